"""The real multi-process server in a subprocess, over loopback."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx
import pytest

from tests.conftest import LiveServer, free_port, walk_conversation

pytestmark = pytest.mark.slow


def worker_pids(server: LiveServer) -> set[int]:
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    return {int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")}


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
