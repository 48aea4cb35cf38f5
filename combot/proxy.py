"""Behind a reverse proxy: believe X-Forwarded-For/-Proto/-Host only from the proxies named in
`[server] forwarded_allow_ips`, so the rate limits see the participant's address and the admin
cookie is `Secure` when the participant's connection is https.

The header parsing is Hypercorn's own `ProxyFixMiddleware` (one trusted hop: the proxy in front
appends the address it saw last). It believes whoever sends the headers, so this wrapper hands it
only the requests whose peer is a named proxy; anyone else's forwarded headers are ignored.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hypercorn.middleware import ProxyFixMiddleware
from starlette.requests import Request

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """ASGI middleware: Hypercorn's ProxyFixMiddleware for requests from a trusted proxy only."""

    def __init__(self, app: Any, allow: list[str]):
        self.app = app
        self.any = "*" in allow
        self.networks: list[Network] = [ipaddress.ip_network(value, strict=False) for value in allow if value != "*"]

    def trusted(self, peer: str) -> bool:
        if self.any:
            return True
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:  # a Unix socket or an odd test client: not a proxy we know
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        client = scope.get("client") if scope["type"] in ("http", "websocket") else None
        if not (client and self.trusted(str(client[0]))):
            await self.app(scope, receive, send)
            return
        # ProxyFixMiddleware deep-copies the scope it is given, and Starlette's scope holds the app itself
        # (thread pools, the store): it gets only the keys it reads and rewrites, merged back after.
        fixed: dict[str, Any] = {}

        async def keep(new_scope: Any, _receive: Any, _send: Any) -> None:
            fixed.update(new_scope)

        read: Any = {key: scope[key] for key in ("type", "headers", "client", "scheme") if key in scope}
        await ProxyFixMiddleware(keep, mode="legacy", trusted_hops=1)(read, receive, send)
        # In place, not a copy: what the app notes in the scope (the participant id the access log
        # shows instead of a session token, combot/accesslog.py) must reach the server's logger.
        scope.update(fixed)
        await self.app(scope, receive, send)


def client_address(request: Request) -> str:
    """The participant's address as the app sees it (after a trusted proxy's X-Forwarded-For)."""
    return request.client.host if request.client else ""
