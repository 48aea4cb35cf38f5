"""Messages and turns: a participant message, the bot's replies and the new state, stored in one
transaction; a repeated message answered from what was stored the first time."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from combot import chain
from combot.errors import Conflict
from combot.store.digests import refuse_when_closed
from combot.store.links import _Chain
from combot.store.timestamps import now
from combot.store.transactions import transaction


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
    # On a bot reply to a participant message: see _v6 (store/schema.py) and the codebook.
    compute_ms: int | None = None
    shown_ms: int | None = None


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


def recent_llm_reply_ms(conn: sqlite3.Connection, limit: int = 64, scan: int = 20_000,
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
