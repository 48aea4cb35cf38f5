"""Hash-chain links (combot/chain.py): the values each link covers, and a participant's chain as a
write transaction extends it."""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Mapping

from combot import chain


def participant_link_values(row: sqlite3.Row | Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a participant row its `participant` link covers, named as in the export."""
    declined = row["status"] == "declined"
    return {"participant_id": row["id"], "cell": row["cell"], "cell_number": row["cell_number"],
            "assignment": row["assignment"], "started_at": row["created_at"],
            "consent": "declined" if declined else "agreed" if row["consented_at"] else "not asked",
            "study_version": row["study_version"], "synthetic": row["synthetic"]}


def message_link_values(row: sqlite3.Row | Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a message row its link covers, named as in the export."""
    return {"participant_id": row["participant_id"], "message_id": row["id"], "turn": row["turn"],
            "sender": row["sender"], "kind": row["kind"], "text": row["text"], "produced_by": row["produced_by"],
            "model": row["model"], "latency_ms": row["latency_ms"], "fallback_reason": row["fallback_reason"],
            "timestamp": row["created_at"], "stage": row["stage"], "expects": row["expects"],
            "scores": chain.scores_text(json.loads(row["scores"]) if row["scores"] else None),
            # Added by a later migration than the chains' own backfill, which reads rows without them.
            "compute_ms": _column(row, "compute_ms"), "shown_ms": _column(row, "shown_ms")}


def _column(row: sqlite3.Row | Mapping[str, Any], name: str) -> Any:
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
