"""All SQL lives here, behind functions named for what they do to the study's data.

One SQLite file in WAL mode, shared by every worker process. Each process keeps one connection
on one thread (`Store`), so the event loop never waits on the disk. Writes are short
`BEGIN IMMEDIATE` transactions; nothing is ever held only in memory.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import sqlite_utils

from combot.errors import Conflict, Unavailable

T = TypeVar("T")
BUSY_TIMEOUT_MS = 10_000


def now() -> str:
    """UTC, ISO 8601, milliseconds: sorts as text and reads in R, Stata and pandas."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- schema -------------------------------------------------------------------------------------

def _v1(db: sqlite_utils.Database) -> None:
    db["participants"].create({
        "id": str, "token": str, "cell": str, "cell_number": int, "factors": str, "assignment": str,
        "state": str, "version": int, "status": str, "problem_type": str, "scores": str, "turns": int,
        "created_at": str, "updated_at": str, "finished_at": str, "user_agent": str, "url_params": str,
        "platform_id": str,
    }, pk="id", not_null={"token", "cell", "factors", "state", "version", "status", "created_at"})
    db["participants"].create_index(["token"], unique=True)
    db["participants"].create_index(["platform_id"])
    db["participants"].create_index(["cell", "status"])
    db["messages"].create({
        "id": int, "participant_id": str, "turn": int, "sender": str, "kind": str, "text": str,
        "produced_by": str, "model": str, "latency_ms": int, "fallback_reason": str,
        "client_message_id": str, "reply_to": int, "created_at": str,
    }, pk="id", not_null={"participant_id", "turn", "sender", "kind", "text", "created_at"},
        foreign_keys=[("participant_id", "participants", "id")])
    db["messages"].create_index(["participant_id", "id"])
    db["messages"].create_index(["participant_id", "client_message_id"], unique=True)
    db["emails"].create({"participant_id": str, "email": str, "created_at": str}, pk="participant_id",
                        foreign_keys=[("participant_id", "participants", "id")])


def _v2(db: sqlite_utils.Database) -> None:
    """The researcher's side: when consent was given, server errors, and each worker's memory."""
    db["participants"].add_column("consented_at", str)
    db["participants"].create_index(["updated_at"])
    db["messages"].create_index(["created_at"])  # the dashboard looks at the last few minutes
    db["events"].create({"id": int, "at": str, "kind": str, "pid": int, "path": str, "status": int, "detail": str},
                        pk="id", not_null={"at", "kind"})
    db["events"].create_index(["at"])
    db["workers"].create({"pid": int, "started_at": str, "seen_at": str, "rss_bytes": int, "host": str},
                         pk=("pid", "started_at"), not_null={"seen_at"})


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_v1, _v2)
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: str | Path) -> sqlite3.Connection:
    """Open the database and bring its schema up to date (safe when many processes start at once)."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL: in WAL mode, NORMAL may lose the last commits on power loss; FULL syncs the WAL on every
    # commit, so an acknowledged message survives an OS crash.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    migrate(conn)
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    with transaction(conn):
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"the database has schema version {version}; this Combot knows up to {SCHEMA_VERSION}")
        db = sqlite_utils.Database(conn)
        for step in MIGRATIONS[version:]:
            step(db)
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    return SCHEMA_VERSION


class transaction:
    """`BEGIN IMMEDIATE` ... `COMMIT`: takes the write lock up front, so it never fails half-way on a lock."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        if kind is None:
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                # After an I/O error, a full disk or SQLITE_BUSY at COMMIT, SQLite may leave the
                # transaction open; it would hold this process's write lock for good.
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


# --- participants ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class NewMessage:
    sender: str
    kind: str
    text: str
    produced_by: str = "participant"
    model: str | None = None
    latency_ms: int | None = None
    fallback_reason: str | None = None
    client_message_id: str | None = None


def create_participant(
    conn: sqlite3.Connection,
    *,
    participant_id: str,
    token: str,
    choose_cell: Callable[[Mapping[str, int]], tuple[str, int, Mapping[str, str], str]],
    greet: Callable[[Mapping[str, str]], tuple[Mapping[str, Any], Sequence[NewMessage]]],
    user_agent: str = "",
    url_params: Mapping[str, str] | None = None,
    platform_id: str | None = None,
    fill: str = "started",
    active_minutes: float = 30,
    consented: bool = False,
) -> tuple[sqlite3.Row, bool]:
    """Assign a cell and store a new participant with the greeting, atomically across processes.

    `choose_cell` sees the number of participants per cell (counted inside the write lock, so
    concurrent arrivals never over-fill a cell; `fill` says who counts, see `cell_counts`). A
    returning platform id gets its old row back (second value False) instead of a new draw.
    """
    with transaction(conn):
        if platform_id:
            existing = participant_by_platform_id(conn, platform_id)
            if existing is not None:
                return existing, False
        counts = cell_counts(conn, fill, active_minutes)
        label, number, factors, method = choose_cell(counts)
        state, greeting = greet(factors)
        stamp = now()
        conn.execute(
            "INSERT INTO participants (id, token, cell, cell_number, factors, assignment, state, version, status,"
            " turns, created_at, updated_at, user_agent, url_params, platform_id, consented_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 0, 'started', 0, ?, ?, ?, ?, ?, ?)",
            (participant_id, token, label, number, json.dumps(dict(factors)), method, json.dumps(state), stamp, stamp,
             user_agent[:500], json.dumps(dict(url_params or {})), platform_id, stamp if consented else None),
        )
        _insert_messages(conn, participant_id, 0, greeting, None, stamp)
        row = conn.execute("SELECT * FROM participants WHERE id = ?", (participant_id,)).fetchone()
    return row, True


def cell_counts(conn: sqlite3.Connection, fill: str = "started", active_minutes: float = 30) -> dict[str, int]:
    """Participants per cell label as balanced assignment counts them.

    "started": everyone ever given the cell. "finished_or_active": those who finished plus those
    who wrote within the last `active_minutes`, so an abandoned session frees its slot. A decline
    never has a cell and never counts.
    """
    if fill == "finished_or_active":
        rows = conn.execute(
            "SELECT cell, count(*) AS n FROM participants WHERE status = 'finished'"
            " OR (status = 'started' AND updated_at >= ?) GROUP BY cell", (ago(active_minutes * 60),))
    else:
        rows = conn.execute("SELECT cell, count(*) AS n FROM participants WHERE status != 'declined' GROUP BY cell")
    return {row["cell"]: row["n"] for row in rows}


def ago(seconds: float) -> str:
    """The `now()` of `seconds` ago, for comparing with stored timestamps as text."""
    moment = datetime.now(timezone.utc) - timedelta(seconds=seconds)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def participant_by_platform_id(conn: sqlite3.Connection, platform_id: str) -> sqlite3.Row | None:
    """The first session of this recruitment-platform id (a decline is not a session to resume)."""
    return conn.execute("SELECT * FROM participants WHERE platform_id = ? AND status != 'declined'"
                        " ORDER BY created_at LIMIT 1", (platform_id,)).fetchone()


def record_decline(conn: sqlite3.Connection, *, participant_id: str, token: str, user_agent: str = "",
                   url_params: Mapping[str, str] | None = None, platform_id: str | None = None) -> None:
    """A person who saw the consent page and declined: a row without a cell, so it fills none."""
    stamp = now()
    with transaction(conn):
        conn.execute(
            "INSERT INTO participants (id, token, cell, factors, state, version, status, turns, created_at,"
            " updated_at, user_agent, url_params, platform_id) VALUES (?, ?, '', '{}', '{}', 0, 'declined', 0,"
            " ?, ?, ?, ?, ?)",
            (participant_id, token, stamp, stamp, user_agent[:500], json.dumps(dict(url_params or {})), platform_id))


def record_event(conn: sqlite3.Connection, kind: str, *, path: str = "", status: int | None = None,
                 detail: str = "", pid: int | None = None) -> None:
    """Something the dashboard should count, such as a request that failed on the server's side."""
    with transaction(conn):
        conn.execute("INSERT INTO events (at, kind, pid, path, status, detail) VALUES (?, ?, ?, ?, ?, ?)",
                     (now(), kind, pid, path[:200], status, detail[:500]))


def record_worker(conn: sqlite3.Connection, *, pid: int, started_at: str, rss_bytes: int, host: str = "") -> None:
    """A worker's heartbeat with its memory; rows of workers gone for an hour are dropped."""
    stamp = now()
    with transaction(conn):
        conn.execute("INSERT OR REPLACE INTO workers (pid, started_at, seen_at, rss_bytes, host) VALUES (?, ?, ?, ?, ?)",
                     (pid, started_at, stamp, rss_bytes, host))
        conn.execute("DELETE FROM workers WHERE seen_at < ?", (ago(3600),))


def participant_by_token(conn: sqlite3.Connection, token: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM participants WHERE token = ?", (token,)).fetchone()


def transcript(conn: sqlite3.Connection, participant_id: str) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM messages WHERE participant_id = ? ORDER BY id", (participant_id,)).fetchall()


def replies_to(conn: sqlite3.Connection, participant_id: str, client_message_id: str) -> list[sqlite3.Row] | None:
    """The bot's replies to an earlier message with this client id, or None if it never arrived."""
    sent = conn.execute("SELECT id FROM messages WHERE participant_id = ? AND client_message_id = ?",
                        (participant_id, client_message_id)).fetchone()
    if sent is None:
        return None
    return conn.execute("SELECT * FROM messages WHERE reply_to = ? ORDER BY id", (sent["id"],)).fetchall()


def llm_reply_count(conn: sqlite3.Connection, participant_id: str) -> int:
    """How many of the bot's replies to this participant an LLM wrote (for the per-participant cap)."""
    return int(conn.execute("SELECT count(*) FROM messages WHERE participant_id = ? AND produced_by = 'llm'",
                            (participant_id,)).fetchone()[0])


@dataclass(frozen=True)
class Turn:
    participant_id: str
    expected_version: int
    turn: int
    incoming: NewMessage
    replies: Sequence[NewMessage]
    state: Mapping[str, Any]
    status: str
    problem_type: str | None = None
    scores: Mapping[str, float] | None = None
    email: str | None = None


def record_turn(conn: sqlite3.Connection, turn: Turn) -> list[sqlite3.Row]:
    """Store a participant message, the bot's replies and the new state in one transaction.

    Returns the stored replies. A repeat of an already stored client message id returns the replies
    stored the first time and writes nothing; a turn computed from a stale state raises Conflict.
    """
    with transaction(conn):
        if turn.incoming.client_message_id:
            earlier = replies_to(conn, turn.participant_id, turn.incoming.client_message_id)
            if earlier is not None:
                return earlier
        row = conn.execute("SELECT version FROM participants WHERE id = ?", (turn.participant_id,)).fetchone()
        if row is None or row["version"] != turn.expected_version:
            raise Conflict("another message changed this conversation first; reload to continue")
        stamp = now()
        first_id = _insert_messages(conn, turn.participant_id, turn.turn, [turn.incoming], None, stamp)
        _insert_messages(conn, turn.participant_id, turn.turn, turn.replies, first_id, stamp)
        sets = {"state": json.dumps(dict(turn.state)), "version": turn.expected_version + 1, "status": turn.status,
                "turns": turn.turn, "updated_at": stamp}
        if turn.problem_type is not None:
            sets["problem_type"] = turn.problem_type
            sets["scores"] = json.dumps(dict(turn.scores or {}))
        if turn.status == "finished":
            sets["finished_at"] = stamp
        assignments = ", ".join(f"{name} = ?" for name in sets)
        conn.execute(f"UPDATE participants SET {assignments} WHERE id = ?", (*sets.values(), turn.participant_id))
        if turn.email:
            conn.execute("INSERT OR REPLACE INTO emails (participant_id, email, created_at) VALUES (?, ?, ?)",
                         (turn.participant_id, turn.email, stamp))
        return conn.execute("SELECT * FROM messages WHERE reply_to = ? ORDER BY id", (first_id,)).fetchall()


def _insert_messages(conn: sqlite3.Connection, participant_id: str, turn: int, messages: Sequence[NewMessage],
                     reply_to: int | None, stamp: str) -> int:
    last = 0
    for message in messages:
        cursor = conn.execute(
            "INSERT INTO messages (participant_id, turn, sender, kind, text, produced_by, model, latency_ms,"
            " fallback_reason, client_message_id, reply_to, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (participant_id, turn, message.sender, message.kind, message.text, message.produced_by, message.model,
             message.latency_ms, message.fallback_reason, message.client_message_id, reply_to, stamp),
        )
        last = int(cursor.lastrowid or 0)
    return last


def ping(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1").fetchone()[0] == 1


def iter_rows(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> Iterator[sqlite3.Row]:
    yield from conn.execute(sql, params)


# --- the per-process handle -------------------------------------------------------------------------

_UNAVAILABLE = ("locked", "busy", "disk is full", "disk i/o error", "unable to open")


class Store:
    """One connection on one thread per process; `await store.run(fn, ...)` calls `fn(conn, ...)` there."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="combot-db")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._executor, connect, self.path)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._conn is None:
            raise RuntimeError("the store is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, partial(fn, self._conn, *args, **kwargs))
        except sqlite3.OperationalError as error:
            if any(word in str(error).lower() for word in _UNAVAILABLE):
                raise Unavailable("the server is busy storing messages; please try again in a moment") from error
            raise

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)


def wait_for_schema(path: str | Path, attempts: int = 50) -> None:
    """Create or migrate the database once, before workers start (they migrate too; this is just earlier)."""
    for attempt in range(attempts):
        try:
            connect(path).close()
            return
        except sqlite3.OperationalError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1)
