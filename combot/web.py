"""The app factory: one set of resources per worker process, routes, middleware and error handlers.

Requests flow one way: parse and check the request (`parsing`), ask the engine what to say, let the
adapters (classifier, LLM, store) do their I/O (`replies`), and answer only after the store has
committed (`api`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount

from combot import __version__, accesslog, admin, api, assets, consent, monitor, store, versioning
from combot.errors import CombotError
from combot.llm import create_llm
from combot.middleware import RequestTimeout, SecurityHeaders
from combot.proxy import TrustedProxies
from combot.ratelimit import RateLimiter
from combot.server import notify_ready
from combot.study import Study, load_study
from combot.timing import RecentLatencies
from combot.worker import Resources, load_classifier

log = logging.getLogger("combot")


async def _combot_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CombotError)
    return JSONResponse({"error": str(exc)}, status_code=exc.status_code)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The page was closed or the network dropped mid-upload: not a server error (the dashboard's
    # error rate counts 5xx), and nobody is left to read the answer.
    return JSONResponse({"error": "the request ended before its body arrived; please send it again"}, status_code=400)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, accesslog.public_path(request.scope))
    return JSONResponse({"error": "something went wrong on the server; please try again"}, status_code=500)



def _served_study(config_path: str | None) -> Study:
    """The study this worker serves: the version `serve` checked and stamped (COMBOT_STUDY_TEXT), so a
    worker started later never reads a combot.toml edited since; else the file itself."""
    shown = config_path or os.environ.get("COMBOT_CONFIG") or None
    text = os.environ.get("COMBOT_STUDY_TEXT")
    if not text:
        return load_study(shown)
    study = load_study(shown, source=text)
    return dataclasses.replace(study, version=os.environ["COMBOT_STUDY_VERSION"], version_text=text,
                               head_sha256=os.environ.get("COMBOT_STUDY_HEAD_SHA256", ""),
                               encoder_sha256=os.environ.get("COMBOT_STUDY_ENCODER_SHA256", ""))


# --- the factory ----------------------------------------------------------------------------------

def create_app(config_path: str | None = None, database: str | None = None, study: Study | None = None) -> Starlette:
    """Build the app. Hypercorn workers call this by name (`combot.web:create_app()`): it reads
    COMBOT_CONFIG and COMBOT_DB when no arguments are given; nothing heavy happens until the lifespan."""
    if study is None:
        study = _served_study(config_path)
    if not study.version:
        study = versioning.stamp(study)
    db_path = database or study.settings["server.database"]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        handle = store.Store(db_path)
        await handle.open()
        await handle.run(store.record_study_version, version=study.version, text=study.version_text,
                         combot_version=__version__, head_sha256=study.head_sha256,
                         encoder_sha256=study.encoder_sha256)
        loop = asyncio.get_running_loop()
        inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="combot-classify")
        classifier = await loop.run_in_executor(inference, load_classifier, study)
        starts = study.settings["server.session_rate_limit"]
        app.state.resources = Resources(study, handle, classifier, inference,
                                        RateLimiter(study.settings["server.rate_limit"], 60.0),
                                        assets=assets.Assets.for_study(study),
                                        llm=create_llm(study.settings, database=db_path),
                                        starts=RateLimiter(starts, 60.0) if starts > 0 else None,
                                        latencies=RecentLatencies(
                                            lambda: handle.read(store.recent_llm_reply_ms, classified=False)),
                                        opening_latencies=RecentLatencies(
                                            lambda: handle.read(store.recent_llm_reply_ms, classified=True)))
        app.state.admin_token = admin.ensure_token(study.settings, db_path)
        notify_ready()
        heartbeat = monitor.Heartbeat(handle)
        heartbeat.start()
        try:
            yield
        finally:
            await heartbeat.stop()
            if app.state.resources.llm is not None:
                await app.state.resources.llm.aclose()
            await handle.close()
            inference.shutdown(wait=False)

    routes = [
        *api.routes(),
        *consent.routes(),
        *admin.routes(),
        *assets.routes(),
        Mount("/static", assets.page_files(), name="static"),
    ]
    middleware = [
        # First: everything after it sees the participant's address and scheme, not the proxy's.
        Middleware(TrustedProxies, allow=study.settings["server.forwarded_allow_ips"]),
        Middleware(SecurityHeaders),
        Middleware(TrustedHostMiddleware, allowed_hosts=study.settings["server.trusted_hosts"]),
        Middleware(monitor.ErrorRecorder),  # outside RequestTimeout, so its 503s count as errors
        Middleware(RequestTimeout, seconds=study.settings["server.request_timeout"]),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={CombotError: _combot_error, HTTPException: _http_error, ClientDisconnect: _client_gone,
                            Exception: _unexpected},
    )
