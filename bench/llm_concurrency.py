"""Reply times of LLM turns with many participants at once: the issue's yardstick for the LLM adapter.

Starts the fake OpenAI-compatible server (its own process, `--llm-latency` seconds per answer)
and the real multi-process server (`python -m combot serve --workers 8`) on free loopback ports
with a temporary database and a study in which every follow-up turn is a paraphrase, then runs
`--users` simulated participants at once over HTTP. Each creates a session, sends a first
message, answers every follow-up, gives an e-mail address and reaches the end.

Reported per run and as the median of `--runs`: p50/p95/max of the LLM turns (all paraphrase
turns; the first one also waits for the classifier, so it is shown apart too), the share of
participants who finished with nothing but 200s, and how the stored paraphrases were made
(produced_by, fallback reasons) read back from the database.

    /work/venv/bin/python bench/llm_concurrency.py --users 300 --workers 8 --runs 3
    /work/venv/bin/python bench/llm_concurrency.py --users 300 --ramp 30   # arrivals over 30 s

With no ramp, all participants send every message in lock-step: a worst case whose first wave
is 300 classifications at once. The benchmark's own clients cost ~2 ms of CPU per request
(httpx), on the same machine as the server; the report shows that CPU beside the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import sqlite3
import ssl
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from combot.bench import local_server, worker_pids
from combot.fakellm import running_fake_llm
from combot.resources import default_study_path

FIRST_MESSAGES = [
    "I ordered a blender online and it arrived with a cracked jug, and the motor smelled of burning on first use.",
    "My parcel was marked as delivered but it never arrived, and the courier says it's not their problem.",
    "The shop assistant rolled her eyes at me and walked off when I asked for help finding a size.",
    "My new headphones stopped charging after a week and the left ear crackles all the time.",
    "The delivery was two weeks late and the box had clearly been opened and taped up again.",
    "The manager shouted at me in front of other customers when I tried to return a faulty toaster.",
    "I waited on hold for an hour and then the call was cut off, twice in the same day.",
    "The sofa we ordered came in the wrong colour and one of the legs was missing.",
]
FOLLOW_UPS = [
    "I contacted them by e-mail and only got an automatic reply saying they would be in touch.",
    "It happened last month, just before a family birthday, so the timing was really bad.",
    "They offered me a voucher, which I didn't want because I wouldn't shop there again.",
    "I felt ignored and quite angry, honestly; nobody seemed to take responsibility.",
    "In the end I asked my bank to get the money back because the company stopped answering.",
]


@dataclass
class Participant:
    first_turn_s: float | None = None
    llm_turns_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    finished: bool = False


def paraphrase_study(workdir: Path) -> Path:
    """The default study with paraphrase follow-ups in every cell (think = high asks questions)."""
    text = default_study_path().read_text(encoding="utf-8")
    old = 'when = { think = "high" }\nmode = "questions"'
    assert old in text, "the default study's follow-up blocks changed; update this benchmark"
    path = workdir / "combot.toml"
    path.write_text(text.replace(old, 'when = { think = "high" }\nmode = "paraphrase"'), encoding="utf-8")
    return path


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time so far of these processes, from /proc (0 for any that is gone)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


async def walk(client: httpx.AsyncClient, base: str, rng: random.Random, think: float, arrive: float,
               out: Participant) -> None:
    await asyncio.sleep(arrive)
    try:
        created = await client.post(base + "api/sessions", json={})
        if created.status_code != 201:
            out.errors.append(f"create {created.status_code}")
            return
        token = created.json()["session_id"]
        text, turn, expects = rng.choice(FIRST_MESSAGES), 0, "message"
        while expects == "message":
            if think and turn:
                await asyncio.sleep(rng.uniform(0, 2 * think))
            started = time.perf_counter()
            reply = await client.post(f"{base}api/sessions/{token}/messages",
                                      json={"text": text, "client_message_id": f"m{turn}"})
            took = time.perf_counter() - started
            if reply.status_code != 200:
                out.errors.append(f"turn {turn + 1}: {reply.status_code}")
                return
            expects = reply.json()["expects"]
            if expects == "message":
                # A follow-up turn, every one a paraphrase in this study (the closing turn expects an e-mail).
                out.llm_turns_s.append(took)
                if turn == 0:
                    out.first_turn_s = took
            turn += 1
            text = rng.choice(FOLLOW_UPS)
        done = await client.post(f"{base}api/sessions/{token}/messages", json={"text": f"p{id(out)}@example.org"})
        if done.status_code != 200 or done.json()["expects"] != "done":
            out.errors.append(f"e-mail: {done.status_code}")
            return
        out.finished = True
    except httpx.HTTPError as error:
        out.errors.append(f"{type(error).__name__}")


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(share * len(ordered) + 0.5)) - 1))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": percentile(values, 0.50), "p95": percentile(values, 0.95),
            "p99": percentile(values, 0.99), "max": max(values) if values else float("nan")}


def stored(database: Path) -> dict[str, Any]:
    conn = sqlite3.connect(database)
    made = Counter(f"{by}" + (f" ({why})" if why else "") for by, why in conn.execute(
        "SELECT produced_by, fallback_reason FROM messages WHERE kind = 'paraphrase'"))
    llm_ms = [row[0] for row in conn.execute(
        "SELECT latency_ms FROM messages WHERE kind = 'paraphrase' AND produced_by = 'llm'")]
    conn.close()
    return {"paraphrases": dict(made), "llm_call_ms": summary([float(v) for v in llm_ms])}


async def run_users(base: str, users: range, total: int, think: float, ramp: float, seed: int,
                    start_at: float) -> list[Participant]:
    # One client per participant, like one browser each. A single shared client would make the
    # benchmark measure itself: httpcore's pool does work proportional to requests x connections
    # on every request, which at 300 connections costs more CPU than the server does.
    ssl_context = ssl.create_default_context()
    clients = [httpx.AsyncClient(timeout=httpx.Timeout(60.0), verify=ssl_context) for _ in users]
    try:
        people = [Participant() for _ in users]
        await asyncio.sleep(max(0.0, start_at - time.time()))
        await asyncio.gather(*(walk(client, base, random.Random(seed * 100003 + i), think, ramp * i / total, p)
                               for i, client, p in zip(users, clients, people)))
        return people
    finally:
        for client in clients:
            await client.aclose()


def _client_process(base: str, users: range, total: int, think: float, ramp: float, seed: int,
                    start_at: float) -> tuple[list[Participant], float]:
    cpu = time.process_time()
    people = asyncio.run(run_users(base, users, total, think, ramp, seed, start_at))
    return people, time.process_time() - cpu


def simulate(args: argparse.Namespace, base: str, seed: int) -> tuple[list[Participant], float, float]:
    """The participants, split over --client-processes processes so that the clients' own CPU
    (httpx costs ~2 ms a request) is not serialised in one event loop; returns them, the wall time
    and the clients' CPU seconds."""
    n = max(1, min(args.client_processes, args.users))
    shares = [range(i * args.users // n, (i + 1) * args.users // n) for i in range(n)]
    start_at = time.time() + 3.0  # every process has made its clients by then
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(n) as pool:
        jobs = [pool.apply_async(_client_process, (base, share, args.users, args.think_time, args.ramp, seed, start_at))
                for share in shares]
        results = [job.get() for job in jobs]
    wall = time.time() - start_at
    return [p for people, _ in results for p in people], wall, sum(cpu for _, cpu in results)


def one_run(args: argparse.Namespace, llm_url: str, llm_pid: int, run: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="combot-llm-bench-") as tmp:
        workdir = Path(tmp)
        env = {"COMBOT_LLM_URL": llm_url, "COMBOT_LLM_MODEL": "fake-llm"}
        with local_server(args.workers, str(paraphrase_study(workdir)), env, workdir) as (base, database, process):
            workers = worker_pids(process.pid)
            cpu_before = cpu_seconds(workers), cpu_seconds([llm_pid])
            people, wall, client_cpu = simulate(args, base, args.seed + run)
            cpu = {"workers_s": cpu_seconds(workers) - cpu_before[0], "bench_client_s": client_cpu,
                   "fake_llm_s": cpu_seconds([llm_pid]) - cpu_before[1]}
            data = stored(database)
    llm_turns = [t for p in people for t in p.llm_turns_s]
    first = [p.first_turn_s for p in people if p.first_turn_s is not None]
    later = [t for p in people for t in p.llm_turns_s[1:]]
    errors = Counter(e for p in people for e in p.errors)
    return {
        "run": run + 1, "wall_s": wall,
        "finished": sum(p.finished for p in people), "participants": len(people),
        "success_rate": sum(p.finished and not p.errors for p in people) / len(people),
        "llm_turns": summary(llm_turns), "first_turn": summary(first), "later_turns": summary(later),
        "errors": dict(errors), "cpu": cpu,
        # Every request a participant makes: create, each turn, the e-mail.
        "requests": sum(len(p.llm_turns_s) + 3 for p in people), **data,
    }


def show(result: dict[str, Any]) -> str:
    def row(name: str, s: dict[str, float]) -> str:
        return (f"  {name:<24} n={s['n']:<5} p50 {s['p50'] * 1000:6.0f} ms   p95 {s['p95'] * 1000:6.0f} ms"
                f"   p99 {s['p99'] * 1000:6.0f} ms   max {s['max'] * 1000:6.0f} ms")
    calls = result["llm_call_ms"]
    lines = [
        f"run {result['run']}: {result['finished']}/{result['participants']} finished, success rate"
        f" {result['success_rate']:.1%}, {result['wall_s']:.1f} s",
        row("LLM turns (all)", result["llm_turns"]),
        row("  first (classify + LLM)", result["first_turn"]),
        row("  later follow-ups", result["later_turns"]),
        f"  stored paraphrases: {result['paraphrases']}",
        f"  LLM call latency as stored: p50 {calls['p50']:.0f} ms, p95 {calls['p95']:.0f} ms, max {calls['max']:.0f} ms",
        "  CPU: " + ", ".join(f"{name[:-2]} {seconds:.1f} s ({seconds / result['requests'] * 1000:.1f} ms/request)"
                            for name, seconds in result["cpu"].items())
        + f"; machine load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
    ]
    if result["errors"]:
        lines.append(f"  errors: {result['errors']}")
    return "\n".join(lines)


def fake_pid() -> int:
    """The fake LLM's process: this process's only child before any server starts."""
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    return int(children[-1]) if children else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--llm-latency", type=float, default=1.0)
    parser.add_argument("--think-time", type=float, default=0.0, help="mean seconds between messages (uniform 0..2x)")
    parser.add_argument("--ramp", type=float, default=0.0,
                        help="seconds over which participants arrive (0: all at the same instant)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--client-processes", type=int, default=4,
                        help="processes the simulated participants are split over")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="write every run and the medians to this file")
    args = parser.parse_args()

    results = []
    with running_fake_llm(latency=args.llm_latency) as llm_url:
        llm_pid = fake_pid()
        print(f"fake LLM at {llm_url}, {args.llm_latency} s per answer; {args.users} participants,"
              f" {args.workers} workers, {args.runs} runs", flush=True)
        for run in range(args.runs):
            result = one_run(args, llm_url, llm_pid, run)
            results.append(result)
            print(show(result), flush=True)
    medians = {
        key: {stat: statistics.median(r[key][stat] for r in results) for stat in ("p50", "p95", "p99", "max")}
        for key in ("llm_turns", "first_turn", "later_turns")
    }
    success = statistics.median(r["success_rate"] for r in results)
    print(f"\nmedian of {len(results)} runs:")
    for key, s in medians.items():
        print(f"  {key:<12} p50 {s['p50'] * 1000:6.0f} ms   p95 {s['p95'] * 1000:6.0f} ms   max {s['max'] * 1000:6.0f} ms")
    print(f"  success rate {success:.1%}; target: p95 of LLM turns <= 1200 ms with the LLM at"
          f" {args.llm_latency * 1000:.0f} ms -> {'met' if medians['llm_turns']['p95'] <= 1.2 else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"options": vars(args), "runs": results, "median": medians,
                                               "success_rate": success}, indent=2))


if __name__ == "__main__":
    main()
