"""Two checkouts side by side: the same `combot bench` load against each, alternating, N runs.

On a shared machine absolute timings drift from minute to minute; alternating the two servers
run by run and comparing medians keeps the comparison fair. The load generator is this checkout's.

    python bench/ab.py --checkout /work/wt/baseline --checkout . --runs 3 -- --users 30 --mode first-message --no-llm
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from combot.bench import BenchOptions, run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", action="append", required=True, help="source tree whose server to run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--mode", default="full", choices=["full", "first-message"])
    parser.add_argument("--think-time", type=float, default=0.0)
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--llm-latency", type=float, default=1.0)
    parser.add_argument("--no-llm", action="store_true")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--server-env", action="append", default=[], help="NAME=VALUE for the servers")
    parser.add_argument("--json", help="write every run's report here")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.server_env)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.checkout}
    for run in range(args.runs):
        for checkout in args.checkout:
            options = BenchOptions(users=[args.users], workers=args.workers, think_time=args.think_time,
                                   mode=args.mode, llm_latency=args.llm_latency, use_llm=not args.no_llm,
                                   duration=args.duration, progress=False,
                                   server_env={"PYTHONPATH": str(Path(checkout).resolve()), **extra})
            level = run_bench(options, say=lambda line: None)["levels"][0]
            runs[checkout].append(level)
            mem = level.get("memory", {})
            print(f"run {run + 1} {checkout}: {level['succeeded']}/{level['participants']} ok, "
                  + ", ".join(f"{kind} p95 {row['p95'] * 1000:.0f} ms" for kind, row in level["latency"].items())
                  + f", {level['replies_per_s']:.0f} replies/s, PSS {mem.get('total_pss_mb', 0):.0f} MB, "
                  f"RSS {mem.get('total_mb', 0):.0f} MB, missing {level.get('data', {}).get('messages_missing')}",
                  file=sys.stderr, flush=True)
    medians: dict[str, dict[str, float]] = {}
    for checkout, levels in runs.items():
        row = {f"{kind} p95 ms": statistics.median(lv["latency"][kind]["p95"] * 1000 for lv in levels)
               for kind in levels[0]["latency"]}
        row["every reply p50 ms"] = statistics.median(lv["latency"]["every reply"]["p50"] * 1000 for lv in levels)
        row["replies/s"] = statistics.median(lv["replies_per_s"] for lv in levels)
        row["PSS MB"] = statistics.median(lv.get("memory", {}).get("total_pss_mb", 0) for lv in levels)
        row["RSS MB"] = statistics.median(lv.get("memory", {}).get("total_mb", 0) for lv in levels)
        row["failed"] = sum(lv["failed"] for lv in levels)
        medians[checkout] = row
    names = list(medians)
    print(f"\nmedians of {args.runs} runs, alternating")
    print(f"{'':<26}" + "".join(f"{Path(n).name:>16}" for n in names) + ("       ratio" if len(names) == 2 else ""))
    for key in medians[names[0]]:
        values = [medians[n].get(key, float("nan")) for n in names]
        ratio = f"{values[1] / values[0]:>12.2f}" if len(names) == 2 and values[0] else ""
        print(f"{key:<26}" + "".join(f"{v:>16.1f}" for v in values) + ratio)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": medians}, indent=2, default=str))


if __name__ == "__main__":
    main()
