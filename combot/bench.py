"""`combot bench`: simulated participants walk the whole study over HTTP, as the page does.

Starts a real multi-process server on loopback with a temporary database (unless given a URL),
runs N participants at once, then checks that every message each of them sent or received is in
the database. Numbers are reported, never asserted: the researcher reads them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from combot import synthetic

# The original system's published 30-user result (see the project's seed report).
# The admin token of the server `combot bench` starts itself (a throw-away database).
LOCAL_ADMIN_TOKEN = "bench"
ORIGINAL = {"users": 30, "mean_s": 16.5, "p95_s": 20.0, "max_s": 21.75, "memory_gb": 3.5}

COMPLAINTS = [
    ("A", "I bought a blender from an online shop and it stopped working after three days. The motor just died."),
    ("A", "my new running shoes fell apart after two weeks, the sole came completely off"),
    ("A", "The jacket I ordered had a broken zip and the stitching was coming loose on the sleeve."),
    ("A", "Laptop charger overheated and melted after a month. Really poor quality for the price."),
    ("A", "bought a phone case that cracked the first time i dropped it, total junk"),
    ("A", "The frozen pizza we bought was mouldy inside even though it was well within the date."),
    ("B", "My parcel was supposed to arrive on Monday but it is now two weeks late and tracking hasn't moved."),
    ("B", "the courier marked my package as delivered but it was never here, nobody at the door"),
    ("B", "Ordered a mirror for my mum's birthday and it arrived smashed because the box had been crushed in transit."),
    ("B", "They delivered my groceries to the wrong address and half the items were missing anyway."),
    ("B", "I waited in all day for a sofa delivery and the van never came, no call, nothing."),
    ("C", "The cashier rolled her eyes and was really rude when I asked to pay with coins."),
    ("C", "A manager at the phone store shouted at me in front of other customers when I asked about my contract."),
    ("C", "The waiter ignored our table for forty minutes and then mocked my accent when I complained."),
    ("C", "support agent on the phone hung up on me twice and called me difficult"),
    ("C", "The delivery driver swore at me because I took a minute to get to the door."),
    ("Other", "hi, is this the study?"),
    ("Other", "I was charged twice for the same order and it took a month to get the money back."),
    ("Other", "I can't really think of a bad experience, most companies have been fine with me."),
    ("Other", "The website kept logging me out while I was trying to check out."),
]
FOLLOW_UPS = [
    "It happened about two weeks ago and I was really annoyed about it.",
    "I contacted them twice by email but nobody got back to me.",
    "They offered me a voucher in the end but it was not enough.",
    "I probably won't shop there again, to be honest.",
    "it made me late for work and i had to sort it all out myself",
    "Honestly I just wanted someone to apologise.",
]


@dataclass
class Participant:
    session_id: str = ""
    sent: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    finished: bool = False


@dataclass
class Progress:
    total: int
    finished: int = 0
    failed: int = 0
    started_at: float = field(default_factory=time.monotonic)
    show: bool = True

    def update(self, ok: bool) -> None:
        if ok:
            self.finished += 1
        else:
            self.failed += 1
        if self.show:
            done = self.finished + self.failed
            width = 30
            filled = int(width * done / max(self.total, 1)) if self.total else width
            sys.stderr.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {self.finished} finished, "
                             f"{self.failed} failed, {time.monotonic() - self.started_at:5.1f} s ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.show:
            sys.stderr.write("\n")


async def _post(client: httpx.AsyncClient, url: str, body: dict[str, Any], kind: str, person: Participant,
                params: dict[str, str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    response = await client.post(url, json=body, params=params)
    elapsed = time.perf_counter() - started
    if response.status_code not in (200, 201):
        raise RuntimeError(f"{kind}: HTTP {response.status_code} {response.text[:200]}")
    person.timings.append((kind, elapsed))
    return response.json()  # type: ignore[no-any-return]


async def walk(client: httpx.AsyncClient, base: str, rng: random.Random, think_time: float, mode: str,
               index: int, start_body: dict[str, Any] | None = None) -> Participant:
    """One participant through the study, timing each reply by kind of turn."""
    person = Participant()

    async def pause() -> None:
        if think_time > 0:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * think_time)

    try:
        session = await _post(client, base + "api/sessions", start_body or {}, "start", person,
                              params={"PROLIFIC_PID": f"bench-{os.getpid()}-{index}-{rng.getrandbits(32):x}"})
        person.session_id = session["session_id"]
        person.received += [m["text"] for m in session["messages"]]
        url = f"{base}api/sessions/{person.session_id}/messages"
        expects, turn = session["expects"], 0
        text = rng.choice(COMPLAINTS)[1]
        kind = "first message"
        while expects == "message":
            await pause()
            answer = await _post(client, url, {"text": text, "client_message_id": f"b{turn}"}, kind, person)
            person.sent.append(text)
            person.received += [r["text"] for r in answer["replies"]]
            expects = answer["expects"]
            if mode == "first-message":
                person.finished = True
                return person
            turn += 1
            text = rng.choice(FOLLOW_UPS)
            kind = "follow-up"
        if expects == "email":
            await pause()
            address = f"participant{index}@example.com"
            answer = await _post(client, url, {"text": address, "client_message_id": "email"}, "e-mail", person)
            person.sent.append(address)
            person.received += [r["text"] for r in answer["replies"]]
            expects = answer["expects"]
        if expects != "done":
            raise RuntimeError(f"ended expecting {expects!r}")
        person.finished = True
    except Exception as error:  # every failure is counted and shown, never hidden
        person.error = f"{type(error).__name__}: {error}"[:300]
    return person


async def run_load(base: str, users: int, think_time: float, mode: str, duration: float, seed: int,
                   show_progress: bool = True, admin_token: str = "") -> tuple[list[Participant], float]:
    """Run the participants; with the study's admin token, every one is marked synthetic (see
    combot.synthetic), so they count towards no cell and stay out of the dashboard and export."""
    # Several small connection pools: httpx's pool does work that grows with the square of its
    # connections on every request (encode/httpcore#1035), so one big pool would measure itself.
    per_pool = 8
    limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
    timeout = httpx.Timeout(120.0)
    rng = random.Random(seed)
    progress = Progress(users if duration <= 0 else 0, show=show_progress)
    people: list[Participant] = []
    started = time.monotonic()
    marks = synthetic.headers(admin_token) if admin_token else {}
    clients = [httpx.AsyncClient(limits=limits, timeout=timeout, headers=marks)
               for _ in range((users + per_pool - 1) // per_pool)]
    try:
        # A study with a consent page starts only with {"consent": true}.
        consent = (await clients[0].get(base + "api/consent")).json().get("enabled", False)
        start_body = {"consent": True} if consent else {}
        async def one(index: int) -> None:
            local = random.Random(rng.getrandbits(64))
            client = clients[index // per_pool]
            # Arrivals are spread over the first think-time so they do not all land in the same millisecond.
            if think_time > 0:
                await asyncio.sleep(local.uniform(0, think_time))
            while True:
                person = await walk(client, base, local, think_time, mode, index, start_body)
                people.append(person)
                progress.update(person.error is None)
                if duration <= 0 or time.monotonic() - started >= duration:
                    return

        await asyncio.gather(*(one(i) for i in range(users)))
    finally:
        for client in clients:
            await client.aclose()
    progress.close()
    return people, time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(people: list[Participant], elapsed: float) -> dict[str, Any]:
    by_kind: dict[str, list[float]] = {}
    for person in people:
        for kind, seconds in person.timings:
            by_kind.setdefault(kind, []).append(seconds)
    every = [s for kind, values in by_kind.items() if kind != "start" for s in values]
    table = {}
    for kind, values in list(by_kind.items()) + [("every reply", every)]:
        table[kind] = {"count": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
                       "p99": percentile(values, 99), "max": max(values) if values else float("nan"),
                       "mean": statistics.fmean(values) if values else float("nan")}
    ok = [p for p in people if p.error is None]
    replies = sum(len(p.timings) for p in people)
    return {
        "participants": len(people),
        "succeeded": len(ok),
        "failed": len(people) - len(ok),
        "success_rate": len(ok) / len(people) if people else 0.0,
        "errors": [p.error for p in people if p.error],
        "seconds": elapsed,
        "replies_per_s": replies / elapsed if elapsed else 0.0,
        "participants_per_min": len(ok) / elapsed * 60 if elapsed else 0.0,
        "latency": table,
    }


# --- the server under test -----------------------------------------------------------------------

def self_command() -> list[str]:
    """How to run this same Combot again: the .pyz when running from one, else `python -m combot`."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 and os.path.isfile(argv0) and zipfile.is_zipfile(argv0):
        return [sys.executable, argv0]
    return [sys.executable, "-m", "combot"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def local_server(workers: int, config_path: str | None, env: dict[str, str], workdir: Path) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    port = free_port()
    database = workdir / "bench.db"
    args = self_command() + ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
                             "--database", str(database), "--access-log", ""]
    if config_path:
        args += ["--config", config_path]
    log = (workdir / "server.log").open("wb")
    # Generous limits so the bench measures the server, not its abuse protection.
    environment = {**os.environ, "COMBOT_RATE_LIMIT": "0", "COMBOT_ADMIN_TOKEN": LOCAL_ADMIN_TOKEN, **env}
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n" + (workdir / "server.log").read_text())
            try:
                if httpx.get(url + "healthz", timeout=2).status_code == 200 and \
                        sum(_is_worker(pid) for pid in worker_pids(process.pid)) >= workers:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in 120 s:\n" + (workdir / "server.log").read_text())
            time.sleep(0.2)
        # Every worker loads its model lazily at start; wait until all answer.
        for _ in range(workers * 4):
            httpx.get(url + "healthz", timeout=10)
        yield url, database, process
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def worker_pids(parent: int) -> list[int]:
    try:
        return [int(pid) for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
    except OSError:
        return []


def _kb_field(path: str, name: str) -> float:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_mb(pid: int) -> float:
    return _kb_field(f"/proc/{pid}/status", "VmRSS")


def pss_mb(pid: int) -> float:
    """Proportional set size: shared library pages divided among the processes that map them."""
    return _kb_field(f"/proc/{pid}/smaps_rollup", "Pss")


def _is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def memory(parent: int) -> dict[str, Any]:
    """RSS of the supervisor, each worker, and helpers such as multiprocessing's resource tracker."""
    children = {pid: rss_mb(pid) for pid in worker_pids(parent)}
    workers = [mb for pid, mb in children.items() if _is_worker(pid)]
    helpers = sum(mb for pid, mb in children.items() if not _is_worker(pid))
    # RSS counts the shared libraries (onnxruntime, numpy, Python: ~40 MB) once per worker; PSS
    # shares them out, so its total is what the server really occupies.
    return {"supervisor_mb": rss_mb(parent), "workers_mb": workers, "helpers_mb": helpers,
            "total_mb": rss_mb(parent) + sum(children.values()),
            "total_pss_mb": pss_mb(parent) + sum(pss_mb(pid) for pid in children)}


def verify(database: Path, people: list[Participant]) -> dict[str, int]:
    """Every message a simulated participant sent or received must be in the database."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    expected = found = 0
    missing: list[str] = []
    for person in people:
        if not person.session_id:
            continue
        row = conn.execute("SELECT id FROM participants WHERE token = ?", (person.session_id,)).fetchone()
        stored_bot: list[str] = []
        stored_sent: list[str] = []
        if row:
            for sender, kind, text in conn.execute(
                    "SELECT sender, kind, text FROM messages WHERE participant_id = ? ORDER BY id", (row[0],)):
                (stored_bot if sender == "bot" else stored_sent).append(text)
            emails = conn.execute("SELECT email FROM emails WHERE participant_id = ?", (row[0],)).fetchall()
            stored_sent += [e[0] for e in emails]
        for seen, stored in ((person.received, stored_bot), (person.sent, stored_sent)):
            for text in seen:
                expected += 1
                if text in stored:
                    stored.remove(text)  # each stored message matches one seen message only
                    found += 1
                else:
                    missing.append(text)
    integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    conn.close()
    return {"messages_expected": expected, "messages_found": found, "messages_missing": len(missing),
            "integrity_ok": int(integrity == "ok")}


@dataclass
class BenchOptions:
    users: list[int]
    url: str | None = None
    workers: int = 8
    think_time: float = 0.0
    mode: str = "full"
    llm_latency: float = 1.0
    use_llm: bool = True
    duration: float = 0.0
    config_path: str | None = None
    seed: int = 1
    progress: bool = True
    admin_token: str = ""  # of the study at `url`: marks its simulated participants synthetic


def run_bench(options: BenchOptions, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every load level in turn; return the whole report."""
    levels = []
    with tempfile.TemporaryDirectory(prefix="combot-bench-") as tmp:
        with _llm(options) as llm_env:
            for users in options.users:
                say(f"{users} participants ({options.mode}, think time {options.think_time} s, "
                    f"{'LLM ' + str(options.llm_latency) + ' s' if llm_env else 'offline paraphraser'}):")
                if options.url:
                    people, elapsed = asyncio.run(run_load(options.url.rstrip("/") + "/", users, options.think_time,
                                                           options.mode, options.duration, options.seed, options.progress,
                                                           options.admin_token))
                    level = summarise(people, elapsed)
                else:
                    workdir = Path(tmp) / f"level-{users}"
                    workdir.mkdir()
                    with local_server(options.workers, options.config_path, llm_env, workdir) as (url, db, process):
                        people, elapsed = asyncio.run(run_load(url, users, options.think_time, options.mode,
                                                               options.duration, options.seed, options.progress,
                                                               LOCAL_ADMIN_TOKEN))
                        level = summarise(people, elapsed)
                        level["memory"] = memory(process.pid)
                    level["data"] = verify(db, people)
                    if level["data"]["messages_missing"]:
                        level["failed"] += 1
                level["users"] = users
                levels.append(level)
    return {"options": options.__dict__, "levels": levels, "original": ORIGINAL}


@contextmanager
def _llm(options: BenchOptions) -> Iterator[dict[str, str]]:
    if options.url or not options.use_llm or options.llm_latency <= 0:
        yield {}
        return
    from combot.fakellm import running_fake_llm

    with running_fake_llm(latency=options.llm_latency) as url:
        yield {"COMBOT_LLM_URL": url, "COMBOT_LLM_MODEL": "fake-llm", "COMBOT_LLM_MAX_IN_FLIGHT": "10000",
               "COMBOT_LLM_TIMEOUT": str(max(4.0, options.llm_latency * 3))}


def format_report(report: dict[str, Any]) -> str:
    lines: list[str] = []
    for level in report["levels"]:
        lines.append(f"\n{level['users']} participants: {level['succeeded']}/{level['participants']} finished "
                     f"({level['success_rate']:.0%}), {level['replies_per_s']:.1f} replies/s, "
                     f"{level['participants_per_min']:.1f} participants/min, {level['seconds']:.1f} s")
        lines.append(f"  {'turn':<14}{'count':>7}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}")
        for kind, row in level["latency"].items():
            lines.append(f"  {kind:<14}{row['count']:>7}" + "".join(
                f"{row[q] * 1000:>8.0f}ms" for q in ("p50", "p95", "p99", "max")))
        if "memory" in level:
            mem = level["memory"]
            workers = ", ".join(f"{m:.0f}" for m in mem["workers_mb"])
            lines.append(f"  memory: RSS {mem['total_mb']:.0f} MB in all (workers: {workers} MB; supervisor "
                         f"{mem['supervisor_mb']:.0f} MB); PSS {mem['total_pss_mb']:.0f} MB (shared libraries "
                         "counted once)")
        if "data" in level:
            data = level["data"]
            lines.append(f"  data: {data['messages_found']}/{data['messages_expected']} messages found in the database"
                         f", {data['messages_missing']} missing, integrity {'ok' if data['integrity_ok'] else 'FAILED'}")
        for error in level["errors"][:10]:
            lines.append(f"  error: {error}")
        if len(level["errors"]) > 10:
            lines.append(f"  ... and {len(level['errors']) - 10} more errors")
        every = level["latency"].get("every reply", {})
        if every.get("count"):
            original = report["original"]
            lines.append(f"  vs. the original at {original['users']} users (mean {original['mean_s']} s, p95 "
                         f"~{original['p95_s']:.0f} s, {original['memory_gb']} GB): mean {every['mean']:.3f} s, "
                         f"p95 {every['p95']:.3f} s ({original['p95_s'] / max(every['p95'], 1e-9):.0f}x faster at p95)")
    if len(report["levels"]) > 1:
        lines.append("\ncapacity:")
        lines.append(f"  {'users':>6}{'success':>9}{'p50':>10}{'p95':>10}{'max':>10}{'replies/s':>11}")
        for level in report["levels"]:
            every = level["latency"]["every reply"]
            lines.append(f"  {level['users']:>6}{level['success_rate']:>9.0%}{every['p50'] * 1000:>8.0f}ms"
                         f"{every['p95'] * 1000:>8.0f}ms{every['max'] * 1000:>8.0f}ms{level['replies_per_s']:>11.1f}")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=str))
