"""A graceful stop that never takes a request it cannot answer.

When a worker is asked to stop, Hypercorn (0.18, read here) closes every keep-alive connection that
is idle at once, from a task of that connection's own. A participant's message can arrive on such
a connection in the same instant, and the two tasks race:

- its bytes are parsed into a request just before the close runs: the close goes ahead, the
  request still runs (its turn is stored) and its answer has no connection left to go out on;
- its bytes are already read, not yet parsed, when the close runs: they are parsed after it, with
  the same result.

Nothing is lost either way (the page retries with the same `client_message_id` and gets the stored
answer), but a stop should answer what it takes. `install()` wraps the close: a connection with a
request under way is left open (Hypercorn closes it once the answer is sent, as it does after every
answer once stopping), and a connection it does close drops whatever it reads afterwards, so no
request starts there. Called in each worker before it serves.

The same close ends a connection left idle for `keep_alive_timeout` while the server runs, with the
same race for a message sent just as it expires; the wrapper covers it too (a connection with a
request under way stays open and goes back to waiting once answered).
"""

from __future__ import annotations

from typing import Any, Callable, Coroutine

import h11
from hypercorn.events import RawData

# The peer's HTTP/1.1 states in which a request has been received and not yet answered.
_REQUEST_UNDER_WAY = (h11.SEND_BODY, h11.DONE)


def request_under_way(protocol: Any) -> bool:
    """Whether Hypercorn's protocol for one connection holds a request it has read: an HTTP/1.1
    stream, or a peer past the request's head (h11), or any HTTP/2 stream (browsers speak HTTP/2
    over TLS; a stream that starts as the stop begins is reset by Hypercorn itself, but one that
    starts as keep-alive expires was closed with the connection, its answer lost)."""
    inner = getattr(protocol, "protocol", None)
    if getattr(inner, "stream", None) is not None or getattr(inner, "streams", None):
        return True
    connection = getattr(inner, "connection", None)
    return isinstance(connection, h11.Connection) and connection.their_state in _REQUEST_UNDER_WAY


def _closing_safely(close: Callable[[Any], Coroutine[Any, Any, None]]) -> Callable[[Any], Coroutine[Any, Any, None]]:
    async def initiate_server_close(server: Any) -> None:
        if request_under_way(server.protocol):
            return  # answered first; Hypercorn then closes it if the server is stopping
        handle = server.protocol.handle

        async def without_new_requests(event: Any) -> None:
            if not isinstance(event, RawData):  # bytes read from now on would start a request
                await handle(event)

        server.protocol.handle = without_new_requests  # no await since the check: nothing slipped in
        await close(server)

    initiate_server_close.combot_graceful = True  # type: ignore[attr-defined]
    return initiate_server_close


def install() -> None:
    """Wrap Hypercorn's asyncio server-side close of idle connections (once per process). A Hypercorn
    without that method (a later version) keeps its own behaviour."""
    from hypercorn.asyncio.tcp_server import TCPServer

    close = getattr(TCPServer, "_initiate_server_close", None)
    if close is not None and not getattr(close, "combot_graceful", False):
        TCPServer._initiate_server_close = _closing_safely(close)  # type: ignore[method-assign, assignment]
