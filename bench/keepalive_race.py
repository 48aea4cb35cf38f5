"""Messages sent just as an idle keep-alive connection expires: are any stored without an answer?

Hypercorn closes a connection left idle for `keep_alive_timeout` (75 s in Combot) from a task of its
own; a message that arrives in the same instant used to be read, stored, and left without an answer
(combot/graceful.py). This opens `--connections` keep-alive connections to a real 2-worker server
from each checkout given, starts a session on each, waits until 75 s +- 0.05 s after that session's
answer, sends one message, and counts the messages stored without an answer (the page would have
retried them and got the stored answer; nothing is lost either way). Takes ~80 s per checkout.

    python bench/keepalive_race.py --checkout /work/wt/baseline --checkout .
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from combot.bench import Connection, free_port, worker_pids

KEEP_ALIVE_SECONDS = 75.0


async def _crowd(port: int, connections: int) -> dict[str, str]:
    outcome: dict[str, str] = {}

    async def one() -> None:
        connection = Connection(f"http://127.0.0.1:{port}/", timeout=30)
        _, body = await connection.send(connection.request("api/sessions", {}))
        answered = time.monotonic()
        token = json.loads(body)["session_id"]
        await asyncio.sleep(KEEP_ALIVE_SECONDS + random.uniform(-0.05, 0.05) - (time.monotonic() - answered))
        message = {"text": "My parcel never arrived.", "client_message_id": "m1"}
        # Not sent again on a new connection, as the page would: the lost answer must show.
        outcome[token] = await connection.last_send(connection.request(f"api/sessions/{token}/messages", message))

    await asyncio.gather(*(one() for _ in range(connections)))
    return outcome


def measure(checkout: Path, connections: int) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="combot-keepalive-"))
    port, database = free_port(), workdir / "race.db"
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve()), "COMBOT_RATE_LIMIT": "0", "COMBOT_ADMIN_TOKEN": "bench",
           "COMBOT_REPLY_TIMING": "none"}
    env.pop("COMBOT_LLM_URL", None)
    with (workdir / "server.log").open("wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "combot", "serve", "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", "2", "--database", str(database), "--access-log", ""],
                                  cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(worker_pids(server.pid)) < 2 or not _healthy(port):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not start:\n" + (workdir / "server.log").read_text())
            time.sleep(0.2)
        outcome = asyncio.run(_crowd(port, connections))
    finally:
        server.terminate()
        server.wait(60)
    with sqlite3.connect(database) as conn:
        stored = {token for (token,) in conn.execute(
            "SELECT p.token FROM participants p JOIN messages m ON m.participant_id = p.id"
            " WHERE m.client_message_id = 'm1'")}
    answered = {token for token, status in outcome.items() if status == "200"}
    return {"outcomes": dict(Counter(outcome.values())), "stored": len(stored),
            "stored_without_answer": len(stored - answered)}


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", action="append", required=True, type=Path, help="source tree whose server to run")
    parser.add_argument("--connections", type=int, default=300)
    args = parser.parse_args()
    for checkout in args.checkout:
        print(checkout, measure(checkout, args.connections), flush=True)


if __name__ == "__main__":
    main()
