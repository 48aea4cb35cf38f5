"""The researcher's dashboard at /admin: the token, its checks, the page, its numbers and the export.

The token comes from COMBOT_ADMIN_TOKEN (or `[server] admin_token`); otherwise it is generated on
first start and kept beside the database as `<database>.admin-token`, readable by its owner only.
Every /admin page and endpoint answers 401 without it. A researcher gives it either as
`Authorization: Bearer <token>` (scripts) or once in the login form, which sets an HttpOnly,
SameSite=Strict cookie (browsers); it never travels in a URL.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from combot import export, monitor
from combot.errors import NotFound, Unauthorized
from combot.resources import static_dir
from combot.settings import Settings

COOKIE = "combot_admin"
TOKEN_SUFFIX = ".admin-token"
MAX_FORM_BYTES = 4096
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self';"
                               " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}


# --- the token ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdminToken:
    value: str
    source: str  # "environment" (or the study file) or the path of the token file
    created: bool  # generated just now: the one time it is printed


def token_path(database: str | Path) -> Path:
    return Path(str(database) + TOKEN_SUFFIX)


def ensure_token(settings: Settings, database: str | Path) -> AdminToken:
    """The configured token, else the one stored beside the database, else a new one stored there.

    Several workers may start at once: the new file is written under a private name and linked
    into place, so exactly one token wins and nobody reads a half-written file.
    """
    configured = (settings["server.admin_token"] or "").strip()
    if configured:
        return AdminToken(configured, "environment", False)
    path = token_path(database)
    for _ in range(3):
        try:
            value = path.read_text(encoding="ascii").strip()
            if value:
                if path.stat().st_mode & 0o077:
                    path.chmod(0o600)
                return AdminToken(value, str(path), False)
        except FileNotFoundError:
            pass
        value = secrets.token_urlsafe(32)
        fd, temporary = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(value + "\n")
            os.link(temporary, path)
            return AdminToken(value, str(path), True)
        except FileExistsError:
            continue
        finally:
            os.unlink(temporary)
    raise RuntimeError(f"cannot read or create the admin token file {path}")


def _same(given: str, expected: str) -> bool:
    return secrets.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def cookie_value(token: str) -> str:
    """What the browser keeps: derived from the token, so a new token logs every browser out."""
    return hmac.new(token.encode("utf-8"), b"combot admin session", hashlib.sha256).hexdigest()


def authorised(request: Request) -> bool:
    token: str = request.app.state.admin_token.value
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return _same(header[7:].strip(), token)
    cookie = request.cookies.get(COOKIE)
    return cookie is not None and _same(cookie, cookie_value(token))


def _require(request: Request) -> None:
    if not authorised(request):
        raise Unauthorized("the researcher token is missing or wrong")


# --- pages ----------------------------------------------------------------------------------------

def _to_root(request: Request) -> str:
    """The relative way from this page back to the app's root ("" from /admin, "../" from /admin/login):
    links stay relative, so a proxy may serve the study under a sub-path (/study1/admin)."""
    path = request.url.path
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):  # a prefix the server was told about is not ours to climb
        path = path[len(root):]
    return "../" * (path.rstrip("/").count("/") - 1)


def _login_page(request: Request, error: str = "", status: int = 401) -> Response:
    page = (static_dir() / "admin-login.html").read_text(encoding="utf-8")
    # Only fixed server texts go in here, never anything from the request.
    page = page.replace("<!--error-->", f'<p class="login__error" role="alert">{error}</p>' if error else "")
    page = page.replace("{root}", _to_root(request))
    return HTMLResponse(page, status_code=status, headers={**_HEADERS, "WWW-Authenticate": "Bearer"})


async def dashboard_page(request: Request) -> Response:
    if not authorised(request):
        return _login_page(request)
    return FileResponse(static_dir() / "admin.html", headers=_HEADERS)


async def login(request: Request) -> Response:
    if request.method == "GET":
        return RedirectResponse("../admin", status_code=303, headers=_HEADERS) if authorised(request) else _login_page(request)
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_FORM_BYTES:
            return _login_page(request, "That is not a researcher token.")
    given = parse_qs(body.decode("utf-8", errors="replace")).get("token", [""])[0].strip()
    token: str = request.app.state.admin_token.value
    if not given or not _same(given, token):
        return _login_page(request, "That token is not right. Copy it from the server's start-up output or the token file.")
    # Relative, so a study served under a sub-path by a proxy keeps working.
    response = RedirectResponse("../admin", status_code=303, headers=_HEADERS)
    # No Path attribute: the browser takes this URL's folder, /admin, or /study1/admin under a proxy's
    # sub-path. Secure when the participant-facing connection is https (a trusted proxy says so).
    response.set_cookie(COOKIE, cookie_value(token), httponly=True, samesite="strict", path=None,
                        secure=request.url.scheme == "https")
    return response


async def logout(request: Request) -> Response:
    _require(request)
    response = RedirectResponse("../admin", status_code=303, headers=_HEADERS)
    response.set_cookie(COOKIE, "", max_age=0, expires=0, path=None, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


async def stats(request: Request) -> Response:
    _require(request)
    res = request.app.state.resources
    numbers = await res.store.read(monitor.dashboard, res.study)
    return JSONResponse(numbers, headers=_HEADERS)


async def download(request: Request) -> Response:
    """A zip of the export, built in a temporary file by its own connection (the workers' store
    thread keeps serving participants meanwhile) and streamed from there."""
    _require(request)
    res = request.app.state.resources
    anonymise = request.query_params.get("anonymise") in ("1", "true", "yes")
    include_synthetic = request.query_params.get("include_synthetic") in ("1", "true", "yes")
    fmt = request.query_params.get("format", "csv")
    if fmt not in export.FORMATS:
        fmt = "csv"
    target = tempfile.TemporaryFile()

    def build() -> None:
        conn = export.open_database(res.store.path)
        try:
            export.export_to_zip(conn, res.study, target, anonymise=anonymise, fmt=fmt,
                                 include_synthetic=include_synthetic)
        finally:
            conn.close()
        target.seek(0)

    try:
        await asyncio.to_thread(build)
    except BaseException:
        target.close()
        raise

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while chunk := await asyncio.to_thread(target.read, 1 << 16):
                yield chunk
        finally:
            target.close()

    name = "combot-export" + ("-anonymised" if anonymise else "") + ".zip"
    headers = {**_HEADERS, "Content-Disposition": f'attachment; filename="{name}"'}
    return StreamingResponse(chunks(), media_type="application/zip", headers=headers)


async def elsewhere(request: Request) -> Response:
    """Any other /admin address: 401 first, so nothing about the admin side shows without the token."""
    _require(request)
    raise NotFound("no such admin page")


def routes() -> list[Route]:
    return [
        Route("/admin", dashboard_page),
        Route("/admin/login", login, methods=["GET", "POST"]),
        Route("/admin/logout", logout, methods=["POST"]),
        Route("/admin/api/stats", stats),
        Route("/admin/export.zip", download),
        Route("/admin/{rest:path}", elsewhere, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
