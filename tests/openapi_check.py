"""Hold every response to the published contract (combot/openapi.py).

`check(method, path, status, content_type, body)` raises AssertionError when a documented operation
answers with a status it does not document, or with a body that leaves the status's schema. The
in-process test clients run it on every response (tests/conftest.py), so the whole suite checks
the description against the code that builds the responses.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

import httpx
import jsonschema_rs

from combot import openapi


@lru_cache(maxsize=1)
def _operations() -> list[tuple[re.Pattern[str], str, dict[str, Any]]]:
    out = []
    for template, item in openapi.document()["paths"].items():
        pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$")
        for method, operation in item.items():
            out.append((pattern, method.upper(), operation))
    return out


@lru_cache(maxsize=None)
def _validator(ref: str) -> Any:
    document = openapi.document()
    return jsonschema_rs.Draft202012Validator({"$ref": ref, "components": document["components"]})


def operation_for(method: str, path: str) -> dict[str, Any] | None:
    for pattern, verb, operation in _operations():
        if verb == method.upper() and pattern.match(path):
            return operation
    return None


def check(method: str, path: str, status: int, content_type: str, body: bytes, host_refused: bool = False) -> None:
    operation = operation_for(method, path)
    if operation is None:
        return  # an undocumented path or method (pages, static files): not part of the API contract
    where = f"{method} {path} -> {status}"
    if host_refused:
        return  # Starlette's TrustedHostMiddleware answers before the API (the document's description says so)
    if status == 500:
        # Never designed, so never documented (schemathesis's not_a_server_error hunts for them); the
        # tests that break the server on purpose still get the one error shape.
        _validator("#/components/schemas/Error").validate(json.loads(body))
        return
    response = operation["responses"].get(str(status))
    assert response is not None, (f"{where}: status {status} is not documented for {operation['operationId']} "
                                  "in combot/openapi.py")
    content = response.get("content", {})
    media = content_type.split(";")[0].strip()
    assert media in content, f"{where}: content type {media!r} is not documented ({sorted(content)})"
    schema = content[media].get("schema", {})
    if media != "application/json" or "$ref" not in schema:
        return
    data = json.loads(body)
    errors = [f"{e.message} at {'/'.join(map(str, e.instance_path)) or '(root)'}"
              for e in _validator(schema["$ref"]).iter_errors(data)]
    assert not errors, f"{where}: the response leaves its schema in combot/openapi.py: {errors}; body {data}"


def check_response(response: httpx.Response) -> None:
    """An httpx response hook: read the body and check it."""
    response.read()
    request = response.request
    refused = response.status_code == 400 and response.headers.get("content-type", "").startswith("text/plain")
    check(request.method, request.url.path, response.status_code, response.headers.get("content-type", ""),
          response.content, host_refused=refused and response.text == "Invalid host header")
