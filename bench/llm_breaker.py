"""What a hanging LLM costs participants, without and with the circuit breaker, side by side.

Starts the fake OpenAI-compatible server with behaviour "slow" (it never answers within the
timeout) and, twice, the real 8-worker server on a temporary database with the default study:
once with `breaker_failures = 0` (no breaker: every paraphrase turn waits the whole `[llm] timeout`)
and once with the default breaker. `--users` simulated participants walk the whole study at once
(no think time, reply timing "none" so only compute time is measured). Reported: the sum of every
participant's waiting time for replies ("in all"), the wall time of the run, the slowest reply, and
how the paraphrases were made (fallback reasons, read back from the database).

    python bench/llm_breaker.py --users 8
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from combot.bench import local_server, run_load
from combot.fakellm import running_fake_llm


def one_run(label: str, users: int, workers: int, env: dict[str, str], workdir: Path) -> dict[str, Any]:
    workdir.mkdir()
    with local_server(workers, None, env, workdir) as (url, database, _process):
        people, elapsed, load = asyncio.run(run_load(url, users, 0.0, "full", 0.0, seed=7, show_progress=False))
    replies = [h for kind, h in load.timings.items() if kind != "start"]
    conn = sqlite3.connect(database)
    reasons = Counter(row[0] or row[1] for row in conn.execute(
        "SELECT fallback_reason, produced_by FROM messages WHERE kind = 'paraphrase'"))
    conn.close()
    return {"label": label, "finished": sum(p.error is None for p in people), "users": users,
            "waiting_s": sum(h.total for h in replies), "wall_s": elapsed, "slowest_s": max(h.max for h in replies),
            "paraphrases": dict(reasons)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=4.0, help="[llm] timeout in seconds")
    args = parser.parse_args()
    results = []
    with running_fake_llm(behaviour="slow") as llm_url, tempfile.TemporaryDirectory(prefix="combot-breaker-") as tmp:
        for label, failures in (("no breaker", "0"), ("breaker", "")):
            env = {"COMBOT_LLM_URL": llm_url, "COMBOT_LLM_TIMEOUT": str(args.timeout), "COMBOT_REPLY_TIMING": "none"}
            if failures:
                env["COMBOT_LLM_BREAKER_FAILURES"] = failures
            results.append(one_run(label, args.users, args.workers, env, Path(tmp) / label.replace(" ", "-")))
    for r in results:
        print(f"{r['label']:>11}: {r['finished']}/{r['users']} finished; waiting in all {r['waiting_s']:.1f} s,"
              f" wall {r['wall_s']:.1f} s, slowest reply {r['slowest_s']:.2f} s; paraphrases {r['paraphrases']}")


if __name__ == "__main__":
    main()
