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
    redacted: int = 0  # messages of an anonymised export whose text was redacted: not checkable

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
    opaque: bool = False  # its content was changed on purpose (redacted): only its place can be checked


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
            computed = link.stored if link.opaque else chain.link(head, link.kind, values)
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
        try:
            version = store.schema_version(conn)
        except sqlite3.DatabaseError as error:
            report.fail(None, str(path), f"is not a Combot database ({error})")
            return report
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


# --- an export folder -----------------------------------------------------------------------------

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _readings(value: Any, csv_format: bool) -> list[Any]:
    """What a cell may have been stored as: a CSV cell starting with `'` before a formula character
    was either neutralised by the export or typed that way."""
    if csv_format and isinstance(value, str) and value.startswith("'") and value[1:2].startswith(_FORMULA_START) \
            and value[1:2]:
        return [value[1:], value]
    return [value]


def _variants(values: Mapping[str, Any], csv_format: bool) -> tuple[dict[str, Any], ...]:
    import itertools

    names = list(values)
    options = [_readings(values[name], csv_format) for name in names]
    return tuple(dict(zip(names, combo)) for combo in itertools.islice(itertools.product(*options), 64))


def _read_table(path: Path, fmt: str) -> list[dict[str, Any]]:
    import csv
    import json

    if fmt == "csv":
        with open(path, encoding="utf-8", newline="") as stream:
            return [dict(row) for row in csv.DictReader(stream)]
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def verify_export(folder: str | Path, expected_digest: str | None = None) -> Report:
    """Check an export folder: file hashes against MANIFEST.json, every chain from the files, the digest."""
    import hashlib
    import json

    folder = Path(folder)
    report = Report(source=str(folder))
    try:
        manifest = json.loads((folder / "MANIFEST.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        report.fail(None, "MANIFEST.json", f"cannot be read ({error})")
        return report
    changed = Report(source=str(folder))
    for name, info in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            changed.fail(None, name, "is listed in MANIFEST.json but missing")
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 16), b""):
                digest.update(block)
        if digest.hexdigest() != info.get("sha256"):
            changed.fail(None, name, "its sha256 differs from MANIFEST.json: the file changed after the export")
    fmt = manifest.get("format", "csv")
    try:
        participants = _read_table(folder / f"participants.{fmt}", fmt)
        messages = _read_table(folder / f"messages.{fmt}", fmt)
        links = _read_table(folder / f"chain.{fmt}", fmt)
    except (OSError, ValueError) as error:
        report.fail(None, "export", f"cannot read its files ({error})")
        return report
    _verify_export_chains(report, manifest, fmt, participants, messages, links)
    if not report.problems:
        stated = manifest.get("study_digest", {}).get("digest")
        if stated != report.digest:
            report.fail(None, "MANIFEST.json", f"states the study digest {stated}, the files give {report.digest}")
        _compare(report, expected_digest)
    # The rows first (they name the participant), then the files that changed.
    report.problems += changed.problems
    since = manifest.get("chain", {}).get("authoritative_since")
    if since:
        report.notes.append(f"chains authoritative since {since}")
    if manifest.get("anonymised"):
        report.notes.append(f"anonymised export: {report.redacted} messages had e-mail addresses or phone numbers"
                            " replaced; their content cannot be checked, only their place in the chain")
    return report


def _verify_export_chains(report: Report, manifest: Mapping[str, Any], fmt: str, participants: list[dict[str, Any]],
                          messages: list[dict[str, Any]], links: list[dict[str, Any]]) -> None:
    csv_format = fmt == "csv"
    people = {row["participant_id"]: (n, row) for n, row in enumerate(participants, 1)}
    by_id: dict[str, tuple[int, dict[str, Any]]] = {}
    order: dict[str, list[tuple[int, str]]] = {}
    for n, row in enumerate(messages, 1):
        key = str(row["message_id"])
        if key in by_id:
            report.fail(row["participant_id"], f"messages.{fmt} row {n}", f"message {key} appears twice")
            return
        by_id[key] = (n, row)
        order.setdefault(str(row["participant_id"]), []).append((n, key))
    chains: dict[str, list[dict[str, Any]]] = {}
    for row in links:
        chains.setdefault(str(row["participant_id"]), []).append(row)
    heads_stated = manifest.get("heads", {})
    heads: list[tuple[str, str]] = []
    used: set[str] = set()
    for pid in sorted(set(people) | set(chains) | set(heads_stated), key=lambda p: p.encode("utf-8")):
        if pid not in people:
            report.fail(pid, f"participants.{fmt}", "has no row for this participant, whose chain is in the export")
            return
        line, person = people[pid]
        synthetic = person.get("synthetic", 0)
        values = {name: person.get(name) for name in chain.FIELDS["participant"] if name != "synthetic"}
        values["synthetic"] = synthetic if synthetic not in (None, "") else 0
        walked: list[Link] = []
        expected_messages: list[str] = []
        for row in chains.get(pid, []):
            seq = int(row["seq"]) if row.get("seq") not in (None, "") else None
            kind = row["link"]
            if kind == "participant":
                readings = _variants(values, csv_format)
                walked.append(Link(seq, kind, f"participants.{fmt} row {line}", readings[0], row["hash"] or None,
                                   readings[1:]))
            elif kind == "status":
                walked.append(Link(seq, kind, f"status change at {row['at']} (chain.{fmt}, link {seq})", row,
                                   row["hash"] or None))
            else:
                key = str(row["message_id"])
                expected_messages.append(key)
                if key not in by_id:
                    report.fail(pid, f"message {key}", f"is link {seq} of the chain but missing from messages.{fmt}"
                                                       " (a deleted row)")
                    return
                n, message = by_id[key]
                used.add(key)
                message_values = {name: message.get(name) for name in chain.FIELDS["message"]}
                message_values["scores"] = _scores(message, manifest.get("message_score_columns", {}))
                readings = _variants(message_values, csv_format)
                opaque = chain.value_text(row.get("redacted")) == "1"
                report.redacted += opaque
                walked.append(Link(seq, kind, f"message {key} (messages.{fmt} row {n})", readings[0],
                                   row["hash"] or None, readings[1:], opaque))
        head, count, intact = walk(report, pid, walked)
        if not intact:
            return
        stated = heads_stated.get(pid, {})
        if head != stated.get("head") or count != stated.get("links"):
            report.fail(pid, f"chain.{fmt}", f"the chain has {count} links ending in {head}; MANIFEST.json states"
                                             f" {stated.get('links')} ending in {stated.get('head')}")
            return
        present = [key for _, key in order.get(pid, [])]
        if present != expected_messages:
            for (n, key), wanted in zip(order.get(pid, []) + [(0, "")] * len(expected_messages),
                                        expected_messages + [""] * len(present)):
                if key != wanted:
                    what = (f"message {key} is in no chain (an added row)" if key and key not in expected_messages
                            else f"message {key} is out of its chain's order (a re-ordered row)" if key
                            else f"message {wanted} is missing")
                    report.fail(pid, f"messages.{fmt} row {n}" if n else f"messages.{fmt}", what)
                    return
        last = next((row for row in reversed(chains.get(pid, [])) if row["link"] == "status"), None)
        reason = _derived_columns(manifest, person, last)
        if reason:
            report.fail(pid, f"participants.{fmt} row {line}", reason)
            return
        if not chain.value_text(values["synthetic"]) or chain.value_text(values["synthetic"]) == "0":
            heads.append((pid, head or ""))
            report.participants += 1
            report.messages += len(expected_messages)
    stray = [(n, key) for key, (n, _) in by_id.items() if key not in used]
    if stray:
        n, key = min(stray)
        report.fail(by_id[key][1].get("participant_id"), f"messages.{fmt} row {n}", f"message {key} is in no chain")
        return
    report.digest = chain.digest(heads)


def _derived_columns(manifest: Mapping[str, Any], person: Mapping[str, Any], last: Mapping[str, Any] | None
                     ) -> str | None:
    """Columns of participants that the chain does not cover itself must agree with what it covers."""
    if last is not None:
        for name in ("status", "problem_type", "finished_at", "described_experience"):
            if name in person and chain.value_text(person.get(name)) != chain.value_text(last.get(name)):
                return f"its `{name}` differs from the last status change of its chain"
        scores = dict(pair.split(":", 1) for pair in (chain.value_text(last.get("scores")) or "").split(",") if pair)
        for label, column in manifest.get("score_columns", {}).items():
            shown = chain.value_text(person.get(column))
            if (shown is None) != (label not in scores) or (shown is not None and float(shown) != float(scores[label])):
                return f"its `{column}` differs from the scores in the last status change of its chain"
    factors = manifest.get("factor_columns", {})
    cell = chain.value_text(person.get("cell"))
    if cell and factors and "-".join(str(person.get(column) or "") for column in factors.values()) != cell:
        return "its factor columns do not spell its `cell`"
    return None


def _scores(row: Mapping[str, Any], columns: Mapping[str, str]) -> str | None:
    """A message's scores as the chain encodes them, read back from the export's score columns."""
    scores = {label: float(row[column]) for label, column in columns.items()
              if row.get(column) not in (None, "")}
    return chain.scores_text(scores)
