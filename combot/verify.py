"""`combot verify`: recompute every hash chain and the study digest of a database or an export.

A check walks the participants in the digest's order (by id) and each one's links in the order
they were written, recomputing every hash from the row's content. The first link whose content
does not give its stored hash, a missing link, a row no chain holds, or a head that differs is
reported by participant and row; the digest is then compared with the closing digest (database)
or MANIFEST.json (export), and with a digest the caller publishes (`expected_digest`).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from combot import chain, store


@dataclass(frozen=True)
class Problem:
    participant_id: str | None
    row: str  # "message 17", "participant row", "status change 2", "messages.csv line 5", ...
    reason: str

    def __str__(self) -> str:
        who = f"participant {self.participant_id}, " if self.participant_id else ""
        return f"{who}{self.row}: {self.reason}"


@dataclass
class Report:
    source: str
    participants: int = 0
    messages: int = 0
    digest: str | None = None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, participant_id: str | None, row: str, reason: str) -> None:
        self.problems.append(Problem(participant_id, row, reason))


@dataclass(frozen=True)
class Link:
    seq: int | None
    kind: str
    row: str  # how the report names the row holding it
    values: Mapping[str, Any]
    stored: str | None
    candidates: tuple[Mapping[str, Any], ...] = ()  # other readings of the same row (a CSV's neutralised text)


def walk(report: Report, participant_id: str, links: Iterable[Link]) -> tuple[str | None, int, bool]:
    """Recompute one participant's chain; returns (head, number of links, intact). Reports the first fault."""
    head: str | None = None
    count = 0
    for link in sorted(links, key=lambda item: (item.seq is None, item.seq or 0)):
        if link.seq is None or link.stored is None:
            report.fail(participant_id, link.row, "has no hash: it was not written through Combot's chain")
            return head, count, False
        if link.seq != count:
            missing = "a link is missing before it (a deleted row)" if link.seq > count else "two rows claim its place"
            report.fail(participant_id, link.row, f"is link {link.seq} of the chain but link {count} was expected:"
                                                   f" {missing}")
            return head, count, False
        for values in (link.values, *link.candidates):
            computed = chain.link(head, link.kind, values)
            if computed == link.stored:
                break
        else:
            report.fail(participant_id, link.row, "its content does not give its hash: the row was changed, or an"
                                                   " earlier row of this participant was changed or re-ordered")
            return head, count, False
        head = computed
        count += 1
    return head, count, True


# --- a database -----------------------------------------------------------------------------------

def verify_database(path: str | Path, expected_digest: str | None = None) -> Report:
    """Check every chain in a Combot database and its digest (read-only)."""
    report = Report(source=str(path))
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        version = store.schema_version(conn)
        if version < store.CHAIN_SCHEMA:
            report.fail(None, "database", f"schema version {version} has no hash chains yet: open it once with this"
                                          " Combot (serve, export or digest) to compute them")
            return report
        with store.snapshot(conn):
            _verify_rows(conn, report)
            info = store.study_digest(conn)
    finally:
        conn.close()
    if report.ok:
        if info["closing_digest"] and info["closing_digest"] != report.digest:
            report.fail(None, "closing digest", f"recorded {info['closing_digest']} at {info['closed_at']}, but the"
                                                f" data gives {report.digest}")
        _compare(report, expected_digest)
    if info["chain_since"]:
        report.notes.append(f"chains authoritative since {info['chain_since']}")
    return report


def _verify_rows(conn: sqlite3.Connection, report: Report) -> None:
    heads: list[tuple[str, str]] = []
    covered = 0
    for participant, changes, messages in store.chains(conn):
        pid = participant["id"]
        links = [Link(0 if participant["hash"] else None, "participant", "participant row",
                      store.participant_link_values(participant), participant["hash"])]
        links += [Link(row["seq"], "status", f"status change at {row['at']} (link {row['seq']})",
                       {**dict(row), "participant_id": pid}, row["hash"]) for row in changes]
        links += [Link(row["seq"], "message", f"message {row['id']}", store.message_link_values(row), row["hash"])
                  for row in messages]
        covered += len(messages)
        head, count, intact = walk(report, pid, links)
        if not intact:
            return
        if head != participant["chain_head"] or count != participant["chain_length"]:
            report.fail(pid, "participant row", f"its chain has {count} links ending in {head}, but the row records"
                                                f" {participant['chain_length']} ending in {participant['chain_head']}"
                                                " (a row was deleted from the end, or the head was changed)")
            return
        last = changes[-1] if changes else None
        if last is not None and not chain.same_status(chain.status_values(participant), dict(last)):
            report.fail(pid, "participant row", "its status, problem type, scores or finish time differ from its last"
                                                " status change")
            return
        if not participant["synthetic"]:
            heads.append((pid, head or ""))
            report.participants += 1
            report.messages += len(messages)
    total = store.message_count(conn)
    if total != covered:
        report.fail(None, "messages", f"{total - covered} message rows belong to no participant's chain")
        return
    report.digest = chain.digest(heads)
    synthetic = store.synthetic_count(conn)
    if synthetic:
        report.notes.append(f"{synthetic} synthetic participants (bench, pilot) verified, not in the digest")


def _compare(report: Report, expected_digest: str | None) -> None:
    if expected_digest and expected_digest.strip().lower() != report.digest:
        report.fail(None, "study digest", f"the data gives {report.digest}, not the expected {expected_digest.strip()}")
