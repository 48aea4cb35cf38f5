"""`combot backup` while the real multi-worker server takes messages: every snapshot is whole and
holds every message acknowledged before it began."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from combot import store
from tests.conftest import LiveServer

FIRST = "The courier left my parcel in the rain and the box was soaked through."


def chatter(base: str, acked: list[tuple[float, str]], stop: threading.Event, errors: list[str]) -> None:
    """One participant after another, each walked to the end; every acknowledged message is noted."""
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            session = client.post(base + "api/sessions", json={}).json()
            expects, text = session["expects"], FIRST
            while expects != "done" and not stop.is_set():
                mid = str(uuid.uuid4())
                reply = client.post(f"{base}api/sessions/{session['session_id']}/messages",
                                    json={"text": text if expects == "message" else "someone@example.com",
                                          "client_message_id": mid})
                if reply.status_code != 200:
                    errors.append(f"{reply.status_code} {reply.text}")
                    return
                acked.append((time.monotonic(), mid))
                expects, text = reply.json()["expects"], "Nobody ever called me back about it."


def stored_ids(database: Path) -> set[str]:
    with sqlite3.connect(database) as conn:
        rows = conn.execute("SELECT client_message_id FROM messages WHERE client_message_id IS NOT NULL")
        return {row[0] for row in rows}


@pytest.mark.slow
def test_snapshots_under_load_hold_every_acknowledged_message(live_server: Callable[..., LiveServer],
                                                               tmp_path: Path) -> None:
    server = live_server(workers=2, env={**os.environ, "COMBOT_RATE_LIMIT": "0"})
    acked: list[tuple[float, str]] = []
    errors: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=chatter, args=(server.url, acked, stop, errors)) for _ in range(6)]
    for thread in threads:
        thread.start()
    report = []
    try:
        deadline = time.monotonic() + 60
        while len(acked) < 30 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        assert len(acked) >= 30, errors
        for n in range(3):
            out = tmp_path / f"snapshot-{n}.db"
            began = time.monotonic()
            before = {mid for moment, mid in list(acked) if moment < began}
            done = subprocess.run([sys.executable, "-m", "combot", "backup", str(out), "--database",
                                   str(server.database)], capture_output=True, text=True, timeout=120)
            ended = time.monotonic()
            assert done.returncode == 0, done.stderr
            during = sum(1 for moment, _ in list(acked) if began <= moment <= ended)
            with sqlite3.connect(out) as conn:
                assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
                assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
            missing = before - stored_ids(out)
            assert not missing, f"{len(missing)} acknowledged messages are not in the snapshot"
            assert stat.S_IMODE(out.stat().st_mode) == 0o600
            report.append((len(before), during))
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not errors, errors[:3]
    # The load really ran across the snapshots: the database kept growing past each of them.
    assert len(stored_ids(server.database)) > len(stored_ids(tmp_path / "snapshot-2.db"))
    print("\n[backup] (messages acknowledged before it began, acknowledged while the backup command ran)"
          f" per snapshot: {report}")


def test_a_backup_replaces_the_old_one_whole_and_refuses_its_own_database(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "combot.db")
    conn.close()
    (tmp_path / "out.db").write_text("yesterday's backup")
    made = store.backup(tmp_path / "combot.db", tmp_path / "out.db")
    assert made.participants == 0 and sqlite3.connect(made.path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(ValueError):
        store.backup(tmp_path / "combot.db", tmp_path / "combot.db")
    with pytest.raises(FileNotFoundError):
        store.backup(tmp_path / "missing.db", tmp_path / "x.db")


def test_the_command(tmp_path: Path, monkeypatch: Any) -> None:
    from click.testing import CliRunner

    from combot.cli import cli

    store.connect(tmp_path / "combot.db").close()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["backup", "copy.db", "--database", "combot.db"])
    assert result.exit_code == 0 and "integrity_check ok" in result.output, result.output
    missing = CliRunner().invoke(cli, ["backup", "copy.db", "--database", "nothing.db"])
    assert missing.exit_code == 1 and "no database at nothing.db" in missing.output
