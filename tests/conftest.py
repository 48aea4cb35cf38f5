"""Shared fixtures. Fixtures that make things return factories, so a test says what it needs."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
from starlette.testclient import TestClient

from combot.fakellm import FakeLLM, start_fake_llm
from combot.study import Study
from tests.openapi_check import check_response

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STUDY = ROOT / "combot.toml"
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def study_file(tmp_path: Path) -> Callable[..., Path]:
    """Write a study file: the default one with text replaced (`replace={old: new}`) or extra TOML appended."""
    def make(replace: dict[str, str] | None = None, append: str = "", name: str = "combot.toml") -> Path:
        text = DEFAULT_STUDY.read_text(encoding="utf-8")
        for old, new in (replace or {}).items():
            assert old in text, old
            text = text.replace(old, new)
        path = tmp_path / name
        path.write_text(text + append, encoding="utf-8")
        return path
    return make


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLM]:
    """The fake OpenAI-compatible server on loopback, one per test module."""
    server = start_fake_llm()
    yield server
    server.stop()


@pytest.fixture
def reset_fake(fake: FakeLLM) -> FakeLLM:
    """The module's fake LLM, answering at once again with its counters cleared."""
    fake.configure(behaviour="answer", latency=0.0, jitter=0.0, slow_seconds=30, reset=True)
    return fake


@pytest.fixture
def started_app() -> Iterator[Callable[..., TestClient]]:
    """started_app(study, database, peer=None) -> a TestClient with the app's lifespan running (its requests
    come from `peer`, an (address, port) pair); closed after the test."""
    from combot.web import create_app

    opened: list[TestClient] = []

    def start(study: Study, database: Path, peer: tuple[str, int] = ("testclient", 50000)) -> TestClient:
        client = TestClient(create_app(database=str(database), study=study), raise_server_exceptions=False,
                            client=peer)
        client.event_hooks["response"].append(check_response)
        client.__enter__()
        opened.append(client)
        return client

    yield start
    for client in opened:
        client.__exit__(None, None, None)


@dataclass
class LiveServer:
    url: str
    database: Path
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 90,
                 verify: ssl.SSLContext | bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(url + "healthz", timeout=2, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"server did not become healthy in {timeout} s:\n{log.read_text(errors='replace')}")


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start `combot serve` for real in a subprocess on a free loopback port; stopped after the test."""
    started: list[LiveServer] = []

    def start(workers: int = 2, config: Path | None = None, extra: list[str] | None = None,
              env: dict[str, str] | None = None, command: list[str] | None = None, database: Path | None = None,
              cwd: Path | None = None, pass_database: bool = True,
              verify: ssl.SSLContext | bool = True) -> LiveServer:
        port = free_port()
        database = database or (cwd or tmp_path) / "combot.db"
        log = tmp_path / f"server-{port}.log"
        args = (command or [sys.executable, "-m", "combot"]) + [
            "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), "--access-log", ""]
        if pass_database:
            args += ["--database", str(database)]
        if config is not None:
            args += ["--config", str(config)]
        args += extra or []
        environment = dict(os.environ if env is None else env)
        with log.open("wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=environment,
                                       cwd=str(cwd or tmp_path))
        scheme = "https" if "--certfile" in (extra or []) else "http"
        server = LiveServer(f"{scheme}://127.0.0.1:{port}/", database, process, log)
        started.append(server)
        wait_healthy(server.url, process, log, verify=verify)
        return server

    yield start
    for server in started:
        server.stop()


def walk_conversation(client: httpx.Client, base: str, params: dict[str, str] | None = None,
                      first: str = "My new kettle stopped working after two days and the handle melted.") -> dict:
    """Go through a whole study as the page does; returns what the participant saw."""
    created = client.post(base + "api/sessions", params=params or {}, json={})
    assert created.status_code in (200, 201), created.text
    session = created.json()
    seen = {"session_id": session["session_id"], "bot": [m["text"] for m in session["messages"]], "sent": []}
    expects, text, turn = session["expects"], first, 0
    while expects == "message":
        reply = client.post(f"{base}api/sessions/{session['session_id']}/messages",
                            json={"text": text, "client_message_id": f"m{turn}"})
        assert reply.status_code == 200, reply.text
        seen["sent"].append(text)
        seen["bot"] += [r["text"] for r in reply.json()["replies"]]
        expects = reply.json()["expects"]
        turn += 1
        text = f"Answer number {turn}: it was really annoying and nobody helped."
    assert expects == "email"
    done = client.post(f"{base}api/sessions/{session['session_id']}/messages",
                       json={"text": "someone@example.com", "client_message_id": "email"})
    assert done.status_code == 200, done.text
    seen["bot"] += [r["text"] for r in done.json()["replies"]]
    seen["final"] = done.json()
    return seen
