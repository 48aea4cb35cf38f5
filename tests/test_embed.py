"""The chat inside another site's page: only the chat page may be framed, only by the listed origins."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from starlette.testclient import TestClient

from combot.errors import ConfigError
from combot.study import load_study
from tests.inprocess import Client, client_factory, finish

QUALTRICS = {"COMBOT_FRAME_ANCESTORS": "https://*.qualtrics.com,https://survey.example.edu:8443"}


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_app: Callable[..., TestClient]) -> Client:
    return client_factory(tmp_path, monkeypatch, started_app)


def test_by_default_nothing_may_frame_anything(client: Client) -> None:
    c = client()
    for path in ("/", "/admin", "/api/consent", "/static/chat.js"):
        response = c.get(path)
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"], path
        assert response.headers["x-frame-options"] == "DENY", path
    session = c.post("/api/sessions", json={}).json()
    final = finish(c, session["session_id"])
    assert "participant_id" not in final and "embed_origins" not in final


def test_listed_origins_may_frame_the_chat_page_only(client: Client, tmp_path: Path) -> None:
    c = client(environ=QUALTRICS)
    page = c.get("/?participant_label=R_abc")
    assert page.headers["content-security-policy"] == (
        "frame-ancestors 'self' https://*.qualtrics.com https://survey.example.edu:8443")
    assert "x-frame-options" not in page.headers
    for path in ("/admin", "/admin/login", "/api/consent", "/assets/x.svg"):
        response = c.get(path)
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"], path
        assert response.headers["x-frame-options"] == "DENY", path


def test_the_end_carries_the_participant_id_for_the_parent(client: Client, tmp_path: Path) -> None:
    import sqlite3

    c = client(environ=QUALTRICS)
    session = c.post("/api/sessions", params={"participant_label": "R_abc"}, json={}).json()
    assert session["embed_origins"] == ["https://*.qualtrics.com", "https://survey.example.edu:8443"]
    assert "participant_id" not in session
    final = finish(c, session["session_id"])
    with sqlite3.connect(tmp_path / "web.db") as conn:
        (stored,) = conn.execute("SELECT id FROM participants").fetchone()
    assert final["expects"] == "done" and final["participant_id"] == stored
    assert c.get(f"/api/sessions/{session['session_id']}").json()["participant_id"] == stored


def test_an_origin_that_is_not_one_names_the_line(study_file: Callable[..., Path]) -> None:
    path = study_file(append='\n[embed]\nframe_ancestors = ["https://*.qualtrics.com", "*"]\n')
    with pytest.raises(ConfigError) as error:
        load_study(path, environ={})
    assert "frame_ancestors" in str(error.value) and "'*' is not one" in str(error.value)
    assert f"line {len(path.read_text().splitlines())}:" in str(error.value)
