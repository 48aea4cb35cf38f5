"""A graceful stop answers every request it takes (combot/graceful.py)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
from collections import Counter
from typing import Any, Callable

import h11
import pytest
from hypercorn.events import Closed, RawData

from combot import graceful
from combot.bench import Connection
from tests.conftest import LiveServer
from tests.test_faults import all_workers_up

MESSAGE = {"text": "My parcel never arrived and nobody answered my emails.", "client_message_id": "m1"}
REQUEST = (b"POST /api/sessions/x/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 2\r\n\r\n{}")


class Inner:
    """Hypercorn's H11Protocol as far as the check reads it."""

    def __init__(self, data: bytes = b"", stream: object = None):
        self.connection = h11.Connection(h11.SERVER)
        if data:  # (b"" would tell h11 the peer closed)
            self.connection.receive_data(data)
            while self.connection.next_event() not in (h11.NEED_DATA, h11.PAUSED):
                pass
        self.stream = stream


class Wrapper:
    def __init__(self, inner: Inner):
        self.protocol = inner
        self.handled: list[Any] = []

    async def handle(self, event: Any) -> None:
        self.handled.append(event)


class Server:
    def __init__(self, inner: Inner):
        self.protocol = Wrapper(inner)
        self.closed = False


async def _close(server: Server) -> None:
    server.closed = True


def test_a_request_is_under_way_once_its_head_is_read_or_its_stream_exists() -> None:
    assert not graceful.request_under_way(Wrapper(Inner()))
    assert not graceful.request_under_way(Wrapper(Inner(REQUEST[:30])))  # half a head: nothing started
    assert graceful.request_under_way(Wrapper(Inner(REQUEST[:-2])))  # the head, part of the body
    assert graceful.request_under_way(Wrapper(Inner(REQUEST)))
    assert graceful.request_under_way(Wrapper(Inner(stream=object())))
    assert not graceful.request_under_way(object())


def test_an_http2_connection_with_a_stream_has_a_request_under_way() -> None:
    """Hypercorn's H2Protocol keeps its streams in a dict: one open stream is a request to answer."""
    class H2:
        def __init__(self, streams: dict[int, object]):
            self.streams = streams
            self.connection = object()  # an h2 connection, not h11's

    assert graceful.request_under_way(Wrapper(H2({1: object()})))  # type: ignore[arg-type]
    assert not graceful.request_under_way(Wrapper(H2({})))  # type: ignore[arg-type]


def test_the_close_leaves_a_connection_with_a_request_and_stops_reading_one_it_closes() -> None:
    close = graceful._closing_safely(_close)  # type: ignore[arg-type]
    busy = Server(Inner(REQUEST))
    asyncio.run(close(busy))
    assert not busy.closed
    idle = Server(Inner())
    asyncio.run(close(idle))
    assert idle.closed

    async def after_the_close() -> None:  # bytes read now would start a request with no connection left
        await idle.protocol.handle(RawData(data=REQUEST))
        await idle.protocol.handle(Closed())

    asyncio.run(after_the_close())
    assert [type(event) for event in idle.protocol.handled] == [Closed]


def test_install_wraps_hypercorns_close_once() -> None:
    from hypercorn.asyncio.tcp_server import TCPServer

    original = TCPServer._initiate_server_close
    try:
        graceful.install()
        wrapped = TCPServer._initiate_server_close
        graceful.install()
        assert TCPServer._initiate_server_close is wrapped is not original
    finally:
        TCPServer._initiate_server_close = original  # type: ignore[method-assign]


def test_a_hypercorn_without_the_close_it_wraps_keeps_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from hypercorn.asyncio.tcp_server import TCPServer

    monkeypatch.delattr(TCPServer, "_initiate_server_close")
    graceful.install()  # no AttributeError in every worker of a server on a later Hypercorn
    assert not hasattr(TCPServer, "_initiate_server_close")


# --- the real server -----------------------------------------------------------------------------

@pytest.mark.slow
def test_messages_sent_as_a_stop_begins_are_answered_or_never_taken(live_server: Callable[..., LiveServer]) -> None:
    """Participants on idle keep-alive connections send as SIGTERM arrives. Hypercorn closes idle
    connections at once; without the wrapper some messages were read in the same instant, stored,
    and their answers lost (1-15 of 300 in each of 6 runs): a stop must answer what it stores."""
    server = live_server(workers=2)
    all_workers_up(server, 2)
    outcome: dict[str, str] = {}

    async def crowd() -> None:
        connections = []
        for _ in range(300):
            connection = Connection(server.url, timeout=60)
            status, body = await connection.send(connection.request("api/sessions", {}))
            assert status == 201 or status == 200, body
            connections.append((connection, json.loads(body)["session_id"]))

        async def send(connection: Connection, token: str) -> None:
            await asyncio.sleep(random.uniform(0, 0.3))  # spread across the moment the stop begins
            # Not sent again on a new connection: a lost answer must show.
            outcome[token] = await connection.last_send(connection.request(f"api/sessions/{token}/messages", MESSAGE))

        sending = [asyncio.create_task(send(*connection)) for connection in connections]
        await asyncio.sleep(0.04)
        server.process.send_signal(signal.SIGTERM)
        await asyncio.gather(*sending)

    asyncio.run(crowd())
    assert server.process.wait(60) == 0, server.output()
    with sqlite3.connect(server.database) as conn:
        stored = {token for (token,) in conn.execute(
            "SELECT p.token FROM participants p JOIN messages m ON m.participant_id = p.id"
            " WHERE m.client_message_id = 'm1'")}
    answered = {token for token, status in outcome.items() if status == "200"}
    # Each message was answered, or its connection closed before a byte of it was read (any status
    # other than 200, such as a 503 while the worker stops, must have stored nothing).
    assert len(outcome) == 300, Counter(outcome.values())
    assert stored - answered == set(), f"{len(stored - answered)} stored without an answer"
    assert answered <= stored
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_messages_sent_as_a_kept_alive_connection_expires_are_answered_or_never_taken(
        live_server: Callable[..., LiveServer]) -> None:
    """The same race while the server runs: Hypercorn closes a connection idle for
    `keep_alive_timeout` (2 s here, 75 s by default) from a task of its own. A message that arrives
    in that instant used to be read, stored and left unanswered (without the wrapper 5, 22, 7 and 19
    of 300 in 4 runs; bench/keepalive_race.py at 75 s: 15 and 21)."""
    server = live_server(workers=2, extra=["--keep-alive-timeout", "2"])
    all_workers_up(server, 2)
    outcome: dict[str, str] = {}

    async def one() -> None:
        connection = Connection(server.url, timeout=60)
        status, body = await connection.send(connection.request("api/sessions", {}))
        answered = asyncio.get_running_loop().time()
        assert status in (200, 201), body
        token = json.loads(body)["session_id"]
        # Hypercorn's timer starts when it has sent the answer, a little before the client reads it.
        due = answered + 2.0 + random.uniform(-0.05, 0.03)
        await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
        # Not sent again on a new connection: a lost answer must show.
        outcome[token] = await connection.last_send(connection.request(f"api/sessions/{token}/messages", MESSAGE))

    async def crowd() -> None:
        # All at once, as in a launch: the expiries then come together, and so do the closes.
        await asyncio.gather(*(one() for _ in range(300)))

    asyncio.run(crowd())
    assert server.stop() == 0
    with sqlite3.connect(server.database) as conn:
        stored = {token for (token,) in conn.execute(
            "SELECT p.token FROM participants p JOIN messages m ON m.participant_id = p.id"
            " WHERE m.client_message_id = 'm1'")}
    answered = {token for token, status in outcome.items() if status == "200"}
    closed = sum(status != "200" for status in outcome.values())
    assert len(outcome) == 300, Counter(outcome.values())
    assert stored - answered == set(), f"{len(stored - answered)} stored without an answer"
    # The test tested the race only if some messages met a closed connection and some did not.
    assert 0 < closed < 300, Counter(outcome.values())
