"""What a dashboard refresh costs with many participants, with the study digest reused or recomputed.

A fresh database (`store.connect`, so the real schema, indexes and triggers) gets `--participants`
participants of ten messages each (bench/store_scale.py's fill) and a chain head each; then, in
alternating rounds, `monitor.dashboard` (what /admin/api/stats answers every 5 s) is timed as
served (the digest reused while nothing it covers changed) and with the digest recomputed on every
call (as before schema v9: the kept digest is dropped before each call). `study_digest` alone is
timed both ways too. Last, what the schema v9 triggers add to a turn: `record_turn` (one participant
message, one reply; synchronous=OFF, so the disk is out of it) with and without the triggers.

The fill stamps every message "now", so all of them fall in the dashboard's window (`[admin]
window_minutes`): the windowed reply-time queries then read every message, far more than a real
study's last hour. Those, not the digest, are most of a refresh here.

    python bench/dashboard_digest.py --participants 20000 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from store_scale import PER_PARTICIPANT, fill  # noqa: E402

from combot import monitor, store  # noqa: E402
from combot.study import load_study  # noqa: E402

STUDY = Path(__file__).resolve().parent.parent / "combot.toml"


def _ms(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        began = time.perf_counter()
        fn()
        out.append((time.perf_counter() - began) * 1000)
    return out


def _turns(conn: Any, tag: str, n: int) -> list[float]:
    for i in range(n):
        store.create_participant(conn, participant_id=f"{tag}{i}", token=f"tok-{tag}{i}",
                                 choose_cell=lambda counts: ("basic-high-high", 1, {}, "balanced"),
                                 greet=lambda factors: ({"stage": "chat", "turn": 0},
                                                        [store.NewMessage("bot", "greeting", "Hello")]))
    pending = iter(range(n))

    def turn() -> None:
        i = next(pending)
        store.record_turn(conn, store.Turn(
            participant_id=f"{tag}{i}", expected_version=0, turn=1,
            incoming=store.NewMessage("participant", "message", "My parcel never came.", client_message_id="c1"),
            replies=[store.NewMessage("bot", "paraphrase", "It never came; tell me more.", "template", latency_ms=9)],
            state={"stage": "chat", "turn": 1}, status="started"))

    return _ms(turn, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of each way")
    parser.add_argument("--calls", type=int, default=3, help="dashboard calls per way and round")
    parser.add_argument("--turns", type=int, default=300, help="turns per way and round for the trigger cost")
    args = parser.parse_args()
    study = load_study(STUDY, environ={})
    with tempfile.TemporaryDirectory(prefix="combot-dashboard-") as tmp:
        path = Path(tmp) / "dashboard.db"
        conn = store.connect(path)
        fill(conn, args.participants * PER_PARTICIPANT)
        conn.execute("UPDATE participants SET chain_head = lower(hex(randomblob(32)))")
        reader = store.connect(path)
        print(f"{args.participants:,} participants, {store.message_count(reader):,} messages; load average"
              f" {os.getloadavg()[0]:.1f}; median (min-max) ms, {args.rounds} alternating rounds")

        def recomputed() -> Any:
            store.digests._DIGESTS.clear()
            return monitor.dashboard(reader, study)

        times: dict[str, list[float]] = {"dashboard, digest recomputed (before)": [],
                                         "dashboard, digest reused (after)": [],
                                         "study_digest recomputed": [], "study_digest reused": []}
        for _ in range(args.rounds):
            times["dashboard, digest recomputed (before)"] += _ms(recomputed, args.calls)
            monitor.dashboard(reader, study)  # the first refresh after a change computes it
            times["dashboard, digest reused (after)"] += _ms(lambda: monitor.dashboard(reader, study), args.calls)
            times["study_digest recomputed"] += _ms(lambda: store.study_digest(reader), args.calls)
            times["study_digest reused"] += _ms(lambda: store.study_digest(reader, reuse=True), args.calls)
        for name, samples in times.items():
            print(f"  {name:<40}{statistics.median(samples):>9.2f} ({min(samples):.2f}-{max(samples):.2f})")

        # The triggers' cost per turn: the same turns on two small databases, one without the triggers.
        costs: dict[str, list[float]] = {"record_turn with the v9 triggers": [], "record_turn without them": []}
        plain, bare = store.connect(Path(tmp) / "with.db"), store.connect(Path(tmp) / "without.db")
        for name in [row[0] for row in bare.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"
                                                      " AND name LIKE 'chain_changes_%'")]:
            bare.execute(f"DROP TRIGGER {name}")
        for handle in (plain, bare):
            handle.execute("PRAGMA synchronous = OFF")
        for n in range(args.rounds):
            costs["record_turn with the v9 triggers"] += _turns(plain, f"r{n}-", args.turns)
            costs["record_turn without them"] += _turns(bare, f"r{n}-", args.turns)
        for name, samples in costs.items():
            print(f"  {name:<40}{statistics.median(samples) * 1000:>9.1f} µs")
        for handle in (conn, reader, plain, bare):
            handle.close()


if __name__ == "__main__":
    main()
