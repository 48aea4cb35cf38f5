"""`combot bench`: simulated participants walk the whole study over HTTP, as the page does.

Starts a real multi-process server on loopback with a temporary database (unless given a URL),
runs N participants at once, then checks that every message each of them sent or received is in
the database. Numbers are reported, never asserted: the researcher reads them.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from combot import synthetic

# The admin token of the server `combot bench` starts itself (a throw-away database).
LOCAL_ADMIN_TOKEN = "bench"
# The original system's published 30-user result (see the project's seed report).
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
    error: str | None = None
    finished: bool = False


@dataclass
class Progress:
    total: int
    finished: int = 0
    failed: int = 0
    started_at: float = field(default_factory=time.monotonic)
    show: bool = True
    shown_at: float = 0.0

    def update(self, ok: bool) -> None:
        if ok:
            self.finished += 1
        else:
            self.failed += 1
        if self.show and (time.monotonic() - self.shown_at > 0.25 or self.finished + self.failed == self.total):
            self.shown_at = time.monotonic()
            done = self.finished + self.failed
            width = 30
            filled = int(width * done / max(self.total, 1)) if self.total else width
            sys.stderr.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {self.finished} finished, "
                             f"{self.failed} failed, {time.monotonic() - self.started_at:5.1f} s ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.show:
            sys.stderr.write("\n")


class Histogram:
    """Reply times in fixed log-spaced buckets (1% wide, 0.1 ms to ~17 min): a 5,000-participant
    run keeps a few kilobytes per kind of turn instead of every sample; percentiles are within 1%."""

    RATIO = 1.01
    LOW = 1e-4
    BUCKETS = 1620

    def __init__(self) -> None:
        self.counts = [0] * self.BUCKETS
        self.count = 0
        self.total = 0.0
        self.max = float("nan")

    def add(self, seconds: float) -> None:
        index = 0 if seconds <= self.LOW else min(self.BUCKETS - 1, 1 + int(math.log(seconds / self.LOW, self.RATIO)))
        self.counts[index] += 1
        self.count += 1
        self.total += seconds
        self.max = seconds if self.count == 1 else max(self.max, seconds)

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        if other.count:
            self.max = other.max if not self.count else max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    def _nth(self, k: int) -> float:
        """The k-th smallest sample (from 0), as the middle of its bucket; the largest exactly."""
        if k >= self.count - 1:
            return self.max
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen > k:
                return self.LOW if index == 0 else min(self.max, self.LOW * self.RATIO ** (index - 0.5))
        return self.max

    def percentile(self, q: float) -> float:
        """Interpolated between the two nearest ranks, as numpy's default does."""
        if not self.count:
            return float("nan")
        rank = q / 100 * (self.count - 1)
        low = int(rank)
        below = self._nth(low)
        return below + (self._nth(low + 1) - below) * (rank - low) if rank > low else below

    def summary(self) -> dict[str, float]:
        return {"count": self.count, "p50": self.percentile(50), "p95": self.percentile(95),
                "p99": self.percentile(99), "max": self.max,
                "mean": self.total / self.count if self.count else float("nan")}


class Connection:
    """One simulated participant's keep-alive HTTP/1.1 connection, as a browser tab holds one.

    A few lines over asyncio streams instead of an HTTP library: at 5,000 participants the load
    generator shares the server's cores, and every millisecond of its CPU per request would be
    measured as the server's latency (httpx costs several times more per request, and its pool
    grows with the square of its connections, encode/httpcore#1035).
    """

    def __init__(self, base: str, timeout: float = 120.0, headers: dict[str, str] | None = None):
        parts = urllib.parse.urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https"
        self.prefix = parts.path.rstrip("/")
        self.authority = parts.netloc.rsplit("@", 1)[-1]
        self.timeout = timeout
        self.headers = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._used = False

    def request(self, path: str, body: dict[str, Any] | None) -> bytes:
        """A POST of a JSON body (a GET without one), ready to write: built before a barrier, so
        sending costs nothing."""
        start = f"{'GET' if body is None else 'POST'} {self.prefix}/{path.lstrip('/')} HTTP/1.1\r\n"
        head = f"Host: {self.authority}\r\n{self.headers}"
        if body is None:
            return (start + head + "\r\n").encode()
        payload = json.dumps(body).encode()
        return (start + head + f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                ).encode() + payload

    async def send(self, raw: bytes, resend: bool = True) -> tuple[int, bytes]:
        """Send a request built by `request` and read its answer. With `resend=False` a request on a
        kept-alive connection the server closed is not sent again: its loss is the caller's to see."""
        for attempt in (1, 2):
            if self._writer is None:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, ssl=self.tls or None), self.timeout)
                self._reader, self._writer, self._used = reader, writer, False
            reused = self._used
            try:
                self._writer.write(raw)
                return await asyncio.wait_for(self._response(), self.timeout)
            except (ConnectionError, asyncio.IncompleteReadError) as error:
                self.close()
                # A kept-alive connection the server closed meanwhile (its keep-alive timeout, a
                # recycled worker): the request never reached it, so it is sent once more.
                if not (resend and reused) or attempt == 2 or (
                        isinstance(error, asyncio.IncompleteReadError) and error.partial):
                    raise
        raise AssertionError("unreachable")

    async def last_send(self, raw: bytes) -> str:
        """Send one request without resending it and close the connection: its status as text, or
        the name of the connection error that took its answer (the races of combot/graceful.py)."""
        try:
            status, _ = await self.send(raw, resend=False)
            return str(status)
        except (ConnectionError, asyncio.IncompleteReadError) as error:
            return type(error).__name__
        finally:
            self.close()

    async def _response(self) -> tuple[int, bytes]:
        assert self._reader is not None
        head = await self._reader.readuntil(b"\r\n\r\n")
        self._used = True
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self._reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunks.append(await self._reader.readexactly(size + 2))
                if size == 0:
                    await self._reader.readuntil(b"\r\n") if chunks[-1] != b"\r\n" else None
                    break
            body = b"".join(chunk[:-2] for chunk in chunks)
        else:
            body = await self._reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


@dataclass
class Load:
    """What every simulated participant of one run adds to: reply times, and when the barrier let go."""

    timings: dict[str, Histogram] = field(default_factory=dict)
    released_at: float = 0.0
    last_sent_at: float = 0.0

    def record(self, kind: str, seconds: float) -> None:
        self.timings.setdefault(kind, Histogram()).add(seconds)


async def _post(conn: Connection, load: Load, raw: bytes, kind: str) -> dict[str, Any]:
    started = time.perf_counter()
    status, body = await conn.send(raw)
    elapsed = time.perf_counter() - started
    if status not in (200, 201):
        raise RuntimeError(f"{kind}: HTTP {status} {body[:200].decode('utf-8', 'replace')}")
    load.record(kind, elapsed)
    return json.loads(body)  # type: ignore[no-any-return]


async def walk(conn: Connection, load: Load, rng: random.Random, think_time: float, mode: str, index: int,
               barrier: asyncio.Barrier | None = None, start_body: dict[str, Any] | None = None) -> Participant:
    """One participant through the study, timing each reply by kind of turn.

    With a barrier, the participant creates its session, builds its first message and waits until
    every participant has done so; then all first messages go out at the same instant (as the
    original test did), and the send times are recorded to show how close together they left.
    """
    person = Participant()

    async def pause() -> None:
        if think_time > 0:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * think_time)

    text = rng.choice(COMPLAINTS)[1]
    try:
        ready: bytes | None = None
        try:
            pid = f"bench-{os.getpid()}-{index}-{rng.getrandbits(32):x}"
            session = await _post(conn, load, conn.request(f"api/sessions?PROLIFIC_PID={pid}", start_body or {}),
                                  "start")
            person.session_id = session["session_id"]
            person.received += [m["text"] for m in session["messages"]]
            path = f"api/sessions/{person.session_id}/messages"
            ready = conn.request(path, {"text": text, "client_message_id": "b0"})
        finally:
            if barrier is not None:
                await barrier.wait()  # a failed start still arrives, or the others would wait forever
                moment = time.perf_counter()
                load.released_at = min(load.released_at or moment, moment)
                load.last_sent_at = max(load.last_sent_at, moment)
        expects, turn = session["expects"], 0
        kind = "first message"
        while expects == "message":
            if ready is None:
                await pause()
            raw, ready = ready or conn.request(path, {"text": text, "client_message_id": f"b{turn}"}), None
            answer = await _post(conn, load, raw, kind)
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
            answer = await _post(conn, load, conn.request(path, {"text": address, "client_message_id": "email"}),
                                 "e-mail")
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
                   show_progress: bool = True, admin_token: str = "") -> tuple[list[Participant], float, Load]:
    """Run the participants; with the study's admin token, every one is marked synthetic (see
    combot.synthetic), so they count towards no cell and stay out of the dashboard and export."""
    rng = random.Random(seed)
    progress = Progress(users if duration <= 0 else 0, show=show_progress)
    people: list[Participant] = []
    load = Load()
    barrier = asyncio.Barrier(users) if mode == "first-message" else None
    started = time.monotonic()
    marks = synthetic.headers(admin_token) if admin_token else {}
    connections = [Connection(base, headers=marks) for _ in range(users)]
    # A study with a consent page starts only with {"consent": true}.
    status, answer = await connections[0].send(connections[0].request("api/consent", None))
    consent = status == 200 and json.loads(answer).get("enabled", False)
    start_body = {"consent": True} if consent else {}

    async def one(index: int) -> None:
        local = random.Random(rng.getrandbits(64))
        # With think time, arrivals are spread over the first think-time; in first-message mode
        # everyone starts at once and the barrier lines the first messages up.
        if think_time > 0 and mode != "first-message":
            await asyncio.sleep(local.uniform(0, think_time))
        first = True
        while True:
            person = await walk(connections[index], load, local, think_time, mode, index, barrier if first else None,
                                start_body)
            first = False
            people.append(person)
            progress.update(person.error is None)
            if duration <= 0 or time.monotonic() - started >= duration:
                return

    try:
        await asyncio.gather(*(one(i) for i in range(users)))
    finally:
        for conn in connections:
            conn.close()
    progress.close()
    return people, time.monotonic() - started, load


def summarise(people: list[Participant], elapsed: float, load: Load) -> dict[str, Any]:
    every = Histogram()
    for kind, histogram in load.timings.items():
        if kind != "start":
            every.merge(histogram)
    table = {kind: histogram.summary() for kind, histogram in [*load.timings.items(), ("every reply", every)]}
    ok = [p for p in people if p.error is None]
    replies = sum(h.count for h in load.timings.values())
    report = {
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
    if load.released_at:
        # How far apart the barrier's first messages left the client: 0 would be the same instant.
        report["first_messages_sent_within_ms"] = (load.last_sent_at - load.released_at) * 1000
    return report


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
def local_server(workers: int, config_path: str | None, env: dict[str, str], workdir: Path,
                 database_name: str = "bench.db") -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    """The real `combot serve` on loopback with a throwaway database in `workdir`, ready for load."""
    port = free_port()
    database = workdir / database_name
    args = self_command() + ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
                             "--database", str(database), "--access-log", ""]
    if config_path:
        args += ["--config", str(Path(config_path).resolve())]
    log = (workdir / "server.log").open("wb")
    # Generous limits so the bench measures the server, not its abuse protection.
    environment = {**os.environ, "COMBOT_RATE_LIMIT": "0", "COMBOT_ADMIN_TOKEN": LOCAL_ADMIN_TOKEN, **env}
    # Started in its own folder: `python -m combot` puts the current folder first on sys.path, so
    # from a source checkout it would run that checkout's Combot whatever PYTHONPATH says (which
    # bench/ab.py uses to run two versions side by side).
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=workdir)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n" + (workdir / "server.log").read_text())
            try:
                if httpx.get(url + "healthz", timeout=2).status_code == 200 and \
                        len(worker_pids(process.pid)) >= workers:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in 120 s:\n" + (workdir / "server.log").read_text())
            time.sleep(0.2)
        # The supervisor starts one worker, then the rest: wait until every worker has answered (each
        # health check on a new connection, which any worker may accept), so no cold start is timed.
        answered: set[int] = set()
        while len(answered) < workers and time.monotonic() < deadline:
            try:
                answer = httpx.get(url + "healthz", timeout=10, headers={"Connection": "close"})
                if answer.status_code == 200:
                    answered.add(int(answer.json()["pid"]))
            except (httpx.HTTPError, ValueError, KeyError):
                time.sleep(0.2)
        yield url, database, process
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def worker_pids(parent: int) -> list[int]:
    """The server's worker processes: forked by its forkserver, or (spawn) its own children."""
    workers = []
    for child in _children(parent):
        command = _cmdline(child)
        if b"forkserver" in command:
            workers += _children(child)
        elif b"spawn_main" in command:
            workers.append(child)
    return workers


def helper_pids(parent: int) -> list[int]:
    """The supervisor's other children: the forkserver and multiprocessing's resource tracker."""
    return [child for child in _children(parent) if b"spawn_main" not in _cmdline(child)]


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


def memory(parent: int) -> dict[str, Any]:
    """RSS of the supervisor, each worker, and helpers (the forkserver, the resource tracker)."""
    workers = worker_pids(parent)
    helpers = helper_pids(parent)
    # RSS counts shared pages (libraries, the forkserver's imports, the mapped classifier weights)
    # once per process; PSS shares them out, so its total is what the server really occupies.
    return {"supervisor_mb": rss_mb(parent), "workers_mb": [rss_mb(pid) for pid in workers],
            "helpers_mb": sum(rss_mb(pid) for pid in helpers),
            "total_mb": rss_mb(parent) + sum(rss_mb(pid) for pid in workers + helpers),
            "total_pss_mb": pss_mb(parent) + sum(pss_mb(pid) for pid in workers + helpers)}


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


def compute_times(database: Path) -> dict[str, dict[str, float]]:
    """The server's own compute time per kind of turn (from the stored `compute_ms`), beside the
    client-measured reply times, which also hold the designed reply timing."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    by_kind: dict[str, Histogram] = {}
    every = Histogram()
    try:
        rows = conn.execute(
            "SELECT p.turn, p.kind, max(r.compute_ms) FROM messages p JOIN messages r ON r.reply_to = p.id"
            " WHERE p.sender = 'participant' AND r.compute_ms IS NOT NULL GROUP BY p.id").fetchall()
    except sqlite3.OperationalError:  # a server from before compute_ms (bench/ab.py runs old checkouts)
        rows = []
    for turn, kind, ms in rows:
        label = "e-mail" if kind == "email" else "first message" if turn == 1 else "follow-up"
        by_kind.setdefault(label, Histogram()).add(ms / 1000)
        every.add(ms / 1000)
    conn.close()
    return {kind: histogram.summary() for kind, histogram in [*by_kind.items(), ("every reply", every)]
            if histogram.count}


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
    server_env: dict[str, str] = field(default_factory=dict)  # e.g. PYTHONPATH of another checkout (bench/ab.py)
    # Reply timing of the server it starts: "none" (compute time alone), "study" (its [[timing]]
    # blocks), or "matched"/"typing" everywhere. A server given by --url keeps its own.
    timing: str = "none"


def run_bench(options: BenchOptions, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every load level in turn; return the whole report."""
    levels = []
    with tempfile.TemporaryDirectory(prefix="combot-bench-") as tmp:
        with _llm(options) as llm_env:
            for users in options.users:
                say(f"{users} participants ({options.mode}, think time {options.think_time} s, "
                    f"{'LLM ' + str(options.llm_latency) + ' s' if llm_env else 'offline paraphraser'}):")
                if options.url:
                    level = _measure(options.url.rstrip("/") + "/", users, options, options.admin_token)
                else:
                    workdir = Path(tmp) / f"level-{users}"
                    workdir.mkdir()
                    timing_env = {} if options.timing == "study" else {"COMBOT_REPLY_TIMING": options.timing}
                    env = {**llm_env, **timing_env, **options.server_env}
                    with local_server(options.workers, options.config_path, env, workdir) as (url, db, process):
                        level = _measure(url, users, options, LOCAL_ADMIN_TOKEN)
                        level["memory"] = memory(process.pid)
                    level["data"] = verify(db, level.pop("people"))
                    level["compute"] = compute_times(db)
                    if level["data"]["messages_missing"]:
                        level["failed"] += 1
                level.pop("people", None)
                level["users"] = users
                levels.append(level)
    return {"options": options.__dict__, "levels": levels, "original": ORIGINAL}


def _measure(base: str, users: int, options: BenchOptions, admin_token: str) -> dict[str, Any]:
    cpu = time.process_time()
    people, elapsed, load = asyncio.run(run_load(base, users, options.think_time, options.mode, options.duration,
                                                 options.seed, options.progress, admin_token))
    level = summarise(people, elapsed, load)
    level["client_cpu_s"] = time.process_time() - cpu  # the load generator's own share of the cores
    level["people"] = people
    return level


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
                     f"{level['participants_per_min']:.1f} participants/min, {level['seconds']:.1f} s"
                     + (f" (client CPU {level['client_cpu_s']:.1f} s)" if "client_cpu_s" in level else ""))
        if "first_messages_sent_within_ms" in level:
            lines.append(f"  all {level['users']} first messages sent within "
                         f"{level['first_messages_sent_within_ms']:.1f} ms of each other (after every session existed)")
        timing = report["options"].get("timing", "none")
        shown_title = "reply time as the client saw it" + ("" if timing == "none" else f" (reply timing {timing!r})")
        tables = [(shown_title, level["latency"])]
        if level.get("compute"):
            tables.append(("compute time on the server (what the latency goals are about)", level["compute"]))
        for title, table in tables:
            lines.append(f"  {title}:")
            lines.append(f"  {'turn':<14}{'count':>7}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}")
            for kind, row in table.items():
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
        # With designed reply timing the client's times hold the design; compare the compute time.
        every = (level["compute"] if timing != "none" and level.get("compute") else level["latency"]).get("every reply", {})
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
