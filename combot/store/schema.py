"""The schema and its migrations (v1 to v8), and opening the database: WAL, a busy timeout, fully
synced commits, and the schema brought up to date (safe when many processes start at once)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import quote

if TYPE_CHECKING:
    import sqlite_utils

from combot import chain
from combot.store.links import _Chain, message_link_values
from combot.store.timestamps import now
from combot.store.transactions import WriteLock, transaction

BUSY_TIMEOUT_MS = 10_000


def _v1(db: sqlite_utils.Database) -> None:
    db.table("participants").create({
        "id": str, "token": str, "cell": str, "cell_number": int, "factors": str, "assignment": str,
        "state": str, "version": int, "status": str, "problem_type": str, "scores": str, "turns": int,
        "created_at": str, "updated_at": str, "finished_at": str, "user_agent": str, "url_params": str,
        "platform_id": str,
    }, pk="id", not_null={"token", "cell", "factors", "state", "version", "status", "created_at"})
    db.table("participants").create_index(["token"], unique=True)
    db.table("participants").create_index(["platform_id"])
    db.table("participants").create_index(["cell", "status"])
    db.table("messages").create({
        "id": int, "participant_id": str, "turn": int, "sender": str, "kind": str, "text": str,
        "produced_by": str, "model": str, "latency_ms": int, "fallback_reason": str,
        "client_message_id": str, "reply_to": int, "created_at": str,
    }, pk="id", not_null={"participant_id", "turn", "sender", "kind", "text", "created_at"},
        foreign_keys=[("participant_id", "participants", "id")])
    db.table("messages").create_index(["participant_id", "id"])
    db.table("messages").create_index(["participant_id", "client_message_id"], unique=True)
    db.table("emails").create({"participant_id": str, "email": str, "created_at": str}, pk="participant_id",
                              foreign_keys=[("participant_id", "participants", "id")])


def _v2(db: sqlite_utils.Database) -> None:
    """The researcher's side: when consent was given, server errors, and each worker's memory."""
    db.table("participants").add_column("consented_at", str)
    db.table("participants").create_index(["updated_at"])
    db.table("messages").create_index(["created_at"])  # the dashboard looks at the last few minutes
    db.table("events").create({"id": int, "at": str, "kind": str, "pid": int, "path": str, "status": int,
                               "detail": str}, pk="id", not_null={"at", "kind"})
    db.table("events").create_index(["at"])
    db.table("workers").create({"pid": int, "started_at": str, "seen_at": str, "rss_bytes": int, "host": str},
                               pk=("pid", "started_at"), not_null={"seen_at"})


def _v3(db: sqlite_utils.Database) -> None:
    """One person, one participant; one answer, one question (issue 11).

    `client_key`: the page's idempotency key for creating a session or a decline (unique, so no
    two rows can ever hold one). `stage` and `expects` on a participant message (and the greeting):
    what the engine decided after that turn, so a repeated request is answered from the stored
    decision. `scores` on a message: the classifier's verdict on every opening attempt.
    `described_experience`: whether the participant's opening described an experience at all.
    """
    db.table("participants").add_column("client_key", str)
    db.table("participants").add_column("described_experience", int)
    db.table("participants").create_index(["client_key"], unique=True)
    db.table("messages").add_column("stage", str)
    db.table("messages").add_column("expects", str)
    db.table("messages").add_column("scores", str)
    # Turns stored by an older Combot: what came next is read once from the replies they got (through
    # the reply_to index of v4, made here first: without it each row scans every message).
    db.table("messages").create_index(["reply_to"], if_not_exists=True)
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
    db.table("participants").add_column("study_version", str)
    db.table("participants").add_column("synthetic", int, not_null_default=0)
    db.table("messages").create_index(["reply_to"], if_not_exists=True)
    db.table("study_versions").create({"version": str, "text": str, "combot_version": str, "head_sha256": str,
                                       "encoder_sha256": str, "first_served_at": str},
                                      pk="version", not_null={"text", "first_served_at"})


def _v5(db: sqlite_utils.Database) -> None:
    """Hash chains (combot/chain.py): a hash on every message, participant and status change; the
    chain head and length on each participant; closing digests. Rows stored before get their
    chains computed here, once; `meta` records when (the chain is authoritative from then on)."""
    db.table("participants").add_column("hash", str)
    db.table("participants").add_column("chain_head", str)
    db.table("participants").add_column("chain_length", int)
    db.table("messages").add_column("seq", int)
    db.table("messages").add_column("hash", str)
    db.table("status_changes").create({
        "id": int, "participant_id": str, "seq": int, "at": str, "status": str, "problem_type": str, "scores": str,
        "finished_at": str, "described_experience": int, "hash": str,
    }, pk="id", not_null={"participant_id", "seq", "at", "status", "hash"},
        foreign_keys=[("participant_id", "participants", "id")])
    db.table("status_changes").create_index(["participant_id", "seq"], unique=True)
    db.table("digests").create({"id": int, "at": str, "digest": str, "participants": int, "messages": int,
                                "closing": int},
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
        # Present already: a re-run of the migrations after v6 (tests/test_verify.py).
        if name not in db.table("messages").columns_dict:
            db.table("messages").add_column(name, int)


def _v7(db: sqlite_utils.Database) -> None:
    """Balanced assignment counts the cells inside the write lock at every new session: from an index
    that holds every column it reads, not the participant rows (8x faster with 100k participants,
    bench/store_scale.py). It replaces the (cell, status) index, which it starts with."""
    db.table("participants").create_index(["cell", "synthetic", "status", "updated_at"], if_not_exists=True)
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


def _v9(db: sqlite_utils.Database) -> None:
    """What the study digest's cache is keyed by (`study_digest(reuse=True)`, the dashboard): a
    counter bumped by triggers in the same transaction as every change of what the digest covers (a
    participant row stored, changed or deleted; a message stored, moved or deleted), and an id drawn
    when the table is made, so a cache never takes one database for another. Triggers, not code, as
    for `cell_fill`: a row changed by hand in the sqlite3 shell bumps it too."""
    conn = db.conn
    conn.execute("CREATE TABLE IF NOT EXISTS chain_changes (id INTEGER PRIMARY KEY CHECK (id = 1),"
                 " n INTEGER NOT NULL, database_id TEXT NOT NULL)")
    conn.execute("INSERT OR IGNORE INTO chain_changes (id, n, database_id) VALUES (1, 0, lower(hex(randomblob(16))))")
    bump = "BEGIN UPDATE chain_changes SET n = n + 1; END"
    conn.execute(f"CREATE TRIGGER IF NOT EXISTS chain_changes_participant_insert AFTER INSERT ON participants {bump}")
    conn.execute(f"CREATE TRIGGER IF NOT EXISTS chain_changes_participant_delete AFTER DELETE ON participants {bump}")
    # Any change of a participant row: Combot changes them only with their chain. Naming no column
    # leaves the researcher free to drop or rename columns in the sqlite3 shell.
    conn.execute(f"CREATE TRIGGER IF NOT EXISTS chain_changes_participant_update AFTER UPDATE ON participants {bump}")
    conn.execute(f"CREATE TRIGGER IF NOT EXISTS chain_changes_message_insert AFTER INSERT ON messages {bump}")
    conn.execute(f"CREATE TRIGGER IF NOT EXISTS chain_changes_message_delete AFTER DELETE ON messages {bump}")
    conn.execute(f"CREATE TRIGGER IF NOT EXISTS chain_changes_message_update AFTER UPDATE OF participant_id ON messages"
                 f" {bump}")


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8, _v9)
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


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version of a database as it is (0 when it has none), without migrating it."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def ping(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1").fetchone()[0] == 1


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
