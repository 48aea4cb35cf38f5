"""The consent (or welcome) page before the chat, and declines.

`GET /api/consent` tells the page what to show; it never creates anything, so a link-preview bot
opening the study URL uses up no slot. Agreeing is `POST /api/sessions` with `{"consent": true}`.
Declining is `POST /api/declines`: a participant row with status "declined" and no cell, so the
researcher can report how many declined (and who, as personal data) while no cell counts them.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from combot import embed, recruitment, store, synthetic
from combot.errors import BadRequest, NotFound
from combot.parsing import client_key, read_json
from combot.study import Study
from combot.worker import limit_starts


def given(data: Mapping[str, Any]) -> bool:
    """Whether a request body says the participant agreed (`"consent": true`)."""
    value = data.get("consent", False)
    if not isinstance(value, bool):
        raise BadRequest("'consent' must be true or false")
    return value


def page(study: Study) -> dict[str, Any]:
    cfg = study.settings.section("consent")
    paragraphs = [" ".join(part.split()) for part in re.split(r"\n\s*\n", cfg["text"]) if part.strip()]
    return {"enabled": bool(cfg["enabled"]), "title": cfg["title"], "paragraphs": paragraphs,
            "agree_label": cfg["agree_label"], "decline_label": cfg["decline_label"],
            "declined_text": cfg["declined_text"]}


async def get_consent(request: Request) -> Response:
    study: Study = request.app.state.resources.study
    return JSONResponse(page(study), headers={"Cache-Control": "no-cache"})


async def post_decline(request: Request) -> Response:
    res = request.app.state.resources
    study: Study = res.study
    if not study.settings["consent.enabled"]:
        raise NotFound("this study has no consent page")
    data = await read_json(request, study.settings["server.max_body_bytes"])
    key = client_key(data)  # a retried decline (lost response) with the same key stores nothing new
    params = recruitment.captured_params(request.query_params, study.settings)
    is_synthetic = synthetic.is_synthetic(request.headers, request.app.state.admin_token.value)
    if not is_synthetic:
        limit_starts(request)
    _, created = await res.store.run(
        store.record_decline, participant_id="p" + secrets.token_hex(6), token=secrets.token_urlsafe(24),
        user_agent=request.headers.get("user-agent", ""), url_params=params,
        platform_id=recruitment.platform_id(params, study.settings), client_key=key,
        study_version=study.version, synthetic=is_synthetic)
    body = {"declined": True, "text": study.settings["consent.declined_text"],
            # An embedded page tells its survey that the person declined, so the survey can go on.
            **embed.page_fields(study.settings, None, done=False)}
    return JSONResponse(body, status_code=201 if created else 200, headers={"Cache-Control": "no-store"})


def routes() -> list[Route]:
    return [Route("/api/consent", get_consent), Route("/api/declines", post_decline, methods=["POST"])]
