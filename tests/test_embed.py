"""The chat inside another site's page: only the chat page may be framed, only by the listed origins."""

from __future__ import annotations

import http.server
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
from starlette.testclient import TestClient

from combot.errors import ConfigError
from combot.study import load_study
from tests.conftest import ROOT
from tests.inprocess import Client, client_factory, finish
from tests.test_page import browser, walk_to_the_end  # noqa: F401  (browser is a fixture)

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
    c = client(environ=QUALTRICS)
    session = c.post("/api/sessions", params={"participant_label": "R_abc"}, json={}).json()
    assert session["embed_origins"] == ["https://*.qualtrics.com", "https://survey.example.edu:8443"]
    assert "participant_id" not in session
    final = finish(c, session["session_id"])
    with sqlite3.connect(tmp_path / "web.db") as conn:
        (stored,) = conn.execute("SELECT id FROM participants").fetchone()
    assert final["expects"] == "done" and final["participant_id"] == stored
    assert c.get(f"/api/sessions/{session['session_id']}").json()["participant_id"] == stored


def test_without_embedding_a_decline_says_only_that(client: Client) -> None:
    consent = {"COMBOT_CONSENT": "true"}
    plain = client(environ=consent).post("/api/declines", json={}).json()
    assert set(plain) == {"declined", "text"}


def test_a_decline_carries_the_origins_when_embedded(client: Client) -> None:
    answer = client(environ={**QUALTRICS, "COMBOT_CONSENT": "true"}).post("/api/declines", json={}).json()
    assert answer["embed_origins"] == ["https://*.qualtrics.com", "https://survey.example.edu:8443"]
    assert "participant_id" not in answer


def test_an_origin_that_is_not_one_names_the_line(study_file: Callable[..., Path]) -> None:
    bad = 'frame_ancestors = ["https://*.qualtrics.com", "*"]'
    path = study_file(replace={"frame_ancestors = []": bad})
    with pytest.raises(ConfigError) as error:
        load_study(path, environ={})
    assert "frame_ancestors" in str(error.value) and "'*' is not one" in str(error.value)
    assert f"line {path.read_text().splitlines().index(bad) + 1}:" in str(error.value)


# --- in Chromium: a survey page on another origin frames the chat -----------------------------------

def readme_snippet() -> str:
    """The Qualtrics question JavaScript exactly as the README gives it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("```js\n", text.index("<!-- qualtrics-snippet -->")) + len("```js\n")
    return text[start:text.index("```", start)]


class SurveyPages:
    """A tiny web server on another loopback address, standing in for the survey site; `pages` maps a
    path to its HTML and may be filled in after it starts."""

    def __init__(self, host: str):
        self.pages: dict[str, str] = {}
        pages = self.pages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pages.get(self.path.split("?")[0], "").encode()
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.origin = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


SURVEY_PAGE = """<!doctype html><meta charset="utf-8"><title>Survey</title>
<script>
  // A stand-in for Qualtrics' question API, recording what the snippet does.
  window.calls = [];
  window.received = [];
  window.framed = false;
  window.addEventListener("message", function (event) { received.push({origin: event.origin, data: event.data}); });
  var question = {hideNextButton: function () { calls.push(["hideNextButton"]); },
                  showNextButton: function () { calls.push(["showNextButton"]); }};
  window.Qualtrics = {SurveyEngine: {addOnload: function (f) { f.call(question); },
                                     setEmbeddedData: function (k, v) { calls.push(["setEmbeddedData", k, v]); }}};
</script>
<script>SNIPPET</script>
<iframe id="chat" src="CHAT" width="420" height="720" onload="window.framed = true"></iframe>
"""


@pytest.mark.slow
def test_a_survey_page_frames_the_chat_and_hears_the_end(live_server: Callable[..., Any], browser: Any) -> None:
    allowed, stranger = SurveyPages("127.0.0.2"), SurveyPages("127.0.0.3")
    try:
        server = live_server(workers=1, env={**os.environ, "COMBOT_FRAME_ANCESTORS": allowed.origin})
        combot = server.url.rstrip("/")
        page_html = SURVEY_PAGE.replace("CHAT", server.url + "?participant_label=R_embedtest").replace(
            "SNIPPET", readme_snippet().replace("https://study.example.org", combot))
        allowed.pages["/survey"] = stranger.pages["/survey"] = page_html

        context = browser.new_context(service_workers="block")
        survey = context.new_page()
        survey.goto(allowed.origin + "/survey")
        survey.frame_locator("#chat").locator(".msg--bot .bubble__text").first.wait_for()
        chat = next(f for f in survey.frames if f.url.startswith(combot))
        assert survey.evaluate("calls") == [["hideNextButton"]]
        walk_to_the_end(chat)
        survey.wait_for_function("calls.length >= 3")
        with sqlite3.connect(server.database) as conn:
            participant_id, params = conn.execute("SELECT id, url_params FROM participants").fetchone()
        assert "R_embedtest" in params
        received = survey.evaluate("received")
        assert received == [{"origin": combot, "data": {"type": "combot:done", "participant_id": participant_id}}]
        assert survey.evaluate("calls") == [["hideNextButton"], ["setEmbeddedData", "combot_participant_id",
                                                                  participant_id], ["showNextButton"]]
        print(f"\n[embed] Chromium {browser.version}: {allowed.origin}/survey framed {combot}, got {received}")

        # An origin that is not listed cannot frame it: Chromium refuses, nothing starts, nothing is told.
        refusals: list[str] = []
        other = context.new_page()
        other.on("console",
                 lambda message: refusals.append(message.text) if "frame-ancestors" in message.text else None)
        other.goto(stranger.origin + "/survey")
        other.wait_for_function("window.framed")
        assert [f for f in other.frames if f.url.startswith(combot) and f.locator("#log").count()] == []
        assert other.evaluate("received") == [] and other.evaluate("calls") == [["hideNextButton"]]
        with sqlite3.connect(server.database) as conn:
            assert conn.execute("SELECT count(*) FROM participants").fetchone()[0] == 1
        print(f"[embed] {stranger.origin} was refused: {refusals[:1]}")
        context.close()
    finally:
        allowed.close()
        stranger.close()


@pytest.mark.slow
def test_a_decline_inside_the_survey_lets_it_go_on(live_server: Callable[..., Any], browser: Any) -> None:
    survey_site = SurveyPages("127.0.0.2")
    try:
        server = live_server(workers=1, env={**os.environ, "COMBOT_FRAME_ANCESTORS": survey_site.origin,
                                             "COMBOT_CONSENT": "true"})
        combot = server.url.rstrip("/")
        chat = server.url + "?participant_label=R_declines"
        survey_site.pages["/survey"] = SURVEY_PAGE.replace("CHAT", chat).replace(
            "SNIPPET", readme_snippet().replace("https://study.example.org", combot))
        context = browser.new_context(service_workers="block")
        survey = context.new_page()
        survey.goto(survey_site.origin + "/survey")
        survey.frame_locator("#chat").locator("#consent-decline").click()
        survey.frame_locator("#chat").locator("#declined").wait_for()
        survey.wait_for_function("calls.length >= 3")
        assert survey.evaluate("received") == [{"origin": combot, "data": {"type": "combot:declined"}}]
        assert survey.evaluate("calls") == [["hideNextButton"], ["setEmbeddedData", "combot_declined", "1"],
                                            ["showNextButton"]]
        with sqlite3.connect(server.database) as conn:
            assert conn.execute("SELECT status FROM participants").fetchall() == [("declined",)]
        context.close()
    finally:
        survey_site.close()
