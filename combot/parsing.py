"""Reading a participant's request: size limits, JSON that SQLite and the tokenizer can hold, fields."""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from starlette.requests import Request

from combot.errors import BadRequest, PayloadTooLarge, Unprocessable


async def read_json(request: Request, limit: int) -> dict[str, Any]:
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


def message_text(data: Mapping[str, Any], max_chars: int) -> str:
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


def client_message_id(data: Mapping[str, Any]) -> str | None:
    value = data.get("client_message_id")
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 100:
        raise BadRequest("'client_message_id' must be a string of 1 to 100 characters")
    return value


_CLIENT_KEY = re.compile(r"^[A-Za-z0-9_-]{16,100}$")


def client_key(data: Mapping[str, Any]) -> str | None:
    """The page's idempotency key for creating a session or a decline (16-100 URL-safe characters)."""
    value = data.get("client_key")
    if value is None:
        return None
    if not isinstance(value, str) or not _CLIENT_KEY.match(value):
        raise BadRequest("'client_key' must be a string of 16 to 100 characters from A-Z, a-z, 0-9, '-' and '_'")
    return value


def claimed_turn(data: Mapping[str, Any]) -> int | None:
    """The turn number the client believes the server expects (`"turn"`), or None when it sent none."""
    value = data.get("turn")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1_000_000:
        raise BadRequest("'turn' must be a whole number")
    return value
