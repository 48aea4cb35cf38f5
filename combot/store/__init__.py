"""All SQL lives here, behind functions named for what they do to the study's data.

One SQLite file in WAL mode, shared by every worker process. Each process reads on one thread
and writes on another (`Store`), so the event loop never waits on the disk. Writes are short
`BEGIN IMMEDIATE` transactions, group-committed; nothing is ever held only in memory.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import queue
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import quote

if TYPE_CHECKING:
    import sqlite_utils

from combot import chain
from combot.errors import CollectionClosed, Conflict, Unavailable

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


def _v3(db: sqlite_utils.Database) -> None:
    """One person, one participant; one answer, one question (issue 11).

    `client_key`: the page's idempotency key for creating a session or a decline (unique, so no
    two rows can ever hold one). `stage` and `expects` on a participant message (and the greeting):
    what the engine decided after that turn, so a repeated request is answered from the stored
    decision. `scores` on a message: the classifier's verdict on every opening attempt.
    `described_experience`: whether the participant's opening described an experience at all.
    """
    db["participants"].add_column("client_key", str)
    db["participants"].add_column("described_experience", int)
    db["participants"].create_index(["client_key"], unique=True)
    db["messages"].add_column("stage", str)
    db["messages"].add_column("expects", str)
    db["messages"].add_column("scores", str)
    # Turns stored by an older Combot: what came next is read once from the replies they got (through
    # the reply_to index of v4, made here first: without it each row scans every message).
    db["messages"].create_index(["reply_to"], if_not_exists=True)
    db.execute(
        "UPDATE messages SET expects = CASE"
        " WHEN EXISTS (SELECT 1 FROM messages r WHERE r.reply_to = messages.id AND r.kind = 'thanks') THEN 'done'"
        " WHEN EXISTS (SELECT 1 FROM messages r WHERE r.reply_to = messages.id AND r.kind IN ('closing', 'email_retry'))"
        " THEN 'email' ELSE 'message' END WHERE sender = 'participant'")
    db.execute("UPDATE messages SET stage = CASE expects WHEN 'message' THEN 'chat' ELSE expects END"
               " WHERE sender = 'participant'")


def _v4(db: sqlite_utils.Database) -> None:
    """Which study version each participant saw, synthetic (bench, pilot) participants, and the
    index every turn's `WHERE reply_to = ?` needs (it was a full scan of messages)."""
    db["participants"].add_column("study_version", str)
    db["participants"].add_column("synthetic", int, not_null_default=0)
    db["messages"].create_index(["reply_to"], if_not_exists=True)
    db["study_versions"].create({"version": str, "text": str, "combot_version": str, "head_sha256": str,
                                 "encoder_sha256": str, "first_served_at": str},
                                pk="version", not_null={"text", "first_served_at"})


def _v5(db: sqlite_utils.Database) -> None:
    """Hash chains (combot/chain.py): a hash on every message, participant and status change; the
    chain head and length on each participant; closing digests. Rows stored before get their
    chains computed here, once; `meta` records when (the chain is authoritative from then on)."""
    db["participants"].add_column("hash", str)
    db["participants"].add_column("chain_head", str)
    db["participants"].add_column("chain_length", int)
    db["messages"].add_column("seq", int)
    db["messages"].add_column("hash", str)
    db["status_changes"].create({
        "id": int, "participant_id": str, "seq": int, "at": str, "status": str, "problem_type": str, "scores": str,
        "finished_at": str, "described_experience": int, "hash": str,
    }, pk="id", not_null={"participant_id", "seq", "at", "status", "hash"},
        foreign_keys=[("participant_id", "participants", "id")])
    db["status_changes"].create_index(["participant_id", "seq"], unique=True)
    db["digests"].create({"id": int, "at": str, "digest": str, "participants": int, "messages": int, "closing": int},
                         pk="id", not_null={"at", "digest", "participants", "messages", "closing"})
    conn = db.conn
    participants = messages = 0
    for row in conn.execute("SELECT * FROM participants ORDER BY created_at, id").fetchall():
        links = _Chain(conn, row["id"], None, 0)
        links.add_participant(row)
        for message in conn.execute("SELECT * FROM messages WHERE participant_id = ? ORDER BY id", (row["id"],)):
            seq, digest = links.add("message", message_link_values(message))
            conn.execute("UPDATE messages SET seq = ?, hash = ? WHERE id = ?", (seq, digest, message["id"]))
            messages += 1
        # The status history before the upgrade is not known: one link holds the values it found.
        links.add_status({**chain.status_values(row), "at": row["updated_at"] or row["created_at"]})
        links.save()
        participants += 1
    stamp = now()
    conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [
        ("chain_since", stamp),
        ("chain_backfilled", f"{participants} participants and {messages} messages stored before {stamp}"),
    ])


def _v6(db: sqlite_utils.Database) -> None:
    """Reply timing (issue 14): on each bot reply to a participant message, `compute_ms` (until every
    reply of the turn was ready) and `shown_ms` (until this reply was due on the participant's screen)."""
    for name in ("compute_ms", "shown_ms"):
        if name not in db["messages"].columns_dict:  # a re-run of the migrations after v6 (tests/test_verify.py)
            db["messages"].add_column(name, int)


def _v7(db: sqlite_utils.Database) -> None:
    """Balanced assignment counts the cells inside the write lock at every new session: from an index
    that holds every column it reads, not the participant rows (8x faster with 100k participants,
    bench/store_scale.py). It replaces the (cell, status) index, which it starts with."""
    db["participants"].create_index(["cell", "synthetic", "status", "updated_at"], if_not_exists=True)
    db.execute("DROP INDEX IF EXISTS idx_participants_cell_status")


def _v8(db: sqlite_utils.Database) -> None:
    """Balanced assignment's "started" counts kept up to date by triggers (`cell_fill`), so creating a
    participant reads eight numbers instead of counting every participant stored inside the write lock.
    Triggers, not code: every way a row is inserted, deleted or changed keeps the counts right."""
    conn = db.conn
    conn.execute("CREATE TABLE IF NOT EXISTS cell_fill (cell TEXT NOT NULL, synthetic INTEGER NOT NULL,"
                 " n INTEGER NOT NULL, PRIMARY KEY (cell, synthetic))")
    conn.execute("DELETE FROM cell_fill")
    conn.execute("INSERT INTO cell_fill (cell, synthetic, n) SELECT cell, synthetic, count(*) FROM participants"
                 " WHERE status != 'declined' GROUP BY cell, synthetic")
    add = ("INSERT INTO cell_fill (cell, synthetic, n) SELECT NEW.cell, NEW.synthetic, 1 WHERE NEW.status != 'declined'"
           " ON CONFLICT (cell, synthetic) DO UPDATE SET n = n + 1;")
    remove = ("UPDATE cell_fill SET n = n - 1 WHERE cell = OLD.cell AND synthetic = OLD.synthetic"
              " AND OLD.status != 'declined';")
    conn.execute(f"CREATE TRIGGER IF NOT EXISTS cell_fill_insert AFTER INSERT ON participants BEGIN {add} END")
    conn.execute(f"CREATE TRIGGER IF NOT EXISTS cell_fill_delete AFTER DELETE ON participants BEGIN {remove} END")
    conn.execute("CREATE TRIGGER IF NOT EXISTS cell_fill_update AFTER UPDATE OF cell, status, synthetic ON participants"
                 " WHEN OLD.cell IS NOT NEW.cell OR OLD.synthetic IS NOT NEW.synthetic"
                 " OR (OLD.status = 'declined') != (NEW.status = 'declined')"
                 f" BEGIN {remove} {add} END")


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8)
SCHEMA_VERSION = len(MIGRATIONS)
CHAIN_SCHEMA = MIGRATIONS.index(_v5) + 1  # the first schema version with hash chains


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
    # Through the writers' lock: under load the other processes' writers hand the lock straight to
    # each other, and SQLite's own busy handler (sleep and retry) would never get a turn, so a worker
    # (re)started during a busy study failed its start-up with "database is locked".
    lock = WriteLock(path)
    try:
        lock.acquire()
        try:
            migrate(conn)
        finally:
            lock.release()
    finally:
        lock.close()
    return conn


class WriteLock:
    """Every process's writer takes turns through this lock, fairly, woken the moment it is free.

    Two flocks, both waited for in the kernel: the `.lock-queue` file admits one waiter at a time
    to wait for the `.lock` file itself, which the writers hold for one transaction each. The holder
    cannot take `.lock` again while someone waits for it, because to wait it must first get through
    the queue, which that waiter holds: so the lock passes to another process at every release
    (one flock alone let the busiest process re-take it at once, every time, and the others' writes
    timed out: bench/write_lock.py). A dead process's flocks are released by the kernel. A holder
    keeps `.lock` for one transaction, bounded by SQLite's busy timeout.
    """

    def __init__(self, path: str | Path):
        self._queue = open(f"{path}.lock-queue", "a+b")
        self._lock = open(f"{path}.lock", "a+b")

    def acquire(self) -> None:
        fcntl.flock(self._queue, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        finally:
            fcntl.flock(self._queue, fcntl.LOCK_UN)

    def release(self) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_UN)

    def close(self) -> None:
        self._queue.close()
        self._lock.close()


def connect_readonly(path: str | Path) -> sqlite3.Connection:
    """Open a database only to read it: no migration, no lock file, no WAL written. With the file or
    its folder read-only (an archived study), `immutable=1`: SQLite then reads the main file alone."""
    resolved = Path(path).resolve()
    writable = os.access(resolved, os.W_OK) and os.access(resolved.parent, os.W_OK)
    uri = f"file:{quote(str(resolved))}?" + ("mode=ro" if writable else "immutable=1")
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    # Up to date already (every worker start but the first): no write lock. Taking one would wait
    # in SQLite's sleeping busy handler behind the serving workers' writes, which hand the lock on
    # to each other at once, and could time out under load.
    if schema_version(conn) == SCHEMA_VERSION:
        return SCHEMA_VERSION
    with transaction(conn):
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"the database has schema version {version}; this Combot knows up to {SCHEMA_VERSION}")
        if version == SCHEMA_VERSION:
            return version
        # Only when there is something to migrate: sqlite-utils imports numpy, and pandas when it is
        # installed (~40 MB in every worker that merely opens an up-to-date database).
        import sqlite_utils

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
        # Inside a transaction already (the Store's group commit): a savepoint, so a failure rolls
        # back this piece of work alone.
        self.nested = self.conn.in_transaction
        self.conn.execute("SAVEPOINT nested" if self.nested else "BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        if self.nested:
            if not self.conn.in_transaction:
                return  # SQLite already rolled back everything (disk full, I/O error); the error goes on
            if kind is not None:
                self.conn.execute("ROLLBACK TO nested")
            self.conn.execute("RELEASE nested")
            return
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
    # On the message that ends a turn's input (the participant's, or the greeting): the engine's
    # stage after the turn and what it expects next, stored so nothing re-derives them.
    stage: str | None = None
    expects: str | None = None
    scores: Mapping[str, float] | None = None
    # On a bot reply to a participant message: see _v4 and the codebook.
    compute_ms: int | None = None
    shown_ms: int | None = None


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
    client_key: str | None = None,
    study_version: str | None = None,
    synthetic: bool = False,
) -> tuple[sqlite3.Row, bool]:
    """Assign a cell and store a new participant with the greeting, atomically across processes.

    `choose_cell` sees the number of participants per cell (counted inside the write lock, so
    concurrent arrivals never over-fill a cell; `fill` says who counts, see `cell_counts`). A
    known `client_key` (a retry of this request) or a returning platform id gets its old row back
    (second value False) instead of a new draw; both are looked up inside the write lock, so
    concurrent retries in several worker processes still make one participant. A key that
    declined earlier (then reloaded the consent page and agreed) becomes that same row's session. A
    `synthetic` participant (bench, pilot) is stored like any other but counts towards no real
    participant's cell: synthetic arrivals are balanced among themselves (so a pilot of a live study
    still meets every cell) and real ones among real ones.
    """
    with transaction(conn):
        declined = None
        if client_key:
            existing = participant_by_client_key(conn, client_key)
            if existing is not None and existing["status"] != "declined":
                return existing, False
            declined = existing
        if platform_id:
            existing = participant_by_platform_id(conn, platform_id)
            if existing is not None:
                return existing, False
        refuse_when_closed(conn)
        counts = cell_counts(conn, fill, active_minutes, synthetic=synthetic)
        label, number, factors, method = choose_cell(counts)
        state, greeting = greet(factors)
        stamp = now()
        if declined is not None:
            participant_id = declined["id"]
            # The decline becomes this session: its chain starts again with the session (as its row does).
            conn.execute("DELETE FROM status_changes WHERE participant_id = ?", (participant_id,))
            conn.execute("DELETE FROM participants WHERE id = ?", (participant_id,))
        conn.execute(
            "INSERT INTO participants (id, token, cell, cell_number, factors, assignment, state, version, status,"
            " turns, created_at, updated_at, user_agent, url_params, platform_id, consented_at, client_key,"
            " study_version, synthetic) VALUES (?, ?, ?, ?, ?, ?, ?, 0, 'started', 0, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (participant_id, token, label, number, json.dumps(dict(factors)), method, json.dumps(state), stamp, stamp,
             user_agent[:500], json.dumps(dict(url_params or {})), platform_id, stamp if consented else None,
             client_key, study_version, int(synthetic)),
        )
        links = _Chain.new(conn, participant_id, stamp)
        _insert_messages(conn, links, 0, greeting, None, stamp)
        links.save()
        row = conn.execute("SELECT * FROM participants WHERE id = ?", (participant_id,)).fetchone()
    return row, True


def cell_counts(conn: sqlite3.Connection, fill: str = "started", active_minutes: float = 30,
                synthetic: bool = False) -> dict[str, int]:
    """Participants per cell label as balanced assignment counts them.

    "started": everyone ever given the cell. "finished_or_active": those who finished plus those
    who wrote within the last `active_minutes`, so an abandoned session frees its slot. A decline
    never has a cell and never counts. Real participants and synthetic ones (bench, pilot) are
    counted apart: `synthetic` says which.
    """
    if fill == "finished_or_active":
        rows = conn.execute(
            "SELECT cell, count(*) AS n FROM participants WHERE synthetic = ? AND (status = 'finished'"
            " OR (status = 'started' AND updated_at >= ?)) GROUP BY cell", (int(synthetic), ago(active_minutes * 60)))
    else:
        # Kept by triggers (schema v8): eight rows, however many participants are stored.
        rows = conn.execute("SELECT cell, n FROM cell_fill WHERE synthetic = ? AND n > 0", (int(synthetic),))
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
                   url_params: Mapping[str, str] | None = None, platform_id: str | None = None,
                   client_key: str | None = None, study_version: str | None = None,
                   synthetic: bool = False) -> tuple[sqlite3.Row, bool]:
    """A person who saw the consent page and declined: a row without a cell, so it fills none.

    A known `client_key` returns its row (second value False) and stores nothing; a key whose
    session has started is a Conflict.
    """
    stamp = now()
    with transaction(conn):
        if client_key:
            existing = participant_by_client_key(conn, client_key)
            if existing is not None:
                if existing["status"] != "declined":
                    raise Conflict("this session has already started")
                return existing, False
        refuse_when_closed(conn)
        conn.execute(
            "INSERT INTO participants (id, token, cell, factors, state, version, status, turns, created_at,"
            " updated_at, user_agent, url_params, platform_id, client_key, study_version, synthetic) VALUES (?, ?,"
            " '', '{}', '{}', 0, 'declined', 0, ?, ?, ?, ?, ?, ?, ?, ?)",
            (participant_id, token, stamp, stamp, user_agent[:500], json.dumps(dict(url_params or {})), platform_id,
             client_key, study_version, int(synthetic)))
        _Chain.new(conn, participant_id, stamp).save()
        row = conn.execute("SELECT * FROM participants WHERE id = ?", (participant_id,)).fetchone()
    return row, True


def participant_by_client_key(conn: sqlite3.Connection, client_key: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM participants WHERE client_key = ?", (client_key,)).fetchone()


def record_study_version(conn: sqlite3.Connection, *, version: str, text: str, combot_version: str,
                         head_sha256: str, encoder_sha256: str) -> None:
    """Keep the full text of a study version the first time it is served (later serves change nothing)."""
    with transaction(conn):
        conn.execute("INSERT OR IGNORE INTO study_versions (version, text, combot_version, head_sha256,"
                     " encoder_sha256, first_served_at) VALUES (?, ?, ?, ?, ?, ?)",
                     (version, text, combot_version, head_sha256, encoder_sha256, now()))


def study_versions(conn: sqlite3.Connection, include_synthetic: bool = False) -> list[sqlite3.Row]:
    """Every stored study version, oldest first, with how many participants (declines included) saw it."""
    return conn.execute(
        "SELECT v.*, (SELECT count(*) FROM participants p WHERE p.study_version = v.version"
        " AND (? OR p.synthetic = 0)) AS participants FROM study_versions v ORDER BY v.first_served_at, v.version",
        (int(include_synthetic),)).fetchall()


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


def participant_by_token(conn: sqlite3.Connection, token: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM participants WHERE token = ?", (token,)).fetchone()


def transcript(conn: sqlite3.Connection, participant_id: str) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM messages WHERE participant_id = ? ORDER BY id", (participant_id,)).fetchall()


@dataclass(frozen=True)
class StoredTurn:
    """A stored turn: the participant's message (with the engine's stage and `expects` after it)
    and the bot's replies to it."""

    message: sqlite3.Row
    replies: list[sqlite3.Row]

    @property
    def next_turn(self) -> int:
        """The turn number the server expected after this one."""
        return int(self.message["turn"]) + 1


def replies_to(conn: sqlite3.Connection, participant_id: str, client_message_id: str) -> StoredTurn | None:
    """The turn of an earlier message with this client id, or None if it never arrived."""
    sent = conn.execute("SELECT * FROM messages WHERE participant_id = ? AND client_message_id = ?",
                        (participant_id, client_message_id)).fetchone()
    if sent is None:
        return None
    return StoredTurn(sent, conn.execute("SELECT * FROM messages WHERE reply_to = ? ORDER BY id",
                                         (sent["id"],)).fetchall())


def recent_llm_reply_ms(conn: sqlite3.Connection, limit: int = 200, scan: int = 20_000,
                        classified: bool | None = None) -> list[int]:
    """Compute times of the latest `limit` LLM-written replies among the last `scan` messages: the
    sample "matched" reply timing draws from. A range scan of the primary key, so it stays cheap
    however large the study grows.

    `classified` keeps only the replies to messages the classifier read first (True: openings,
    whose reply time includes the classification) or only the others (False: follow-ups), so a
    held reply is drawn from LLM replies of its own kind."""
    kind = "" if classified is None else (" AND (SELECT m.scores IS NOT NULL FROM messages m WHERE m.id = r.reply_to)"
                                          f" = {int(classified)}")
    return [int(row[0]) for row in conn.execute(
        "SELECT coalesce(r.compute_ms, r.latency_ms) FROM messages r WHERE r.id > (SELECT coalesce(max(id), 0)"
        " FROM messages) - ? AND r.produced_by = 'llm' AND coalesce(r.compute_ms, r.latency_ms) IS NOT NULL"
        + kind + " ORDER BY r.id DESC LIMIT ?", (scan, limit))]


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
    # Set on the turn that settles the opening: whether it described an experience (issue 11).
    described_experience: bool | None = None


def record_turn(conn: sqlite3.Connection, turn: Turn) -> StoredTurn:
    """Store a participant message, the bot's replies and the new state in one transaction.

    Returns the stored turn. A repeat of an already stored client message id returns the replies
    stored the first time and writes nothing; a turn computed from a stale state raises Conflict.
    """
    with transaction(conn):
        if turn.incoming.client_message_id:
            earlier = replies_to(conn, turn.participant_id, turn.incoming.client_message_id)
            if earlier is not None:
                return earlier
        row = conn.execute("SELECT version, status, problem_type, scores, finished_at, described_experience,"
                           " chain_head, chain_length FROM participants WHERE id = ?", (turn.participant_id,)).fetchone()
        if row is None or row["version"] != turn.expected_version:
            raise Conflict("another message changed this conversation first; reload to continue")
        refuse_when_closed(conn)
        stamp = now()
        links = _Chain(conn, turn.participant_id, row["chain_head"], row["chain_length"] or 0)
        first_id = _insert_messages(conn, links, turn.turn, [turn.incoming], None, stamp)
        _insert_messages(conn, links, turn.turn, turn.replies, first_id, stamp)
        sets = {"state": json.dumps(dict(turn.state)), "version": turn.expected_version + 1, "status": turn.status,
                "turns": turn.turn, "updated_at": stamp}
        if turn.problem_type is not None:
            sets["problem_type"] = turn.problem_type
            sets["scores"] = json.dumps(dict(turn.scores or {}))
        if turn.described_experience is not None:
            sets["described_experience"] = int(turn.described_experience)
        if turn.status == "finished":
            sets["finished_at"] = stamp
        before = chain.status_values(row)
        after = chain.status_values({**dict(row), **sets})
        if not chain.same_status(before, after):
            links.add_status({**after, "at": stamp})
        sets.update(links.saved_columns())
        assignments = ", ".join(f"{name} = ?" for name in sets)
        conn.execute(f"UPDATE participants SET {assignments} WHERE id = ?", (*sets.values(), turn.participant_id))
        if turn.email:
            conn.execute("INSERT OR REPLACE INTO emails (participant_id, email, created_at) VALUES (?, ?, ?)",
                         (turn.participant_id, turn.email, stamp))
        return StoredTurn(conn.execute("SELECT * FROM messages WHERE id = ?", (first_id,)).fetchone(),
                          conn.execute("SELECT * FROM messages WHERE reply_to = ? ORDER BY id", (first_id,)).fetchall())


def _insert_messages(conn: sqlite3.Connection, links: _Chain, turn: int, messages: Sequence[NewMessage],
                     reply_to: int | None, stamp: str) -> int:
    # The id is chosen here (what SQLite would choose), because the message's hash covers it.
    last = int(conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0])
    for message in messages:
        last += 1
        scores = json.dumps(dict(message.scores)) if message.scores is not None else None
        values = {"participant_id": links.participant_id, "message_id": last, "turn": turn, "sender": message.sender,
                  "kind": message.kind, "text": message.text, "produced_by": message.produced_by,
                  "model": message.model, "latency_ms": message.latency_ms,
                  "fallback_reason": message.fallback_reason, "timestamp": stamp, "stage": message.stage,
                  "expects": message.expects, "scores": chain.scores_text(message.scores),
                  "compute_ms": message.compute_ms, "shown_ms": message.shown_ms}
        seq, digest = links.add("message", values)
        conn.execute(
            "INSERT INTO messages (id, participant_id, turn, sender, kind, text, produced_by, model, latency_ms,"
            " fallback_reason, client_message_id, reply_to, created_at, stage, expects, scores, seq, hash, compute_ms,"
            " shown_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (last, links.participant_id, turn, message.sender, message.kind, message.text, message.produced_by,
             message.model, message.latency_ms, message.fallback_reason, message.client_message_id, reply_to, stamp,
             message.stage, message.expects, scores, seq, digest, message.compute_ms, message.shown_ms),
        )
    return last


# --- hash chains (combot/chain.py) ----------------------------------------------------------------

def participant_link_values(row: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a participant row its `participant` link covers, named as in the export."""
    declined = row["status"] == "declined"
    return {"participant_id": row["id"], "cell": row["cell"], "cell_number": row["cell_number"],
            "assignment": row["assignment"], "started_at": row["created_at"],
            "consent": "declined" if declined else "agreed" if row["consented_at"] else "not asked",
            "study_version": row["study_version"], "synthetic": row["synthetic"]}


def message_link_values(row: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a message row its link covers, named as in the export."""
    return {"participant_id": row["participant_id"], "message_id": row["id"], "turn": row["turn"],
            "sender": row["sender"], "kind": row["kind"], "text": row["text"], "produced_by": row["produced_by"],
            "model": row["model"], "latency_ms": row["latency_ms"], "fallback_reason": row["fallback_reason"],
            "timestamp": row["created_at"], "stage": row["stage"], "expects": row["expects"],
            "scores": chain.scores_text(json.loads(row["scores"]) if row["scores"] else None),
            # Added by a later migration than the chains' own backfill, which reads rows without them.
            "compute_ms": _column(row, "compute_ms"), "shown_ms": _column(row, "shown_ms")}


def _column(row: Mapping[str, Any], name: str) -> Any:
    keys = row.keys() if isinstance(row, sqlite3.Row) else row
    return row[name] if name in keys else None


class _Chain:
    """A participant's chain while a write transaction extends it (its head was read in that transaction)."""

    def __init__(self, conn: sqlite3.Connection, participant_id: str, head: str | None, length: int):
        self.conn = conn
        self.participant_id = participant_id
        self.head = head
        self.length = length

    @classmethod
    def new(cls, conn: sqlite3.Connection, participant_id: str, stamp: str) -> _Chain:
        """The chain of a participant row just inserted: its `participant` and first `status` links."""
        row = conn.execute("SELECT * FROM participants WHERE id = ?", (participant_id,)).fetchone()
        links = cls(conn, participant_id, None, 0)
        links.add_participant(row)
        links.add_status({**chain.status_values(row), "at": stamp})
        return links

    def add(self, kind: str, values: Mapping[str, Any]) -> tuple[int, str]:
        seq = self.length
        self.head = chain.link(self.head, kind, values)
        self.length += 1
        return seq, self.head

    def add_participant(self, row: sqlite3.Row) -> None:
        _, digest = self.add("participant", participant_link_values(row))
        self.conn.execute("UPDATE participants SET hash = ? WHERE id = ?", (digest, self.participant_id))

    def add_status(self, values: Mapping[str, Any]) -> None:
        values = {**values, "participant_id": self.participant_id}
        seq, digest = self.add("status", values)
        self.conn.execute(
            "INSERT INTO status_changes (participant_id, seq, at, status, problem_type, scores, finished_at,"
            " described_experience, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (self.participant_id, seq, values["at"], values["status"], values["problem_type"], values["scores"],
             values["finished_at"], values["described_experience"], digest))

    def saved_columns(self) -> dict[str, Any]:
        return {"chain_head": self.head, "chain_length": self.length}

    def save(self) -> None:
        self.conn.execute("UPDATE participants SET chain_head = ?, chain_length = ? WHERE id = ?",
                          (self.head, self.length, self.participant_id))


def refuse_when_closed(conn: sqlite3.Connection) -> None:
    """Raise CollectionClosed (410) once `combot digest --close` has closed data collection."""
    if conn.execute("SELECT 1 FROM meta WHERE key = 'closed_at'").fetchone():
        raise CollectionClosed("this study has finished collecting data and takes no new conversations or messages;"
                               " thank you for your interest")


def _read_snapshot(conn: sqlite3.Connection) -> Any:
    """Several reads that must see one moment: a read transaction, unless one is open already."""
    from contextlib import nullcontext

    if conn.in_transaction:
        return nullcontext()
    return snapshot(conn)


class snapshot:
    """`BEGIN` ... `COMMIT` around reads, so they all see the same moment (WAL lets writers go on)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN")
        return self.conn

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        self.conn.execute("COMMIT")


def chain_heads(conn: sqlite3.Connection) -> Iterator[tuple[str, str | None]]:
    """(participant id, chain head) of every participant the study digest covers (synthetic ones,
    from bench and pilot runs, are not study data), in the digest's order (text compares bytewise)."""
    for row in conn.execute("SELECT id, chain_head FROM participants WHERE synthetic = 0 ORDER BY id"):
        yield row[0], row[1]


def study_digest(conn: sqlite3.Connection) -> dict[str, Any]:
    """The study digest over the stored chain heads, with what it covers and the collection's state."""
    with _read_snapshot(conn):
        count = 0

        def counted() -> Iterator[tuple[str, str | None]]:
            nonlocal count
            for pair in chain_heads(conn):
                count += 1
                yield pair

        root = chain.digest(counted(), ordered=True)
        messages = int(conn.execute("SELECT count(*) FROM messages WHERE participant_id IN"
                                    " (SELECT id FROM participants WHERE synthetic = 0)").fetchone()[0])
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        closing = conn.execute("SELECT * FROM digests WHERE closing = 1 ORDER BY id DESC LIMIT 1").fetchone()
    return {"digest": root, "participants": count, "messages": messages,
            "chain_since": meta.get("chain_since"), "closed_at": meta.get("closed_at"),
            "closing_digest": closing["digest"] if closing else None}


def chains(conn: sqlite3.Connection, include_synthetic: bool = True
           ) -> Iterator[tuple[sqlite3.Row, list[sqlite3.Row], list[sqlite3.Row]]]:
    """Each participant (by id, bytewise: the digest's order) with its status changes and messages."""
    where = "" if include_synthetic else " WHERE synthetic = 0"
    for participant in conn.execute(f"SELECT * FROM participants{where} ORDER BY id"):
        changes = conn.execute("SELECT * FROM status_changes WHERE participant_id = ? ORDER BY seq",
                               (participant["id"],)).fetchall()
        messages = conn.execute("SELECT * FROM messages WHERE participant_id = ? ORDER BY seq, id",
                                (participant["id"],)).fetchall()
        yield participant, changes, messages


def chain_heads_of(conn: sqlite3.Connection, include_synthetic: bool = False) -> Iterator[sqlite3.Row]:
    """(id, chain_head, chain_length, synthetic) per participant, by id."""
    where = "" if include_synthetic else " WHERE synthetic = 0"
    yield from conn.execute(f"SELECT id, chain_head, chain_length, synthetic FROM participants{where} ORDER BY id")


def meta(conn: sqlite3.Connection) -> dict[str, str]:
    return {row[0]: row[1] for row in conn.execute("SELECT key, value FROM meta")}


def synthetic_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM participants WHERE synthetic != 0").fetchone()[0])


def message_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version of a database as it is (0 when it has none), without migrating it."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def close_collection(conn: sqlite3.Connection) -> dict[str, Any]:
    """Record the closing digest and stop taking new participants and messages (idempotent: a second
    close records nothing new and returns the first closing digest)."""
    with transaction(conn):
        info = study_digest(conn)
        if info["closed_at"] is None:
            stamp = now()
            conn.execute("INSERT INTO digests (at, digest, participants, messages, closing) VALUES (?, ?, ?, ?, 1)",
                         (stamp, info["digest"], info["participants"], info["messages"]))
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('closed_at', ?)", (stamp,))
            info.update(closed_at=stamp, closing_digest=info["digest"])
    return info


def ping(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1").fetchone()[0] == 1



# --- the per-process handle -------------------------------------------------------------------------

_UNAVAILABLE = ("locked", "busy", "disk is full", "disk i/o error", "unable to open", "readonly")


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.monotonic)

    def settle(self, value: Any = None, error: BaseException | None = None) -> None:
        def set_result() -> None:
            if self.future.done():  # the request was cancelled (timeout, client gone) meanwhile
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)

        self.loop.call_soon_threadsafe(set_result)


class Store:
    """A process's way to the database: reads on one thread, writes group-committed on another.

    `await store.read(fn, ...)` calls `fn(conn, ...)` on a read connection (WAL readers never wait
    for writers). `await store.run(fn, ...)` queues a write: the writer thread takes every write
    waiting, runs each in its own SAVEPOINT inside one `BEGIN IMMEDIATE` transaction, and answers
    them all only after the COMMIT: one fsync for many messages, each still on disk before its
    reply is sent. A write that fails rolls back alone. Across processes the writers take turns
    through `WriteLock`, fairly, and the kernel wakes the next one the moment it is free (SQLite's
    own busy handler polls with sleeps).
    """

    MAX_BATCH = 64

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="combot-db-read")
        self._read_conn: sqlite3.Connection | None = None
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._read_conn = await loop.run_in_executor(self._reader, connect, self.path)
        ready: asyncio.Future[None] = loop.create_future()
        self._writer = threading.Thread(target=self._write_loop, args=(loop, ready), name="combot-db-write",
                                        daemon=True)
        self._writer.start()
        await ready

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._read_conn is None:
            raise RuntimeError("the store is not open")
        loop = asyncio.get_running_loop()
        with _unavailable_on_busy():
            return await loop.run_in_executor(self._reader, partial(fn, self._read_conn, *args, **kwargs))

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._writer is None:
            raise RuntimeError("the store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn, args, kwargs, future, loop))
        with _unavailable_on_busy():
            return await future

    async def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            writer, self._writer = self._writer, None
            await asyncio.get_running_loop().run_in_executor(None, writer.join)
        if self._read_conn is not None:
            conn, self._read_conn = self._read_conn, None
            await asyncio.get_running_loop().run_in_executor(self._reader, conn.close)
        self._reader.shutdown(wait=True)

    def _write_loop(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            conn = connect(self.path)
            lock = WriteLock(self.path)
        except BaseException as error:
            loop.call_soon_threadsafe(ready.set_exception, error)
            return
        loop.call_soon_threadsafe(ready.set_result, None)
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    return
                batch = [job]
                stop = False
                while len(batch) < self.MAX_BATCH:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                self._commit(conn, lock, batch)
                if stop:
                    return
        finally:
            conn.close()
            lock.close()

    @staticmethod
    def _commit(conn: sqlite3.Connection, lock: WriteLock, batch: list[_Job]) -> None:
        # A write that has waited longer than the busy timeout (the database was locked by something
        # else for long) gets its 503 now rather than after waiting its turn again.
        patience = BUSY_TIMEOUT_MS / 1000
        batch = _fresh(batch, patience)
        if not batch:
            return
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            # Waited for in the kernel, which wakes the next writer the moment the holder unlocks
            # (polling with sleeps wasted up to a sleep at every hand-off). Writes that waited past
            # the busy timeout meanwhile get their 503 here.
            lock.acquire()
            try:
                batch = _fresh(batch, patience)
                if not batch:
                    return
                with transaction(conn):
                    for job in batch:
                        conn.execute("SAVEPOINT job")
                        try:
                            value = job.fn(conn, *job.args, **job.kwargs)
                        except BaseException as error:
                            if not conn.in_transaction:
                                raise  # SQLite rolled back the whole batch (disk full, I/O error)
                            conn.execute("ROLLBACK TO job")
                            conn.execute("RELEASE job")
                            outcomes.append((job, None, error))
                        else:
                            conn.execute("RELEASE job")
                            outcomes.append((job, value, None))
            finally:
                lock.release()
        except BaseException as error:
            # BEGIN or COMMIT failed (locked for too long, disk full): nothing of the batch is stored.
            outcomes = [(job, None, error) for job in batch]
        for job, value, failure in outcomes:
            job.settle(value, failure)


def _fresh(batch: list[_Job], patience: float) -> list[_Job]:
    """The jobs that have not waited past the busy timeout; the others get their 503 now."""
    moment = time.monotonic()
    fresh = []
    for job in batch:
        if moment - job.queued_at > patience:
            job.settle(error=sqlite3.OperationalError("database is locked: waited too long for the write lock"))
        else:
            fresh.append(job)
    return fresh


class _unavailable_on_busy:
    """Turn SQLite's 'locked', 'disk full' and I/O errors into a 503 the page retries."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        if isinstance(error, sqlite3.OperationalError) and any(word in str(error).lower() for word in _UNAVAILABLE):
            raise Unavailable("the server is busy storing messages; please try again in a moment") from error


@dataclass(frozen=True)
class Backup:
    path: Path
    size: int
    participants: int
    messages: int
    seconds: float


def backup(source: str | Path, target: str | Path) -> Backup:
    """A consistent snapshot of a live database, through SQLite's online backup API.

    One backup step over the whole file (pages=-1) runs inside one read transaction: in WAL mode the
    workers keep writing meanwhile, and the copy holds exactly what was committed when it began (a
    copy in several steps would start over after every write). The copy is made under a temporary
    name beside the target, switched to a single self-contained file (journal_mode DELETE), checked
    with integrity_check and only then renamed into place, so a cron job never leaves half a backup.
    """
    started = time.monotonic()
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise FileNotFoundError(f"no database at {source}")
    if target.exists() and target.resolve() == source.resolve():
        raise ValueError("the backup must go to another file than the database itself")
    pending = target.with_name(f".{target.name}.{os.getpid()}.pending")
    pending.unlink(missing_ok=True)
    pending.touch(mode=0o600)  # it holds e-mail addresses: readable by its owner only
    src = sqlite3.connect(str(source), timeout=BUSY_TIMEOUT_MS / 1000)
    dst = sqlite3.connect(str(pending), isolation_level=None)
    try:
        src.backup(dst, pages=-1)
        dst.execute("PRAGMA journal_mode = DELETE")
        problems = [row[0] for row in dst.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("the copy fails integrity_check: " + "; ".join(problems[:5]))
        tables = {row[0] for row in dst.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        count = (lambda table: int(dst.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                 if table in tables else 0)
        participants, messages = count("participants"), count("messages")
        dst.close()
        with open(pending, "rb") as written:
            os.fsync(written.fileno())
        os.replace(pending, target)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException:
        dst.close()
        pending.unlink(missing_ok=True)
        raise
    finally:
        src.close()
    return Backup(target, target.stat().st_size, participants, messages, time.monotonic() - started)


def check_database(path: str | Path) -> None:
    """Before any worker starts: the database opens, is in WAL mode, and is not from a newer Combot.

    Workers create or migrate the schema themselves (safely, inside BEGIN IMMEDIATE); this check
    keeps the supervisor free of sqlite-utils and numpy, which would add 25 MB to it for nothing.
    """
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if has_meta:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row and int(row[0]) > SCHEMA_VERSION:
                raise RuntimeError(f"the database has schema version {row[0]}; this Combot knows up to {SCHEMA_VERSION}")
    finally:
        conn.close()
