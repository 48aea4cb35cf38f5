"""`combot systemd`: the unit it prints runs this study, restarts on failure and stops gracefully."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from combot import systemd
from combot.cli import cli
from tests.conftest import DEFAULT_STUDY


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


@pytest.fixture
def study_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "my study"  # a space, which ExecStart= must quote
    folder.mkdir()
    text = DEFAULT_STUDY.read_text(encoding="utf-8").replace("[server]\n", "[server]\ngraceful_timeout = 90\n", 1)
    (folder / "combot.toml").write_text(text, encoding="utf-8")
    monkeypatch.chdir(folder)
    return folder


def test_the_unit_for_this_folder(study_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["systemd", "--user", "research"])
    assert result.exit_code == 0, result.output
    unit = directives(result.output)
    assert unit["WorkingDirectory"] == [str(study_dir)]
    assert unit["User"] == ["research"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["EnvironmentFile"] == [str(study_dir / "combot.env")]
    assert unit["KillSignal"] == ["SIGTERM"] and unit["KillMode"] == ["mixed"]
    # The supervisor may take graceful_timeout + 10 s before it has stopped every worker.
    assert int(unit["TimeoutStopSec"][0]) > 90 + 10
    assert str(study_dir) in unit["ReadWritePaths"][0]
    assert "OPENAI_API_KEY" in result.output and "COMBOT_ADMIN_TOKEN" in result.output
    argv = shlex.split(unit["ExecStart"][0])
    assert argv[argv.index("serve") + 1:] == ["--config", str(study_dir / "combot.toml")]
    # The very command the service runs works: with `check` in place of `serve` it reads this study.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMBOT_")}
    checked = subprocess.run([("check" if a == "serve" else a) for a in argv], cwd=study_dir, env=env,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0 and str(study_dir / "combot.toml") in checked.stdout, checked.stderr


def test_a_pyz_is_run_by_python_with_its_own_unpack_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zipfile

    archive = tmp_path / "combot.pyz"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("__main__.py", "")
    monkeypatch.setattr("sys.argv", [str(archive), "systemd"])
    assert systemd.command()[1:] == [str(archive)]
    text = systemd.unit(workdir=tmp_path, argv=[*systemd.command(), "serve"], user="u", env_file=tmp_path / "e",
                        graceful_timeout=30, title="t", pyz=True, database=tmp_path / "combot.db")
    assert f"Environment=SHIV_ROOT={tmp_path / '.shiv'}" in text


def test_percent_signs_and_spaces_survive() -> None:
    assert systemd._quote("/srv/100% study/combot.toml") == '"/srv/100%% study/combot.toml"'
    assert systemd._quote("/srv/plain") == "/srv/plain"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_finds_nothing_wrong(study_dir: Path) -> None:
    (study_dir / "combot.env").write_text("COMBOT_ADMIN_TOKEN=x\n")
    result = CliRunner().invoke(cli, ["systemd"])
    unit = study_dir / "combot.service"
    unit.write_text(result.output)
    verified = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                              timeout=60)
    # It warns (exit 0) about unknown keys or bad values: there must be nothing to say at all.
    assert verified.returncode == 0 and verified.stderr.strip() == "" and verified.stdout.strip() == "", verified.stderr
