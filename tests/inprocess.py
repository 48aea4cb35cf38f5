"""An in-process app with a stand-in classifier, for tests about the researcher's side (consent,
recruitment, dashboard) that do not depend on the shipped model."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from starlette.testclient import TestClient

from combot import web
from combot.classifier import Classification
from combot.study import load_study
from tests.conftest import DEFAULT_STUDY

Client = Callable[..., TestClient]
SCORES = {"A": 0.1, "B": 0.7, "C": 0.1, "Other": 0.1}


class FakeClassifier:
    """Files every first message as a delivery problem (B)."""

    opener = None  # no opener head: every opening describes an experience

    def classify(self, texts: list[str]) -> list[Classification]:
        return [Classification("B", dict(SCORES), "B") for _ in texts]


def client_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_app: Callable[..., TestClient]) -> Client:
    """client(study_path=None, environ=None, peer=...) -> a started TestClient on tmp_path/web.db."""
    monkeypatch.setattr(web, "load_classifier", lambda study: FakeClassifier())

    def make(study_path: Path | None = None, environ: dict[str, str] | None = None,
             peer: tuple[str, int] = ("testclient", 50000)) -> TestClient:
        return started_app(load_study(study_path or DEFAULT_STUDY, environ=environ or {}), tmp_path / "web.db", peer)
    return make


def finish(c: TestClient, session: str, email: str = "someone@example.com") -> dict:
    """Answer every question and give the e-mail address; returns the final response body."""
    answer = c.post(f"/api/sessions/{session}/messages", json={"text": "My parcel never arrived at all."}).json()
    while answer["expects"] == "message":
        answer = c.post(f"/api/sessions/{session}/messages", json={"text": "Nobody answered my calls."}).json()
    return c.post(f"/api/sessions/{session}/messages", json={"text": email}).json()
