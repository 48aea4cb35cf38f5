"""The LLM's HTTP client against scripted servers on loopback: every framing a server may use,
answers that break off or lie, kept-alive connections the server drops, cancellation, proxies and
TLS (a certificate made by openssl). Each server writes raw bytes, so nothing here trusts a library
to speak HTTP the way this client reads it."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import ssl
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from combot import llmhttp
from combot.llm import LLM, Fallback, LLMConfig, LLMReply, describe
from combot.llmhttp import BodyTooLarge, Endpoint, ProtocolError, route
from tests.test_server import self_signed

T = TypeVar("T")
HEADERS = {"User-Agent": "combot-test", "Accept": "application/json"}
HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

# An answer: raw bytes to send, None to close without answering, or a coroutine given the server
# and the writer.
Answer = bytes | None | Callable[["Scripted", asyncio.StreamWriter], Awaitable[None]]


def closing(raw: bytes) -> Answer:
    """Send `raw`, then close the connection (a body read to the end, or an answer cut off)."""
    async def answer(_: Scripted, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
        writer.close()
    return answer


async def never(server: "Scripted", _: asyncio.StreamWriter) -> None:
    """An answer that never comes (until the server stops)."""
    await server.stopping.wait()


_REPLY = json.dumps({"model": "m", "choices": [{"message": {"content": "So the lamp was broken."},
                                                  "finish_reason": "stop"}]}).encode()
# A chat completion, whole.
COMPLETION = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(_REPLY) + _REPLY


def llm_call(api_key: str | None = None) -> Callable[[str], Awaitable[LLMReply | Fallback]]:
    """One call through the LLM adapter to the scripted server at `url`."""
    async def call(url: str) -> LLMReply | Fallback:
        config = LLMConfig(base_url=url.removesuffix("/chat/completions"), timeout=10)
        async with LLM(config, api_key=api_key) as llm:
            return await llm.complete("Paraphrase.", "The lamp was broken.")
    return call


@dataclass
class Seen:
    request_line: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Scripted:
    """A loopback server that answers the n-th request of its m-th connection with `script[m][n]`
    (the last list, and its last answer, repeat). `trickle` writes answers a byte at a time."""

    script: list[list[Answer]]
    trickle: bool = False
    connections: int = 0
    seen: list[Seen] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # a connection ended from the client's side
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    server: asyncio.Server | None = None
    _handlers: set[tuple[asyncio.Task[None], asyncio.StreamWriter]] = field(default_factory=set)

    async def start(self, tls: ssl.SSLContext | None = None) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/v1/chat/completions"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = (asyncio.current_task(), writer)
        self._handlers.add(handler)  # type: ignore[arg-type]
        answers = self.script[min(self.connections, len(self.script) - 1)]
        self.connections += 1
        try:
            for index in range(10_000):
                seen = await read_request(reader)
                if seen is None:
                    self.closed.set()
                    return
                self.seen.append(seen)
                answer = answers[min(index, len(answers) - 1)]
                if answer is None:
                    return
                if callable(answer):
                    await answer(self, writer)
                elif self.trickle:
                    for i in range(len(answer)):
                        writer.write(answer[i:i + 1])
                        await writer.drain()
                        await asyncio.sleep(0)
                else:
                    writer.write(answer)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed.set()
        finally:
            writer.close()
            self._handlers.discard(handler)  # type: ignore[arg-type]

    async def stop(self) -> None:
        """Stop listening and end every connection, letting each handler return by itself."""
        assert self.server is not None
        self.server.close()
        self.stopping.set()
        tasks = [task for task, writer in self._handlers]
        for _, writer in list(self._handlers):
            writer.transport.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=10)


async def read_request(reader: asyncio.StreamReader) -> Seen | None:
    line = await reader.readline()
    if not line:
        return None
    headers: dict[str, str] = {}
    while (header := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Seen(line.decode("latin-1").strip(), headers, body)


def against(server: Scripted, body: Callable[[str], Awaitable[T]], tls: ssl.SSLContext | None = None) -> T:
    """`body(url)` run against `server`, started for it and stopped after."""
    async def go() -> T:
        url = await server.start(tls)
        try:
            return await body(url)
        finally:
            await server.stop()
    return asyncio.run(go())


async def posts(url: str, calls: int = 1, max_body: int = 1 << 20, environ: dict[str, str] | None = None,
                ssl_context: ssl.SSLContext | None = None) -> list[llmhttp.Response]:
    endpoint = Endpoint(url, HEADERS, ssl_context, environ=environ or {})
    try:
        return [await endpoint.post(b'{"n": %d}' % i, "application/json", max_body) for i in range(calls)]
    finally:
        await endpoint.aclose()


# --- framing ----------------------------------------------------------------------------------------

FRAMINGS = {
    "content-length": HELLO,
    "chunked, with an extension and a trailer": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                                 b"2;name=value\r\nhe\r\n3\r\nllo\r\n0\r\nX-Trailer: yes\r\n\r\n"),
    "gzip": (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(gzip.compress(b"hello"))
             + gzip.compress(b"hello")),
    "deflate (zlib)": (b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: %d\r\n\r\n"
                       % len(zlib.compress(b"hello")) + zlib.compress(b"hello")),
    "an interim 100 Continue first": b"HTTP/1.1 100 Continue\r\n\r\n" + HELLO,
    "header names in any case, spaces around values": b"HTTP/1.1 200 OK\r\ncOnTeNt-LeNgTh:   5  \r\n\r\nhello",
}


@pytest.mark.parametrize("trickle", [False, True], ids=["at once", "a byte at a time"])
@pytest.mark.parametrize("name", FRAMINGS)
def test_every_framing_gives_the_same_body_and_keeps_the_connection(name: str, trickle: bool) -> None:
    server = Scripted([[FRAMINGS[name]]], trickle=trickle)
    responses = against(server, lambda url: posts(url, calls=3))
    assert [(r.status, r.body) for r in responses] == [(200, b"hello")] * 3
    assert server.connections == 1 and len(server.seen) == 3
    first = server.seen[0]
    assert first.request_line == "POST /v1/chat/completions HTTP/1.1"
    assert first.headers["host"] == f"127.0.0.1:{server.port}"
    assert first.headers["content-type"] == "application/json" and first.headers["user-agent"] == "combot-test"
    assert [s.body for s in server.seen] == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']


def test_a_body_up_to_the_end_of_the_connection_and_a_raw_deflate_body() -> None:
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = raw.compress(b"hello") + raw.flush()
    server = Scripted([[closing(b"HTTP/1.1 200 OK\r\n\r\nhello")],
                       [b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: %d\r\n\r\n" % len(deflated)
                        + deflated]])

    async def go(url: str) -> list[llmhttp.Response]:
        endpoint = Endpoint(url, HEADERS, environ={})
        try:
            first = await endpoint.post(b"{}", "application/json", 100)
            return [first, await endpoint.post(b"{}", "application/json", 100)]
        finally:
            await endpoint.aclose()

    responses = against(server, go)
    assert [r.body for r in responses] == [b"hello", b"hello"]
    assert server.connections == 2  # a body ended by the close cannot share its connection


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n" + b"x" * 101,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n" + b"x" * 64 + b"\r\n40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 101,
    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(gzip.compress(b"x" * 100_000))
    + gzip.compress(b"x" * 100_000),
], ids=["content-length", "chunked", "to the end", "a gzip bomb"])
def test_a_body_over_the_limit_is_refused(answer: bytes) -> None:
    server = Scripted([[answer]])  # the connection stays open: the limit is seen before any end
    with pytest.raises(BodyTooLarge):
        against(server, lambda url: posts(url, max_body=100))


@pytest.mark.parametrize("answer", [
    b"SMTP ready\r\n\r\n",
    b"HTTP/1.1 2OO OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (llmhttp.MAX_HEAD_BYTES + 10) + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 12\r\n\r\n" + gzip.compress(b"hello" * 20)[:12],
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
], ids=["not http", "a bad status", "a header without a colon", "a bad length", "cut off mid-body",
        "a bad chunk size", "a chunk without its CRLF", "another transfer-encoding", "another content-encoding",
        "not really gzip", "an endless header",
        "two lengths", "a non-ASCII digit", "a signed length", "a negative chunk", "a 0x chunk", "a 1_0 chunk",
        "truncated gzip", "a protocol switch"])
def test_an_answer_that_is_not_http_as_read_here_is_a_protocol_error(answer: bytes) -> None:
    server = Scripted([[closing(answer)]])
    with pytest.raises(ProtocolError):
        against(server, lambda url: posts(url))


def test_connection_close_and_http_1_0_are_not_reused() -> None:
    server = Scripted([[b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"],
                       [b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello"],
                       [b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello"]])
    responses = against(server, lambda url: posts(url, calls=4))
    assert [r.body for r in responses] == [b"hello"] * 4
    assert server.connections == 3  # close, 1.0, then 1.0 with keep-alive for the last two


def test_an_error_status_is_returned_whole_and_the_connection_kept() -> None:
    server = Scripted([[b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 2\r\n\r\n{}", HELLO]])
    responses = against(server, lambda url: posts(url, calls=2))
    assert [(r.status, r.headers.get("retry-after")) for r in responses] == [(429, "1"), (200, None)]
    assert server.connections == 1


# --- kept-alive connections the server drops, and cancelled calls ------------------------------------


def test_a_reused_connection_dropped_unanswered_is_retried_once_on_a_new_one() -> None:
    # The first connection answers once, then drops the next request unanswered (an idle timeout
    # racing the reuse); the call goes through on a second connection.
    server = Scripted([[HELLO, None], [HELLO]])
    responses = against(server, lambda url: posts(url, calls=3))
    assert [r.body for r in responses] == [b"hello"] * 3
    assert server.connections == 2 and len(server.seen) == 4


def test_a_new_connection_dropped_unanswered_is_not_retried() -> None:
    server = Scripted([[None]])
    with pytest.raises(ProtocolError):
        against(server, lambda url: posts(url))
    assert len(server.seen) == 1


def test_a_reused_connection_cut_mid_answer_is_not_retried() -> None:
    # The server began answering, so it may have acted on the request: sending it again could
    # pay for a second completion.
    server = Scripted([[HELLO, closing(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel")], [HELLO]])
    with pytest.raises(ProtocolError):
        against(server, lambda url: posts(url, calls=2))
    assert server.connections == 1 and len(server.seen) == 2


def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    server = Scripted([[closing(HELLO)]])

    async def go(url: str) -> list[llmhttp.Response]:
        endpoint = Endpoint(url, HEADERS, environ={})
        try:
            first = await endpoint.post(b"{}", "application/json", 100)
            await server.closed.wait()  # the server's close has reached the client
            for _ in range(100):  # until the client's event loop has run its connection_lost
                if not any(c.usable for c in endpoint._idle):
                    break
                await asyncio.sleep(0.01)
            return [first, await endpoint.post(b"{}", "application/json", 100)]
        finally:
            await endpoint.aclose()

    responses = against(server, go)
    assert [r.body for r in responses] == [b"hello", b"hello"]
    assert server.connections == 2 and len(server.seen) == 2  # no request was sent on the closed one


def test_idle_connections_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llmhttp, "IDLE_SECONDS", 0.0)
    server = Scripted([[HELLO]])
    against(server, lambda url: posts(url, calls=2))
    assert server.connections == 2


def test_a_cancelled_call_closes_its_connection_and_the_next_call_opens_a_new_one() -> None:
    server = Scripted([[never], [HELLO]])

    async def go(url: str) -> llmhttp.Response:
        endpoint = Endpoint(url, HEADERS, environ={})
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await endpoint.post(b"{}", "application/json", 100)
            assert not endpoint._idle and not endpoint._open
            return await endpoint.post(b"{}", "application/json", 100)
        finally:
            await endpoint.aclose()

    response = against(server, go)
    assert response.body == b"hello"
    assert server.connections == 2


def test_aclose_closes_connections_in_use_and_idle() -> None:
    server = Scripted([[HELLO]])

    async def go(url: str) -> None:
        endpoint = Endpoint(url, HEADERS, environ={})
        await endpoint.post(b"{}", "application/json", 100)
        await endpoint.aclose()
        await asyncio.wait_for(server.closed.wait(), 10)

    against(server, go)


# --- proxies ------------------------------------------------------------------------------------------


def test_the_route_follows_the_proxy_variables_as_httpx_reads_them(caplog: pytest.LogCaptureFixture) -> None:
    url = "https://api.example.com/v1/chat/completions"
    assert route(url, {}) == llmhttp._Route("api.example.com", 443, True, "/v1/chat/completions", "api.example.com",
                                            "api.example.com")
    assert not route(url, {}).proxied
    tunnelled = route(url, {"HTTPS_PROXY": "http://user:p%40ss@proxy.lan:3128"})
    assert (tunnelled.host, tunnelled.port, tunnelled.tunnel) == ("proxy.lan", 3128, "api.example.com:443")
    assert tunnelled.proxy_authorization == "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert route(url, {"ALL_PROXY": "proxy.lan:8080"}).host == "proxy.lan"
    assert route(url, {"HTTP_PROXY": "http://proxy.lan"}).host == "api.example.com"  # not for https
    assert route(url, {"HTTPS_PROXY": "http://upper", "https_proxy": "http://lower"}).host == "lower"
    for no_proxy in ("example.com", ".example.com", "api.example.com:443", "*", "other.org, example.com"):
        assert route(url, {"HTTPS_PROXY": "http://proxy.lan", "NO_PROXY": no_proxy}).host == "api.example.com"
    assert route(url, {"HTTPS_PROXY": "http://proxy.lan", "NO_PROXY": "ample.com"}).host == "proxy.lan"
    plain = route("http://10.0.0.5:8000/v1/chat/completions", {"HTTP_PROXY": "http://proxy.lan:3128"})
    assert (plain.host, plain.tunnel, plain.target) == ("proxy.lan", None, "http://10.0.0.5:8000/v1/chat/completions")
    assert route("http://[::1]:8000/v1", {}).host_header == "[::1]:8000"
    with caplog.at_level(logging.WARNING, logger="combot.llm"):
        assert route(url, {"HTTPS_PROXY": "socks5://proxy.lan:1080"}).host == "api.example.com"
    assert "only http:// proxies" in caplog.text
    with pytest.raises(ValueError):
        route("ftp://example.com/v1", {})


# Loopback endpoints never go through a proxy, so the proxy tests name the endpoint by a name only
# the test proxy knows (it connects to 127.0.0.1 for it).
PROXIED_NAME = "llm.test"


@dataclass
class Proxy:
    """A forwarding proxy on loopback: CONNECT tunnels, and absolute-URL requests passed on."""

    seen: list[Seen] = field(default_factory=list)
    server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://proxy-user:proxy-pass@127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        self._writers.append(writer)
        try:
            line = (await reader.readline()).decode("latin-1").strip()
            headers: dict[str, str] = {}
            raw = b""
            while (header := await reader.readline()) not in (b"\r\n", b""):
                if not header.lower().startswith(b"proxy-"):  # for the proxy alone, as real ones have it
                    raw += header
                name, _, value = header.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            self.seen.append(Seen(line, headers, b""))
            method, target, _ = line.split(" ", 2)
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                up_reader, up_writer = await asyncio.open_connection(_resolve(host), int(port))
                self._writers.append(up_writer)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                rest = target.split("://", 1)[1]
                hostport, path = rest.split("/", 1)
                host, port = hostport.rsplit(":", 1)
                up_reader, up_writer = await asyncio.open_connection(_resolve(host), int(port))
                self._writers.append(up_writer)
                up_writer.write(f"{method} /{path} HTTP/1.1\r\n".encode() + raw + b"\r\n")
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self._writers:
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)


def _resolve(host: str) -> str:
    return "127.0.0.1" if host == PROXIED_NAME else host


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def test_an_http_endpoint_through_an_http_proxy() -> None:
    server, proxy = Scripted([[HELLO]]), Proxy()

    async def go(url: str) -> list[llmhttp.Response]:
        proxy_url = await proxy.start()
        try:
            return await posts(url.replace("127.0.0.1", PROXIED_NAME), calls=2, environ={"HTTP_PROXY": proxy_url})
        finally:
            await proxy.stop()

    responses = against(server, go)
    assert [r.body for r in responses] == [b"hello"] * 2
    assert proxy.seen[0].request_line == f"POST http://{PROXIED_NAME}:{server.port}/v1/chat/completions HTTP/1.1"
    assert server.seen[0].headers["host"] == f"{PROXIED_NAME}:{server.port}"
    assert proxy.seen[0].headers["proxy-authorization"] == "Basic " + base64.b64encode(b"proxy-user:proxy-pass").decode()
    assert len(proxy.seen) == 1  # both requests on one kept-alive connection


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"), also=PROXIED_NAME)


def _tls(certificate: tuple[Path, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(*certificate)
    return served, ssl.create_default_context(cafile=str(certificate[0]))


def test_https_directly_and_through_a_connect_tunnel(certificate: tuple[Path, Path]) -> None:
    served, trusted = _tls(certificate)
    server, proxy = Scripted([[HELLO]]), Proxy()

    async def go(url: str) -> list[llmhttp.Response]:
        direct = await posts(url, calls=2, ssl_context=trusted)
        proxy_url = await proxy.start()
        try:
            return direct + await posts(url.replace("127.0.0.1", PROXIED_NAME), calls=2, ssl_context=trusted,
                                        environ={"HTTPS_PROXY": proxy_url})
        finally:
            await proxy.stop()

    responses = against(server, go, tls=served)
    assert [r.body for r in responses] == [b"hello"] * 4
    assert [s.request_line for s in proxy.seen] == [f"CONNECT {PROXIED_NAME}:{server.port} HTTP/1.1"]
    assert proxy.seen[0].headers["proxy-authorization"].startswith("Basic ")
    assert server.connections == 2  # one direct, one tunnelled, each kept alive for its second call


def test_an_untrusted_certificate_is_refused(certificate: tuple[Path, Path]) -> None:
    served, _ = _tls(certificate)
    server = Scripted([[HELLO]])
    with pytest.raises(ssl.SSLCertVerificationError):
        against(server, lambda url: posts(url, ssl_context=ssl.create_default_context()), tls=served)
    assert server.seen == []


def test_the_llm_checks_certificates_as_httpx_does(certificate: tuple[Path, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """SSL_CERT_FILE names the authorities to trust (httpx.create_ssl_context reads it); without it a
    self-signed endpoint is a "connection" fallback, the participant getting the offline text."""
    served, _ = _tls(certificate)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    outcome = against(Scripted([[COMPLETION]]), llm_call(), tls=served)
    assert isinstance(outcome, LLMReply) and outcome.text == "So the lamp was broken."
    monkeypatch.delenv("SSL_CERT_FILE")
    outcome = against(Scripted([[COMPLETION]]), llm_call(), tls=served)
    assert isinstance(outcome, Fallback) and outcome.reason == "connection"


# --- what a second reader found ---------------------------------------------------------------------


def echo(stray: bytes = b"") -> Answer:
    """Answer with the request's own body (so each answer names its request), then send `stray`."""
    async def answer(server: Scripted, writer: asyncio.StreamWriter) -> None:
        body = server.seen[-1].body
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        if stray:
            await asyncio.sleep(0.05)  # once the client has put the connection back in its pool
            writer.write(stray)
            await writer.drain()
    return answer


def test_bytes_on_an_idle_connection_never_become_the_next_calls_answer() -> None:
    """A server that sends something unasked on an idle connection (a 408 before it closes, a bug)
    would otherwise shift every later answer by one: a participant would get another's reply."""
    server = Scripted([[echo(stray=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")], [echo()]])

    async def go(url: str) -> list[bytes]:
        endpoint = Endpoint(url, HEADERS, environ={})
        try:
            first = await endpoint.post(b"participant-A", "application/json", 100)
            for _ in range(400):  # until the stray bytes have reached the idle connection
                if not endpoint._idle or endpoint._idle[0].ended or endpoint._idle[0].buffer:
                    break
                await asyncio.sleep(0.005)
            rest = [await endpoint.post(name, "application/json", 100) for name in (b"participant-B", b"participant-C")]
            return [r.body for r in [first, *rest]]
        finally:
            await endpoint.aclose()

    assert against(server, go) == [b"participant-A", b"participant-B", b"participant-C"]
    assert server.connections == 2


def test_aclose_during_a_call_fails_it_without_sending_it_again() -> None:
    server = Scripted([[HELLO, never]])

    async def go(url: str) -> None:
        endpoint = Endpoint(url, HEADERS, environ={})
        await endpoint.post(b"a", "application/json", 100)  # the connection is now a reused one
        call = asyncio.create_task(endpoint.post(b"b", "application/json", 100))
        while len(server.seen) < 2:
            await asyncio.sleep(0.005)
        await endpoint.aclose()
        with pytest.raises(ProtocolError):
            await call
        assert not endpoint._open and not endpoint._idle
        with pytest.raises(ProtocolError):
            await endpoint.post(b"c", "application/json", 100)

    against(server, go)
    assert [s.body for s in server.seen] == [b"a", b"b"]


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.0 200 OK\r\nConnection: foo\r\nContent-Length: 5\r\n\r\nhello",
], ids=["chunked and a length", "close, then keep-alive", "keep-alive and close", "1.0 without keep-alive"])
def test_an_answer_that_may_leave_the_connection_unclear_is_not_reused(answer: bytes) -> None:
    server = Scripted([[answer]])
    responses = against(server, lambda url: posts(url, calls=2))
    assert [r.body for r in responses] == [b"hello", b"hello"]
    assert server.connections == 2


def test_no_body_after_204_whatever_the_headers_say() -> None:
    server = Scripted([[b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", HELLO]])
    responses = against(server, lambda url: posts(url, calls=2))
    assert [(r.status, r.body) for r in responses] == [(204, b""), (200, b"hello")]
    assert server.connections == 1


def test_expired_idle_connections_are_closed_even_below_the_top_of_the_stack() -> None:
    server = Scripted([[HELLO]])

    async def go(url: str) -> tuple[int, int]:
        endpoint = Endpoint(url, HEADERS, environ={})
        try:
            await asyncio.gather(*(endpoint.post(b"{}", "application/json", 100) for _ in range(5)))
            opened = len(endpoint._idle)
            for connection in endpoint._idle[:-1]:  # all but the most recently used have expired
                connection.idle_since -= llmhttp.IDLE_SECONDS + 1
            await endpoint.post(b"{}", "application/json", 100)
            return opened, len(endpoint._open)
        finally:
            await endpoint.aclose()

    assert against(server, go) == (5, 1)  # the 4 expired ones closed, the fresh one reused


def test_no_proxy_entries_are_read_as_httpx_reads_them() -> None:
    proxy = {"HTTPS_PROXY": "http://proxy.lan:3128", "HTTP_PROXY": "http://proxy.lan:3128"}

    def direct(url: str, no_proxy: str) -> bool:
        return route(url, {**proxy, "NO_PROXY": no_proxy}).host != "proxy.lan"

    api = "https://api.example.com/v1"
    assert direct(api, "example.com") and direct("https://example.com/v1", "example.com")
    assert direct(api, ".example.com") and not direct("https://example.com/v1", ".example.com")
    assert direct(api, "api.example.com:443") and not direct(api, "api.example.com:8443")
    assert direct("http://a.localhost/v1", "a.localhost") and not direct("http://a.localhost/v1", "localhost")
    assert direct("http://10.0.0.5:8000/v1", "10.0.0.5") and not direct("http://10.0.0.50/v1", "10.0.0.5")
    assert direct("http://[2001:db8::1]:8000/v1", "2001:db8::1") and direct("http://[2001:db8::1]:8000/v1",
                                                                           "[2001:db8::1]:8000")
    assert not direct("http://[2001:db8::1]:8000/v1", "[2001:db8::1]:9000")
    # A server on this machine's loopback is always called directly: a proxy could not reach it.
    for local in ("http://127.0.0.1:11434/v1", "http://127.8.0.1/v1", "http://[::1]:8000/v1", "http://localhost/v1"):
        assert direct(local, "")
    assert direct(api, "https://api.example.com") and not direct("http://api.example.com/v1", "https://api.example.com")
    assert not direct("https://eu.api.example.com/v1", "https://api.example.com")
    assert not direct(api, "ample.com") and not direct(api, "")


@pytest.mark.parametrize("key, sent", [("sk-abc\n", "Bearer sk-abc"), ("  sk-abc  ", "Bearer sk-abc")])
def test_an_api_key_with_a_line_end_is_trimmed(key: str, sent: str) -> None:
    server = Scripted([[COMPLETION]])
    assert isinstance(against(server, llm_call(key)), LLMReply)
    assert server.seen[0].headers["authorization"] == sent


@pytest.mark.parametrize("key", ["sk-abc\r\nX-Injected: yes", "sk-\u00e9t\u00e9", "sk abc"])
def test_an_api_key_a_header_cannot_carry_falls_back_without_a_request(key: str, caplog: pytest.LogCaptureFixture) -> None:
    server = Scripted([[COMPLETION]])
    with caplog.at_level(logging.ERROR, logger="combot.llm"):
        outcome = against(server, llm_call(key))
    assert outcome == Fallback("unusable API key", 0) and server.seen == []
    assert "OPENAI_API_KEY" in caplog.text and key not in caplog.text


def test_llm_check_shows_the_proxy_without_its_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    config = LLMConfig(base_url="https://api.example.com/v1")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://user:s3cret@proxy.lan:3128")
    assert describe(config)["proxy"] == "proxy.lan:3128 (CONNECT tunnel)"
    assert "s3cret" not in repr(describe(config))
    monkeypatch.setenv("NO_PROXY", "example.com")
    assert describe(config)["proxy"] == "none"
