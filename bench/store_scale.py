"""Does a turn stay fast as a study grows? Per-turn store operations with 10k, 100k and 1M messages stored.

For each size, a fresh database (made by `store.connect`, so the real schema and indexes) is
filled quickly with `executemany` (participants of ten messages each, replies pointing at the
participant message they answer, as `record_turn` stores them), then each per-turn operation is
timed on new participants: creating one (balanced assignment counts the cells inside the write
lock), reading it by its session token, a turn (`record_turn`, one transaction, synchronous=FULL
as the server runs it), a repeated message (`replies_to`), the transcript and the LLM-reply count.
Medians (and p95) of `--turns` calls each. With `--compare`, the same is timed again after
dropping the `reply_to` index, side by side. `EXPLAIN QUERY PLAN` of every per-turn query is printed.

    python bench/store_scale.py --sizes 10000,100000,1000000 --turns 200 --compare
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from combot import store

PER_PARTICIPANT = 10  # messages: a greeting, then participant message + one reply per turn
QUERIES = {
    "participant_by_token": ("SELECT * FROM participants WHERE token = ?", ("t1",)),
    "replies_to (the message)": ("SELECT * FROM messages WHERE participant_id = ? AND client_message_id = ?",
                                 ("p1", "c1")),
    "replies_to / record_turn (its replies)": ("SELECT * FROM messages WHERE reply_to = ? ORDER BY id", (1,)),
    "record_turn (the participant)": ("SELECT version, status, problem_type, scores, finished_at,"
                                      " described_experience, chain_head, chain_length FROM participants"
                                      " WHERE id = ?", ("p1",)),
    "record_turn (next message id)": ("SELECT coalesce(max(id), 0) FROM messages", ()),
    "record_turn (closed?)": ("SELECT 1 FROM meta WHERE key = 'closed_at'", ()),
    "record_turn (update)": ("UPDATE participants SET state = ?, version = ? WHERE id = ?", ("{}", 1, "p1")),
    "transcript": ("SELECT * FROM messages WHERE participant_id = ? ORDER BY id", ("p1",)),
    "llm_reply_count": ("SELECT count(*) FROM messages WHERE participant_id = ? AND produced_by = 'llm'", ("p1",)),
    "create_participant (cell counts)": ("SELECT cell, n FROM cell_fill WHERE synthetic = ? AND n > 0", (0,)),
    "create_participant (returning platform id)": ("SELECT * FROM participants WHERE platform_id = ? AND status !="
                                                   " 'declined' ORDER BY created_at LIMIT 1", ("x",)),
    "create_participant (client key)": ("SELECT * FROM participants WHERE client_key = ?", ("k",)),
}
CELLS = [f"{b}-{t}-{f}" for b in ("basic", "bramble") for t in ("high", "low") for f in ("high", "low")]


def fill(conn: sqlite3.Connection, messages: int) -> None:
    """`messages` messages in participants of PER_PARTICIPANT, inserted in one transaction."""
    stamp = store.now()
    people = messages // PER_PARTICIPANT
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO participants (id, token, cell, cell_number, factors, assignment, state, version, status, turns,"
        " created_at, updated_at, platform_id, client_key, study_version, synthetic)"
        " VALUES (?, ?, ?, ?, '{}', 'balanced', '{}', 5, 'finished', 4, ?, ?, ?, ?, 'v', 0)",
        ((f"p{i}", f"t{i}", CELLS[i % 8], i % 8 + 1, stamp, stamp, f"pp{i}", f"k{i}") for i in range(people)))

    def rows() -> Any:
        next_id = 1
        for i in range(people):
            yield (next_id, f"p{i}", 0, "bot", "greeting", "Hello, what happened?", "script", None, None, stamp)
            next_id += 1
            for turn in range(1, PER_PARTICIPANT // 2 + 1):
                sent = next_id
                yield (sent, f"p{i}", turn, "participant", "message", "It broke after two days " * 3,
                       f"c{turn}", None, None, stamp)
                next_id += 1
                if next_id - (i * PER_PARTICIPANT) <= PER_PARTICIPANT:
                    yield (next_id, f"p{i}", turn, "bot", "paraphrase", "You say it broke; tell me more.",
                           None, sent, 12, stamp)
                    next_id += 1

    conn.executemany(
        "INSERT INTO messages (id, participant_id, turn, sender, kind, text, client_message_id, reply_to, latency_ms,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows())
    conn.execute("COMMIT")


def plans(conn: sqlite3.Connection) -> dict[str, list[str]]:
    out = {}
    for name, (sql, params) in QUERIES.items():
        out[name] = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
    return out


def timed(fn: Callable[[], Any], n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        began = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    return {"median_ms": round(statistics.median(samples), 3), "p95_ms": round(samples[int(0.95 * (n - 1))], 3)}


def measure(conn: sqlite3.Connection, turns: int, tag: str) -> dict[str, dict[str, float]]:
    """Time each per-turn operation on `turns` fresh participants (ids prefixed by `tag`)."""
    rng = random.Random(1)
    ids = [f"{tag}{i}" for i in range(turns)]
    made = iter(ids)

    def create() -> None:
        pid = next(made)
        store.create_participant(
            conn, participant_id=pid, token=f"tok-{pid}", study_version="v",
            choose_cell=lambda counts: (min(CELLS, key=lambda c: (counts.get(c, 0), rng.random())), 1, {}, "balanced"),
            greet=lambda factors: ({"stage": "chat", "turn": 0}, [store.NewMessage("bot", "greeting", "Hello")]))

    out = {"create_participant": timed(create, turns)}
    out["participant_by_token"] = timed(lambda: store.participant_by_token(conn, f"tok-{rng.choice(ids)}"), turns)
    pending = iter(ids)

    def turn() -> None:
        pid = next(pending)
        store.record_turn(conn, store.Turn(
            participant_id=pid, expected_version=0, turn=1,
            incoming=store.NewMessage("participant", "message", "My parcel never came.", client_message_id="c1"),
            replies=[store.NewMessage("bot", "paraphrase", "It never came; tell me more.", "template", latency_ms=9)],
            state={"stage": "chat", "turn": 1}, status="started"))

    out["record_turn"] = timed(turn, turns)
    out["replies_to (a repeated message)"] = timed(lambda: store.replies_to(conn, rng.choice(ids), "c1"), turns)
    out["transcript"] = timed(lambda: store.transcript(conn, rng.choice(ids)), turns)
    out["llm_reply_count"] = timed(lambda: store.llm_reply_count(conn, rng.choice(ids)), turns)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--compare", action="store_true", help="also time without the reply_to index")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="combot-scale-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            path = Path(tmp) / f"scale-{size}.db"
            conn = store.connect(path)
            began = time.perf_counter()
            fill(conn, size)
            stored = store.message_count(conn)
            entry: dict[str, Any] = {"messages": stored, "fill_s": round(time.perf_counter() - began, 1),
                                     "plans": plans(conn), "with_index": measure(conn, args.turns, "a")}
            if args.compare:
                conn.execute("DROP INDEX idx_messages_reply_to")
                entry["without_reply_to_index"] = measure(conn, args.turns, "b")
                conn.execute("CREATE INDEX idx_messages_reply_to ON messages (reply_to)")
            conn.close()
            path.unlink()
            results[str(size)] = entry
            print(f"\n{stored:,} messages stored (filled in {entry['fill_s']} s); median (p95) ms of {args.turns} calls")
            for name, numbers in entry["with_index"].items():
                line = f"  {name:<34}{numbers['median_ms']:>9.3f} ({numbers['p95_ms']:.3f})"
                if args.compare:
                    before = entry["without_reply_to_index"][name]
                    line += f"   without the reply_to index: {before['median_ms']:>9.3f} ({before['p95_ms']:.3f})"
                print(line)
    first = next(iter(results.values()))
    print("\nEXPLAIN QUERY PLAN (with the indexes):")
    for name, plan in first["plans"].items():
        print(f"  {name}: {' / '.join(plan)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
