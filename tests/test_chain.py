from __future__ import annotations

import hashlib

from combot import chain


def test_the_encoding_is_fixed_and_leaves_out_nulls_and_empty_text() -> None:
    values = {"participant_id": "p1", "message_id": 7, "turn": 1, "sender": "participant", "kind": "message",
              "text": "Grüße\nline 2", "produced_by": "participant", "model": None, "latency_ms": None,
              "fallback_reason": "", "timestamp": "2026-01-02T03:04:05.678Z"}
    assert chain.encode("message", values) == (
        "combot-chain-1\nmessage\nparticipant_id=2:p1\nmessage_id=1:7\nturn=1:1\nsender=11:participant\n"
        "kind=7:message\ntext=14:Grüße\nline 2\nproduced_by=11:participant\ntimestamp=24:2026-01-02T03:04:05.678Z\n"
    ).encode("utf-8")


def test_a_link_hashes_the_previous_hash_then_the_encoding() -> None:
    values = {"participant_id": "p1", "cell": "a-b", "cell_number": 2, "assignment": "balanced",
              "consent": "not asked", "started_at": "2026-01-02T03:04:05.678Z"}
    first = chain.link(None, "participant", values)
    assert first == hashlib.sha256(bytes(32) + chain.encode("participant", values)).hexdigest()
    second = chain.link(first, "participant", values)
    assert second == hashlib.sha256(bytes.fromhex(first) + chain.encode("participant", values)).hexdigest()


def test_values_read_back_from_text_encode_the_same() -> None:
    # What a CSV gives back (all text, empty for null) must hash like the stored values.
    stored = {"participant_id": "p1", "message_id": 3, "turn": 0, "text": "hi", "model": None, "latency_ms": 12}
    from_csv = {"participant_id": "p1", "message_id": "3", "turn": "0", "text": "hi", "model": "", "latency_ms": "12"}
    assert chain.encode("message", stored) == chain.encode("message", from_csv)
    assert chain.scores_text({"B": 0.25, "A": 0.1 + 0.2}) == "A:0.30000000000000004,B:0.25"
    assert chain.scores_text({}) is None


def test_any_change_of_a_covered_field_changes_the_hash() -> None:
    values = {"participant_id": "p1", "at": "t", "status": "started", "problem_type": "A", "scores": "A:1.0"}
    base = chain.link(None, "status", values)
    for name, other in [("status", "finished"), ("problem_type", "B"), ("scores", "A:0.9"), ("at", "u"),
                        ("participant_id", "p2"), ("finished_at", "t")]:
        assert chain.link(None, "status", {**values, name: other}) != base, name
    # A value cannot leak into the next field: lengths are part of the encoding.
    assert (chain.encode("status", {"status": "a", "problem_type": "b"})
            != chain.encode("status", {"status": "a\nproblem_type=1:b"}))


def test_the_digest_is_rfc6962_over_sorted_leaves() -> None:
    def h(data: bytes) -> bytes:
        return hashlib.sha256(data).digest()

    heads = [("p3", "cc" * 32), ("p1", "aa" * 32), ("p2", "bb" * 32)]
    leaves = [chain.leaf(pid, head) for pid, head in sorted(heads)]
    expected = h(b"\x01" + h(b"\x01" + h(b"\x00" + leaves[0]) + h(b"\x00" + leaves[1])) + h(b"\x00" + leaves[2]))
    assert chain.digest(heads) == expected.hex()
    assert chain.digest([]) == hashlib.sha256(b"").hexdigest()
    assert chain.digest(heads[:1]) == h(b"\x00" + chain.leaf("p3", "cc" * 32)).hex()
    assert chain.digest([("p1", "aa" * 32), ("p2", "bb" * 32)]) != chain.digest([("p1", "bb" * 32), ("p2", "aa" * 32)])


def _reference(items: list[bytes]) -> bytes:
    """RFC 6962 section 2.1, written as the RFC says it."""
    if len(items) == 1:
        return hashlib.sha256(b"\x00" + items[0]).digest()
    k = 1
    while k * 2 < len(items):
        k *= 2
    return hashlib.sha256(b"\x01" + _reference(items[:k]) + _reference(items[k:])).digest()


def test_the_one_pass_merkle_root_equals_the_rfc_definition() -> None:
    for n in range(1, 40):
        items = [f"leaf {i}".encode() for i in range(n)]
        assert chain.merkle_root(iter(items)) == _reference(items).hex(), n
