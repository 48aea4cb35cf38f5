"""Synthetic participants (bench, pilots): marked at creation, left out of balance, dashboard and export."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from combot import synthetic
from combot.cli import cli
from tests.inprocess import Client, client_factory, finish

TOKEN = "researcher-token-for-synthetic-tests-0123"


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_app: Callable[..., TestClient]) -> Client:
    return client_factory(tmp_path, monkeypatch, started_app)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream))


def test_the_key_needs_the_admin_token() -> None:
    assert synthetic.key(TOKEN) == synthetic.key(TOKEN)
    assert synthetic.key(TOKEN) != synthetic.key(TOKEN + "x")
    assert TOKEN not in synthetic.key(TOKEN)
    assert synthetic.is_synthetic({}, TOKEN) is False
    assert synthetic.is_synthetic({"x-combot-synthetic": synthetic.key(TOKEN)}, TOKEN) is True


def test_synthetic_participants_fill_no_cell_and_stay_out_of_dashboard_and_export(
        client: Client, tmp_path: Path) -> None:
    c = client(environ={"COMBOT_ADMIN_TOKEN": TOKEN})
    marked = synthetic.headers(TOKEN)
    # Eight synthetic participants first: with balanced assignment, were they counted, the next eight
    # real ones would not cover every cell.
    fakes = [c.post("/api/sessions", json={}, headers=marked).json()["session_id"] for _ in range(8)]
    for session in fakes:
        finish(c, session, email="bench@example.com")
    real = [c.post("/api/sessions", json={}, params={"PROLIFIC_PID": f"real{i}"}).json()["session_id"]
            for i in range(8)]
    finish(c, real[0])
    with sqlite3.connect(tmp_path / "web.db") as conn:
        cells = [row[0] for row in conn.execute("SELECT cell FROM participants WHERE synthetic = 0")]
        assert len(set(cells)) == 8  # one real participant per cell: the synthetic ones counted for none
        assert conn.execute("SELECT count(*) FROM participants WHERE synthetic = 1").fetchone()[0] == 8

    stats = c.get("/admin/api/stats", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert stats["totals"]["started"] == 8 and stats["totals"]["finished"] == 1
    assert stats["synthetic_left_out"] == 8
    assert sum(p["n"] for p in stats["problem_types"]) == 8

    runner = CliRunner()
    env = {"COMBOT_DB": str(tmp_path / "web.db")}
    result = runner.invoke(cli, ["export", "--out", str(tmp_path / "plain")], env=env)
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "plain" / "participants.csv")
    assert len(rows) == 8 and "synthetic" not in rows[0]
    personal = (tmp_path / "plain" / "personal.csv").read_text()
    assert "bench@example.com" not in personal
    messages = read_rows(tmp_path / "plain" / "messages.csv")
    assert {m["participant_id"] for m in messages} == {r["participant_id"] for r in rows}
    assert "left out" in (tmp_path / "plain" / "codebook.md").read_text()

    result = runner.invoke(cli, ["export", "--include-synthetic", "--out", str(tmp_path / "all")], env=env)
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "all" / "participants.csv")
    assert len(rows) == 16 and sorted(r["synthetic"] for r in rows) == ["0"] * 8 + ["1"] * 8
    assert "`synthetic`" in (tmp_path / "all" / "codebook.md").read_text()


def test_a_wrong_key_is_refused_and_stores_nothing(client: Client, tmp_path: Path) -> None:
    c = client(environ={"COMBOT_ADMIN_TOKEN": TOKEN})
    refused = c.post("/api/sessions", json={}, headers=synthetic.headers("another study's token"))
    assert refused.status_code == 403 and synthetic.HEADER in refused.json()["error"]
    assert c.post("/api/sessions", json={}, headers={synthetic.HEADER: "1"}).status_code == 403
    with sqlite3.connect(tmp_path / "web.db") as conn:
        assert conn.execute("SELECT count(*) FROM participants").fetchone()[0] == 0


def test_bench_against_a_url_needs_the_admin_token() -> None:
    result = CliRunner().invoke(cli, ["bench", "--url", "http://127.0.0.1:9/", "--users", "1"],
                                env={"COMBOT_ADMIN_TOKEN": ""})
    assert result.exit_code != 0
    assert "--url needs the study's admin token" in result.output
