"""A fake OpenAI-compatible chat-completions server on loopback, for tests and `combot bench`.

A raw asyncio HTTP/1.1 server (keep-alive, Content-Length bodies): light enough that hundreds of
concurrent calls cost it next to nothing, so a benchmark measures Combot, not the fake. It answers
`POST /v1/chat/completions` with a paraphrase built from the user message, after `latency`
seconds, or misbehaves as told (see BEHAVIOURS).

    fake = start_fake_llm(latency=1.0)              # a thread; process=True for its own process
    with running_fake_llm(latency=1.0) as url: ...  # the same as a context manager (own process)
    env = {"COMBOT_LLM_URL": fake.url}              # base URL, ends in /v1
    fake.configure(behaviour="429")                 # change behaviour or latency while running
    fake.stats()                                     # requests, in flight, max in flight, last request
    fake.stop()

Also runnable on its own: `python -m combot.fakellm --port 8900 --latency 1.0`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx

from combot.paraphrase import reflect
from combot.personas import FACTS_HEADING, PLAYER_MARKER

BEHAVIOURS = {
    "answer": "a paraphrase of the user message after `latency` seconds (or, when the system prompt is a"
              " `combot pilot` persona's, that persona's next fact: see `play_persona`)",
    "slow": "the same, but only after `slow_seconds` (default 60): past any sensible timeout",
    "429": "HTTP 429 Too Many Requests",
    "500": "HTTP 500 Internal Server Error",
    "close": "read the request, then close the connection without answering",
    "garbage": "HTTP 200 with an HTML page instead of JSON",
    "empty": "HTTP 200 with an empty 'choices' list",
    "long": "HTTP 200 with a reply of about 2,000 characters",
    "shape": "HTTP 200 with JSON that is not a chat completion",
}
DEFAULT_MODEL = "fake-paraphraser-1"

_FRAMES = (
    "It sounds like {r}. Could you tell me a bit more about what happened?",
    "So {r}. What happened after that?",
    "From what you describe, {r}. Can you walk me through it in more detail?",
    "If I follow you, {r}. How did that come about?",
    "You're telling me that {r}. What else can you remember about it?",
    "I hear that {r}. Could you describe that part a little more?",
)
_SHORT = (
    "I see. Could you tell me more about that?",
    "Thank you. What happened next?",
)


def fake_paraphrase(text: str) -> str:
    """A plausible paraphrase: the user's words in the second person in one of a few framings."""
    reflection = reflect(text)
    digest = int.from_bytes(hashlib.blake2s(text.encode("utf-8"), digest_size=4).digest(), "big")
    if len(reflection.split()) < 4:
        return _SHORT[digest % len(_SHORT)]
    return _FRAMES[digest % len(_FRAMES)].replace("{r}", reflection)


def play_persona(messages: list[dict[str, Any]]) -> str | None:
    """A `combot pilot` persona's next message: its n-th fact, n being the replies it gave so far.

    None when the system prompt is not a persona's. The answer comes only from the persona's own
    instructions, so a test can tell that the persona (and not the bot's prompt) was played.
    """
    system = next((str(m.get("content", "")) for m in messages if m.get("role") == "system"), "")
    if PLAYER_MARKER not in system or FACTS_HEADING not in system:
        return None
    facts = [line[2:].strip() for line in system.split(FACTS_HEADING, 1)[1].splitlines() if line.startswith("- ")]
    if not facts:
        return None
    given = sum(1 for m in messages if m.get("role") == "assistant")
    return facts[given % len(facts)]


def _check(behaviour: str, jitter: float) -> None:
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {behaviour!r}; one of {', '.join(BEHAVIOURS)}")
    if not 0 <= jitter <= 1:
        raise ValueError("jitter must be between 0 and 1")


@dataclass
class FakeState:
    behaviour: str = "answer"
    latency: float = 0.0
    jitter: float = 0.0  # each answer after latency * a uniform factor in 1 +- jitter
    slow_seconds: float = 60.0
    requests: int = 0
    max_in_flight: int = 0
    connections: int = 0  # connections that carried a chat completion (a client's keep-alive shows here)
    active: set[asyncio.Task[Any]] = field(default_factory=set)
    last_request: dict[str, Any] | None = None
    authorization: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(self.behaviour, self.jitter)

    def configure(self, body: dict[str, Any]) -> None:
        behaviour = body.get("behaviour", self.behaviour)
        jitter = float(body.get("jitter", self.jitter))
        _check(behaviour, jitter)
        self.behaviour = behaviour
        self.latency = float(body.get("latency", self.latency))
        self.jitter = jitter
        self.slow_seconds = float(body.get("slow_seconds", self.slow_seconds))
        if body.get("reset"):
            # A fresh start: drop calls still being answered (e.g. "slow" ones whose client gave up).
            for task in self.active:
                task.cancel()
            self.active.clear()
            self.requests = self.max_in_flight = self.connections = 0
            self.last_request = None
            self.authorization = []

    def stats(self) -> dict[str, Any]:
        return {"behaviour": self.behaviour, "latency": self.latency, "jitter": self.jitter, "requests": self.requests,
                "in_flight": len(self.active), "max_in_flight": self.max_in_flight, "connections": self.connections,
                "last_request": self.last_request, "authorization": sorted(set(self.authorization))}


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}


class _Close(Exception):
    """Drop the connection without an answer."""


async def _completion(state: FakeState, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    state.requests += 1
    task = asyncio.current_task()
    assert task is not None
    state.active.add(task)
    state.max_in_flight = max(state.max_in_flight, len(state.active))
    try:
        try:
            request = json.loads(body)
            messages = request["messages"]
            user = next(m["content"] for m in reversed(messages) if m.get("role") == "user")
        except (ValueError, KeyError, TypeError, StopIteration):
            return 400, "application/json", b'{"error": {"message": "expected a chat completion request"}}'
        state.last_request = request
        if "authorization" in headers:
            state.authorization.append(headers["authorization"])
        behaviour = state.behaviour
        await asyncio.sleep(state.slow_seconds if behaviour == "slow"
                            else state.latency * random.uniform(1 - state.jitter, 1 + state.jitter))
        model = request.get("model") or DEFAULT_MODEL
        if behaviour == "429":
            return 429, "application/json", b'{"error": {"message": "rate limited", "type": "rate_limit"}}'
        if behaviour == "500":
            return 500, "application/json", b'{"error": {"message": "the fake broke"}}'
        if behaviour == "close":
            raise _Close
        if behaviour == "garbage":
            return 200, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        if behaviour == "empty":
            return 200, "application/json", json.dumps({"id": "x", "model": model, "choices": []}).encode()
        if behaviour == "shape":
            return 200, "application/json", json.dumps({"result": {"text": fake_paraphrase(user)}}).encode()
        content = play_persona(messages) or fake_paraphrase(user)
        if behaviour == "long":
            content = " ".join([content] * (2000 // len(content) + 1))
        reply = {
            "id": f"chatcmpl-fake{state.requests}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(user.split()), "completion_tokens": len(content.split())},
        }
        return 200, "application/json", json.dumps(reply).encode()
    finally:
        state.active.discard(task)


async def _route(state: FakeState, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
    if method == "POST" and path.endswith("/chat/completions"):
        return await _completion(state, body, headers)
    if method == "POST" and path == "/_fake/config":
        try:
            state.configure(json.loads(body or b"{}"))
        except (ValueError, TypeError) as error:
            return 400, "application/json", json.dumps({"error": str(error)}).encode()
        return 200, "application/json", json.dumps(state.stats()).encode()
    if method == "GET" and path == "/_fake/stats":
        return 200, "application/json", json.dumps(state.stats()).encode()
    return 404, "application/json", b'{"error": {"message": "not found"}}'


async def _connection(state: FakeState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    counted = False
    try:
        while True:
            request_line = await reader.readline()
            if not request_line.strip():
                return
            method, target, _version = request_line.decode("latin-1").split(" ", 2)
            headers: dict[str, str] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            body = await reader.readexactly(length) if length else b""
            path = target.split("?")[0]
            if not counted and path.endswith("/chat/completions"):
                state.connections, counted = state.connections + 1, True
            try:
                status, content_type, payload = await _route(state, method, path, headers, body)
            except _Close:
                writer.transport.abort()
                return
            head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(payload)}\r\n")
            if status == 429:
                head += "Retry-After: 1\r\n"
            writer.write(head.encode("latin-1") + b"\r\n" + payload)
            await writer.drain()
            if headers.get("connection", "").lower() == "close":
                return
    except (ConnectionError, asyncio.IncompleteReadError, ValueError, asyncio.CancelledError):
        return
    finally:
        writer.close()


async def serve(state: FakeState, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Start listening; the returned server's socket gives the port."""
    return await asyncio.start_server(lambda r, w: _connection(state, r, w), host, port, backlog=2048)


class FakeLLM:
    """A running fake: its base URL (ends in /v1), and control over its behaviour and latency."""

    def __init__(self, url: str, stopper: Any):
        self.url = url
        self._stop = stopper

    @property
    def root(self) -> str:
        return self.url[: -len("/v1")]

    def configure(self, behaviour: str | None = None, latency: float | None = None,
                  slow_seconds: float | None = None, reset: bool = False, jitter: float | None = None) -> dict[str, Any]:
        """Change what the fake does from now on; `reset` zeroes its counters. Returns `stats()`."""
        body: dict[str, Any] = {"reset": reset}
        for name, value in (("behaviour", behaviour), ("latency", latency), ("slow_seconds", slow_seconds),
                            ("jitter", jitter)):
            if value is not None:
                body[name] = value
        response = httpx.post(self.root + "/_fake/config", json=body, timeout=10)
        if response.status_code != 200:
            raise ValueError(response.json()["error"])
        return dict(response.json())

    def stats(self) -> dict[str, Any]:
        """requests, in_flight, max_in_flight, connections, behaviour, latency, last_request, authorization."""
        return dict(httpx.get(self.root + "/_fake/stats", timeout=10).json())

    def stop(self) -> None:
        self._stop()

    def __enter__(self) -> FakeLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_fake_llm(latency: float = 0.0, behaviour: str = "answer", *, process: bool = False,
                   host: str = "127.0.0.1", port: int = 0, jitter: float = 0.0) -> FakeLLM:
    """Start a fake on a free loopback port (or `port`): in a daemon thread, or with `process=True`
    in a process of its own (use that under load, so the fake never competes for your GIL)."""
    state = FakeState(behaviour=behaviour, latency=latency, jitter=jitter)  # refuses a bad behaviour or jitter
    if process:
        return _start_process(state, host, port)
    return _start_thread(state, host, port)


@contextlib.contextmanager
def running_fake_llm(latency: float = 0.0, behaviour: str = "answer", *, process: bool = True,
                     host: str = "127.0.0.1", port: int = 0, jitter: float = 0.0) -> Iterator[str]:
    """`with running_fake_llm(latency=1.0) as url:` a fake (in its own process by default) at base URL `url`."""
    fake = start_fake_llm(latency, behaviour, process=process, host=host, port=port, jitter=jitter)
    try:
        yield fake.url
    finally:
        fake.stop()


def _start_thread(state: FakeState, host: str, port: int) -> FakeLLM:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            box["server"] = loop.run_until_complete(serve(state, host, port))
        except BaseException as error:  # noqa: BLE001 - reported to the starting thread
            box["error"] = error
            ready.set()
            return
        ready.set()
        loop.run_forever()
        # Stopping: cancel what is still running (e.g. "slow" calls) and close cleanly.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    thread = threading.Thread(target=run, name="combot-fakellm", daemon=True)
    thread.start()
    ready.wait()
    if "error" in box:
        raise box["error"]
    server: asyncio.Server = box["server"]
    bound = server.sockets[0].getsockname()

    def stop() -> None:
        if thread.is_alive():
            async def shut() -> None:
                server.close()
                loop.stop()
            asyncio.run_coroutine_threadsafe(shut(), loop)
            thread.join(10)

    return FakeLLM(_url(bound[0], bound[1]), stop)


def _process_main(state: FakeState, host: str, port: int, conn: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def main() -> None:
        server = await serve(state, host, port)
        conn.send(server.sockets[0].getsockname()[:2])
        conn.close()
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        await stopping.wait()
        server.close()

    asyncio.run(main())


def _start_process(state: FakeState, host: str, port: int) -> FakeLLM:
    # spawn, like the server's workers: safe from threads and inside the .pyz.
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_process_main, args=(state, host, port, child), name="combot-fakellm", daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(30):
            raise EOFError
        bound_host, bound_port = parent.recv()
    except EOFError:
        proc.terminate()
        raise RuntimeError("the fake LLM process did not start (a script that starts it needs an"
                           " `if __name__ == \"__main__\":` guard, as with any spawned process)") from None

    def stop() -> None:
        if proc.is_alive():
            proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()

    return FakeLLM(_url(bound_host, bound_port), stop)


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m combot.fakellm", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--jitter", type=float, default=0.0, help="each answer after latency * (1 +- jitter)")
    parser.add_argument("--behaviour", default="answer", choices=sorted(BEHAVIOURS))
    args = parser.parse_args(argv)

    async def run() -> None:
        server = await serve(FakeState(behaviour=args.behaviour, latency=args.latency, jitter=args.jitter),
                             args.host, args.port)
        host, port = server.sockets[0].getsockname()[:2]
        print(f"fake LLM at {_url(host, port)}  (behaviour {args.behaviour}, latency {args.latency} s)", flush=True)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
