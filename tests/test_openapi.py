"""The published contract: /openapi.json, and schemathesis attacking a real multi-worker server with it.

Every in-process response of the whole suite is also checked against the document
(tests/openapi_check.py, hooked into the test clients in conftest.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
from starlette.testclient import TestClient

from bench.schemathesis_run import TOKEN, run_schemathesis
from combot import errors, openapi
from tests.conftest import LiveServer
from tests.inprocess import Client, client_factory
from tests.openapi_check import check


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_app: Callable[..., TestClient]) -> Client:
    return client_factory(tmp_path, monkeypatch, started_app)


def test_the_document_is_served_and_is_openapi_3_1(client: Client) -> None:
    c = client()
    response = c.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"] == "3.1.0"
    assert document == json.loads(json.dumps(openapi.document()))
    operations = {op["operationId"] for item in document["paths"].values() for op in item.values()}
    assert {"createSession", "getSession", "sendMessage", "getConsent", "decline", "health", "adminStats",
            "adminExport"} <= operations


def test_every_status_the_error_hierarchy_can_answer_is_documented_somewhere() -> None:
    documented = {int(code) for item in openapi.document()["paths"].values() for op in item.values()
                  for code in op["responses"]}
    statuses = {cls.status_code for cls in _subclasses(errors.CombotError)} - {500}
    assert statuses <= documented, statuses - documented


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_subclasses(sub)}
    return out


def test_the_checker_fails_a_response_that_leaves_its_schema() -> None:
    # The check the whole suite relies on must be able to fail: an undeclared field, a missing
    # required one, a wrong type, an undocumented status.
    good = {"replies": [{"text": "hi"}], "expects": "message", "turn": 2}
    check("POST", "/api/sessions/abc/messages", 200, "application/json", json.dumps(good).encode())
    for bad in ({**good, "cell": "basic-high-low"}, {"replies": []}, {**good, "expects": "later"},
                {**good, "replies": [{"text": 3}]}):
        with pytest.raises(AssertionError, match="leaves its schema"):
            check("POST", "/api/sessions/abc/messages", 200, "application/json", json.dumps(bad).encode())
    with pytest.raises(AssertionError, match="not documented"):
        check("GET", "/api/sessions/abc", 418, "application/json", b'{"error": "teapot"}')


def test_the_session_links_lead_to_the_operations_that_take_its_id() -> None:
    paths = openapi.document()["paths"]
    links = paths["/api/sessions"]["post"]["responses"]["201"]["links"]
    assert {link["operationId"] for link in links.values()} == {"getSession", "sendMessage"}
    assert all(link["parameters"] == {"session_id": "$response.body#/session_id"} for link in links.values())


@pytest.mark.slow
@pytest.mark.parametrize("consent", [False, True], ids=["open", "consent"])
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
        live_server: Callable[..., LiveServer], study_file: Callable[..., Path], tmp_path: Path, consent: bool) -> None:
    """The independent fuzzer against the real 2-worker server: 0 5xx, every status and body as documented.

    The CI-sized run; bench/schemathesis_run.py runs the >= 10,000-request one.
    """
    config = study_file(append="", name="study.toml")
    env = {**os.environ, "COMBOT_ADMIN_TOKEN": TOKEN, "COMBOT_RATE_LIMIT": "0",
           "COMBOT_CONSENT": "true" if consent else "false"}
    server = live_server(workers=2, config=config, env=env)
    outcome = run_schemathesis(server.url, tmp_path, max_examples=60 if consent else 150, timeout=1200)
    statuses = outcome["statuses"]
    assert outcome["returncode"] == 0, outcome["output"][-6000:]
    assert sum(statuses.values()) > 500, statuses
    assert not [code for code in statuses if code >= 500], statuses
    assert statuses[201] > 0 and statuses[200] > 0, statuses  # it got past validation to real work


def test_the_readme_example_client_uses_only_documented_operations() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    start = readme.index("```js")
    example = readme[start:readme.index("```", start + 5)]
    assert len(example.splitlines()) <= 40
    paths = openapi.document()["paths"]
    assert '"POST", "api/sessions"' in example and "/api/sessions" in paths
    assert "`api/sessions/${s.session_id}/messages`" in example and "/api/sessions/{session_id}/messages" in paths
    assert "client_message_id" in example and "turn" in example


@pytest.mark.slow
def test_a_whole_conversation_over_the_wire_stays_in_its_schema(live_server: Callable[..., LiveServer]) -> None:
    server = live_server(workers=2)
    with httpx.Client(timeout=30, event_hooks={"response": [_check_wire]}) as http:
        created = http.post(server.url + "api/sessions", json={})
        session = created.json()
        expects, n = session["expects"], 0
        while expects != "done":
            text = "someone@example.com" if expects == "email" else f"my parcel was lost, part {n}"
            body: dict[str, Any] = {"text": text, "client_message_id": f"m{n}"}
            reply = http.post(f"{server.url}api/sessions/{session['session_id']}/messages", json=body)
            assert reply.status_code == 200, reply.text
            expects, n = reply.json()["expects"], n + 1
        assert http.get(f"{server.url}api/sessions/{session['session_id']}").json()["expects"] == "done"
        assert http.post(f"{server.url}api/sessions/{session['session_id']}/messages",
                         json={"text": "one more"}).status_code == 409


def _check_wire(response: httpx.Response) -> None:
    response.read()
    check(response.request.method, response.request.url.path, response.status_code,
          response.headers.get("content-type", ""), response.content)
