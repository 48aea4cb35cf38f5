"""Hash chains over each participant's data, and the study digest over all of them. Pure: no I/O.

Each participant has one chain. Its links, in the order they were written:

- one `participant` link when the row is created (the fields that never change afterwards);
- one `status` link at creation and one whenever status, problem type, scores or finish time change;
- one `message` link per stored message.

A link's hash is `SHA-256(previous hash ‖ encoding)`, with 32 zero bytes before the first link;
the last hash is the participant's chain head. The encoding of a link (UTF-8 bytes) is

    combot-chain-1 LF <link kind> LF
    then, for each declared field of that kind, in the declared order, unless its value is null
    or empty:  <name> "=" <length of the value in UTF-8 bytes, decimal> ":" <value> LF

Values are written as text: text as stored, integers in decimal, timestamps exactly as stored
(UTC, ISO 8601 with milliseconds), scores as `label:value` pairs sorted by label and joined by
`,` (each value the shortest decimal that reads back as the same double, Python's `repr`). A
null and an empty text are both left out, so a field added in a later version (null in older
rows) leaves older hashes valid, and a CSV's empty cell reads back as it was written.

The study digest is the Merkle tree hash of RFC 6962 (section 2.1) over one leaf per participant,
in order of participant id (bytewise): leaf data = `UTF-8 participant id ‖ 0x00 ‖ chain head (32
bytes)`. With no participants it is SHA-256 of nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    import sqlite3

FORMAT = "combot-chain-1"
GENESIS = bytes(32)

# The fields each kind of link covers, by the name they have in the export. Fields of other
# engineers' columns join these lists when they exist (null in older rows, so older links still
# verify); anything not listed here is not covered, see the codebook.
FIELDS: dict[str, tuple[str, ...]] = {
    "participant": ("participant_id", "cell", "cell_number", "assignment", "consent", "started_at", "study_version",
                    "synthetic"),
    "status": ("participant_id", "at", "status", "problem_type", "scores", "finished_at", "described_experience"),
    "message": ("participant_id", "message_id", "turn", "sender", "kind", "text", "produced_by", "model",
                "latency_ms", "fallback_reason", "timestamp", "stage", "expects", "scores", "compute_ms", "shown_ms"),
}
# The fields whose change makes a new status link.
STATUS_FIELDS = ("status", "problem_type", "scores", "finished_at", "described_experience")


def value_text(value: Any) -> str | None:
    """A field value as the encoding writes it; None when it is left out."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    return text if text != "" else None


def scores_text(scores: Mapping[str, Any] | None) -> str | None:
    """The canonical text of a participant's classifier scores (None when there are none)."""
    if not scores:
        return None
    return ",".join(f"{label}:{float(scores[label])!r}" for label in sorted(scores))


def encode(kind: str, values: Mapping[str, Any]) -> bytes:
    """The canonical encoding of one link (see the module's docstring)."""
    parts = [FORMAT, "\n", kind, "\n"]
    for name in FIELDS[kind]:
        text = value_text(values.get(name))
        if text is None:
            continue
        parts += [name, "=", str(len(text.encode("utf-8"))), ":", text, "\n"]
    return "".join(parts).encode("utf-8")


def link(previous: str | None, kind: str, values: Mapping[str, Any]) -> str:
    """The hex hash of a link that follows `previous` (a hex hash, or None for a chain's first link)."""
    before = bytes.fromhex(previous) if previous else GENESIS
    return hashlib.sha256(before + encode(kind, values)).hexdigest()


def status_values(row: sqlite3.Row | Mapping[str, Any]) -> dict[str, Any]:
    """The status fields of a participant row (scores parsed from their stored JSON)."""
    scores = row["scores"]
    parsed = json.loads(scores) if isinstance(scores, str) and scores else scores
    return {"status": row["status"], "problem_type": row["problem_type"],
            "scores": scores_text(parsed if isinstance(parsed, Mapping) else None), "finished_at": row["finished_at"],
            "described_experience": row["described_experience"]}


def same_status(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(value_text(a.get(name)) == value_text(b.get(name)) for name in STATUS_FIELDS)


# --- the study digest -----------------------------------------------------------------------------

def leaf(participant_id: str, head: str | None) -> bytes:
    # A row written without a chain (by hand) has no head: its leaf holds none, and verify says so.
    return participant_id.encode("utf-8") + b"\x00" + bytes.fromhex(head or "")


def merkle_root(leaves: Iterable[bytes]) -> str:
    """RFC 6962 Merkle tree hash (hex) of the leaf data, in the given order, in one pass.

    A stack of perfect subtrees (sizes strictly decreasing) is merged as leaves arrive; folding it
    from the right at the end gives the RFC's split at the largest power of two below n."""
    stack: list[tuple[int, bytes]] = []
    for data in leaves:
        size, node = 1, hashlib.sha256(b"\x00" + data).digest()
        while stack and stack[-1][0] == size:
            left_size, left = stack.pop()
            size, node = left_size + size, hashlib.sha256(b"\x01" + left + node).digest()
        stack.append((size, node))
    if not stack:
        return hashlib.sha256(b"").hexdigest()
    _, root = stack.pop()
    while stack:
        _, left = stack.pop()
        root = hashlib.sha256(b"\x01" + left + root).digest()
    return root.hex()


def digest(heads: Iterable[tuple[str, str | None]], ordered: bool = False) -> str:
    """The study digest over (participant id, chain head) pairs; sorted here unless `ordered` says
    they already come by participant id, bytewise (as SQLite's ORDER BY id gives them)."""
    pairs = heads if ordered else sorted(heads, key=lambda pair: pair[0].encode("utf-8"))
    return merkle_root(leaf(pid, head) for pid, head in pairs)
