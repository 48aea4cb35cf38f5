"""The HTTP API, in-process through Starlette's TestClient (the lifespan runs, with the real model)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Callable

import pytest
from starlette.testclient import TestClient

from combot.study import load_study
from tests.conftest import DEFAULT_STUDY

Client = Callable[..., TestClient]


@pytest.fixture
def client(tmp_path: Path, started_app: Callable[..., TestClient]) -> Client:
    """A factory: client(study_path=None, environ=None) -> a TestClient on a fresh database."""
    def make(study_path: Path | None = None, environ: dict[str, str] | None = None) -> TestClient:
        return started_app(load_study(study_path or DEFAULT_STUDY, environ=environ or {}), tmp_path / "web.db")
    return make


def db(tmp_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(tmp_path / "web.db")
    conn.row_factory = sqlite3.Row
    return conn


def start(c: TestClient, **params: str) -> dict:
    response = c.post("/api/sessions", params=params, json={})
    assert response.status_code in (200, 201), response.text
    return response.json()


def send(c: TestClient, session: str, text: str, client_id: str | None = None) -> dict:
    body = {"text": text} | ({"client_message_id": client_id} if client_id else {})
    response = c.post(f"/api/sessions/{session}/messages", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_whole_conversation_is_stored_message_by_message(client: Client, tmp_path: Path) -> None:
    c = client()
    session = start(c)
    assert session["expects"] == "message" and len(session["messages"]) == 1
    assert set(session) == {"session_id", "messages", "expects", "bot", "max_message_chars", "turn"}
    shown = [m["text"] for m in session["messages"]]
    answer = send(c, session["session_id"], "The courier left my parcel in the rain and it was soaked.")
    shown += [r["text"] for r in answer["replies"]]
    while answer["expects"] == "message":
        answer = send(c, session["session_id"], "They never replied to my emails about it.")
        shown += [r["text"] for r in answer["replies"]]
    assert answer["expects"] == "email"
    retry = send(c, session["session_id"], "not-an-email")
    assert retry["expects"] == "email"
    final = send(c, session["session_id"], "zq.participant@example.org")
    assert final["expects"] == "done"
    link = final["replies"][-1]["link"]
    assert link["url"].startswith("https://") and "pid=p" in link["url"] and "zq.participant" not in link["url"].split("?")[1]
    shown += [r["text"] for r in retry["replies"] + final["replies"]]

    conn = db(tmp_path)
    participant = conn.execute("SELECT * FROM participants").fetchone()
    assert participant["status"] == "finished" and participant["finished_at"]
    assert participant["problem_type"] in ("A", "B", "C", "Other")
    scores = json.loads(participant["scores"])
    assert set(scores) == {"A", "B", "C", "Other"} and abs(sum(scores.values()) - 1) < 1e-4
    stored_bot = [r["text"] for r in conn.execute("SELECT text FROM messages WHERE sender='bot' ORDER BY id")]
    assert stored_bot == shown
    assert conn.execute("SELECT email FROM emails").fetchone()[0] == "zq.participant@example.org"
    assert "zq.participant@example.org" not in json.dumps([dict(r) for r in conn.execute("SELECT * FROM messages")])

    late = c.post(f"/api/sessions/{session['session_id']}/messages", json={"text": "hello?"})
    assert late.status_code == 409 and "error" in late.json()


def test_the_condition_never_reaches_the_participant(client: Client) -> None:
    c = client()
    session = start(c)
    text = json.dumps(session)
    for secret in ("think", "feel", "brand", "high", "low", "cell", "condition"):
        assert secret not in text.lower().replace("bramble", "")
    resumed = c.get(f"/api/sessions/{session['session_id']}").json()
    assert resumed["messages"] == session["messages"]


def test_a_refresh_resumes_the_same_conversation(client: Client) -> None:
    c = client()
    session = start(c)
    send(c, session["session_id"], "My phone screen cracked on day one without being dropped.")
    resumed = c.get(f"/api/sessions/{session['session_id']}").json()
    assert [m["from"] for m in resumed["messages"]] == ["bot", "participant", "bot"]
    assert resumed["expects"] == "message"


def test_a_retried_message_is_answered_once(client: Client, tmp_path: Path) -> None:
    c = client()
    session = start(c)
    first = send(c, session["session_id"], "The waiter laughed at me when I asked for the bill.", "id-1")
    again = send(c, session["session_id"], "The waiter laughed at me when I asked for the bill.", "id-1")
    assert first == again
    assert db(tmp_path).execute("SELECT count(*) FROM messages WHERE sender='participant'").fetchone()[0] == 1


def test_a_returning_prolific_id_resumes(client: Client, tmp_path: Path) -> None:
    c = client()
    first = c.post("/api/sessions", params={"PROLIFIC_PID": "pp1", "STUDY_ID": "s"}, json={})
    again = c.post("/api/sessions", params={"PROLIFIC_PID": "pp1"}, json={})
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["session_id"] == again.json()["session_id"]
    row = db(tmp_path).execute("SELECT url_params FROM participants").fetchone()
    assert json.loads(row[0]) == {"PROLIFIC_PID": "pp1", "STUDY_ID": "s"}


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    (b'{"text": 5}', 400),
    (b'{"nothing": 1}', 400),
    (b'{"text": "   "}', 422),
    (json.dumps({"text": "x" * 2001}).encode(), 413),
    (b'{"text": "' + b"x" * 17000 + b'"}', 413),
    (b'{"text": "\xff\xfe"}', 400),
    (b"[" * 100000 + b"]" * 100000, 413),
    (b'{"text": "hi", "client_message_id": 7}', 400),
])
def test_bad_input_gets_a_4xx_with_a_message(client: Client, body: bytes, status: int) -> None:
    c = client()
    session = start(c)
    response = c.post(f"/api/sessions/{session['session_id']}/messages", content=body,
                      headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"]


def test_deep_json_within_the_size_limit_is_a_400(client: Client) -> None:
    c = client()
    session = start(c)
    body = b"[" * 5000 + b"]" * 5000
    response = c.post(f"/api/sessions/{session['session_id']}/messages", content=body)
    assert response.status_code == 400


def test_unknown_sessions_are_404(client: Client) -> None:
    c = client()
    assert c.get("/api/sessions/nope-nope-nope-nope").status_code == 404
    assert c.post("/api/sessions/nope-nope-nope-nope/messages", json={"text": "hi"}).status_code == 404
    assert c.get("/api/sessions/x").json()["error"]


def test_health_and_page(client: Client) -> None:
    c = client()
    assert c.get("/healthz").json()["status"] == "ok"
    page = c.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert c.get("/static/../combot.toml").status_code == 404
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"


def test_an_invalid_email_attempt_is_not_stored_as_text(client: Client, tmp_path: Path) -> None:
    c = client()
    session = start(c)
    answer = send(c, session["session_id"], "My order never arrived and nobody answered the phone.")
    while answer["expects"] == "message":
        answer = send(c, session["session_id"], "It was a long time ago.")
    assert send(c, session["session_id"], "jane.doe@gmail")["expects"] == "email"
    texts = [r[0] for r in db(tmp_path).execute("SELECT text FROM messages WHERE kind = 'email'")]
    assert texts == ["[not an e-mail address]"]


def test_hosts_outside_the_trusted_list_are_refused(client: Client) -> None:
    c = client(environ={"COMBOT_TRUSTED_HOSTS": "study.example.org"})
    assert c.get("/healthz").status_code == 400
    assert c.get("/healthz", headers={"host": "study.example.org"}).status_code == 200


def test_flooding_is_rate_limited_per_participant(client: Client) -> None:
    c = client(environ={"COMBOT_RATE_LIMIT": "3"})
    one, two = start(c), start(c)
    codes = [c.post(f"/api/sessions/{one['session_id']}/messages", json={"text": "spam spam"}).status_code
             for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
    assert c.post(f"/api/sessions/{two['session_id']}/messages", json={"text": "My order never came."}).status_code == 200


def test_get_never_creates_a_session(client: Client, tmp_path: Path) -> None:
    c = client()
    c.get("/")
    c.get("/?PROLIFIC_PID=abc")
    assert c.get("/api/sessions").status_code == 405
    assert db(tmp_path).execute("SELECT count(*) FROM participants").fetchone()[0] == 0


def test_a_declined_email_finishes_without_an_address(client: Client, tmp_path: Path,
                                                      study_file: Callable[..., Path]) -> None:
    c = client(study_file({"email_skip_words = []": 'email_skip_words = ["skip"]'}))
    session = start(c)
    answer = send(c, session["session_id"], "The shop assistant shouted at me in front of everyone.")
    while answer["expects"] == "message":
        answer = send(c, session["session_id"], "It was last week.")
    final = send(c, session["session_id"], "Skip")
    assert final["expects"] == "done" and final["replies"][-1]["link"]["url"].startswith("https://")
    conn = db(tmp_path)
    assert [r[0] for r in conn.execute("SELECT text FROM messages WHERE kind = 'email'")] == ["[no e-mail address given]"]
    assert conn.execute("SELECT count(*) FROM emails").fetchone()[0] == 0
    assert conn.execute("SELECT status FROM participants").fetchone()[0] == "finished"
