"""The published contract of the HTTP API: an OpenAPI 3.1 description, served at /openapi.json.

The schemas here are the one description of what the endpoints answer. Tests hold the code to
them: every response the test suite's in-process clients receive is checked against its schema
(`tests/openapi_check.py`), and schemathesis attacks a real multi-worker server with this
document. Response objects are closed (`additionalProperties: false`), so a field added to a
response without being described here fails the tests, as does one described but never sent.
"""

from __future__ import annotations

from typing import Any

from combot import __version__
from combot.errors import (
    BadRequest,
    CollectionClosed,
    CombotError,
    Conflict,
    ConsentRequired,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    Unprocessable,
)

JSON = "application/json"
CLIENT_KEY_PATTERN = r"^[A-Za-z0-9_-]{16,100}$"


def _closed(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False, **extra}
    if required:
        out["required"] = required
    return out


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


# What an answer adds when [embed] frame_ancestors is set: whom the page may tell, and at the end what.
_EMBED = {
    "embed_origins": {"type": "array", "items": {"type": "string"},
                      "description": "Origins allowed to frame the chat ([embed] frame_ancestors); the page "
                                     "posts combot:done only to a parent of one of them."},
    "participant_id": {"type": "string", "description": "When the conversation is done and embedding is "
                                                        "configured: the id the survey link also carries."},
}

_LINK = _closed({"url": {"type": "string"}, "label": {"type": "string"}}, ["url", "label"])

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _closed({
        "error": {"type": "string", "description": "What went wrong, in words a participant can read."},
    }, ["error"]),
    "Link": _LINK,
    "Redirect": _closed({
        "url": {"type": "string", "description": "The completion URL (e.g. Prolific's), ids filled in."},
        "label": {"type": "string"},
        "after_seconds": {"type": ["integer", "null"], "minimum": 0,
                          "description": "Follow the URL after this many seconds; null: only show it "
                                         "(a survey link comes first)."},
    }, ["url", "label", "after_seconds"]),
    "Bot": _closed({
        "name": {"type": "string"},
        "colour": {"type": "string"},
        "logo": {"type": "string", "description": "A URL relative to the chat page; names no condition."},
    }, ["name", "colour"]),
    "Expects": {"type": "string", "enum": ["message", "email", "done"],
                "description": "What the server waits for next: a chat message, an e-mail address, or nothing."},
    "TranscriptMessage": _closed({
        "from": {"type": "string", "enum": ["bot", "participant"]},
        "text": {"type": "string"},
        "link": _ref("Link"),
    }, ["from", "text"]),
    "Session": _closed({
        "session_id": {"type": "string", "minLength": 10, "maxLength": 100,
                       "description": "The participant's secret; the only key to this conversation."},
        "messages": {"type": "array", "items": _ref("TranscriptMessage")},
        "expects": _ref("Expects"),
        "turn": {"type": "integer", "minimum": 1,
                 "description": "The turn the server now expects; send it back with the next message."},
        "bot": _ref("Bot"),
        "max_message_chars": {"type": "integer", "minimum": 1},
        "redirect": _ref("Redirect"),
        **_EMBED,
    }, ["session_id", "messages", "expects", "turn", "bot", "max_message_chars"]),
    "NewSession": _closed({
        "consent": {"type": "boolean", "description": "true: the participant agreed on the consent page."},
        "client_key": {"type": "string", "pattern": CLIENT_KEY_PATTERN,
                       "description": "Made by the page before its first request and kept for the tab: the "
                                      "same key always returns the same participant (201, then 200)."},
    }),
    "NewMessage": _closed({
        "text": {"type": "string", "minLength": 1, "description": "At most max_message_chars characters."},
        "client_message_id": {"type": "string", "minLength": 1, "maxLength": 100,
                              "description": "A retry with the same id gets the stored replies and stores "
                                             "nothing twice."},
        "turn": {"type": "integer", "minimum": 1,
                 "description": "The turn this message answers (from the last response); a stale one is a 409."},
    }, ["text"]),
    "Reply": _closed({
        "text": {"type": "string"},
        "link": _ref("Link"),
        "delay_ms": {"type": "integer", "minimum": 0,
                     "description": "When to show this reply: milliseconds after the first reply of the answer is "
                                    "shown (0 for the first; the server already held the answer until then)."},
    }, ["text"]),
    "TurnResult": _closed({
        "replies": {"type": "array", "items": _ref("Reply")},
        "expects": _ref("Expects"),
        "turn": {"type": "integer", "minimum": 1},
        "redirect": _ref("Redirect"),
        **_EMBED,
    }, ["replies", "expects", "turn"]),
    "StaleTurn": _closed({
        "error": {"type": "string"},
        "turn": {"type": "integer", "minimum": 1},
        "expects": _ref("Expects"),
        "messages": {"type": "array", "items": _ref("TranscriptMessage")},
        "redirect": _ref("Redirect"),
        **_EMBED,
    }, ["error", "turn", "expects", "messages"]),
    "Consent": _closed({
        "enabled": {"type": "boolean"},
        "title": {"type": "string"},
        "paragraphs": {"type": "array", "items": {"type": "string"}},
        "agree_label": {"type": "string"},
        "decline_label": {"type": "string"},
        "declined_text": {"type": "string"},
    }, ["enabled", "title", "paragraphs", "agree_label", "decline_label", "declined_text"]),
    "NewDecline": _closed({
        "client_key": {"type": "string", "pattern": CLIENT_KEY_PATTERN},
    }),
    "Declined": _closed({
        "declined": {"type": "boolean", "const": True},
        "text": {"type": "string"},
        "embed_origins": _EMBED["embed_origins"],
    }, ["declined", "text"]),
    "Health": _closed({
        "status": {"type": "string", "enum": ["ok", "error"]},
        "pid": {"type": "integer"},
        "classifier": {"type": "boolean"},
    }, ["status", "pid", "classifier"]),
    "Stats": {"type": "object", "description": "The dashboard's numbers (cells, funnel, problem types, "
                                               "reply times, errors, memory, warnings).",
              "required": ["generated_at", "cells", "totals", "funnel", "warnings"]},
}

# Which error each status stands for, from the one exception hierarchy (errors.py).
_ERRORS: dict[int, type[CombotError]] = {
    cls.status_code: cls for cls in (BadRequest, CollectionClosed, Unauthorized, ConsentRequired, NotFound,
                                     Conflict, PayloadTooLarge, Unprocessable, TooManyRequests, Unavailable)
}


def _error(status: int, schema: str = "Error", description: str | None = None) -> dict[str, Any]:
    text = description or (_ERRORS[status].__doc__ or "").strip()
    return {"description": text, "content": {JSON: {"schema": _ref(schema)}}}


def _json(schema: str, description: str, links: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {JSON: {"schema": _ref(schema)}}}
    if links:
        out["links"] = links
    return out


def _body(schema: str, required: bool = False) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": _ref(schema)}}}


_SESSION_ID = {"name": "session_id", "in": "path", "required": True,
               "schema": {"type": "string", "minLength": 1, "maxLength": 200}}
_FOLLOW_SESSION = {
    "GetSession": {"operationId": "getSession", "parameters": {"session_id": "$response.body#/session_id"}},
    "SendMessage": {"operationId": "sendMessage", "parameters": {"session_id": "$response.body#/session_id"}},
}
_RECRUITMENT = [
    {"name": name, "in": "query", "required": False, "schema": {"type": "string", "maxLength": 200},
     "description": "Kept when listed in [recruitment] params (personal data)."}
    for name in ("PROLIFIC_PID", "STUDY_ID", "SESSION_ID")
]
_BUSY = _error(503, description="The database is busy or the disk is full: nothing was stored; send it again.")


def _paths() -> dict[str, Any]:
    return {
        "/api/sessions": {"post": {
            "operationId": "createSession", "tags": ["participant"],
            "summary": "Start a conversation (or resume one: same client_key, or a returning platform id).",
            "parameters": _RECRUITMENT, "requestBody": _body("NewSession"),
            "responses": {
                "201": _json("Session", "A new participant, assigned to a cell, with the greeting.", _FOLLOW_SESSION),
                "200": _json("Session", "An existing participant resumed (same client_key or platform id).",
                             _FOLLOW_SESSION),
                "410": _error(410), "400": _error(400), "403": _error(403, description="Consent is required first, collection has closed, "
                                                                    "or an X-Combot-Synthetic header does not match."),
                "413": _error(413), "429": _error(429), "503": _BUSY,
            }}},
        "/api/sessions/{session_id}": {"get": {
            "operationId": "getSession", "tags": ["participant"], "parameters": [_SESSION_ID],
            "summary": "The transcript so far and what comes next (a reloaded page resumes from it).",
            "responses": {"200": _json("Session", "The session."), "404": _error(404), "503": _BUSY}}},
        "/api/sessions/{session_id}/messages": {"post": {
            "operationId": "sendMessage", "tags": ["participant"], "parameters": [_SESSION_ID],
            "summary": "Send the participant's message; the replies come after everything is on disk.",
            "requestBody": _body("NewMessage", required=True),
            "responses": {
                "200": _json("TurnResult", "The bot's replies (the stored ones again for a repeated client id)."),
                "400": _error(400), "404": _error(404),
                "409": _error(409, "StaleTurn", "The conversation has ended, or the message answers a turn "
                                                "that is no longer current: the body carries the transcript."),
                "410": _error(410), "413": _error(413), "422": _error(422), "429": _error(429), "503": _BUSY,
            }}},
        "/api/consent": {"get": {
            "operationId": "getConsent", "tags": ["participant"],
            "summary": "What the consent page shows; creates nothing.",
            "responses": {"200": _json("Consent", "The consent page.")}}},
        "/api/declines": {"post": {
            "operationId": "decline", "tags": ["participant"],
            "summary": "Record that a person declined on the consent page (no cell is used).",
            "parameters": _RECRUITMENT, "requestBody": _body("NewDecline"),
            "responses": {"201": _json("Declined", "Recorded."), "200": _json("Declined", "Recorded before "
                                                                                           "(same client_key)."),
                          "400": _error(400), "404": _error(404, description="The study has no consent page."),
                          "409": _error(409, description="This client_key already started a session."),
                          "410": _error(410),
                          "413": _error(413), "503": _BUSY}}},
        "/healthz": {"get": {
            "operationId": "health", "tags": ["participant"],
            "summary": "200 when this worker reaches its database and its classifier is loaded.",
            "responses": {"200": _json("Health", "Healthy."), "503": _BUSY}}},
        "/admin/api/stats": {"get": {
            "operationId": "adminStats", "tags": ["admin"], "security": [{"bearer": []}],
            "summary": "The dashboard's numbers as JSON.",
            "responses": {"200": _json("Stats", "The numbers."), "401": _error(401)}}},
        "/admin/export.zip": {"get": {
            "operationId": "adminExport", "tags": ["admin"], "security": [{"bearer": []}],
            "summary": "The export (CSV or JSON lines, codebook) as a zip.",
            "parameters": [
                {"name": "anonymise", "in": "query", "required": False, "schema": {"type": "string",
                                                                                   "enum": ["1", "0"]}},
                {"name": "format", "in": "query", "required": False, "schema": {"type": "string",
                                                                                "enum": ["csv", "jsonl"]}},
            ],
            "responses": {"200": {"description": "A zip file.",
                                  "content": {"application/zip": {"schema": {"type": "string",
                                                                             "format": "binary"}}}},
                          "401": _error(401)}}},
    }


def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Combot participant API", "version": __version__,
            "description": "Start a conversation, send messages, read the transcript. Every error is "
                           "`{\"error\": \"...\"}`. Researchers' endpoints need the admin token as a "
                           "bearer token. A request whose Host header is not one of `[server] trusted_hosts` "
                           "gets Starlette's plain-text 400 before it reaches the API.",
        },
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "The admin token (COMBOT_ADMIN_TOKEN, or "
                                                          "<database>.admin-token)."}},
        },
        "tags": [{"name": "participant", "description": "What the chat page (or any front end) uses."},
                 {"name": "admin", "description": "The researcher's side; bearer token required."}],
    }
