"""CPU of one request, and where it goes: one worker, requests one at a time, side by side.

For each checkout given (alternating, `--rounds` times) this starts `combot serve --workers 1`
from that checkout on a fresh database, warms it up, then sends `--requests` session starts,
first messages and follow-ups one after another over one keep-alive connection, and reads the
worker's CPU time (user + system, all threads, from /proc) around each kind. With `--py-spy` it
samples the worker during a separate pass and splits each kind's CPU by where it goes.

    python bench/request_cpu.py --checkout /work/wt/baseline --checkout . --rounds 3 --py-spy

With `--llm` the server asks the fake LLM (its own process, answering at once) wherever the study
would ask one, so the CPU of the calls is counted too.

Numbers depend on whatever else runs on the machine: compare checkouts within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from combot.bench import worker_pids
from combot.fakellm import running_fake_llm

TICKS = os.sysconf("SC_CLK_TCK")
TEXTS = [
    "I bought a blender from an online shop and it stopped working after three days. The motor just died.",
    "My parcel was supposed to arrive on Monday but it is now two weeks late and tracking hasn't moved.",
    "The cashier rolled her eyes and was really rude when I asked to pay with coins.",
    "I was charged twice for the same order and it took a month to get the money back.",
]
FOLLOW_UP = "I contacted them twice by email but nobody got back to me."

# Where a sample's CPU goes: the innermost frame whose file matches decides (first match wins).
CATEGORIES = [
    ("classifier", ("onnxruntime", "tokenizers", "combot/classifier.py", "numpy")),
    ("store (SQLite, writer thread)", ("sqlite3", "combot/store/", "sqlite_utils")),
    ("JSON", ("json/",)),
    ("logging", ("logging/",)),
    ("HTTP parsing (h11)", ("h11/",)),
    ("Hypercorn (protocol, tasks)", ("hypercorn/",)),
    ("Starlette (routing, request, response)", ("starlette/",)),
    ("event loop (asyncio, uvloop, threads)", ("asyncio/", "uvloop", "selectors.py", "concurrent/futures",
                                               "threading.py", "queue.py", "socket.py", "ssl.py")),
    ("combot (engine, api, middleware)", ("combot/",)),
]

# Leaf frames py-spy reports as active although the thread waits in a blocking call (epoll, a queue):
# left out, so the split shares out CPU, not waiting.
WAITING = ("EpollSelector.select", "_worker (concurrent/futures/thread.py", "Store._write_loop", "Condition.wait",
           "SimpleQueue.get", "Event.wait", "Thread.join", "_wait_for_tstate_lock")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, checkout: Path, workdir: Path, access_log: str, extra_env: dict[str, str]):
        self.port = free_port()
        self.workdir = workdir
        env = {**os.environ, "PYTHONPATH": str(checkout.resolve()), "COMBOT_RATE_LIMIT": "0",
               "COMBOT_ADMIN_TOKEN": "bench", **extra_env}
        if "COMBOT_LLM_URL" not in extra_env:
            env.pop("COMBOT_LLM_URL", None)
        self.log = (workdir / "server.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "combot", "serve", "--workers", "1", "--host", "127.0.0.1", "--port",
             str(self.port), "--database", str(workdir / "cpu.db"), "--access-log", access_log],
            cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _ = self.request("GET", "/healthz")
                if status == 200:
                    break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((workdir / "server.log").read_text())
            time.sleep(0.1)
        deadline = time.monotonic() + 30
        while True:
            workers = worker_pids(self.process.pid)
            if workers or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.worker = workers[0]
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def request(self, method: str, path: str, body: dict[str, object] | None = None) -> tuple[int, dict]:
        conn = getattr(self, "conn", None) or http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
        response = conn.getresponse()
        data = response.read()
        return response.status, (json.loads(data) if data else {})

    def stop(self) -> None:
        self.conn.close()
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def one_pass(server: Server, n: int, offset: int) -> dict[str, float]:
    """Worker CPU milliseconds per request of each kind, over n requests of each."""
    spent: dict[str, float] = {}
    before = cpu_seconds(server.worker)
    sessions = []
    for i in range(n):
        status, body = server.request("POST", f"/api/sessions?PROLIFIC_PID=cpu{offset + i}", {})
        assert status == 201, (status, body)
        sessions.append(body["session_id"])
    spent["start"] = cpu_seconds(server.worker) - before
    before = cpu_seconds(server.worker)
    for i, sid in enumerate(sessions):
        status, body = server.request("POST", f"/api/sessions/{sid}/messages",
                                      {"text": TEXTS[i % len(TEXTS)], "client_message_id": "m1"})
        assert status == 200, (status, body)
    spent["first message"] = cpu_seconds(server.worker) - before
    before = cpu_seconds(server.worker)
    for sid in sessions:
        status, body = server.request("POST", f"/api/sessions/{sid}/messages",
                                      {"text": FOLLOW_UP, "client_message_id": "m2"})
        assert status == 200, (status, body)
    spent["follow-up"] = cpu_seconds(server.worker) - before
    return {kind: seconds * 1000 / n for kind, seconds in spent.items()}


def categorise(raw: Path) -> Counter[str]:
    """py-spy's raw (collapsed) stacks -> samples per category."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if any(mark in frames[-1] for mark in WAITING):
            continue
        where = "other"
        for frame in reversed(frames):
            found = next((name for name, marks in CATEGORIES if any(m in frame for m in marks)), None)
            if found:
                where = found
                break
        counts[where] += int(count)
    return counts


def profiled_pass(server: Server, n: int, offset: int, out: Path, keep: str | None) -> dict[str, Counter[str]]:
    """The same requests with py-spy attached, one recording per kind of request."""
    result: dict[str, Counter[str]] = {}
    sessions = []
    for kind in ("start", "first message", "follow-up"):
        raw = out / f"{kind.replace(' ', '-')}.txt"
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(server.worker), "--rate", "400", "--format", "raw",
                                "--output", str(raw), "--nonblocking"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches
        for i in range(n):
            if kind == "start":
                status, body = server.request("POST", f"/api/sessions?PROLIFIC_PID=spy{offset + i}", {})
                sessions.append(body["session_id"])
            elif kind == "first message":
                status, body = server.request("POST", f"/api/sessions/{sessions[i]}/messages",
                                              {"text": TEXTS[i % len(TEXTS)], "client_message_id": "m1"})
            else:
                status, body = server.request("POST", f"/api/sessions/{sessions[i]}/messages",
                                              {"text": FOLLOW_UP, "client_message_id": "m2"})
            assert status in (200, 201), (status, body)
        spy.send_signal(2)
        spy.wait(30)
        result[kind] = categorise(raw)
        if keep:
            shutil.copy(raw, Path(keep) / f"{out.name}-{raw.name}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", action="append", required=True, help="a source tree to run (repeatable)")
    parser.add_argument("--requests", type=int, default=200, help="requests of each kind per pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--access-log", default="-", help="the server's access log ('-' stderr, '' off)")
    parser.add_argument("--py-spy", action="store_true", help="also split the CPU by where it goes")
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--keep", help="copy py-spy's raw stacks into this folder")
    parser.add_argument("--llm", action="store_true", help="serve with the fake LLM (answering at once)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        llm_env: dict[str, str] = {}
        if args.llm:
            url = stack.enter_context(running_fake_llm(latency=0.0))
            llm_env = {"COMBOT_LLM_URL": url, "COMBOT_LLM_MODEL": "fake-llm", "COMBOT_REPLY_TIMING": "none"}
        measure(args, llm_env)


def measure(args: argparse.Namespace, llm_env: dict[str, str]) -> None:
    checkouts = [Path(c) for c in args.checkout]
    results: dict[str, list[dict[str, float]]] = {str(c): [] for c in checkouts}
    splits: dict[str, dict[str, Counter[str]]] = {}
    with tempfile.TemporaryDirectory(prefix="combot-cpu-") as tmp:
        servers = {}
        for index, checkout in enumerate(checkouts):
            workdir = Path(tmp) / f"c{index}"
            workdir.mkdir()
            servers[str(checkout)] = Server(checkout, workdir, args.access_log, llm_env)
        try:
            for server in servers.values():
                one_pass(server, 20, 10_000_000)  # warm-up: imports, caches, the first classification
            for round_ in range(args.rounds):
                for name, server in servers.items():
                    results[name].append(one_pass(server, args.requests, round_ * args.requests))
                    print(name, {k: round(v, 2) for k, v in results[name][-1].items()}, file=sys.stderr)
            if args.py_spy and shutil.which("py-spy"):
                for index, (name, server) in enumerate(servers.items()):
                    splits[name] = profiled_pass(server, args.requests, 20_000_000, Path(tmp) / f"c{index}", args.keep)
        finally:
            for server in servers.values():
                server.stop()
    report: dict[str, object] = {}
    for name, passes in results.items():
        medians = {kind: statistics.median(p[kind] for p in passes) for kind in passes[0]}
        report[name] = {"cpu_ms_median": medians, "passes": passes}
        print(f"\n{name}: worker CPU per request, median of {len(passes)} passes of {args.requests}")
        for kind, ms in medians.items():
            print(f"  {kind:<14}{ms:7.2f} ms")
            split = splits.get(name, {}).get(kind)
            if split:
                total = sum(split.values())
                for where, samples in split.most_common():
                    print(f"      {where:<42}{samples / total:6.1%}  ~{ms * samples / total:5.2f} ms")
                report[name][f"split {kind}"] = dict(split)  # type: ignore[index]
    if len(checkouts) == 2:
        a, b = (report[str(c)]["cpu_ms_median"] for c in checkouts)  # type: ignore[index]
        print("\nratio (second / first):", {k: round(b[k] / a[k], 2) for k in a})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
