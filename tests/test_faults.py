"""Faults that really happen to a running study, done for real: a worker killed with SIGKILL under
load, SIGTERM under load and a restart, the database locked for longer than the busy timeout, and
a full disk. After each, every message a participant was acknowledged is in the database exactly
once, and the database passes `PRAGMA integrity_check`.

Run with `-s` to see the figures.
"""

from __future__ import annotations

import asyncio
import http.client as http_client
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
from starlette.testclient import TestClient

from combot import store, web
from combot.fakellm import running_fake_llm
from combot.study import load_study
from tests import faultload
from tests.conftest import DEFAULT_STUDY, LiveServer
from tests.faultload import Crowd, Person
from tests.inprocess import FakeClassifier
from tests.test_server import worker_pids

CROWD = 200  # simulated participants in the crash test
LOAD_SECONDS = 90.0  # the crowd stops sending new messages after this long, whatever happens


@pytest.fixture
def fake_llm() -> Iterator[dict[str, str]]:
    """The environment of a server whose paraphrase turns go to a fake LLM that takes 1 s, as a real
    one might: requests then really are inside a worker when it is killed."""
    with running_fake_llm(latency=1.0) as url:
        yield {"COMBOT_LLM_URL": url, "COMBOT_LLM_MODEL": "fake-llm", "COMBOT_LLM_TIMEOUT": "5",
               "COMBOT_REPLY_TIMING": "none"}


def report(name: str, **figures: Any) -> None:
    print(f"\n[{name}] " + ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in figures.items()))


def all_workers_up(server: LiveServer, workers: int, timeout: float = 60) -> set[int]:
    """Wait until `workers` workers run and each has answered (each loads its model at start)."""
    deadline = time.monotonic() + timeout
    answered: set[int] = set()
    while time.monotonic() < deadline:
        pids = worker_pids(server)
        if len(pids) == workers:
            try:
                answered.add(httpx.get(server.url + "healthz", timeout=5).json()["pid"])
            except httpx.HTTPError:
                pass
            if pids <= answered:
                return pids
        time.sleep(0.05)
    raise AssertionError(f"{workers} workers did not come up:\n{server.output()}")


def assert_exactly_once(database: Path, people: list[Person]) -> faultload.Tally:
    result = faultload.tally(database, people)
    assert result.missing == 0, result
    assert result.found == result.acknowledged, result
    assert result.unacknowledged_stored == 0, result
    assert result.duplicate_client_ids == 0, result
    assert result.out_of_order == 0, result
    return result


# --- crash --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_of_a_worker_under_load_loses_no_acknowledged_message(live_server: Callable[..., LiveServer],
                                                                     fake_llm: dict[str, str]) -> None:
    server = live_server(workers=3, env={**os.environ, **fake_llm})
    before = all_workers_up(server, 3)
    crowd = Crowd(server.url, CROWD, think=(0.2, 0.5), arrive_over=4.0, deadline=time.monotonic() + LOAD_SECONDS)
    figures: dict[str, Any] = {}

    async def scenario() -> None:
        async with faultload.client(CROWD) as http:
            load = asyncio.create_task(crowd.run(http))
            # Strike when most participants are mid-conversation and many requests are in flight. The
            # worker with the most sockets can still hold none of the requests in flight at that instant:
            # then no request was cut, and the strike is repeated (at most 3 times) on a new worker.
            victims: list[int] = figures.setdefault("victims", [])
            while len(victims) < 3 and sum(p.cut for p in crowd.people) == 0:
                while not load.done() and not (crowd.under_load() >= CROWD // 2 and crowd.in_flight() >= 20
                                               and sum(p.turn >= 2 for p in crowd.people) >= CROWD // 4):
                    await asyncio.sleep(0.02)
                if load.done():
                    break
                if victims:
                    await asyncio.to_thread(all_workers_up, server, 3)
                victim = max(worker_pids(server), key=_open_sockets)
                figures.setdefault("under_load", crowd.under_load())
                figures.setdefault("in_flight", crowd.in_flight())
                figures.setdefault("acknowledged_before_kill", sum(p.acknowledged for p in crowd.people))
                os.kill(victim, signal.SIGKILL)
                victims.append(victim)
                # A cut shows at once (the kernel closes the dead worker's sockets); wait briefly for it.
                deadline = time.monotonic() + 2.0
                while sum(p.cut for p in crowd.people) == 0 and time.monotonic() < deadline and not load.done():
                    await asyncio.sleep(0.02)
            await load
            # A participant still without an answer at the deadline: the page retries, so do they.
            crowd.deadline = time.monotonic() + 60
            await crowd.run(http)

    started = time.monotonic()
    asyncio.run(scenario())
    seconds = time.monotonic() - started

    after = all_workers_up(server, 3)
    victims = figures["victims"]
    assert victims and not set(victims) & after and len(after - before) == len(victims), (victims, before, after)
    assert "died" in server.output()
    errors = [e for p in crowd.people for e in p.errors]
    assert errors == [], errors[:5]
    assert all(p.finished for p in crowd.people)
    cut = sum(p.cut for p in crowd.people)
    assert cut >= 1, "the kill cut no request: the test did not test a crash"
    result = assert_exactly_once(server.database, crowd.people)
    assert faultload.integrity(server.database) == "ok"
    assert server.stop() == 0
    report("crash", participants=CROWD, under_load_when_killed=figures["under_load"],
           requests_in_flight_when_killed=figures["in_flight"],
           acknowledged_before_kill=figures["acknowledged_before_kill"], requests_cut_and_retried=cut,
           answered_503=sum(p.unavailable for p in crowd.people),
           messages_acknowledged=result.acknowledged, messages_found=result.found,
           duplicates=result.unacknowledged_stored + result.duplicate_client_ids,
           strikes=len(victims), replacement_workers=sorted(after - before), load_seconds=round(seconds, 1))


def _open_sockets(pid: int) -> int:
    """How many sockets a worker holds: the one with the most connections is the one to kill."""
    count = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            except OSError:
                pass
    except OSError:
        pass
    return count


# --- graceful stop --------------------------------------------------------------------------------

STOP_CROWD = 120


@pytest.mark.slow
def test_sigterm_under_load_then_a_restart_resumes_every_conversation(live_server: Callable[..., LiveServer],
                                                                       fake_llm: dict[str, str]) -> None:
    env = {**os.environ, **fake_llm}
    server = live_server(workers=2, env=env)
    all_workers_up(server, 2)
    # Participants keep writing through the stop; a cut request is not retried until the restart.
    crowd = Crowd(server.url, STOP_CROWD, think=(0.2, 0.5), arrive_over=3.0, retry_cut=False,
                  deadline=time.monotonic() + LOAD_SECONDS)
    figures: dict[str, Any] = {}

    async def until_stopped() -> None:
        async with faultload.client(STOP_CROWD) as http:
            load = asyncio.create_task(crowd.run(http))
            while not load.done() and not (crowd.under_load() >= STOP_CROWD // 2 and crowd.in_flight() >= 10
                                           and sum(p.turn >= 2 for p in crowd.people) >= STOP_CROWD // 4):
                await asyncio.sleep(0.02)
            in_flight = [p for p in crowd.people if p.in_flight]
            turns = {p.index: p.turn for p in in_flight}
            figures.update(under_load=crowd.under_load(), in_flight=len(in_flight))
            server.process.send_signal(signal.SIGTERM)
            await load
            figures["in_flight_answered"] = sum(p.turn > turns[p.index] for p in in_flight)
            figures["in_flight_cut"] = len(in_flight) - figures["in_flight_answered"]

    started = time.monotonic()
    asyncio.run(until_stopped())
    assert server.process.wait(60) == 0, server.output()
    figures["stop_seconds"] = round(time.monotonic() - started, 1)
    assert crowd.other_status == [], [e for p in crowd.people for e in p.errors][:5]
    # Graceful: requests already inside a worker got their replies after the signal.
    assert figures["in_flight_answered"] >= 1, figures
    stopped = faultload.tally(server.database, crowd.people)
    assert stopped.missing == 0 and stopped.found == stopped.acknowledged, stopped
    assert faultload.integrity(server.database) == "ok"

    restarted = live_server(workers=2, env=env, database=server.database)
    resumed_with_pending = 0
    with httpx.Client(timeout=60) as http:
        for person in crowd.people:
            if not person.session_id:
                continue
            body = http.get(f"{restarted.url}api/sessions/{person.session_id}").json()
            transcript = [("bot" if m["from"] == "bot" else "participant", m["text"]) for m in body["messages"]]
            assert transcript[:len(person.seen)] == person.seen
            if person.pending is None:
                assert transcript == person.seen and body["expects"] == person.expects
            elif len(transcript) > len(person.seen):
                # Stored but its answer never arrived: the retry below must get the stored replies.
                resumed_with_pending += 1
                assert transcript[len(person.seen)][0] == "participant"
    # Graceful means a request a worker started was answered: no message stored without its reply.
    assert resumed_with_pending == 0
    crowd.base, crowd.retry_cut, crowd.deadline = restarted.url, True, time.monotonic() + LOAD_SECONDS

    async def resume() -> None:
        async with faultload.client(STOP_CROWD) as http:
            await crowd.run(http)

    asyncio.run(resume())
    errors = [e for p in crowd.people for e in p.errors]
    assert crowd.other_status == [] and all(p.finished for p in crowd.people), errors[:5]
    result = assert_exactly_once(server.database, crowd.people)
    assert restarted.stop() == 0
    assert faultload.integrity(server.database) == "ok"
    report("stop", participants=STOP_CROWD, under_load_at_sigterm=figures["under_load"],
           requests_in_flight_at_sigterm=figures["in_flight"], of_which_answered=figures["in_flight_answered"],
           of_which_cut_before_acknowledgement=figures["in_flight_cut"], exit_code=0,
           acknowledged_before_stop=stopped.acknowledged, found_after_stop=stopped.found,
           stored_but_unanswered_then_resumed=resumed_with_pending,
           messages_acknowledged=result.acknowledged, messages_found=result.found,
           duplicates=result.unacknowledged_stored + result.duplicate_client_ids)


# --- power loss, a database locked for long, a full disk ------------------------------------------

@pytest.fixture
def app_client(monkeypatch: pytest.MonkeyPatch,
               started_app: Callable[..., TestClient]) -> Callable[..., TestClient]:
    """app_client(database, **environ) -> a started in-process TestClient (stand-in classifier)."""
    monkeypatch.setattr(web, "load_classifier", lambda study: FakeClassifier())

    def make(database: Path, **environ: str) -> TestClient:
        return started_app(load_study(DEFAULT_STUDY, environ=environ), database)
    return make


def on_worker_connection(c: TestClient, fn: Callable[[sqlite3.Connection], Any], reader: bool = False) -> Any:
    """Run `fn` on the very connection (and thread) the app's store writes with (or reads with)."""
    handle = c.app.state.resources.store  # type: ignore[attr-defined]
    return c.portal.call(handle.read if reader else handle.run, fn)


def snapshot(database: Path) -> tuple[Any, ...]:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return (conn.execute("SELECT id, version, turns, state, status FROM participants ORDER BY id").fetchall(),
                conn.execute("SELECT id, sender, text, client_message_id FROM messages ORDER BY id").fetchall(),
                conn.execute("SELECT count(*) FROM emails").fetchone())
    finally:
        conn.close()


def test_a_worker_connection_survives_power_loss_settings(app_client: Callable[..., TestClient], tmp_path: Path) -> None:
    # WAL with synchronous=FULL: every commit fsyncs the WAL before the participant gets the reply,
    # so an acknowledged message survives an OS crash or power cut (NORMAL would not: it syncs only
    # at checkpoints and may lose the last commits).
    c = app_client(tmp_path / "study.db")

    def pragmas(conn: sqlite3.Connection) -> tuple[Any, ...]:
        return tuple(conn.execute(f"PRAGMA {name}").fetchone()[0] for name in ("journal_mode", "synchronous",
                                                                                 "busy_timeout"))

    assert on_worker_connection(c, pragmas) == ("wal", 2, store.BUSY_TIMEOUT_MS)  # 2: FULL
    assert on_worker_connection(c, pragmas, reader=True) == ("wal", 2, store.BUSY_TIMEOUT_MS)
    assert faultload.integrity(tmp_path / "study.db") == "ok"


def test_a_database_locked_for_long_gets_503_and_the_same_request_then_succeeds(
        app_client: Callable[..., TestClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Where it is declared: connect() and the writer's patience (store/handle.py) both read it there.
    monkeypatch.setattr(store.schema, "BUSY_TIMEOUT_MS", 200)
    database = tmp_path / "study.db"
    c = app_client(database)
    session = c.post("/api/sessions", json={}).json()["session_id"]
    message = {"text": "My parcel never arrived and the courier lied about it.", "client_message_id": "locked-1"}
    before = snapshot(database)

    blocker = sqlite3.connect(database, isolation_level=None, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock far past the busy timeout
    try:
        refused = c.post(f"/api/sessions/{session}/messages", json=message)
        assert refused.status_code == 503 and "try again" in refused.json()["error"]
        new = c.post("/api/sessions", json={})
        assert new.status_code == 503 and "try again" in new.json()["error"]
        assert c.get(f"/api/sessions/{session}").status_code == 200  # reading (resuming) still works
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert snapshot(database) == before  # nothing half-written

    answered = c.post(f"/api/sessions/{session}/messages", json=message)
    assert answered.status_code == 200 and answered.json()["replies"]
    assert c.post(f"/api/sessions/{session}/messages", json=message).json() == answered.json()
    assert c.post("/api/sessions", json={}).status_code == 201
    after = snapshot(database)
    assert [m[3] for m in after[1]].count("locked-1") == 1
    assert faultload.integrity(database) == "ok"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path | None]:
    """A 4 MB tmpfs mounted for the test (a real filesystem that fills up), or None where mounting
    is not permitted (not root, or a container without CAP_SYS_ADMIN)."""
    where = tmp_path / "tiny"
    where.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(where)], capture_output=True).returncode == 0
    try:
        yield where if mounted else None
    finally:
        if mounted:
            unmounted = subprocess.run(["umount", str(where)], capture_output=True)
            if unmounted.returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)
                pytest.fail(f"the tmpfs was still busy at teardown: {unmounted.stderr.decode()}")


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; returns it (delete it to free the space)."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out:
        for size in (1 << 16, 1 << 12, 1 << 9):
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError:
                continue
    return filler


@pytest.mark.parametrize("how", ["tmpfs", "max_page_count"])
def test_a_full_disk_gets_503_and_the_same_request_succeeds_once_space_is_freed(
        tiny_disk: Path | None, app_client: Callable[..., TestClient], tmp_path: Path, how: str) -> None:
    # tiny_disk comes first: set up before the app, unmounted after it has closed its files.
    if how == "tmpfs" and tiny_disk is None:
        pytest.skip("mounting a tmpfs is not permitted here; the max_page_count variant stands in")
    database = (tiny_disk if how == "tmpfs" else tmp_path) / "study.db"  # type: ignore[operator]
    c = app_client(database, COMBOT_ADMIN_TOKEN="not-stored-on-the-tiny-disk")
    session = c.post("/api/sessions", json={}).json()["session_id"]
    before = snapshot(database)

    if how == "tmpfs":
        assert tiny_disk is not None
        filler = fill(tiny_disk)

        def clear() -> None:
            filler.unlink()
    else:
        # No mount: the worker's own connection may not grow the file past its current size.
        pages = on_worker_connection(c, lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
        on_worker_connection(c, lambda conn: conn.execute(f"PRAGMA max_page_count = {pages}").fetchall())

        def clear() -> None:
            on_worker_connection(c, lambda conn: conn.execute("PRAGMA max_page_count = 1073741823").fetchall())

    refused: list[dict[str, str]] = []
    try:
        for attempt in range(20):  # a write may still fit in space already allocated
            message = {"text": f"Attempt {attempt}: my order arrived broken. " + "x" * 1500,
                       "client_message_id": f"full-{attempt}"}
            ahead = snapshot(database)
            response = c.post(f"/api/sessions/{session}/messages", json=message)
            if response.status_code == 503:
                assert "try again" in response.json()["error"]
                assert snapshot(database) == ahead  # the refused turn left nothing behind
                refused.append(message)
                break
            assert response.status_code == 200, response.text
        assert refused, "the disk never filled up"
        assert c.get(f"/api/sessions/{session}").status_code == 200
    finally:
        clear()

    retried = c.post(f"/api/sessions/{session}/messages", json=refused[0])
    assert retried.status_code == 200 and retried.json()["replies"]
    assert c.post(f"/api/sessions/{session}/messages", json=refused[0]).json() == retried.json()
    assert c.post("/api/sessions", json={}).status_code == 201
    after = snapshot(database)
    assert [m[3] for m in after[1]].count(refused[0]["client_message_id"]) == 1
    assert len(after[1]) > len(before[1])
    assert faultload.integrity(database) == "ok"
    report("disk full", method=how, writes_accepted_before_full=attempt, refused_with_503=len(refused),
           same_request_after_freeing="200, stored once")


def test_a_commit_that_fails_never_leaves_the_transaction_open(tmp_path: Path) -> None:
    # SQLite may or may not roll back by itself after an I/O error at COMMIT; a transaction left
    # open would keep this worker's write lock and fail every later request.
    conn = store.connect(tmp_path / "study.db")

    class FailingCommit:
        in_transaction = property(lambda self: conn.in_transaction)

        def execute(self, sql: str, *args: Any) -> Any:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            return conn.execute(sql, *args)

    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        with store.transaction(FailingCommit()):  # type: ignore[arg-type]
            conn.execute("INSERT INTO meta (key, value) VALUES ('half', 'written')")
    assert not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM meta WHERE key = 'half'").fetchone()[0] == 0


# --- a held answer ----------------------------------------------------------------------------------

HELD = '\n[[timing]]\nmode = "typing"\nbase = 8\njitter = 0\nmin = 8\nmax = 8\n'


def _stored(database: Path, token: str, client_id: str) -> list[tuple[str, str]]:
    """The turn stored for `client_id`: the participant's message and the replies, as (sender, text)."""
    conn = sqlite3.connect(database)
    try:
        first = conn.execute("SELECT m.id, m.text FROM messages m JOIN participants p ON p.id = m.participant_id"
                             " WHERE p.token = ? AND m.client_message_id = ?", (token, client_id)).fetchall()
        if not first:
            return []
        assert len(first) == 1, first
        replies = conn.execute("SELECT text FROM messages WHERE reply_to = ? ORDER BY id", (first[0][0],)).fetchall()
        return [("participant", first[0][1])] + [("bot", r[0]) for r in replies]
    finally:
        conn.close()


@pytest.mark.slow
def test_a_worker_killed_or_stopped_while_it_holds_an_answer_loses_nothing_acknowledged(
        live_server: Callable[..., LiveServer], study_file: Callable[..., Path]) -> None:
    """A turn is stored only when its first reply is due. kill -9 of the worker while it holds one:
    the client has no answer and nothing is stored; the page's retry (same client_message_id) is
    answered by the replacement worker and stored once. SIGTERM while a worker holds one: the
    answer still goes out, and what the client got is on disk."""
    config = study_file(append=HELD)
    server = live_server(workers=1, config=config, env={**os.environ, "COMBOT_RATE_LIMIT": "0"})
    (worker,) = all_workers_up(server, 1)
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    with httpx.Client(timeout=60) as http:
        token = http.post(server.url + "api/sessions", json={}).json()["session_id"]
        path = f"/api/sessions/{token}/messages"
        opened = http.post(server.url + path[1:], json={"text": "My parcel never arrived at all.",
                                                        "client_message_id": "m0"})
        assert opened.status_code == 200, opened.text

        body = {"text": "Nobody answered my calls for a week.", "client_message_id": "m1"}
        sockets = _open_sockets(worker)
        conn = http_client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        deadline = time.monotonic() + 30
        while _open_sockets(worker) <= sockets:  # the worker has taken the request: it holds it 8 s
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(worker, signal.SIGKILL)
        with pytest.raises((http_client.HTTPException, OSError)):
            conn.getresponse()
        conn.close()
        assert _stored(server.database, token, "m1") == []  # killed before its reply was due: not stored

        (replacement,) = all_workers_up(server, 1)
        assert replacement != worker
        retried = http.post(server.url + path[1:], json=body)
        assert retried.status_code == 200, retried.text
        got = [("participant", body["text"])] + [("bot", r["text"]) for r in retried.json()["replies"]]
        assert _stored(server.database, token, "m1") == got
        again = http.post(server.url + path[1:], json=body)  # a late duplicate is answered from the store
        assert again.json() == retried.json()

        body = {"text": "They said it was my fault.", "client_message_id": "m2"}
        sockets = _open_sockets(replacement)
        conn = http_client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        deadline = time.monotonic() + 30
        while _open_sockets(replacement) <= sockets:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        response = conn.getresponse()  # graceful: the held answer still goes out
        assert response.status == 200
        answer = json.loads(response.read())
        conn.close()
    assert server.process.wait(60) == 0, server.output()
    assert _stored(server.database, token, "m2") == ([("participant", body["text"])]
                                                     + [("bot", r["text"]) for r in answer["replies"]])
    assert faultload.integrity(server.database) == "ok"


@pytest.mark.slow
def test_a_reply_held_past_the_graceful_timeout_is_cut_unstored_and_the_retry_is_answered(
        live_server: Callable[..., LiveServer], study_file: Callable[..., Path]) -> None:
    """SIGTERM with a reply held longer than `graceful_timeout`: the request is cut before the turn is
    stored (the client got nothing, so nothing acknowledged is lost); after a restart the page's retry
    is worked out again, held and stored once."""
    config = study_file(append=HELD)
    env = {**os.environ, "COMBOT_RATE_LIMIT": "0"}
    server = live_server(workers=1, config=config, env=env, extra=["--graceful-timeout", "1"])
    (worker,) = all_workers_up(server, 1)
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    with httpx.Client(timeout=60) as http:
        token = http.post(server.url + "api/sessions", json={}).json()["session_id"]
        body = {"text": "My parcel never arrived at all.", "client_message_id": "m0"}
        sockets = _open_sockets(worker)
        conn = http_client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", f"/api/sessions/{token}/messages", json.dumps(body), {"Content-Type": "application/json"})
        deadline = time.monotonic() + 30
        while _open_sockets(worker) <= sockets:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        try:
            status = conn.getresponse().status
        except (http_client.HTTPException, OSError):
            status = None
        conn.close()
        assert server.process.wait(60) == 0, server.output()
        assert status is None or status >= 500, status
        assert _stored(server.database, token, "m0") == []

        restarted = live_server(workers=1, config=config, env=env, database=server.database)
        retried = http.post(f"{restarted.url}api/sessions/{token}/messages", json=body)
        assert retried.status_code == 200, retried.text
        assert _stored(server.database, token, "m0") == ([("participant", body["text"])]
                                                         + [("bot", r["text"]) for r in retried.json()["replies"]])
