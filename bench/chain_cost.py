"""What the hash chain costs per turn: `store.record_turn` with and without it, side by side.

Each round stores the same turns (a participant message and two bot replies, as a follow-up turn
does) on two fresh database files: once with Combot's chain, once with the chain replaced by a
no-op (no hashing, no status-change row, no head update; the explicit message id stays). Rounds
alternate, so drift on a shared machine hits both alike; medians of the per-turn times are
compared. `--sync full` is what the server runs (one fsync per turn here, because this calls
record_turn outside the Store's group commit); `--sync off` takes the disk out, leaving the CPU cost.

    python bench/chain_cost.py --turns 400 --rounds 5 --sync full
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from combot import store
from combot.store import NewMessage, Turn


class _NoChain(store._Chain):
    """The chain taken out: links cost nothing and nothing chain-related is written."""

    @classmethod
    def new(cls, conn: Any, participant_id: str, stamp: str) -> store._Chain:
        return cls(conn, participant_id, None, 0)

    def add(self, kind: str, values: Mapping[str, Any]) -> tuple[int, str]:
        return 0, ""

    def add_status(self, values: Mapping[str, Any]) -> None:
        return None

    def saved_columns(self) -> dict[str, Any]:
        return {}

    def save(self) -> None:
        return None


def _choose(counts: Mapping[str, int]) -> tuple[str, int, dict[str, str], str]:
    return "basic-high-high", 1, {"brand": "basic", "think": "high", "feel": "high"}, "balanced"


def _greet(factors: Mapping[str, str]) -> tuple[dict[str, Any], list[NewMessage]]:
    return {"stage": "chat"}, [NewMessage("bot", "greeting", "Hello, I am Combot. What happened?", "script")]


def one_run(folder: Path, name: str, turns: int, participants: int, sync: str) -> list[float]:
    conn = store.connect(folder / f"{name}.db")
    conn.execute(f"PRAGMA synchronous = {sync.upper()}")
    versions = {}
    for n in range(participants):
        pid = f"p{n:05d}"
        store.create_participant(conn, participant_id=pid, token="t" + pid, choose_cell=_choose, greet=_greet)
        versions[pid] = 0
    times = []
    for k in range(turns):
        pid = f"p{k % participants:05d}"
        version = versions[pid]
        turn = Turn(participant_id=pid, expected_version=version, turn=version + 1,
                    incoming=NewMessage("participant", "message", f"It was turn {k} and still nobody helped me."
                                        " The parcel was two weeks late.", client_message_id=f"c{k}", stage="chat",
                                        expects="message"),
                    replies=[NewMessage("bot", "paraphrase", "So the parcel was two weeks late and nobody helped?",
                                        "template", latency_ms=3, compute_ms=3, shown_ms=900),
                             NewMessage("bot", "question", "What did you do next?", "script", latency_ms=3,
                                        compute_ms=3, shown_ms=1800)],
                    state={"stage": "chat"}, status="started", problem_type="B" if version == 0 else None,
                    scores={"A": 0.05, "B": 0.9, "C": 0.03, "Other": 0.02} if version == 0 else None)
        started = time.perf_counter()
        store.record_turn(conn, turn)
        times.append(time.perf_counter() - started)
        versions[pid] = version + 1
    conn.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=400)
    parser.add_argument("--participants", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sync", choices=["full", "off"], default="full")
    args = parser.parse_args()
    chained = store._Chain
    # Swapped where record_turn and create_participant look it up (store/turns.py, store/participants.py).
    users: tuple[Any, ...] = (store.turns, store.participants)
    medians: dict[str, list[float]] = {"with chain": [], "without": []}
    with tempfile.TemporaryDirectory(prefix="combot-chain-cost-") as tmp:
        for round_ in range(args.rounds):
            order: list[tuple[str, Callable[..., Any]]] = [("with chain", chained), ("without", _NoChain)]
            for label, kind in order if round_ % 2 == 0 else order[::-1]:
                for module in users:
                    module._Chain = kind
                times = one_run(Path(tmp), f"{label.replace(' ', '-')}-{round_}", args.turns, args.participants,
                                args.sync)
                medians[label].append(statistics.median(times) * 1e6)
        for module in users:
            module._Chain = chained
    print(f"record_turn, {args.turns} turns x {args.rounds} rounds, synchronous={args.sync.upper()},"
          f" {args.participants} participants (median per turn, microseconds):")
    for label, values in medians.items():
        print(f"  {label:>10}: median of rounds {statistics.median(values):8.1f}  (rounds:"
              f" {', '.join(f'{v:.0f}' for v in values)})")
    with_chain, without = statistics.median(medians["with chain"]), statistics.median(medians["without"])
    print(f"  difference: {with_chain - without:+.1f} us per turn ({(with_chain / without - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
