"""The LLM's HTTP: a lean HTTP/1.1 client that POSTs JSON to one endpoint over kept-alive connections.

The LLM adapter used httpx. Measured with `bench/llm_client_cpu.py`, one chat-completions call cost
a worker 1.6-2.2 ms of CPU through httpx (httpcore's pool, anyio, its models) and 0.15-0.5 ms
through this client; classifying a first message costs ~3.5 ms, so in a launch burst httpx added
about half as much again. It does what the adapter needs and no more:

- HTTP/1.1 over TCP or TLS (certificates checked as httpx checks them, `httpx.create_ssl_context`
  honouring SSL_CERT_FILE and SSL_CERT_DIR, unless the caller gives a context); one request at a
  time per connection, connections kept alive for the next call and dropped once idle for
  `IDLE_SECONDS` or closed by the server;
- responses framed by Content-Length, chunked, or the end of the connection; gzip and deflate
  bodies decoded; a body past `max_body` bytes, or a header block past `MAX_HEAD_BYTES`, refused;
- an http:// proxy from HTTPS_PROXY / HTTP_PROXY / ALL_PROXY, with NO_PROXY read as httpx reads it
  (and loopback endpoints always direct): a CONNECT tunnel for an https endpoint, the absolute URL
  for an http one, Basic credentials from the proxy URL. (httpx would also take an https:// or
  socks5:// proxy; this client logs a warning and calls the endpoint directly.)

Timeouts are the caller's (`asyncio.timeout`): a call cancelled half-way closes its connection.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import re
import ssl
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import httpx

log = logging.getLogger("combot.llm")

MAX_HEAD_BYTES = 64 * 1024
# Kept-alive connections idle longer than this are closed rather than reused: a server may close an
# idle connection at any moment, and one reused just as it does fails the call.
IDLE_SECONDS = 10.0


class ProtocolError(Exception):
    """The server's answer was not HTTP/1.1 as this client reads it, or the connection ended early."""


class BodyTooLarge(Exception):
    """The response body is longer than the caller accepts."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names; a repeated header's values joined by ", "
    body: bytes


@dataclass(frozen=True)
class _Route:
    """Where to connect and what to send for one endpoint URL (directly or through a proxy)."""

    host: str
    port: int
    tls: bool  # TLS to the endpoint (through a tunnel when `tunnel` is set)
    target: str  # the request target: a path, or the absolute URL when an http proxy forwards it
    host_header: str
    server_name: str  # the endpoint's host name, which its TLS certificate must carry
    tunnel: str | None = None  # "host:port" to CONNECT to through the proxy
    proxy_authorization: str | None = None

    @property
    def proxied(self) -> bool:
        """Whether `host` and `port` are a proxy's."""
        return self.tunnel is not None or not self.target.startswith("/")


def route(url: str, environ: Mapping[str, str] | None = None) -> _Route:
    """How to reach `url`, given the proxy variables in `environ` (the process's by default)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    host = parts.hostname
    port = parts.port or (443 if tls else 80)
    default_port = port == (443 if tls else 80)
    bracketed = f"[{host}]" if ":" in host else host
    host_header = bracketed if default_port else f"{bracketed}:{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    proxy = _proxy_for(parts.scheme, host, port, environ)
    if proxy is None:
        return _Route(host, port, tls, path, host_header, host)
    proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if proxy_parts.scheme != "http" or not proxy_parts.hostname:
        log.warning("LLM proxy %s://%s ignored: only http:// proxies are supported; calling the LLM directly",
                    proxy_parts.scheme, proxy_parts.hostname)
        return _Route(host, port, tls, path, host_header, host)
    credentials = None
    if proxy_parts.username is not None:
        pair = f"{unquote(proxy_parts.username)}:{unquote(proxy_parts.password or '')}"
        credentials = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    proxy_host, proxy_port = proxy_parts.hostname, proxy_parts.port or 80
    if tls:
        return _Route(proxy_host, proxy_port, True, path, host_header, host, tunnel=f"{bracketed}:{port}",
                      proxy_authorization=credentials)
    return _Route(proxy_host, proxy_port, False, f"http://{host_header}{path}", host_header, host,
                  proxy_authorization=credentials)


def _proxy_for(scheme: str, host: str, port: int, environ: Mapping[str, str] | None) -> str | None:
    """The proxy URL for `scheme`://`host`:`port` from *_PROXY variables (lower-case names win), or None."""
    proxies: dict[str, str] = {}
    for name, value in sorted((os.environ if environ is None else environ).items(), key=lambda i: i[0].islower()):
        if value and name.lower().endswith("_proxy"):
            proxies[name.lower()[:-len("_proxy")]] = value.strip()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy or _loopback(host) or any(_no_proxy_covers(entry.strip(), scheme, host, port)
                        for entry in proxies.get("no", "").split(",")):
        return None
    return proxy


def _no_proxy_covers(entry: str, scheme: str, host: str, port: int) -> bool:
    """Whether one NO_PROXY entry covers the URL, read as httpx reads it: "*" covers everything;
    "scheme://host[:port]" that scheme and host; an IP address or "localhost" that host alone;
    "example.com" the domain and every name under it, ".example.com" only the names under it; a
    ":port" after a name limits it to that port."""
    if not entry:
        return False
    if entry == "*":
        return True
    entry_scheme, exact = "all", "://" in entry
    if exact:
        entry_scheme, _, entry = entry.partition("://")
        if entry_scheme.lower() not in ("all", scheme):
            return False
    entry = entry.strip("/").lower()
    entry_port: int | None = None
    if entry.startswith("["):  # [v6] or [v6]:port
        name, _, rest = entry[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            entry_port = int(rest[1:])
    elif entry.count(":") == 1:
        name, _, port_text = entry.partition(":")
        if not port_text.isdigit():
            return False
        entry_port = int(port_text)
    else:
        name = entry  # a bare name, or an IPv6 address without brackets
    if entry_port is not None and entry_port != port:
        return False
    host = host.lower()
    if exact or _is_ip(name) or name == "localhost":
        return host == name
    if name.startswith("."):
        return host.endswith(name)
    return host == name or host.endswith("." + name)


def _loopback(host: str) -> bool:
    """A local LLM server (Ollama, vLLM on this VM) is never reached through a proxy, which could
    not reach this machine's loopback anyway (httpx would send it there unless NO_PROXY says not)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: bytes in a buffer, and a waiter woken when more arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ended = False  # closed, by either side
        self.peer_closed = False  # the server closed it (or the network did), not this client
        self.pooled = False  # idle in the pool: no request of ours is out, so no byte is due
        self.idle_since = 0.0
        self.answered = False  # a byte of an answer arrived for the request being sent
        self._waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.pooled:
            # Bytes nobody asked for (a 408 before a close, a server's bug): read as the next call's
            # answer they would shift every later answer on this connection by one. Never reused.
            self.close()
            return
        self.answered = True
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool | None:
        self.ended = self.peer_closed = True
        self._wake()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended:
            self.peer_closed = True
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- reading ------------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return (not self.ended and not self.buffer and self.transport is not None
                and not self.transport.is_closing() and self.transport.get_write_buffer_size() == 0)

    def close(self) -> None:
        self.ended = True
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    async def _more(self, end_ok: bool = False) -> None:
        """Wait for more bytes, or for the end of the connection when `end_ok`."""
        if self.ended:
            if end_ok:
                return
            raise ProtocolError("the server closed the connection before the response was complete")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_until(self, separator: bytes, limit: int) -> bytes:
        """Bytes up to and including `separator` (at most `limit` before it)."""
        start = 0
        while True:
            found = self.buffer.find(separator, start)
            if found > limit:
                raise ProtocolError("a response header or chunk line is too long")
            if found >= 0:
                end = found + len(separator)
                data = bytes(self.buffer[:end])
                del self.buffer[:end]
                return data
            if len(self.buffer) > limit:
                raise ProtocolError("a response header or chunk line is too long")
            start = max(0, len(self.buffer) - len(separator) + 1)
            await self._more()

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._more()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def read_to_end(self, limit: int) -> bytes:
        while not self.ended:
            if len(self.buffer) > limit:
                raise BodyTooLarge
            await self._more(end_ok=True)
        if len(self.buffer) > limit:
            raise BodyTooLarge
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


class Endpoint:
    """Kept-alive HTTP/1.1 connections to one URL, for POSTing JSON and reading the answer whole.

    Nothing here limits how many calls run at once: the LLM adapter's semaphore does. As many
    connections stay open as calls ran at once, until each has been idle `IDLE_SECONDS`.
    """

    def __init__(self, url: str, headers: Mapping[str, str], ssl_context: ssl.SSLContext | None = None,
                 environ: Mapping[str, str] | None = None):
        self._route = route(url, environ)
        # Certificates are checked against the authorities httpx would use (certifi's, or
        # SSL_CERT_FILE / SSL_CERT_DIR); the context is made once, and only for an https endpoint.
        self._ssl = ssl_context if ssl_context is not None or not self._route.tls else httpx.create_ssl_context()
        fixed = {"Host": self._route.host_header, **headers, "Accept-Encoding": "gzip, deflate"}
        if self._route.proxy_authorization and self._route.tunnel is None:
            fixed["Proxy-Authorization"] = self._route.proxy_authorization
        self._head = (f"POST {self._route.target} HTTP/1.1\r\n"
                      + "".join(f"{name}: {value}\r\n" for name, value in fixed.items())).encode("latin-1")
        self._idle: list[_Connection] = []  # a stack: the most recently used on top
        self._open: set[_Connection] = set()
        self._closed = False

    async def post(self, body: bytes, content_type: str, max_body: int) -> Response:
        """POST `body`; the whole response, or ProtocolError / OSError / BodyTooLarge.

        A request sent on a reused connection that the server closed before a byte of an answer is
        sent once more, on a new connection: the server dropped an idle connection as it was reused
        (browsers do the same). A request is never sent again once any answer has begun.
        """
        request = (self._head + f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
                   .encode("latin-1") + body)
        connection, reused = await self._connection()
        try:
            return await self._exchange(connection, request, max_body)
        except ProtocolError:
            if not (reused and connection.peer_closed and not connection.answered and not self._closed):
                raise
        connection, _ = await self._connection(fresh=True)
        return await self._exchange(connection, request, max_body)

    async def _exchange(self, connection: _Connection, request: bytes, max_body: int) -> Response:
        done = False
        try:
            connection.answered = False
            assert connection.transport is not None
            connection.transport.write(request)
            response, keep = await _read_response(connection, max_body)
            done = True
        finally:
            if not done:
                self._discard(connection)
        if keep and connection.usable and not self._closed:
            connection.idle_since, connection.pooled = time.monotonic(), True
            self._idle.append(connection)
        else:
            self._discard(connection)
        return response

    async def _connection(self, fresh: bool = False) -> tuple[_Connection, bool]:
        if self._closed:
            raise ProtocolError("the LLM client is closed")
        now = time.monotonic()
        # The oldest idle connections are at the bottom of the stack: close the expired ones.
        while self._idle and now - self._idle[0].idle_since >= IDLE_SECONDS:
            self._discard(self._idle.pop(0))
        while self._idle and not fresh:
            connection = self._idle.pop()
            connection.pooled = False
            if connection.usable:
                return connection, True
            self._discard(connection)
        return await self._connect(), False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        routed = self._route
        direct_tls = self._ssl if routed.tls and routed.tunnel is None else None
        _, connection = await loop.create_connection(
            _Connection, routed.host, routed.port, ssl=direct_tls,
            server_hostname=routed.server_name if direct_tls is not None else None)
        self._open.add(connection)
        try:
            if self._closed:  # aclose() ran while this connection was being made
                raise ProtocolError("the LLM client is closed")
            if routed.tunnel is not None:
                await self._tunnel(connection)
        except BaseException:
            self._discard(connection)
            raise
        return connection

    async def _tunnel(self, connection: _Connection) -> None:
        """CONNECT through the proxy, then TLS to the endpoint inside the tunnel."""
        routed = self._route
        assert routed.tunnel is not None and connection.transport is not None and self._ssl is not None
        head = f"CONNECT {routed.tunnel} HTTP/1.1\r\nHost: {routed.tunnel}\r\n"
        if routed.proxy_authorization:
            head += f"Proxy-Authorization: {routed.proxy_authorization}\r\n"
        connection.transport.write((head + "\r\n").encode("latin-1"))
        status, _, _ = await _read_head(connection)
        if not 200 <= status < 300:
            raise ProtocolError(f"the proxy refused the tunnel: HTTP {status}")
        if connection.buffer:
            raise ProtocolError("the proxy sent bytes before the tunnel was set up")
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(connection.transport, connection, self._ssl,
                                         server_hostname=routed.server_name)
        if transport is None:
            raise ProtocolError("TLS through the proxy's tunnel failed")
        connection.transport = transport  # type: ignore[assignment]

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)

    async def aclose(self) -> None:
        """Close every connection, idle or in use (a call in flight fails, and is not sent again)."""
        self._closed = True
        for connection in list(self._open):
            self._discard(connection)
        self._idle.clear()


async def _read_head(connection: _Connection) -> tuple[int, str, dict[str, str]]:
    """A response's status, HTTP version and headers (lower-case names; a repeated header's values
    joined by ", "), skipping any 1xx interim response."""
    while True:
        head = await connection.read_until(b"\r\n\r\n", MAX_HEAD_BYTES)
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if version not in ("HTTP/1.1", "HTTP/1.0") or not _DIGITS.fullmatch(code) or rest[3:4] not in ("", " "):
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, colon, value = line.partition(":")
            if not colon or not _TOKEN.fullmatch(name):
                raise ProtocolError(f"a malformed header line: {line[:80]!r}")
            name, value = name.lower(), value.strip(" \t")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        status = int(code)
        if 100 <= status < 200 and status != 101:
            continue
        return status, version, headers


_DIGITS = re.compile(r"[0-9]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


async def _read_response(connection: _Connection, max_body: int) -> tuple[Response, bool]:
    """The response and whether its connection may carry another request (RFC 9112, section 6.3)."""
    status, version, headers = await _read_head(connection)
    tokens = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    keep = "close" not in tokens and (version == "HTTP/1.1" or "keep-alive" in tokens)
    encoding = headers.get("transfer-encoding", "").lower()
    if status == 101:
        raise ProtocolError("the server switched protocols")
    if status in (204, 304):
        body = b""  # never a body, whatever the headers say
    elif encoding:
        if encoding.rsplit(",", 1)[-1].strip() != "chunked":
            raise ProtocolError(f"an unsupported transfer-encoding: {encoding[:40]!r}")
        body = await _read_chunked(connection, max_body)
        keep = keep and "content-length" not in headers  # both: a sign of smuggling; do not reuse
    elif "content-length" in headers:
        values = {value.strip() for value in headers["content-length"].split(",")}
        if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):
            raise ProtocolError(f"a malformed content-length: {headers['content-length'][:40]!r}")
        length = int(values.pop())
        if length > max_body:
            raise BodyTooLarge
        body = await connection.read_exactly(length)
    else:
        body, keep = await connection.read_to_end(max_body), False
    coding = headers.get("content-encoding", "identity").lower().strip()
    if coding in ("gzip", "x-gzip", "deflate"):
        body = _decompress(body, coding, max_body)
    elif coding not in ("", "identity"):
        raise ProtocolError(f"an unsupported content-encoding: {coding[:40]!r}")
    return Response(status, headers, body), keep


async def _read_chunked(connection: _Connection, max_body: int) -> bytes:
    body = bytearray()
    while True:
        line = await connection.read_until(b"\r\n", 1024)
        size_text = line[:-2].split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise ProtocolError(f"a malformed chunk size: {size_text[:20]!r}")
        size = int(size_text, 16)
        if size == 0:
            while await connection.read_until(b"\r\n", MAX_HEAD_BYTES) != b"\r\n":  # trailers, then the end
                pass
            return bytes(body)
        if len(body) + size > max_body:
            raise BodyTooLarge
        body += await connection.read_exactly(size)
        if await connection.read_exactly(2) != b"\r\n":
            raise ProtocolError("a chunk did not end in CRLF")


def _decompress(body: bytes, coding: str, max_body: int) -> bytes:
    """A gzip or deflate body decoded, at most `max_body` bytes of it; a truncated one is refused."""
    # deflate is meant to be zlib-wrapped; some servers send it raw, so that is tried second.
    for wbits in ((16 + zlib.MAX_WBITS,) if "gzip" in coding else (zlib.MAX_WBITS, -zlib.MAX_WBITS)):
        decoder = zlib.decompressobj(wbits)
        try:
            data = decoder.decompress(body, max_body + 1)
        except zlib.error:
            continue
        if len(data) > max_body:
            raise BodyTooLarge
        if decoder.eof:
            return data
    raise ProtocolError(f"a body that is not valid {coding}")
