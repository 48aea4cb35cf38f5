"""The HTTP layer: a Starlette app built by a factory, one set of resources per worker process.

Requests flow one way: parse and check the request, ask the engine what to say, let the
adapters (classifier, LLM, store) do their I/O, and answer only after the store has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from combot import admin, consent, engine, monitor, recruitment, store
from combot.assignment import choose_cell
from combot.classifier import Classifier, classify_async, default_model_dir, get_classifier
from combot.errors import (BadRequest, CombotError, Conflict, ConsentRequired, NotFound, PayloadTooLarge,
                           TooManyRequests, Unprocessable)
from combot.llm import ChatModel, LLMReply, create_llm
from combot.ratelimit import RateLimiter
from combot.resources import static_dir
from combot.server import notify_ready
from combot.study import Study, load_study

log = logging.getLogger("combot")



@dataclass
class Resources:
    """What one worker process holds for its whole life: created in the lifespan, seen by every request."""

    study: Study
    store: store.Store
    classifier: Classifier
    inference: ThreadPoolExecutor
    limiter: RateLimiter
    llm: ChatModel | None = None  # None: no LLM configured, the offline paraphraser answers


def _resources(request: Request) -> Resources:
    return request.app.state.resources  # type: ignore[no-any-return]


def load_classifier(study: Study) -> Classifier:
    cfg = study.settings.section("classifier")
    model_dir = Path(cfg["model_dir"]) if cfg["model_dir"] else default_model_dir()
    head = Path(cfg["head"]) if cfg["head"] else None
    return get_classifier(model_dir, head=head, threads=cfg["threads"], max_length=cfg["max_length"],
                          threshold=cfg["threshold"])


# --- request parsing --------------------------------------------------------------------------------

async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body is over {limit} bytes")
    if not body.strip():
        return {}
    try:
        data = json.loads(bytes(body).decode("utf-8"))
        # JSON can escape a lone surrogate ("\ud800"), which no UTF-8 text holds: SQLite and the
        # tokenizer would fail on it with a 500.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeError:
        raise BadRequest("the request body is not UTF-8") from None
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def _message_text(data: Mapping[str, Any], max_chars: int) -> str:
    text = data.get("text")
    if text is None:
        raise BadRequest("the body needs a 'text' field")
    if not isinstance(text, str):
        raise BadRequest("'text' must be a string")
    if len(text) > max_chars:
        raise PayloadTooLarge(f"the message is over {max_chars} characters; please shorten it")
    text = text.replace("\x00", "").strip()
    if not text:
        raise Unprocessable("the message is empty")
    return text


def _client_message_id(data: Mapping[str, Any]) -> str | None:
    value = data.get("client_message_id")
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 100:
        raise BadRequest("'client_message_id' must be a string of 1 to 100 characters")
    return value


# --- what the page sees ---------------------------------------------------------------------------

def _stored_reply(row: Any, study: Study, link_values: Mapping[str, str]) -> dict[str, Any]:
    """A stored bot message as the page sees it: its text, and the survey link on the last one."""
    out: dict[str, Any] = {"text": row["text"]}
    link = engine.survey_link(study, link_values) if row["kind"] == "thanks" else None
    if link is not None:
        out["link"] = {"url": link.url, "label": link.label}
    return out


def _presentation(study: Study, factors: Mapping[str, str]) -> dict[str, str]:
    shown = study.presentation(factors)
    out = {"name": shown["name"], "colour": shown["colour"]}
    if shown.get("logo"):
        out["logo"] = "/static/" + shown["logo"].lstrip("/")
    return out


# --- endpoints ------------------------------------------------------------------------------------

async def create_session(request: Request) -> Response:
    res = _resources(request)
    data = await _read_json(request, res.study.settings["server.max_body_bytes"])
    study = res.study
    # Which URL parameters are kept, and which one identifies a returning person: [recruitment].
    params = recruitment.captured_params(request.query_params, study.settings)
    platform_id = recruitment.platform_id(params, study.settings)
    consented = consent.given(data)
    if study.settings["consent.enabled"] and not consented:
        returning = await res.store.read(store.participant_by_platform_id, platform_id) if platform_id else None
        if returning is None:
            raise ConsentRequired("please read the study information and agree before the chat starts")
        return await _session_response(res, returning)
    participant_id = "p" + secrets.token_hex(6)
    token = secrets.token_urlsafe(24)
    rng = random.SystemRandom()

    def greet(factors: Mapping[str, str]) -> tuple[dict[str, Any], list[store.NewMessage]]:
        state, replies = engine.start(study, factors)
        return state.to_dict(), [store.NewMessage("bot", r.kind, r.text, r.produced_by) for r in replies]

    row, created = await res.store.run(
        store.create_participant, participant_id=participant_id, token=token,
        choose_cell=lambda counts: choose_cell(study, counts, rng),
        greet=greet, user_agent=request.headers.get("user-agent", ""), url_params=params,
        platform_id=platform_id, fill=study.fill, active_minutes=study.active_minutes, consented=consented)
    return await _session_response(res, row, status=201 if created else 200)


async def _session_response(res: Resources, participant: Any, status: int = 200) -> Response:
    study = res.study
    factors = json.loads(participant["factors"])
    rows = await res.store.read(store.transcript, participant["id"])
    values = recruitment.link_values(participant)
    messages = []
    for row in rows:
        if row["sender"] == "bot":
            messages.append({"from": "bot", **_stored_reply(row, study, values)})
        else:
            messages.append({"from": "participant", "text": row["text"]})
    state = engine.State.from_dict(json.loads(participant["state"]))
    body = {
        "session_id": participant["token"],
        "messages": messages,
        "expects": engine.expects(state),
        "bot": _presentation(study, factors),
        "max_message_chars": study.settings["server.max_message_chars"],
    }
    redirect = recruitment.completion_redirect(study, values) if body["expects"] == "done" else None
    if redirect is not None:
        body["redirect"] = redirect
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


async def _participant(res: Resources, token: str) -> Any:
    if not 10 <= len(token) <= 100:
        raise NotFound("no such session")
    row = await res.store.read(store.participant_by_token, token)
    if row is None:
        raise NotFound("no such session")
    return row


async def get_session(request: Request) -> Response:
    res = _resources(request)
    participant = await _participant(res, request.path_params["session_id"])
    return await _session_response(res, participant)


async def post_message(request: Request) -> Response:
    started = time.perf_counter()
    res = _resources(request)
    study = res.study
    token = request.path_params["session_id"]
    data = await _read_json(request, study.settings["server.max_body_bytes"])
    text = _message_text(data, study.settings["server.max_message_chars"])
    client_id = _client_message_id(data)
    participant = await _participant(res, token)
    values = recruitment.link_values(participant)

    if client_id is not None:
        earlier = await res.store.read(store.replies_to, participant["id"], client_id)
        if earlier is not None:
            return _turn_response(study, participant, earlier, values, repeat=True)
    if not res.limiter.allow(participant["id"]):
        raise TooManyRequests("you are sending messages too quickly; please wait a moment")

    state = engine.State.from_dict(json.loads(participant["state"]))
    if state.stage == "done":
        raise Conflict("this conversation has ended")
    factors = json.loads(participant["factors"])
    problem = scores = None
    if engine.needs_classification(state):
        verdict = await classify_async(res.classifier, text, res.inference)
        problem, scores = verdict.label, verdict.scores
    seed = int.from_bytes(participant["id"].encode(), "big") % (2**32)
    step = engine.respond(study, factors, state, text, problem=problem, seed=seed, link_values=values)
    replies = await _bot_messages(res, participant, factors, step, started)
    # What a participant types at the e-mail step is personal data even when it is not a valid
    # address (a typo of one): only the emails table ever holds it.
    shown = text
    if state.stage == "email":
        shown = ("[e-mail address]" if step.email else "[no e-mail address given]" if step.email_declined
                 else "[not an e-mail address]")
    incoming = store.NewMessage("participant", "email" if state.stage == "email" else "message", shown,
                                client_message_id=client_id)
    stored = await res.store.run(store.record_turn, store.Turn(
        participant_id=participant["id"], expected_version=participant["version"],
        turn=participant["turns"] + 1,
        incoming=incoming, replies=replies, state=step.state.to_dict(),
        status="finished" if step.state.stage == "done" else "started",
        problem_type=problem, scores=scores, email=step.email))
    return _turn_response(study, participant, stored, values, expects=step.expects)


async def _bot_messages(res: Resources, participant: Any, factors: Mapping[str, str], step: engine.Step,
                        started: float) -> list[store.NewMessage]:
    """The replies to store: the engine's, with the ones an LLM may write asked of it concurrently.

    Any LLM failure keeps the engine's offline text (produced_by 'template') and records why; the
    adapter gives up within its timeout, so a participant never waits longer or sees an error.
    """
    def offline(reply: engine.Reply, reason: str | None = None) -> store.NewMessage:
        return store.NewMessage("bot", reply.kind, reply.text, reply.produced_by,
                                latency_ms=int((time.perf_counter() - started) * 1000), fallback_reason=reason)

    llm = res.llm
    wanted = [r for r in step.replies if r.llm_task]
    if llm is None or not wanted:
        return [offline(r) for r in step.replies]
    # The engine gives at most one LLM-writable reply per turn (tests/test_llm.py holds it to that),
    # so `turns` bounds the LLM replies so far; the count is read only when that bound could reach the
    # cap. Under load every read waits in the worker's database queue (p95 0.3 s at 300 participants).
    allowed = llm.config.calls_allowed(participant["turns"])
    if allowed is not None and allowed < len(wanted):
        allowed = llm.config.calls_allowed(await res.store.read(store.llm_reply_count, participant["id"]))

    async def written(reply: engine.Reply, position: int) -> store.NewMessage:
        if allowed is not None and position >= allowed:
            return offline(reply, "participant limit")
        system = res.study.llm_prompt(reply.llm_task or "", factors, step.state.problem)
        if system is None:
            return offline(reply, "no prompt")
        outcome = await llm.complete(system, reply.source_text or reply.text)
        if isinstance(outcome, LLMReply):
            return store.NewMessage("bot", reply.kind, outcome.text, "llm", model=outcome.model,
                                    latency_ms=outcome.latency_ms)
        return offline(reply, outcome.reason)

    made = iter(await asyncio.gather(*(written(r, i) for i, r in enumerate(wanted))))
    return [next(made) if r.llm_task else offline(r) for r in step.replies]


def _turn_response(study: Study, participant: Any, rows: list[Any], values: Mapping[str, str],
                   expects: str | None = None, repeat: bool = False) -> Response:
    if expects is None:
        # A repeated request: what comes next follows from the last reply it got.
        kinds = [row["kind"] for row in rows]
        expects = "done" if "thanks" in kinds else "email" if ("closing" in kinds or "email_retry" in kinds) else "message"
    body: dict[str, Any] = {"replies": [_stored_reply(row, study, values) for row in rows], "expects": expects}
    redirect = recruitment.completion_redirect(study, values) if expects == "done" else None
    if redirect is not None:
        body["redirect"] = redirect
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


async def healthz(request: Request) -> Response:
    res = _resources(request)
    ok = await res.store.read(store.ping)
    return JSONResponse({"status": "ok" if ok else "error", "pid": os.getpid(),
                         "classifier": res.classifier is not None})


async def index(request: Request) -> Response:
    # A GET never creates a session: link-preview bots may open the study URL.
    return FileResponse(static_dir() / "index.html", headers={"Cache-Control": "no-cache"})


# --- errors -------------------------------------------------------------------------------------

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
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": "something went wrong on the server; please try again"}, status_code=500)


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


# --- the factory ----------------------------------------------------------------------------------

def create_app(config_path: str | None = None, database: str | None = None, study: Study | None = None) -> Starlette:
    """Build the app. Hypercorn workers call this by name (`combot.web:create_app()`): it reads
    COMBOT_CONFIG and COMBOT_DB when no arguments are given; nothing heavy happens until the lifespan."""
    if study is None:
        study = load_study(config_path or os.environ.get("COMBOT_CONFIG") or None)
    db_path = database or study.settings["server.database"]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        handle = store.Store(db_path)
        await handle.open()
        loop = asyncio.get_running_loop()
        inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="combot-classify")
        classifier = await loop.run_in_executor(inference, load_classifier, study)
        app.state.resources = Resources(study, handle, classifier, inference,
                                        RateLimiter(study.settings["server.rate_limit"], 60.0),
                                        llm=create_llm(study.settings))
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
        Route("/", index),
        Route("/healthz", healthz),
        Route("/api/sessions", create_session, methods=["POST"]),
        Route("/api/sessions/{session_id}", get_session),
        Route("/api/sessions/{session_id}/messages", post_message, methods=["POST"]),
        *consent.routes(),
        *admin.routes(),
        Mount("/static", StaticFiles(directory=static_dir()), name="static"),
    ]
    middleware = [
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
