from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from combot.cli import cli


def test_every_command_has_help() -> None:
    for name, command in cli.commands.items():
        assert command.help and command.help.strip(), name
        assert CliRunner().invoke(cli, [name, "--help"]).exit_code == 0


def test_init_writes_an_editable_study_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli, ["init"])
    assert result.exit_code == 0, result.output
    assert "# Combot study definition" in (tmp_path / "combot.toml").read_text()
    again = runner.invoke(cli, ["init"])
    assert again.exit_code != 0 and "already exists" in again.output
    assert runner.invoke(cli, ["init", "--force"]).exit_code == 0


def test_check_lists_cells_and_rejects_a_bad_file(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["check"])
    assert result.exit_code == 0 and "8 cells" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[factors]\nbrand = []\n")
    result = runner.invoke(cli, ["check", "--config", str(bad)])
    assert result.exit_code != 0 and f"{bad}, line 2" in result.output


def test_serve_flags_are_declared_settings() -> None:
    serve = cli.commands["serve"]
    assert isinstance(serve, click.Command)
    names = {p.name for p in serve.params}
    assert {"workers", "host", "port", "database", "config_path", "trusted_hosts", "max_requests"} <= names
