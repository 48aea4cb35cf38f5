"""ASGI middleware every response passes through: a request time limit and security headers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.responses import JSONResponse

log = logging.getLogger("combot")


class RequestTimeout:
    """Answer 503 when a request runs past the configured time, instead of leaving the page hanging."""

    def __init__(self, app: Any, seconds: float):
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.seconds <= 0:
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, tracking_send), self.seconds)
        except asyncio.TimeoutError:
            log.warning("request %s %s timed out after %.0f s", scope.get("method"), scope.get("path"), self.seconds)
            if not started:
                response = JSONResponse({"error": "the server took too long to answer; please try again"}, 503)
                await response(scope, receive, send)


class SecurityHeaders:
    """Headers every response carries: no framing, no MIME sniffing, no referrer to the survey site."""

    HEADERS = [
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
    ]

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)
