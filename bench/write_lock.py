"""Eight processes writing to one database at once: does every process get its turn at the lock?

Each process opens a `Store` and keeps `--writers` writes in flight (a short participant-like
transaction each) for `--seconds`; reported: writes per second in all, per process, and the
slowest waits. A lock hand-off that favours the process that just committed shows up as a few
processes doing most of the writes and the others' waits growing towards the busy timeout (503).

    python bench/write_lock.py --processes 8 --writers 40 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time
from pathlib import Path


def _write(conn, n: int) -> None:  # type: ignore[no-untyped-def]
    conn.execute("INSERT INTO events (at, kind, pid, path, status, detail) VALUES (?, 'bench', ?, '', 200, ?)",
                 (str(time.time()), os.getpid(), "x" * 200))


async def _process(path: str, writers: int, seconds: float, start_at: float, busy: float,
                   switch: float) -> dict[str, object]:
    import sys

    from combot import store

    if switch:
        sys.setswitchinterval(switch)

    handle = store.Store(path)
    await handle.open()
    waits: list[float] = []
    failures = 0
    await asyncio.sleep(max(0.0, start_at - time.time()))
    stop = time.monotonic() + seconds

    async def writer() -> None:
        nonlocal failures
        while time.monotonic() < stop:
            began = time.monotonic()
            try:
                await handle.run(_write, 1)
            except Exception:
                failures += 1
            waits.append(time.monotonic() - began)

    async def busy_loop() -> None:
        # Pure-Python work on the event loop (parsing requests, JSON): the writer thread then has
        # to win the GIL back after every SQLite call it makes while holding the lock.
        while time.monotonic() < stop:
            until = time.perf_counter() + busy
            while time.perf_counter() < until:
                pass
            await asyncio.sleep(0)

    await asyncio.gather(*(writer() for _ in range(writers)), *([busy_loop()] if busy else []))
    await handle.close()
    waits.sort()
    return {"pid": os.getpid(), "writes": len(waits), "failures": failures,
            "p50": waits[len(waits) // 2] if waits else 0, "p99": waits[int(len(waits) * 0.99)] if waits else 0,
            "max": waits[-1] if waits else 0}


def _run(args: tuple[str, int, float, float, float, float]) -> dict[str, object]:
    return asyncio.run(_process(*args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--writers", type=int, default=40, help="writes in flight per process")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--busy", type=float, default=0.0,
                        help="seconds of pure-Python work the event loop does between yields (0: none)")
    parser.add_argument("--switch-interval", type=float, default=0.0, help="sys.setswitchinterval (0: default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="combot-lock-") as tmp:
        path = str(Path(tmp) / "lock.db")
        from combot import store

        store.connect(path).close()
        start_at = time.time() + 8
        with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
            results = pool.map(_run, [(path, args.writers, args.seconds, start_at, args.busy, args.switch_interval)] * args.processes, chunksize=1)
    total = sum(int(r["writes"]) for r in results)  # type: ignore[call-overload]
    print(f"{total / args.seconds:.0f} writes/s in all, failures {sum(int(r['failures']) for r in results)}")  # type: ignore[call-overload]
    for r in sorted(results, key=lambda r: -int(r["writes"])):  # type: ignore[call-overload]
        print(f"  pid {r['pid']}: {r['writes']} writes, p50 {float(r['p50']) * 1000:.0f} ms, "  # type: ignore[arg-type]
              f"p99 {float(r['p99']) * 1000:.0f} ms, max {float(r['max']) * 1000:.0f} ms")  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
