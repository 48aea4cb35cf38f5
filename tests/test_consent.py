"""The consent page: nothing is created before "I agree", a decline is recorded and fills no cell."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable

import pytest
from starlette.testclient import TestClient

from combot import store
from tests.inprocess import Client, client_factory

CONSENT = {"COMBOT_CONSENT": "true", "COMBOT_CONSENT_TEXT": "First paragraph.\n\nSecond\nparagraph."}


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_app: Callable[..., TestClient]) -> Client:
    return client_factory(tmp_path, monkeypatch, started_app)


def count(tmp_path: Path, where: str = "1") -> int:
    with sqlite3.connect(tmp_path / "web.db") as conn:
        return int(conn.execute(f"SELECT count(*) FROM participants WHERE {where}").fetchone()[0])


def test_the_page_learns_what_to_show_without_creating_anything(client: Client, tmp_path: Path) -> None:
    c = client(environ=CONSENT)
    for path in ("/", "/?PROLIFIC_PID=abc", "/api/consent", "/api/consent?PROLIFIC_PID=abc"):
        assert c.get(path).status_code == 200
    info = c.get("/api/consent").json()
    assert info["enabled"] is True and info["paragraphs"] == ["First paragraph.", "Second paragraph."]
    assert info["agree_label"] and info["decline_label"] and info["declined_text"] and info["title"]
    assert count(tmp_path) == 0


def test_a_session_starts_only_with_consent(client: Client, tmp_path: Path) -> None:
    c = client(environ=CONSENT)
    refused = c.post("/api/sessions", json={})
    assert refused.status_code == 403 and refused.json()["error"]
    assert c.post("/api/sessions", json={"consent": "yes"}).status_code == 400
    assert count(tmp_path) == 0
    agreed = c.post("/api/sessions", params={"PROLIFIC_PID": "pp-9"}, json={"consent": True})
    assert agreed.status_code == 201 and agreed.json()["expects"] == "message"
    with sqlite3.connect(tmp_path / "web.db") as conn:
        consented_at, status = conn.execute("SELECT consented_at, status FROM participants").fetchone()
    assert consented_at and consented_at.endswith("Z") and status == "started"
    # A returning platform id resumes without being asked again (e.g. a browser without storage).
    again = c.post("/api/sessions", params={"PROLIFIC_PID": "pp-9"}, json={})
    assert again.status_code == 200 and again.json()["session_id"] == agreed.json()["session_id"]


def test_a_decline_is_recorded_and_never_fills_a_cell(client: Client, tmp_path: Path) -> None:
    c = client(environ=CONSENT)
    for n in range(8):
        declined = c.post("/api/declines", params={"PROLIFIC_PID": f"no-{n}"})
        assert declined.status_code == 201 and declined.json()["text"]
    assert count(tmp_path, "status = 'declined' AND cell = ''") == 8
    for _ in range(8):
        assert c.post("/api/sessions", json={"consent": True}).status_code == 201
    conn = store.connect(tmp_path / "web.db")
    assert sorted(store.cell_counts(conn).values()) == [1] * 8
    # Someone who declined and then changes their mind gets a session, not the decline back.
    late = c.post("/api/sessions", params={"PROLIFIC_PID": "no-0"}, json={"consent": True})
    assert late.status_code == 201
    assert count(tmp_path, "platform_id = 'no-0'") == 2


def test_without_a_consent_page_nothing_changes(client: Client, tmp_path: Path) -> None:
    c = client()
    assert c.get("/api/consent").json()["enabled"] is False
    assert c.post("/api/sessions", json={}).status_code == 201
    assert c.post("/api/declines").status_code == 404
    with sqlite3.connect(tmp_path / "web.db") as conn:
        assert conn.execute("SELECT consented_at FROM participants").fetchone()[0] is None
