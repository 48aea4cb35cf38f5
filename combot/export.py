"""Export for analysis: tidy files for R, Stata, SPSS or pandas, and a codebook that explains them.

- participants.csv: one row per participant (declines included), factors and scores as columns.
- messages.csv: one row per stored message.
- personal.csv: e-mail addresses, platform ids and URL parameters; left out with `anonymise`.
- study/<version>.toml: the full text of each study version participants saw (`study_version`).
- codebook.md: every column and every value, and the Combot version and model digests.
- chain.csv: every participant's hash chain, one row per link (combot/chain.py).
- MANIFEST.json: the sha256 of every file above, each participant's chain head, the study digest,
  the study versions and the Combot version; `combot verify DIR` checks all of it.

Synthetic participants (`combot bench`, pilots) are left out unless `include_synthetic`, which adds
them with a `synthetic` column.

Rows are streamed from SQLite cursors straight into the files, so memory stays flat however many
messages there are; the whole export reads one snapshot (one read transaction), so the files agree
with each other even while participants keep chatting.

CSV choices: UTF-8 *without* a byte-order mark (R's read.csv, Stata and Python's csv module would
otherwise glue it to the first column name; Excel users open the file with Data > From Text/CSV),
RFC 4180 quoting, CRLF row ends, empty cell for a missing value, and a leading `'` in front of
any text cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return so that no
spreadsheet runs participant text as a formula. JSON Lines are written as stored, unneutralised.
"""

from __future__ import annotations

import atexit
import csv
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import tempfile
import zipfile
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence

from combot import __version__, chain, store
from combot.codebook import codebook
from combot.redact import redact
from combot.errors import CombotError
from combot.settings import Settings
from combot.study import Study

FORMATS = ("csv", "jsonl")
PERSONAL = "personal"
STUDY_FOLDER = "study"
CHAIN = "chain"
MANIFEST = "MANIFEST.json"
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class ExportError(CombotError):
    """The export cannot be written (no database, or a folder that already holds personal data)."""

    status_code = 400


def neutralise(value: Any) -> Any:
    """Make a text cell inert in spreadsheets: `=SUM(A1)` becomes `'=SUM(A1)`."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


# --- columns --------------------------------------------------------------------------------------

def _column_name(raw: str, taken: set[str], prefix: str) -> str:
    """A name R and Stata accept as it is; prefixed when it would clash with a fixed column."""
    name = re.sub(r"\W", "_", raw, flags=re.ASCII) or prefix.rstrip("_")
    if name[0].isdigit() or name in taken:
        name = prefix + name
    taken.add(name)
    return name


PARTICIPANT_FIXED = ("participant_id", "cell", "cell_number", "problem_type", "described_experience", "reprompts",
                     "status", "consent", "started_at", "finished_at", "last_active_at", "seconds_spent", "turns",
                     "assignment", "study_version")
MESSAGE_COLUMNS = ("participant_id", "message_id", "turn", "sender", "kind", "text", "produced_by", "model",
                   "latency_ms", "compute_ms", "shown_ms", "fallback_reason", "timestamp", "stage", "expects",
                   "experience_score")
CHAIN_COLUMNS = ("participant_id", "seq", "link", "message_id", "redacted", "at", "status", "problem_type",
                 "scores", "finished_at", "described_experience", "hash")
PERSONAL_FIXED = ("participant_id", "email", "platform_id", "user_agent")


class Layout:
    """The columns of each file for this study: fixed ones plus one per factor, score and URL parameter."""

    def __init__(self, study: Study, extra_params: Iterable[str] = (), include_synthetic: bool = False,
                 anonymise: bool = False):
        taken = set(PARTICIPANT_FIXED) | {"synthetic"}
        self.include_synthetic = include_synthetic
        self.anonymise = anonymise
        self.factors = {name: _column_name(name, taken, "factor_") for name in study.factors}
        self.scores = {label: _column_name("score_" + label, taken, "x_") for label in study.problem_types}
        self.participants = (PARTICIPANT_FIXED[:3] + tuple(self.factors.values()) + PARTICIPANT_FIXED[3:4]
                             + tuple(self.scores.values()) + PARTICIPANT_FIXED[4:]
                             + (("synthetic",) if include_synthetic else ()))
        # Each opening attempt's classifier scores (the first message, and any after a re-prompt).
        taken = set(MESSAGE_COLUMNS)
        self.message_scores = {label: _column_name("score_" + label, taken, "x_") for label in study.problem_types}
        self.messages = MESSAGE_COLUMNS + tuple(self.message_scores.values())
        taken = set(PERSONAL_FIXED)
        names = list(dict.fromkeys([*_configured_params(study.settings), *extra_params]))
        self.params = {name: _column_name(name, taken, "param_") for name in names}
        self.personal = PERSONAL_FIXED[:3] + tuple(self.params.values()) + PERSONAL_FIXED[3:]


def _configured_params(settings: Settings) -> list[str]:
    names = list(settings["recruitment.params"])
    if settings["recruitment.platform_id"] and settings["recruitment.platform_id"] not in names:
        names.append(settings["recruitment.platform_id"])
    return names


# --- rows -----------------------------------------------------------------------------------------

def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    delta = datetime.fromisoformat(end.replace("Z", "+00:00")) - datetime.fromisoformat(start.replace("Z", "+00:00"))
    return round(delta.total_seconds(), 3)


def _real_only(layout: Layout, alias: str = "") -> str:
    """The SQL condition that leaves synthetic participants (bench, pilot) out, unless they are wanted."""
    return "1" if layout.include_synthetic else f"{alias}synthetic = 0"


def participant_rows(conn: sqlite3.Connection, layout: Layout) -> Iterator[dict[str, Any]]:
    for row in conn.execute(f"SELECT * FROM participants WHERE {_real_only(layout)} ORDER BY created_at, id"):
        factors = json.loads(row["factors"] or "{}")
        scores = json.loads(row["scores"] or "{}")
        declined = row["status"] == "declined"
        out: dict[str, Any] = {
            "participant_id": row["id"], "cell": row["cell"] or None, "cell_number": row["cell_number"],
            "problem_type": row["problem_type"], "status": row["status"],
            "described_experience": row["described_experience"],
            "reprompts": None if declined else int(json.loads(row["state"] or "{}").get("reprompts", 0)),
            "consent": "declined" if declined else "agreed" if row["consented_at"] else "not asked",
            "started_at": row["created_at"], "finished_at": row["finished_at"], "last_active_at": row["updated_at"],
            "seconds_spent": None if declined else _seconds(row["created_at"], row["finished_at"] or row["updated_at"]),
            "turns": row["turns"], "assignment": row["assignment"], "study_version": row["study_version"],
            "synthetic": row["synthetic"],
        }
        for name, column in layout.factors.items():
            out[column] = factors.get(name)
        for label, column in layout.scores.items():
            out[column] = scores.get(label)
        yield out


def message_rows(conn: sqlite3.Connection, layout: Layout) -> Iterator[dict[str, Any]]:
    # (participant_id, id) is indexed, so this streams in order without a sort.
    where = "" if layout.include_synthetic else " WHERE participant_id IN (SELECT id FROM participants WHERE synthetic = 0)"
    for row in conn.execute(
            "SELECT participant_id, id, turn, sender, kind, text, produced_by, model, latency_ms, compute_ms, shown_ms,"
            " fallback_reason,"
            f" created_at, stage, expects, scores FROM messages{where} ORDER BY participant_id, id"):
        scores = json.loads(row["scores"]) if row["scores"] else {}
        out = {"participant_id": row["participant_id"], "message_id": row["id"], "turn": row["turn"],
               "sender": row["sender"], "kind": row["kind"],
               "text": redact(row["text"]) if layout.anonymise else row["text"], "produced_by": row["produced_by"],
               "model": row["model"], "latency_ms": row["latency_ms"], "compute_ms": row["compute_ms"],
               "shown_ms": row["shown_ms"], "fallback_reason": row["fallback_reason"],
               "timestamp": row["created_at"], "stage": row["stage"], "expects": row["expects"],
               "experience_score": scores.get("experience")}
        for label, column in layout.message_scores.items():
            out[column] = scores.get(label)
        yield out


def chain_rows(conn: sqlite3.Connection, layout: Layout) -> Iterator[dict[str, Any]]:
    """Every link of every exported participant's chain, in chain order; the content of status
    links (which no other file holds), the message id of message links."""
    for participant, changes, messages in store.chains(conn, include_synthetic=layout.include_synthetic):
        pid = participant["id"]
        links: list[dict[str, Any]] = [{"participant_id": pid, "seq": 0, "link": "participant",
                                        "hash": participant["hash"]}]
        links += [{**{name: row[name] for name in CHAIN_COLUMNS if name not in ("link", "message_id", "redacted")},
                   "link": "status"} for row in changes]
        # An anonymised export replaces e-mail addresses and phone numbers in message texts: those
        # rows cannot give their hash any more, and say so.
        links += [{"participant_id": pid, "seq": row["seq"], "link": "message", "message_id": row["id"],
                   "redacted": 1 if layout.anonymise and redact(row["text"]) != row["text"] else None,
                   "hash": row["hash"]} for row in messages]
        yield from sorted(links, key=lambda link: link["seq"] if link["seq"] is not None else -1)


def personal_rows(conn: sqlite3.Connection, layout: Layout) -> Iterator[dict[str, Any]]:
    for row in conn.execute(
            "SELECT p.id, e.email, p.platform_id, p.url_params, p.user_agent FROM participants p"
            f" LEFT JOIN emails e ON e.participant_id = p.id WHERE {_real_only(layout, 'p.')}"
            " ORDER BY p.created_at, p.id"):
        params = json.loads(row["url_params"] or "{}")
        out: dict[str, Any] = {"participant_id": row["id"], "email": row["email"], "platform_id": row["platform_id"],
                               "user_agent": row["user_agent"] or None}
        for name, column in layout.params.items():
            out[column] = params.get(name)
        yield out


def _stored_param_names(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute(
        "SELECT DISTINCT j.key FROM participants p, json_each(CASE WHEN json_valid(p.url_params)"
        " THEN p.url_params ELSE '{}' END) AS j ORDER BY j.key")]


# --- writing --------------------------------------------------------------------------------------

def write_rows(stream: IO[str], fmt: str, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows to a text stream opened with newline=''; returns how many."""
    count = 0
    if fmt == "csv":
        writer = csv.writer(stream, lineterminator="\r\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else neutralise(row.get(c)) for c in columns])
            count += 1
    else:
        for row in rows:
            stream.write(json.dumps({c: row.get(c) for c in columns}, ensure_ascii=False) + "\n")
            count += 1
    return count


@contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One read transaction: every file sees the same moment of the study (WAL lets writers go on)."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


def _tables(conn: sqlite3.Connection, layout: Layout, anonymise: bool
            ) -> list[tuple[str, Sequence[str], Callable[[], Iterable[Mapping[str, Any]]]]]:
    tables: list[tuple[str, Sequence[str], Callable[[], Iterable[Mapping[str, Any]]]]] = [
        ("participants", layout.participants, lambda: participant_rows(conn, layout)),
        ("messages", layout.messages, lambda: message_rows(conn, layout)),
    ]
    tables.append((CHAIN, CHAIN_COLUMNS, lambda: chain_rows(conn, layout)))
    if not anonymise:
        tables.append((PERSONAL, layout.personal, lambda: personal_rows(conn, layout)))
    return tables


class _Hashing:
    """A text stream that keeps the sha256 and size of the UTF-8 bytes written through it."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, text: str) -> int:
        data = text.encode("utf-8")
        self.sha256.update(data)
        self.bytes += len(data)
        return self.stream.write(text)


def write_manifest(stream: IO[str], conn: sqlite3.Connection, layout: Layout, fmt: str, anonymise: bool,
                   files: Mapping[str, Mapping[str, Any]]) -> None:
    """MANIFEST.json: the files' hashes, the study digest of this snapshot and (streamed, one line
    each) every exported participant's chain head."""
    text = json.dumps(manifest(conn, layout, fmt, anonymise, files), indent=2, ensure_ascii=False)
    stream.write(text[:-2] + ',\n  "heads": {')
    for n, row in enumerate(store.chain_heads_of(conn, include_synthetic=layout.include_synthetic)):
        entry = {"head": row["chain_head"], "links": row["chain_length"], "synthetic": bool(row["synthetic"])}
        stream.write(("," if n else "") + "\n    " + json.dumps(row["id"], ensure_ascii=False) + ": "
                     + json.dumps(entry))
    stream.write("\n  }\n}\n")


def manifest(conn: sqlite3.Connection, layout: Layout, fmt: str, anonymise: bool,
             files: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What MANIFEST.json says, but for the chain heads (written after it by `write_manifest`)."""
    info = store.study_digest(conn)
    meta = store.meta(conn)
    return {
        "manifest": "combot-export-1",
        "combot_version": __version__,
        "exported_at": store.now(),
        "format": fmt,
        "anonymised": anonymise,
        "includes_synthetic": layout.include_synthetic,
        "study_versions": [row["version"] for row in store.study_versions(conn, layout.include_synthetic)],
        "chain": {"format": chain.FORMAT, "fields": chain.FIELDS, "authoritative_since": meta.get("chain_since"),
                  "computed_on_upgrade": meta.get("chain_backfilled")},
        "study_digest": {"digest": info["digest"], "participants": info["participants"], "messages": info["messages"],
                         "closed_at": info["closed_at"], "closing_digest": info["closing_digest"]},
        "factor_columns": layout.factors,
        "score_columns": layout.scores,
        "message_score_columns": {"experience": "experience_score", **layout.message_scores},
        "files": dict(files),
    }


def _write_all(conn: sqlite3.Connection, study: Study, anonymise: bool, fmt: str,
               open_text: Callable[[str], Any], include_synthetic: bool = False) -> dict[str, int]:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format '{fmt}' (expected one of: {', '.join(FORMATS)})")
    counts: dict[str, int] = {}
    files: dict[str, dict[str, Any]] = {}

    @contextmanager
    def hashed(name: str) -> Iterator[_Hashing]:
        with open_text(name) as stream:
            hashing = _Hashing(stream)
            yield hashing
        files[name] = {"sha256": hashing.sha256.hexdigest(), "bytes": hashing.bytes}

    with snapshot(conn):
        layout = Layout(study, _stored_param_names(conn), include_synthetic=include_synthetic, anonymise=anonymise)
        for name, columns, rows in _tables(conn, layout, anonymise):
            with hashed(f"{name}.{fmt}") as stream:
                counts[name] = write_rows(stream, fmt, columns, rows())  # type: ignore[arg-type]
            files[f"{name}.{fmt}"]["rows"] = counts[name]
        # Every version of the study participants saw, as the text it was served from.
        versions = store.study_versions(conn, include_synthetic)
        for version in versions:
            with hashed(f"{STUDY_FOLDER}/{version['version']}.toml") as stream:
                stream.write(version["text"])
        with hashed("codebook.md") as stream:
            stream.write(codebook(conn, study, layout, fmt, anonymise, counts, versions))
        with open_text(MANIFEST) as stream:
            write_manifest(stream, conn, layout, fmt, anonymise, files)
    return counts


def export_to_dir(conn: sqlite3.Connection, study: Study, out: str | Path, *, anonymise: bool = False,
                  fmt: str = "csv", include_synthetic: bool = False) -> dict[str, int]:
    """Write the export into folder `out` (created if needed); returns rows written per file.

    Each file is written under a temporary name and renamed when complete. With `anonymise`, a
    folder that still holds personal data from an earlier export is refused rather than left
    looking anonymous.
    """
    folder = Path(out)
    if anonymise:
        leftovers = [f"{PERSONAL}.{ext}" for ext in FORMATS if (folder / f"{PERSONAL}.{ext}").exists()]
        if leftovers:
            raise ExportError(f"{folder} already holds {', '.join(leftovers)} from an earlier export;"
                              " choose an empty folder for an anonymised export")
    folder.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def open_text(name: str) -> Iterator[IO[str]]:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.partial")
        with open(temporary, "w", encoding="utf-8", newline="") as stream:
            yield stream
        os.replace(temporary, target)

    return _write_all(conn, study, anonymise, fmt, open_text, include_synthetic)


def export_to_zip(conn: sqlite3.Connection, study: Study, target: IO[bytes], *, anonymise: bool = False,
                  fmt: str = "csv", include_synthetic: bool = False) -> dict[str, int]:
    """The same files in a zip archive written to `target` (a file, so nothing is held in memory)."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:

        @contextmanager
        def open_text(name: str) -> Iterator[IO[str]]:
            with archive.open(name, "w", force_zip64=True) as raw:
                stream = io.TextIOWrapper(raw, encoding="utf-8", newline="")
                yield stream
                stream.flush()
                stream.detach()

        return _write_all(conn, study, anonymise, fmt, open_text, include_synthetic)


def open_database(path: str | Path) -> sqlite3.Connection:
    """The study database for exporting; an error (not a new empty file) when it does not exist.

    A database that can be written is opened as the server opens it (brought up to date). A
    read-only one (an archived study on read-only media or with read-only permissions) is read as it
    is, nothing written beside it; when it needs what only a write can give (a write-ahead log to
    replay, an older schema to migrate), a private temporary copy is read instead.
    """
    database = Path(path)
    if not database.is_file():
        raise ExportError(f"no database at {path}")
    resolved = database.resolve()
    if os.access(resolved, os.W_OK) and os.access(resolved.parent, os.W_OK):
        return store.connect(path)
    wal = Path(f"{resolved}-wal")
    try:
        if not (wal.is_file() and wal.stat().st_size > 0):
            conn = store.connect_readonly(resolved)
            if store.schema_version(conn) == store.SCHEMA_VERSION:
                return conn
            conn.close()
        return _private_copy(resolved)
    except (OSError, sqlite3.Error) as error:
        raise ExportError(f"cannot read the database {path}: {error}") from None


def _private_copy(database: Path) -> sqlite3.Connection:
    """A copy of a read-only database (and its write-ahead log) in a temporary folder, brought up to date."""
    folder = Path(tempfile.mkdtemp(prefix="combot-export-"))
    atexit.register(shutil.rmtree, folder, True)
    for suffix in ("", "-wal"):
        if Path(f"{database}{suffix}").is_file():
            shutil.copyfile(f"{database}{suffix}", folder / f"study.db{suffix}")
    return store.connect(folder / "study.db")
