"""Schemathesis against a real multi-worker Combot server, at a size CI has no time for.

    python bench/schemathesis_run.py --workers 8 --max-examples 1000 [--consent] [--seed 1]

Starts `combot serve` on a temporary database (rate limit off, a known admin token), runs
`st run` with the checks not_a_server_error, status_code_conformance and
response_schema_conformance over every phase (examples, coverage, fuzzing, and the stateful phase
that follows the links from session creation to messages), and prints the requests made by status
and by phase, and the failures. Exits non-zero when schemathesis found anything. The CI-sized run
is tests/test_openapi.py.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from combot.bench import local_server

TOKEN = "schemathesis-admin-token-0123456789"
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance"


def st_command() -> str:
    return shutil.which("st", path=str(Path(sys.executable).parent)) or "st"


def run_schemathesis(url: str, workdir: Path, max_examples: int, seed: int = 1, timeout: float = 3600) -> dict[str, Any]:
    """`st run` against `url`; the requests it made per status and per phase, and its output."""
    reports = workdir / "schemathesis"
    command = [st_command(), "run", url + "openapi.json", "--checks", CHECKS,
               "--phases", "examples,coverage,fuzzing,stateful", "-H", f"Authorization: Bearer {TOKEN}",
               "--max-examples", str(max_examples), "--seed", str(seed), "--request-timeout", "30",
               "--report", "ndjson", "--report-dir", str(reports), "--no-color"]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=workdir)
    statuses: collections.Counter[int] = collections.Counter()
    phases: collections.Counter[str] = collections.Counter()
    for report in reports.glob("*.ndjson"):
        for line in report.read_text().splitlines():
            finished = json.loads(line).get("ScenarioFinished")
            if not finished:
                continue
            for interaction in (finished.get("recorder") or {}).get("interactions", {}).values():
                statuses[(interaction.get("response") or {}).get("status_code", 0)] += 1
                phases[str(finished.get("phase", "?"))] += 1
    return {"returncode": result.returncode, "output": result.stdout + result.stderr, "statuses": statuses,
            "phases": phases, "seconds": time.monotonic() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--max-examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--consent", action="store_true", help="serve the study with its consent page on")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {"COMBOT_ADMIN_TOKEN": TOKEN, "COMBOT_CONSENT": "true" if args.consent else "false"}
        with local_server(args.workers, None, env, Path(tmp)) as (url, _database, _process):
            outcome = run_schemathesis(url, Path(tmp), args.max_examples, args.seed)
    print(outcome["output"][-4000:])
    print(f"schemathesis {subprocess.run([st_command(), '--version'], capture_output=True, text=True).stdout.strip()}")
    print(f"requests: {sum(outcome['statuses'].values())} in {outcome['seconds']:.0f} s")
    print("by status:", dict(sorted(outcome["statuses"].items())))
    print("by phase:", dict(outcome["phases"]))
    server_errors = sum(n for code, n in outcome["statuses"].items() if code >= 500)
    print(f"5xx responses: {server_errors}; schemathesis exit code {outcome['returncode']}")
    return 0 if outcome["returncode"] == 0 and server_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
