"""ASGI middleware every response passes through: a request time limit and security headers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.responses import JSONResponse

from combot.accesslog import public_path

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
            log.warning("request %s %s timed out after %.0f s", scope.get("method"), public_path(scope), self.seconds)
            if not started:
                response = JSONResponse({"error": "the server took too long to answer; please try again"}, 503)
                await response(scope, receive, send)


class SecurityHeaders:
    """Headers every response carries: no MIME sniffing, no referrer to the survey site, and no framing
    unless the response set its own Content-Security-Policy (the chat page, with [embed] frame_ancestors)."""

    HEADERS = [
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]
    NO_FRAMES = [
        (b"x-frame-options", b"DENY"),
        (b"content-security-policy", b"frame-ancestors 'none'"),
    ]

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                own_policy = any(name.lower() == b"content-security-policy" for name, _ in headers)
                message = {**message, "headers": [*headers, *self.HEADERS, *([] if own_policy else self.NO_FRAMES)]}
            await send(message)

        await self.app(scope, receive, with_headers)
