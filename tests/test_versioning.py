"""The study version: canonical, stable, stamped on every participant, and exported with its text."""

from __future__ import annotations

import csv
import hashlib
import sqlite3
import tomllib
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from combot import versioning, web
from combot.cli import cli
from combot.study import load_study
from tests.conftest import DEFAULT_STUDY
from tests.inprocess import FakeClassifier

TOKEN = "researcher-token-for-version-tests-0123"


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream))


def test_the_effective_text_loads_back_to_the_same_version(study_file: Callable[..., Path]) -> None:
    study = versioning.stamp(load_study(DEFAULT_STUDY, environ={}))
    assert len(study.version) == 12 and study.version == hashlib.sha256(study.version_text.encode()).hexdigest()[:12]
    again = versioning.stamp(load_study(source=study.version_text, environ={}))
    assert again.version == study.version and again.version_text == study.version_text
    tomllib.loads(study.version_text)
    assert study.head_sha256 in study.version_text and study.encoder_sha256 in study.version_text


def test_comments_and_machine_settings_keep_the_version_but_the_study_does_not(
        study_file: Callable[..., Path]) -> None:
    base = versioning.stamp(load_study(DEFAULT_STUDY, environ={})).version
    commented = study_file(append="\n# a comment\n", name="c.toml")
    assert versioning.stamp(load_study(commented, environ={})).version == base
    moved = versioning.stamp(load_study(DEFAULT_STUDY, environ={"COMBOT_PORT": "9999", "COMBOT_WORKERS": "2"}))
    assert moved.version == base
    edited = study_file(replace={"followup_turns = 4": "followup_turns = 3"}, name="e.toml")
    assert versioning.stamp(load_study(edited, environ={})).version != base
    threshold = versioning.stamp(load_study(DEFAULT_STUDY, environ={"COMBOT_THRESHOLD": "0.5"}))
    assert threshold.version != base


def test_participants_span_versions_and_the_export_keeps_each_text(
        study_file: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        started_app: Callable[..., TestClient]) -> None:
    monkeypatch.setattr(web, "load_classifier", lambda study: FakeClassifier())
    database = tmp_path / "study.db"
    first = study_file(name="first.toml")
    second = study_file(replace={"title = \"Customer service conversation\"": "title = \"Second run\""},
                        name="second.toml")
    versions = []
    for path, n in ((first, 2), (second, 3)):
        study = load_study(path, environ={"COMBOT_ADMIN_TOKEN": TOKEN})
        c = started_app(study, database)
        for _ in range(n):
            assert c.post("/api/sessions", json={}).status_code == 201
        versions.append(versioning.stamp(study).version)
    assert versions[0] != versions[1]
    stats = c.get("/admin/api/stats", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert {v["version"]: v["participants"] for v in stats["versions"]} == {versions[0]: 2, versions[1]: 3}
    assert any("span 2 versions" in w for w in stats["warnings"])

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", "--out", str(out), "--database", str(database),
                                      "--config", str(second)])
    assert result.exit_code == 0, result.output
    rows = read_rows(out / "participants.csv")
    assert sorted(r["study_version"] for r in rows) == sorted([versions[0]] * 2 + [versions[1]] * 3)
    for version in versions:
        text = (out / "study" / f"{version}.toml").read_bytes()
        assert hashlib.sha256(text).hexdigest().startswith(version)
    assert 'title = "Second run"' in (out / "study" / f"{versions[1]}.toml").read_text()
    codebook = (out / "codebook.md").read_text()
    assert "Combot 0." in codebook and versions[0] in codebook and "span 2 versions" in codebook
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM study_versions").fetchone()[0] == 2


def test_check_prints_the_version() -> None:
    result = CliRunner().invoke(cli, ["check", "--config", str(DEFAULT_STUDY)], env={})
    assert result.exit_code == 0, result.output
    assert versioning.stamp(load_study(DEFAULT_STUDY)).version in result.output
