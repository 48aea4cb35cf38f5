"""URL parameters from recruitment platforms, and the survey link and completion redirect at the end."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import pytest
from starlette.testclient import TestClient

from combot import recruitment
from combot.study import load_study
from tests.conftest import DEFAULT_STUDY
from tests.inprocess import Client, client_factory, finish

NASTY = "a b&c=d#e/f?g+h%ü"
PROLIFIC = 'completion_url = "https://app.prolific.com/submissions/complete?cc=C1X2Y3"\n'


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_app: Callable[..., TestClient]) -> Client:
    return client_factory(tmp_path, monkeypatch, started_app)


def with_survey(study_file: Callable[..., Path], url: str | None, completion: str = "") -> Path:
    old = 'url = "https://example.qualtrics.com/jfe/form/SV_0000000000?pid={participant_id}"\n'
    new = (f'url = "{url}"\n' if url is not None else "") + completion
    return study_file({old: new})


def test_captured_params_follow_the_configuration() -> None:
    study = load_study(DEFAULT_STUDY, environ={"COMBOT_RECRUITMENT_PARAMS": "workerId,assignmentId",
                                               "COMBOT_PLATFORM_ID": "workerId"})
    query = {"workerId": "W1", "assignmentId": "A" * 500, "PROLIFIC_PID": "ignored", "other": "x"}
    params = recruitment.captured_params(query, study.settings)
    assert params == {"workerId": "W1", "assignmentId": "A" * recruitment.MAX_PARAM_LENGTH}
    assert recruitment.platform_id(params, study.settings) == "W1"
    default = load_study(DEFAULT_STUDY, environ={})
    assert recruitment.param_names(default.settings) == ("PROLIFIC_PID", "STUDY_ID", "SESSION_ID", "participant_label")


def test_link_values_never_carry_an_email_address() -> None:
    row = {"id": "p1", "cell_number": 3, "url_params": json.dumps({"PROLIFIC_PID": "abc", "email": "x@example.com",
                                                                    "participant_label": "me@uni.ac.uk"})}
    assert recruitment.link_values(row) == {"participant_id": "p1", "cell": "3", "PROLIFIC_PID": "abc"}


def test_the_redirect_waits_for_the_survey_when_there_is_one(study_file: Callable[..., Path]) -> None:
    both = load_study(with_survey(study_file, "https://q.example/s?pid={participant_id}", PROLIFIC), environ={})
    only = load_study(with_survey(study_file, None, PROLIFIC), environ={})
    values = {"participant_id": "p1"}
    assert recruitment.completion_redirect(both, values)["after_seconds"] is None
    redirect = recruitment.completion_redirect(only, values)
    assert redirect == {"url": "https://app.prolific.com/submissions/complete?cc=C1X2Y3",
                        "label": only.completion_label, "after_seconds": recruitment.REDIRECT_DELAY_SECONDS}
    assert recruitment.completion_redirect(load_study(DEFAULT_STUDY, environ={}), values) is None


def test_the_final_reply_carries_encoded_links_and_no_email(client: Client, study_file: Callable[..., Path],
                                                            tmp_path: Path) -> None:
    path = with_survey(study_file, "https://q.example/jfe/form/SV_1?pid={participant_id}&cell={cell}"
                                   "&prolific={PROLIFIC_PID}&study={STUDY_ID}",
                       'completion_url = "https://app.prolific.com/submissions/complete?cc=C1X2Y3&p={PROLIFIC_PID}"\n')
    c = client(path)
    created = c.post("/api/sessions", params={"PROLIFIC_PID": NASTY, "STUDY_ID": "s 1"}, json={})
    assert created.status_code == 201 and "redirect" not in created.json()
    final = finish(c, created.json()["session_id"], email="secret.person@example.com")
    assert final["expects"] == "done"
    survey = final["replies"][-1]["link"]["url"]
    query = parse_qs(urlsplit(survey).query, keep_blank_values=True)
    with sqlite3.connect(tmp_path / "web.db") as conn:
        pid, cell = conn.execute("SELECT id, cell_number FROM participants").fetchone()
    assert query == {"pid": [pid], "cell": [str(cell)], "prolific": [NASTY], "study": ["s 1"]}
    assert "%26" in survey and "%23" in survey and "#" not in survey
    redirect = final["redirect"]
    assert redirect["after_seconds"] is None  # the survey comes first
    assert parse_qs(urlsplit(redirect["url"]).query) == {"cc": ["C1X2Y3"], "p": [NASTY]}
    everything = json.dumps(final)
    assert "secret.person" not in everything and "example.com" not in everything
    # A reload after the end shows the same hand-off.
    resumed = c.get(f"/api/sessions/{created.json()['session_id']}").json()
    assert resumed["expects"] == "done" and resumed["redirect"] == redirect


def test_a_configured_platform_id_resumes(client: Client, tmp_path: Path) -> None:
    c = client(environ={"COMBOT_RECRUITMENT_PARAMS": "workerId", "COMBOT_PLATFORM_ID": "workerId"})
    first = c.post("/api/sessions", params={"workerId": "W7", "PROLIFIC_PID": "not kept"}, json={})
    again = c.post("/api/sessions", params={"workerId": "W7"}, json={})
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["session_id"] == again.json()["session_id"]
    with sqlite3.connect(tmp_path / "web.db") as conn:
        assert conn.execute("SELECT url_params, platform_id FROM participants").fetchall() == [('{"workerId": "W7"}', "W7")]
