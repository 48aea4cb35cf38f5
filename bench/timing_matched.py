"""Proof that "matched" reply timing removes the reply-speed confound between think-high and think-low.

Starts the fake OpenAI-compatible server (`--llm-latency` seconds per answer, its own process) and,
once per `--modes` entry, the real 8-worker server on a fresh temporary database with the default
study (think-low cells paraphrase through the LLM, think-high cells ask scripted questions) and
`COMBOT_REPLY_TIMING` set to that mode. `--warmup` participants walk the study first (so "matched"
has LLM reply times to draw from, as a running study does; they are not measured), then `--users`
participants walk it at once with `--think-time` between messages, each timing every reply as the
client sees it (request sent to answer read). Afterwards the database says which cell each session
had and which turns were follow-ups (a question or a paraphrase answered them).

Reported per mode, think-high against think-low over the follow-up turns: the count, median and p90
of the client-measured reply times and their ratios, the two-sample Kolmogorov-Smirnov and
Mann-Whitney U tests (combot/stats.py), and the server's median compute time per group.

    python bench/timing_matched.py                          # 100 participants, fake LLM at 1.0 s
    python bench/timing_matched.py --users 16 --json out.json

Numbers are measured on whatever else runs on the machine: read the two modes side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from combot.bench import COMPLAINTS, FOLLOW_UPS, local_server
from combot.fakellm import running_fake_llm
from combot.stats import ks_2samp, mann_whitney_u, percentile


async def walk(client: httpx.AsyncClient, base: str, rng: random.Random, think_time: float) -> tuple[str, list[float]]:
    """One participant through the whole study; the client-measured time of each message's answer."""
    created = await client.post(base + "api/sessions", json={"client_key": f"timing-{rng.getrandbits(64):016x}"})
    created.raise_for_status()
    session = created.json()
    token, expects, turn = session["session_id"], session["expects"], session["turn"]
    url = f"{base}api/sessions/{token}/messages"
    times: list[float] = []
    text = rng.choice([c for _, c in COMPLAINTS[:16]])  # the first 16 describe an experience
    while expects in ("message", "email"):
        if think_time > 0:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * think_time)
        if expects == "email":
            text = f"p{rng.getrandbits(32)}@example.com"
        started = time.perf_counter()
        response = await client.post(url, json={"text": text, "client_message_id": f"m{turn}", "turn": turn})
        body = response.json()
        times.append(time.perf_counter() - started)
        response.raise_for_status()
        expects, turn = body["expects"], body["turn"]
        text = rng.choice(FOLLOW_UPS)
    return token, times


async def load(base: str, users: int, think_time: float, seed: int) -> list[tuple[str, list[float]]]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    clients = [httpx.AsyncClient(limits=limits, timeout=120) for _ in range((users + 7) // 8)]
    try:
        async def one(index: int) -> tuple[str, list[float]]:
            local = random.Random(rng.getrandbits(64))
            if think_time > 0:
                await asyncio.sleep(local.uniform(0, think_time))
            return await walk(clients[index // 8], base, local, think_time)
        return list(await asyncio.gather(*(one(i) for i in range(users))))
    finally:
        for client in clients:
            await client.aclose()


def follow_up_times(database: Path, walked: list[tuple[str, list[float]]]) -> dict[str, dict[str, list[float]]]:
    """Client times and compute times of follow-up turns, by think level (read back from the database)."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    out: dict[str, dict[str, list[float]]] = {}
    for token, times in walked:
        pid, factors = conn.execute("SELECT id, factors FROM participants WHERE token = ?", (token,)).fetchone()
        think = json.loads(factors)["think"]
        group = out.setdefault(think, {"client_ms": [], "compute_ms": [], "shown_ms": [], "opening": []})
        for number, seconds in enumerate(times, start=1):
            row = conn.execute(
                "SELECT r.kind, r.compute_ms, r.shown_ms, p.scores IS NOT NULL FROM messages p"
                " JOIN messages r ON r.reply_to = p.id"
                " WHERE p.participant_id = ? AND p.turn = ? AND p.sender = 'participant' ORDER BY r.id LIMIT 1",
                (pid, number)).fetchone()
            if row and row[0] in ("question", "paraphrase"):
                group["client_ms"].append(seconds * 1000)
                group["compute_ms"].append(float(row[1]))
                group["shown_ms"].append(float(row[2]))
                group["opening"].append(bool(row[3]))  # the classifier read it: the opening's reply
    conn.close()
    return out


def analyse(high: list[float], low: list[float]) -> dict[str, Any]:
    """Think-high against think-low: medians, p90s, their ratios, and the two two-sample tests."""
    ks_d, ks_p = ks_2samp(high, low)
    _, mw_p = mann_whitney_u(high, low)
    return {"n_high": len(high), "n_low": len(low),
            "median_high_ms": statistics.median(high), "median_low_ms": statistics.median(low),
            "p90_high_ms": percentile(high, 90), "p90_low_ms": percentile(low, 90),
            "median_ratio": statistics.median(high) / statistics.median(low),
            "p90_ratio": percentile(high, 90) / percentile(low, 90),
            "ks_d": ks_d, "ks_p": ks_p, "mann_whitney_p": mw_p}


def run(modes: list[str], users: int, warmup: int, think_time: float, llm_latency: float, workers: int,
        seed: int, llm_jitter: float = 0.0) -> dict[str, Any]:
    report: dict[str, Any] = {"users": users, "warmup": warmup, "think_time": think_time,
                              "llm_latency": llm_latency, "llm_jitter": llm_jitter, "workers": workers, "modes": {}}
    with running_fake_llm(latency=llm_latency, jitter=llm_jitter) as llm_url, tempfile.TemporaryDirectory(prefix="combot-timing-") as tmp:
        for mode in modes:
            workdir = Path(tmp) / mode
            workdir.mkdir()
            env = {"COMBOT_LLM_URL": llm_url, "COMBOT_LLM_MODEL": "fake-llm", "COMBOT_LLM_MAX_IN_FLIGHT": "10000",
                   "COMBOT_LLM_TIMEOUT": str(max(4.0, llm_latency * 3)), "COMBOT_REPLY_TIMING": mode,
                   "COMBOT_SESSION_RATE_LIMIT": "0"}
            with local_server(workers, None, env, workdir) as (url, database, _process):
                if warmup:
                    # Paced like the measured run: a cold burst would leave slower LLM times in the sample.
                    asyncio.run(load(url, warmup, think_time, seed + 1))
                started = time.monotonic()
                walked = asyncio.run(load(url, users, think_time, seed))
                elapsed = time.monotonic() - started
            groups = follow_up_times(database, walked)
            result = analyse(groups["high"]["client_ms"], groups["low"]["client_ms"])
            result["compute_median_high_ms"] = statistics.median(groups["high"]["compute_ms"])
            result["compute_median_low_ms"] = statistics.median(groups["low"]["compute_ms"])
            # What the client saw beyond the designed moment: storing the turn, the network, queueing.
            result["after_shown_median_high_ms"] = statistics.median(
                c - s for c, s in zip(groups["high"]["client_ms"], groups["high"]["shown_ms"]))
            result["after_shown_median_low_ms"] = statistics.median(
                c - s for c, s in zip(groups["low"]["client_ms"], groups["low"]["shown_ms"]))
            result["shown_median_high_ms"] = statistics.median(groups["high"]["shown_ms"])
            result["shown_median_low_ms"] = statistics.median(groups["low"]["shown_ms"])
            # Openings (their reply times include the classification) and later turns, apart.
            for name, opening in (("openings", True), ("later_turns", False)):
                high = [c for c, o in zip(groups["high"]["client_ms"], groups["high"]["opening"]) if o == opening]
                low = [c for c, o in zip(groups["low"]["client_ms"], groups["low"]["opening"]) if o == opening]
                if len(high) >= 2 and len(low) >= 2:
                    result[name] = analyse(high, low)
            result["seconds"] = elapsed
            result["raw"] = groups  # every follow-up turn's client, compute and shown ms, by think level
            report["modes"][mode] = result
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['users']} participants (after {report['warmup']} warm-up), think time {report['think_time']} s,"
             f" fake LLM at {report['llm_latency']} s"
             + (f" +- {report['llm_jitter']:.0%}" if report.get("llm_jitter") else "")
             + f", {report['workers']} workers; follow-up turns, client-measured:"]
    for mode, r in report["modes"].items():
        lines.append(
            f"  {mode:>8}: high n={r['n_high']} median {r['median_high_ms']:.0f} ms p90 {r['p90_high_ms']:.0f} ms |"
            f" low n={r['n_low']} median {r['median_low_ms']:.0f} ms p90 {r['p90_low_ms']:.0f} ms |"
            f" median ratio {r['median_ratio']:.3f}, p90 ratio {r['p90_ratio']:.3f} |"
            f" KS D={r['ks_d']:.3f} p={r['ks_p']:.3g}, Mann-Whitney p={r['mann_whitney_p']:.3g} |"
            f" compute median high {r['compute_median_high_ms']:.0f} ms, low {r['compute_median_low_ms']:.0f} ms |"
            f" shown_ms median high {r['shown_median_high_ms']:.0f}, low {r['shown_median_low_ms']:.0f};"
            f" client minus shown_ms median high {r['after_shown_median_high_ms']:.0f}, low"
            f" {r['after_shown_median_low_ms']:.0f}")
        for name in ("openings", "later_turns"):
            if name in r:
                k = r[name]
                lines.append(f"  {'':>8}  {name}: high n={k['n_high']} median {k['median_high_ms']:.0f} p90"
                             f" {k['p90_high_ms']:.0f} | low n={k['n_low']} median {k['median_low_ms']:.0f} p90"
                             f" {k['p90_low_ms']:.0f} | KS D={k['ks_d']:.3f} p={k['ks_p']:.3g},"
                             f" Mann-Whitney p={k['mann_whitney_p']:.3g}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100)
    # As many warm-up participants as measured ones (the default): the measured run's first held
    # replies are drawn from the LLM reply times the warm-up leaves, which must come from the same
    # load (a lighter warm-up left LLM times a millisecond off, which the tests detect against the
    # fake LLM's few milliseconds of spread) and not mostly from each worker's first, cold LLM call.
    parser.add_argument("--warmup", type=int, default=None, help="warm-up participants (default: --users)")
    parser.add_argument("--think-time", type=float, default=1.0)
    parser.add_argument("--llm-latency", type=float, default=1.0)
    parser.add_argument("--llm-jitter", type=float, default=0.0,
                        help="each fake answer after latency * (1 +- jitter), as a real LLM varies")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--modes", default="matched,none")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    warmup = args.users if args.warmup is None else args.warmup
    report = run([m.strip() for m in args.modes.split(",") if m.strip()], args.users, warmup, args.think_time,
                 args.llm_latency, args.workers, args.seed, args.llm_jitter)
    print(format_report(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
