"""The participant API: create a session, send a message, read the transcript, health."""

from __future__ import annotations

import json
import os
import random
import secrets
import time
from dataclasses import replace
from typing import Any, Mapping

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from combot import accesslog, consent, embed, engine, openapi, recruitment, store, synthetic
from combot.assignment import choose_cell
from combot.errors import Conflict, ConsentRequired, NotFound, TooManyRequests
from combot.parsing import claimed_turn, client_key, client_message_id, message_text, read_json
from combot.replies import bot_messages, delays_ms, hold, start_early, timed
from combot.resources import static_dir
from combot.study import Study
from combot.worker import Resources, limit_starts, resources


def _stored_reply(row: Any, study: Study, link_values: Mapping[str, str]) -> dict[str, Any]:
    """A stored bot message as the page sees it: its text, and the survey link on the last one."""
    out: dict[str, Any] = {"text": row["text"]}
    link = engine.survey_link(study, link_values) if row["kind"] == "thanks" else None
    if link is not None:
        out["link"] = {"url": link.url, "label": link.label}
    return out


def _presentation(res: Resources, factors: Mapping[str, str]) -> dict[str, str]:
    shown = res.study.presentation(factors)
    out = {"name": shown["name"], "colour": shown["colour"]}
    # An opaque, relative name (assets/<hash>.svg): nothing the page fetches names a condition, and
    # a study under a proxy's sub-path finds it.
    logo = res.assets.url(shown["logo"]) if shown.get("logo") else None
    if logo:
        out["logo"] = logo
    return out


async def create_session(request: Request) -> Response:
    res = resources(request)
    data = await read_json(request, res.study.settings["server.max_body_bytes"])
    study = res.study
    # The page's idempotency key: a retry (lost response, reload of the tab) gets the same participant.
    key = client_key(data)
    # Which URL parameters are kept, and which one identifies a returning person: [recruitment].
    params = recruitment.captured_params(request.query_params, study.settings)
    platform_id = recruitment.platform_id(params, study.settings)
    consented = consent.given(data)
    is_synthetic = synthetic.is_synthetic(request.headers, request.app.state.admin_token.value)
    if key:
        known = await res.store.read(store.participant_by_client_key, key)
        if known is not None and known["status"] != "declined":
            # A retry: answered from the store, counted against no limit (concurrent first tries are
            # settled inside the write transaction of create_participant).
            return await _session_response(res, known)
    if study.settings["consent.enabled"] and not consented:
        returning = None
        if platform_id:
            returning = await res.store.read(store.participant_by_platform_id, platform_id)
        if returning is None:
            await res.store.read(store.refuse_when_closed)  # closed: no consent page to agree on
            raise ConsentRequired("please read the study information and agree before the chat starts")
        return await _session_response(res, returning)
    if not is_synthetic:  # `combot bench --url` may start many sessions from one machine
        limit_starts(request)
    participant_id = "p" + secrets.token_hex(6)
    token = secrets.token_urlsafe(24)
    rng = random.SystemRandom()

    def greet(factors: Mapping[str, str]) -> tuple[dict[str, Any], list[store.NewMessage]]:
        state, replies = engine.start(study, factors)
        messages = [store.NewMessage("bot", r.kind, r.text, r.produced_by) for r in replies]
        # The engine's decision is stored with the turn it ends (here turn 0, the greeting).
        messages[-1] = replace(messages[-1], stage=state.stage, expects=engine.expects(state))
        return state.to_dict(), messages

    row, created = await res.store.run(
        store.create_participant, participant_id=participant_id, token=token,
        choose_cell=lambda counts: choose_cell(study, counts, rng),
        greet=greet, user_agent=request.headers.get("user-agent", ""), url_params=params,
        platform_id=platform_id, fill=study.fill, active_minutes=study.active_minutes, consented=consented,
        client_key=key, study_version=study.version, synthetic=is_synthetic)
    return await _session_response(res, row, status=201 if created else 200)


async def _conversation(res: Resources, participant: Any) -> dict[str, Any]:
    """The transcript so far, what the server expects next and the turn number it expects."""
    study = res.study
    rows = await res.store.read(store.transcript, participant["id"])
    values = recruitment.link_values(participant)
    messages = []
    for row in rows:
        if row["sender"] == "bot":
            messages.append({"from": "bot", **_stored_reply(row, study, values)})
        else:
            messages.append({"from": "participant", "text": row["text"]})
    state = engine.State.from_dict(json.loads(participant["state"]))
    body: dict[str, Any] = {"messages": messages, "expects": engine.expects(state), "turn": participant["turns"] + 1}
    redirect = recruitment.completion_redirect(study, values) if body["expects"] == "done" else None
    if redirect is not None:
        body["redirect"] = redirect
    body.update(embed.page_fields(study.settings, participant, body["expects"] == "done"))
    return body


async def _session_response(res: Resources, participant: Any, status: int = 200) -> Response:
    study = res.study
    factors = json.loads(participant["factors"])
    body = {
        "session_id": participant["token"],
        **await _conversation(res, participant),
        "bot": _presentation(res, factors),
        "max_message_chars": study.settings["server.max_message_chars"],
    }
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


async def _stale(res: Resources, participant: Any, error: str) -> Response:
    """409: the message was written against a turn the conversation has left (another tab, or the end).

    The answer carries the conversation as it is, so the page can show it and keep what was typed.
    """
    body = {"error": error, **await _conversation(res, participant)}
    return JSONResponse(body, status_code=409, headers={"Cache-Control": "no-store"})


async def _participant(res: Resources, token: str, request: Request | None = None) -> Any:
    if not 10 <= len(token) <= 100:
        raise NotFound("no such session")
    row = await res.store.read(store.participant_by_token, token)
    if row is None:
        raise NotFound("no such session")
    if request is not None:  # the logs name the participant, never the token (combot/accesslog.py)
        request.scope[accesslog.SCOPE_KEY] = row["id"]
    return row


async def get_session(request: Request) -> Response:
    res = resources(request)
    participant = await _participant(res, request.path_params["session_id"], request)
    return await _session_response(res, participant)


async def post_message(request: Request) -> Response:
    started = time.perf_counter()
    res = resources(request)
    study = res.study
    token = request.path_params["session_id"]
    data = await read_json(request, study.settings["server.max_body_bytes"])
    text = message_text(data, study.settings["server.max_message_chars"])
    client_id = client_message_id(data)
    claimed = claimed_turn(data)
    participant = await _participant(res, token, request)
    values = recruitment.link_values(participant)

    # A repeat is answered from what was stored the first time, whatever the turn now is.
    if client_id is not None:
        earlier = await res.store.read(store.replies_to, participant["id"], client_id)
        if earlier is not None:  # stored when its first reply was due: answered at once
            return _turn_response(study, earlier, values, participant)
    if not res.limiter.allow(participant["id"]):
        raise TooManyRequests("you are sending messages too quickly; please wait a moment")

    state = engine.State.from_dict(json.loads(participant["state"]))
    if state.stage == "done":
        return await _stale(res, participant, "this conversation has ended")
    if claimed is not None and claimed != participant["turns"] + 1:
        return await _stale(res, participant, "this conversation has moved on in another window; here it is as it is now")
    factors = json.loads(participant["factors"])
    problem = scores = described = None
    attempt_scores: dict[str, float] | None = None
    seed = int.from_bytes(participant["id"].encode(), "big") % (2**32)
    # (A re-prompted opening needs no LLM: an early call started for it is cancelled below.)
    early = start_early(res, participant, factors, state, text, seed, values)
    try:
        if engine.needs_classification(state):
            verdict = await res.batcher.classify(text)
            problem, scores, described = verdict.label, verdict.scores, verdict.described
            # Every opening attempt keeps its scores, the opener head's P(experience) with them.
            attempt_scores = dict(scores) | ({"experience": verdict.experience} if verdict.experience is not None
                                             else {})
        step = engine.respond(study, factors, state, text, problem=problem, seed=seed, link_values=values,
                              described=described)
        replies = await timed(res, factors, await bot_messages(res, participant, factors, step, started, early),
                              started, classified=attempt_scores is not None)
    finally:
        if early is not None:
            early.cancel()  # not used (another prompt was needed) or the request failed: nobody waits for it
    # What a participant types at the e-mail step is personal data even when it is not a valid
    # address (a typo of one): only the emails table ever holds it.
    shown = text
    if state.stage == "email":
        shown = ("[e-mail address]" if step.email else "[no e-mail address given]" if step.email_declined
                 else "[not an e-mail address]")
    incoming = store.NewMessage("participant", "email" if state.stage == "email" else "message", shown,
                                client_message_id=client_id, stage=step.state.stage, expects=step.expects,
                                scores=attempt_scores)
    # A scripted reply waits for its designed moment as an LLM reply waits for the LLM; then both are
    # stored the same way and sent once on disk (nothing is lost if this worker dies after that).
    await hold(replies, started)
    try:
        stored = await res.store.run(store.record_turn, store.Turn(
            participant_id=participant["id"], expected_version=participant["version"],
            turn=participant["turns"] + 1,
            incoming=incoming, replies=replies, state=step.state.to_dict(),
            status="finished" if step.state.stage == "done" else "started",
            # Only the message that settled the opening fixes the problem type.
            problem_type=problem if step.settled_opening else None,
            scores=scores if step.settled_opening else None, email=step.email,
            described_experience=step.described_experience))
    except Conflict:
        # Another request (another tab) stored a turn first: this message answered a question
        # this conversation has left behind, so it is not stored.
        now = await res.store.read(store.participant_by_token, token)
        return await _stale(res, now, "this conversation has moved on in another window; here it is as it is now")
    return _turn_response(study, stored, values, participant)


def _turn_response(study: Study, stored: store.StoredTurn, values: Mapping[str, str], participant: Any) -> Response:
    # What comes next is what the engine decided for this turn, stored with it.
    expects = stored.message["expects"]
    replies = [{**_stored_reply(row, study, values), "delay_ms": delay}
               for row, delay in zip(stored.replies, delays_ms(stored.replies))]
    body: dict[str, Any] = {"replies": replies,
                            "expects": expects, "turn": stored.next_turn}
    redirect = recruitment.completion_redirect(study, values) if expects == "done" else None
    if redirect is not None:
        body["redirect"] = redirect
    body.update(embed.page_fields(study.settings, participant, expects == "done"))
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


async def healthz(request: Request) -> Response:
    res = resources(request)
    ok = await res.store.read(store.ping)
    return JSONResponse({"status": "ok" if ok else "error", "pid": os.getpid(),
                         "classifier": res.classifier is not None})


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi.document(), headers={"Cache-Control": "no-cache"})


async def index(request: Request) -> Response:
    # A GET never creates a session: link-preview bots may open the study URL.
    headers = {"Cache-Control": "no-cache", **embed.page_headers(resources(request).study.settings)}
    return FileResponse(static_dir() / "index.html", headers=headers)


def routes() -> list[Route]:
    return [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/openapi.json", openapi_json),
        Route("/api/sessions", create_session, methods=["POST"]),
        Route("/api/sessions/{session_id}", get_session),
        Route("/api/sessions/{session_id}/messages", post_message, methods=["POST"]),
    ]
