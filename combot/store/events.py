"""What the dashboard watches besides the study: server errors and each worker's heartbeat."""

from __future__ import annotations

import sqlite3
from typing import Any, Mapping, Sequence

from combot.store.timestamps import ago, now
from combot.store.transactions import transaction


def record_events(conn: sqlite3.Connection, events: Sequence[Mapping[str, Any]]) -> None:
    """Events the dashboard counts (server errors), several in one transaction: each a mapping of
    at, kind, pid, path, status and detail."""
    with transaction(conn):
        conn.executemany("INSERT INTO events (at, kind, pid, path, status, detail) VALUES (?, ?, ?, ?, ?, ?)",
                         [(e["at"], e["kind"], e.get("pid"), str(e.get("path", ""))[:200], e.get("status"),
                           str(e.get("detail", ""))[:500]) for e in events])


def record_worker(conn: sqlite3.Connection, *, pid: int, started_at: str, rss_bytes: int, host: str = "") -> None:
    """A worker's heartbeat with its memory; rows of workers gone for an hour are dropped."""
    stamp = now()
    with transaction(conn):
        conn.execute("INSERT OR REPLACE INTO workers (pid, started_at, seen_at, rss_bytes, host) VALUES (?, ?, ?, ?, ?)",
                     (pid, started_at, stamp, rss_bytes, host))
        conn.execute("DELETE FROM workers WHERE seen_at < ?", (ago(3600),))
