"""The real multi-process server in a subprocess, over loopback."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from combot import bench
from tests.conftest import LiveServer, free_port, walk_conversation

pytestmark = pytest.mark.slow


def worker_pids(server: LiveServer) -> set[int]:
    return set(bench.worker_pids(server.process.pid))


def test_whole_conversations_over_loopback_land_in_the_database(live_server: Callable[..., LiveServer]) -> None:
    server = live_server(workers=2)
    with httpx.Client(timeout=30) as client:
        seen = [walk_conversation(client, server.url) for _ in range(3)]
    conn = sqlite3.connect(server.database)
    for walk in seen:
        pid = conn.execute("SELECT participant_id FROM messages m JOIN participants p ON p.id = m.participant_id "
                           "WHERE p.token = ? LIMIT 1", (walk["session_id"],)).fetchone()[0]
        bot = [r[0] for r in conn.execute("SELECT text FROM messages WHERE participant_id=? AND sender='bot' ORDER BY id", (pid,))]
        sent = [r[0] for r in conn.execute("SELECT text FROM messages WHERE participant_id=? AND sender='participant' "
                                           "AND kind='message' ORDER BY id", (pid,))]
        assert bot == walk["bot"]
        assert sent == walk["sent"]
        assert walk["final"]["expects"] == "done"
    assert conn.execute("SELECT count(*) FROM participants WHERE status='finished'").fetchone()[0] == 3
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert server.stop() == 0


def test_a_dead_worker_is_replaced_and_the_others_keep_serving(live_server: Callable[..., LiveServer]) -> None:
    server = live_server(workers=2)
    before = worker_pids(server)
    assert len(before) == 2
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = worker_pids(server)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"worker not replaced:\n{server.output()}")
    assert server.process.poll() is None
    with httpx.Client(timeout=30) as client:
        for _ in range(10):
            assert client.get(server.url + "healthz").status_code == 200
        walk_conversation(client, server.url)
    assert "died" in server.output()


def test_sigterm_stops_cleanly(live_server: Callable[..., LiveServer]) -> None:
    server = live_server(workers=2)
    assert server.stop(signal.SIGTERM) == 0
    assert server.stop(signal.SIGINT) == 0


def test_a_bad_study_file_stops_serve_before_it_binds(tmp_path: Path) -> None:
    bad = tmp_path / "combot.toml"
    bad.write_text('[study]\nfollowup_turns = "four"\n')
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "combot", "serve", "--config", str(bad), "--port", str(port)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode != 0
    assert f"{bad}, line 2" in result.stderr and "followup_turns" in result.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")


def test_bench_against_a_live_study_with_consent_makes_only_synthetic_participants(
        live_server: Callable[..., LiveServer], study_file: Callable[..., Path], tmp_path: Path) -> None:
    study = study_file(replace={"enabled = false": "enabled = true"})
    token = "token-of-the-live-study-0123456789"
    server = live_server(workers=2, config=study, env={**os.environ, "COMBOT_ADMIN_TOKEN": token})
    env = {k: v for k, v in os.environ.items() if k != "COMBOT_ADMIN_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "combot", "bench", "--url", server.url, "--admin-token", token,
                             "--users", "3", "--no-llm"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3/3 finished" in result.stdout
    with sqlite3.connect(server.database) as conn:
        rows = conn.execute("SELECT synthetic, status, study_version FROM participants").fetchall()
    assert len(rows) == 3 and {(r[0], r[1]) for r in rows} == {(1, "finished")}
    from combot import versioning
    from combot.study import load_study
    assert {r[2] for r in rows} == {versioning.stamp(load_study(study, environ={})).version}


def test_a_replacement_worker_serves_the_version_serve_checked_not_an_edited_file(
        live_server: Callable[..., LiveServer], study_file: Callable[..., Path]) -> None:
    study = study_file()
    server = live_server(workers=1, config=study)
    with httpx.Client(timeout=30) as client:
        assert client.post(server.url + "api/sessions", json={}).status_code == 201
        study.write_text(study.read_text().replace("followup_turns = 4", "followup_turns = 1"))
        (victim,) = worker_pids(server)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = worker_pids(server)
            if now and victim not in now:
                try:
                    if client.get(server.url + "healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        seen = walk_conversation(client, server.url)
    assert len(seen["sent"]) == 5  # the first message and four follow-ups: the checked version, not the edit
    with sqlite3.connect(server.database) as conn:
        assert len({r[0] for r in conn.execute("SELECT study_version FROM participants")}) == 1


def test_serve_refuses_what_check_refuses_in_one_line_before_it_binds(study_file: Callable[..., Path],
                                                                     tmp_path: Path) -> None:
    bad = study_file(replace={"threshold = 0.4": "threshold = 4"})
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "combot", "serve", "--config", str(bad), "--port", str(port),
                             "--database", str(tmp_path / "study.db")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    line = next(n for n, text in enumerate(bad.read_text().splitlines(), start=1) if "threshold = 4" in text)
    assert result.returncode == 1
    assert result.stderr == f"Error: {bad}, line {line}: [classifier.threshold] must be between 0 and 1, not 4\n"
    assert result.stdout == ""  # no banner, no worker tracebacks
    assert not (tmp_path / "study.db").exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")


def test_serve_refuses_an_llm_timeout_the_request_timeout_would_cut_short(study_file: Callable[..., Path],
                                                                           tmp_path: Path) -> None:
    study = study_file(replace={'base_url = ""': 'base_url = "http://127.0.0.1:9/v1"'})
    result = subprocess.run([sys.executable, "-m", "combot", "serve", "--config", str(study), "--port",
                             str(free_port()), "--request-timeout", "3", "--database", str(tmp_path / "study.db")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    line = next(n for n, text in enumerate(study.read_text().splitlines(), start=1) if text == "timeout = 4.0")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"Error: {study}, line {line}: [llm.timeout] must be shorter than [server] request_timeout"
                             " (3 s, from --request-timeout), not 4 s: a hanging LLM would end a participant's turn"
                             " in an error instead of the offline text\n")
    assert not (tmp_path / "study.db").exists()


# --- one server per database; a port, a database or a disk that cannot be used (issue 12) ---------

def serve_once(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`combot serve` expected to refuse: it must exit by itself, quickly."""
    return subprocess.run([sys.executable, "-m", "combot", "serve", "--host", "127.0.0.1", "--workers", "1",
                           "--access-log", "", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_a_second_serve_of_the_same_database_exits_at_once_and_leaves_the_first_alone(
        live_server: Callable[..., LiveServer], tmp_path: Path) -> None:
    first = live_server(workers=1)
    port = int(first.url.rsplit(":", 1)[1].strip("/"))
    with httpx.Client(timeout=30) as client:
        session = client.post(first.url + "api/sessions", json={}).json()["session_id"]
        for second_port in (port, free_port()):
            result = serve_once(["--port", str(second_port), "--database", str(first.database)], tmp_path)
            assert result.returncode == 1 and result.stdout == ""
            assert result.stderr == (f"Error: combot.db is being served by pid {first.process.pid} on port {port}:"
                                     " stop that server first, or serve another database with --database\n")
        assert first.process.poll() is None
        reply = client.post(f"{first.url}api/sessions/{session}/messages",
                            json={"text": "My parcel never came.", "client_message_id": "m1"})
        assert reply.status_code == 200
    # Once the first has stopped (even killed), the database can be served again.
    first.stop(signal.SIGKILL)
    again = live_server(workers=1, database=first.database)
    assert httpx.get(again.url + "healthz", timeout=30).status_code == 200


def test_workers_whose_supervisor_is_killed_finish_and_exit(live_server: Callable[..., LiveServer]) -> None:
    """kill -9 of the supervisor (or the out-of-memory killer) used to leave its workers serving the
    port, unsupervised, until each was killed by hand; they now notice within ~0.1 s and stop."""
    server = live_server(workers=2)
    workers = set()
    deadline = time.monotonic() + 60
    while len(workers) < 2 and time.monotonic() < deadline:
        workers = worker_pids(server)
    assert len(workers) == 2, server.output()
    forkserver = set(bench._children(server.process.pid))
    port = int(server.url.rsplit(":", 1)[1].strip("/"))
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    deadline = time.monotonic() + 30
    while any(b"combot" in bench._cmdline(pid) for pid in workers | forkserver):  # b"": gone (or a zombie)
        assert time.monotonic() < deadline, f"still running: {workers | forkserver}"
        time.sleep(0.05)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_a_port_in_use_is_one_line_even_when_another_combot_holds_it(
        live_server: Callable[..., LiveServer], tmp_path: Path) -> None:
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = serve_once(["--port", str(port), "--database", str(tmp_path / "a.db")], tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"Error: port {port} is already in use by another program: stop it, or serve on"
                             " another port with --port (or [server] port)\n")
    # Another Combot (another database) on the same port: refused, not sharing its connections.
    first = live_server(workers=2, database=tmp_path / "first.db")
    port = int(first.url.rsplit(":", 1)[1].strip("/"))
    result = serve_once(["--port", str(port), "--database", str(tmp_path / "second.db"), "--workers", "2"], tmp_path)
    assert result.returncode == 1 and f"port {port} is already in use" in result.stderr
    assert first.process.poll() is None


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount(size) -> a fresh tmpfs of that size (root only; the test is skipped otherwise)."""
    mounts: list[Path] = []

    def mount(size: str = "8m") -> Path:
        where = tmp_path / f"mnt{len(mounts)}"
        where.mkdir()
        done = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                                     str(where)], capture_output=True).returncode == 0
        if not done:
            pytest.skip("mounting a tmpfs is not permitted here")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_read_only_database_is_refused_by_serve_and_exported(small_mount: Callable[..., Path],
                                                                tmp_path: Path) -> None:
    from combot import store

    archive = small_mount()
    database = archive / "combot.db"
    conn = store.connect(database)
    conn.execute("INSERT INTO participants (id, token, cell, factors, state, version, status, created_at)"
                 " VALUES ('p1', 't1', 'basic-high-high', '{}', '{}', 0, 'started', '2026-01-01T00:00:00.000Z')")
    conn.close()
    before = sorted(p.name for p in archive.iterdir())
    assert subprocess.run(["mount", "-o", "remount,ro", str(archive)], capture_output=True).returncode == 0
    result = serve_once(["--port", str(free_port()), "--database", str(database)], tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"Error: {database} is read-only: serve needs to write to it. Serve a writable copy"
                             " with --database, or read it with `combot export`, which works on read-only"
                             " databases\n")
    exported = subprocess.run([sys.executable, "-m", "combot", "export", "--database", str(database),
                               "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert "p1" in (tmp_path / "out" / "participants.csv").read_text()
    assert sorted(p.name for p in archive.iterdir()) == before  # nothing written beside it


def test_a_full_disk_at_start_is_one_line(small_mount: Callable[..., Path], tmp_path: Path) -> None:
    disk = small_mount("2m")
    filler = disk / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    result = serve_once(["--port", str(free_port()), "--database", str(disk / "combot.db")], tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"Error: the disk holding {disk / 'combot.db'} is full (")
    assert result.stderr.endswith("free): free some space first; serve needs room for new messages and the"
                                  " write-ahead log\n")


def self_signed(folder: Path, also: str = "") -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and `also`, a DNS name) and its key, made by the openssl command line."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is missing and CI is set: install Debian's openssl package")
        pytest.skip("openssl is not installed")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1" + (f",DNS:{also}" if also else "")],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_https_by_hypercorn_itself(live_server: Callable[..., LiveServer], tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    server = live_server(workers=2, extra=["--certfile", str(cert), "--keyfile", str(key)], verify=trust,
                         env={**os.environ, "COMBOT_ADMIN_TOKEN": "tls-test-token-0123456789"})
    assert server.url.startswith("https://127.0.0.1:")
    assert "participants open: https://127.0.0.1:" in server.output()
    with httpx.Client(timeout=30, verify=trust) as client:
        seen = walk_conversation(client, server.url)
        assert seen["final"]["expects"] == "done"
        login = client.post(server.url + "admin/login", data={"token": "tls-test-token-0123456789"},
                            follow_redirects=False)
        assert login.status_code == 303 and "; secure" in login.headers["set-cookie"].lower()
    with httpx.Client(timeout=30, verify=trust, http2=False) as client:
        assert client.get(server.url + "healthz").http_version == "HTTP/1.1"
    # Plain HTTP on the TLS port is refused rather than served.
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url.replace("https://", "http://") + "healthz", timeout=5)


def test_half_a_certificate_is_refused(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    done = subprocess.run([sys.executable, "-m", "combot", "serve", "--certfile", str(cert), "--port", str(free_port()),
                           "--database", str(tmp_path / "x.db")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--certfile and --keyfile" in done.stderr


def test_what_the_forkserver_preloads_starts_no_thread_and_leaves_onnxruntime_out() -> None:
    """Workers are forked from the process that imported combot.preload: forking a process with a
    second thread (onnxruntime starts one at import) could leave a child holding a lock forever."""
    probe = ("import os, sys, combot.preload; "
             "print(len(os.listdir('/proc/self/task')), 'onnxruntime' in sys.modules, 'sqlite_utils' in sys.modules,"
             " 'click' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    # Nor httpx's command-line tool (click, and rich when installed): memory in every worker.
    assert out.stdout.split() == ["1", "False", "False", "False"]


def test_after_the_preload_an_llm_call_imports_nothing_and_still_works(fake) -> None:  # type: ignore[no-untyped-def]
    """A worker's first LLM call in a launch burst must not import httpx's connection pool or
    anyio's backend (nor search sys.path for sniffio at every call); and with sniffio blocked,
    httpcore must still run on asyncio."""
    probe = (
        "import asyncio, sys, combot.preload\n"
        "from combot import llm\n"
        "searched = []\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        searched.append(name)\n"
        "sys.meta_path.insert(0, Spy())\n"
        "async def go():\n"
        f"    async with llm.LLM(llm.LLMConfig(base_url={fake.url!r}, model='fake-llm')) as client:\n"
        "        before = set(sys.modules)\n"
        "        first = await client.complete('You are kind.', 'My parcel never came.')\n"
        "        second = await client.complete('You are kind.', 'Still nothing.')\n"
        "        print(type(first).__name__, type(second).__name__, sorted(set(sys.modules) - before), searched)\n"
        "asyncio.run(go())\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["LLMReply", "LLMReply", "[]", "[]"]


def test_the_access_log_names_participants_never_their_session_tokens(live_server: Callable[..., LiveServer],
                                                                       tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    server = live_server(workers=1, extra=["--access-log", str(access)])
    with httpx.Client(timeout=30) as client:
        seen = walk_conversation(client, server.url, params={"PROLIFIC_PID": "pp-secret-123"})
        client.get(server.url + "api/sessions/not-a-real-session-token")
    assert server.stop() == 0
    log = access.read_text()
    with sqlite3.connect(server.database) as conn:
        (pid,) = conn.execute("SELECT id FROM participants").fetchone()
    assert f"POST /api/sessions/{pid}/messages" in log and "GET /api/sessions/[unknown session]" in log
    assert seen["session_id"] not in log and "pp-secret-123" not in log and "not-a-real-session-token" not in log
    assert seen["session_id"] not in server.output()
