"""The study digest over the stored chain heads (kept per process for the dashboard while nothing it
covers changes), closing data collection, and the reads that verify and export walk the chains with."""

from __future__ import annotations

import sqlite3
from typing import Any, Iterator

from combot import chain
from combot.errors import CollectionClosed
from combot.store.timestamps import now
from combot.store.transactions import _read_snapshot, transaction


def refuse_when_closed(conn: sqlite3.Connection) -> None:
    """Raise CollectionClosed (410) once `combot digest --close` has closed data collection."""
    if conn.execute("SELECT 1 FROM meta WHERE key = 'closed_at'").fetchone():
        raise CollectionClosed("this study has finished collecting data and takes no new conversations or messages;"
                               " thank you for your interest")


def chain_heads(conn: sqlite3.Connection) -> Iterator[tuple[str, str | None]]:
    """(participant id, chain head) of every participant the study digest covers (synthetic ones,
    from bench and pilot runs, are not study data), in the digest's order (text compares bytewise)."""
    for row in conn.execute("SELECT id, chain_head FROM participants WHERE synthetic = 0 ORDER BY id"):
        yield row[0], row[1]


# The last study digest computed per database in this process, for `study_digest(reuse=True)`:
# (database file, database id) -> (chain_changes.n, digest, participants, messages).
_DIGESTS: dict[tuple[str, str], tuple[int, str, int, int]] = {}
_DIGESTS_KEPT = 8


def _digest_key(conn: sqlite3.Connection) -> tuple[tuple[str, str], int] | None:
    """Which database this is and how often what the digest covers has changed (None before schema v9)."""
    try:
        row = conn.execute("SELECT n, database_id FROM chain_changes WHERE id = 1").fetchone()
    except sqlite3.OperationalError:  # an older database read as it is (verify, export of an archive)
        return None
    if row is None:
        return None
    file = next((entry[2] for entry in conn.execute("PRAGMA database_list") if entry[1] == "main"), "")
    return (file, row[1]), int(row[0])


def study_digest(conn: sqlite3.Connection, reuse: bool = False) -> dict[str, Any]:
    """The study digest over the stored chain heads, with what it covers and the collection's state.

    Linear in participants (and messages, for their count). With `reuse` (the dashboard, every few
    seconds) the digest last computed in this process is given again while `chain_changes` says
    nothing it covers has changed since; that counter is read in the same read transaction as the
    heads, and every change to them bumps it in the transaction that makes it (schema v9), so a reused
    digest is exactly the one the heads give. `combot digest`, `verify`, the export and closing
    always compute it afresh. Never reused inside a write transaction, whose changes may yet roll back.
    """
    reuse = reuse and not conn.in_transaction
    with _read_snapshot(conn):
        key = _digest_key(conn) if reuse else None
        kept = _DIGESTS.get(key[0]) if key else None
        if key and kept and kept[0] == key[1]:
            _, root, count, messages = kept
        else:
            count = 0

            def counted() -> Iterator[tuple[str, str | None]]:
                nonlocal count
                for pair in chain_heads(conn):
                    count += 1
                    yield pair

            root = chain.digest(counted(), ordered=True)
            messages = int(conn.execute("SELECT count(*) FROM messages WHERE participant_id IN"
                                        " (SELECT id FROM participants WHERE synthetic = 0)").fetchone()[0])
            if key:
                _DIGESTS.pop(key[0], None)
                while len(_DIGESTS) >= _DIGESTS_KEPT:
                    _DIGESTS.pop(next(iter(_DIGESTS)))
                _DIGESTS[key[0]] = (key[1], root, count, messages)
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
