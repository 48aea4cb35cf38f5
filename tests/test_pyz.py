"""The product itself: build combot.pyz, run it with the system python3 in an empty directory."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Callable

import httpx
import pytest

from tests.conftest import ROOT, LiveServer, walk_conversation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("dist") / "combot.pyz"
    result = subprocess.run([sys.executable, str(ROOT / "build_pyz.py"), "--output", str(output)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"built {output}" in result.stdout
    return output


def system_python() -> str:
    # The system interpreter, as a researcher's VM has it; it must match the Python the .pyz was built for.
    found = shutil.which("python3", path="/usr/bin:/bin")
    if found:
        version = subprocess.run([found, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        if version.stdout.strip() == str(sys.version_info[:2]):
            return found
    return sys.executable


def clean_env(home: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": str(home)}


def test_pyz_holds_only_runtime_dependencies(pyz: Path) -> None:
    import zipfile

    names = zipfile.ZipFile(pyz).namelist()
    tops = {name.split("/")[1] for name in names if name.startswith("site-packages/") and name.count("/") > 1}
    for wanted in ("combot", "onnxruntime", "tokenizers", "numpy", "starlette", "hypercorn", "sqlite_utils", "click"):
        assert wanted in tops, wanted
    for unwanted in ("torch", "pytest", "playwright", "shiv", "transformers", "sympy", "huggingface_hub", "pip"):
        assert unwanted not in tops, unwanted
    for bundled in ("static/index.html", "model/encoder.int8.onnx", "model/tokenizer.json", "combot.toml"):
        assert f"site-packages/combot/_bundled/{bundled}" in names


def test_pyz_serves_a_whole_conversation_from_an_empty_directory(
        pyz: Path, tmp_path: Path, live_server: Callable[..., LiveServer]) -> None:
    workdir = tmp_path / "empty"
    workdir.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    python = system_python()
    server = live_server(workers=2, command=[python, str(pyz)], env=clean_env(home), cwd=workdir, pass_database=False)
    with httpx.Client(timeout=30) as client:
        seen = walk_conversation(client, server.url)
    database = workdir / "combot.db"
    assert database.exists()
    conn = sqlite3.connect(database)
    stored = [r[0] for r in conn.execute("SELECT text FROM messages WHERE sender='bot' ORDER BY id")]
    assert stored == seen["bot"]
    assert conn.execute("SELECT status FROM participants").fetchone()[0] == "finished"
    assert "the bundled default study" in server.output()
    assert server.stop() == 0


def test_pyz_runs_every_command(pyz: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    python = system_python()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([python, str(pyz), *args], capture_output=True, text=True, cwd=tmp_path,
                              env=clean_env(home), timeout=300)

    listing = run("--help")
    assert listing.returncode == 0
    for command in ("serve", "init", "check", "bench", "classify", "train", "export", "llm-check"):
        assert command in listing.stdout
    assert run("init").returncode == 0 and (tmp_path / "combot.toml").exists()
    assert "8 cells" in run("check").stdout
    classified = run("classify", "--json", "The courier lost my parcel and tracking has not moved in a week.")
    assert classified.returncode == 0 and '"B"' in classified.stdout


def test_the_builders_own_packages_never_make_pip_complain(tmp_path: Path) -> None:
    """A builder whose environment holds a package at odds with Combot's dependencies (here one that
    wants click<1) gets no resolver ERROR: build_pyz resolves in an empty environment."""
    builder = tmp_path / "builder"
    subprocess.run([sys.executable, "-m", "venv", str(builder)], check=True, timeout=300)
    python = builder / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    meta = site / "conflicting-1.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: conflicting\nVersion: 1.0\nRequires-Dist: click<1\n")
    (meta / "RECORD").write_text("conflicting-1.0.dist-info/METADATA,,\n")

    # The way build_pyz used to run pip shows what this test catches.
    plain = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--target", str(tmp_path / "plain"),
                            "click>=8.1"], capture_output=True, text=True, timeout=300)
    assert "ERROR: pip's dependency resolver" in plain.stderr

    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import build_pyz; from pathlib import Path;"
              f"build_pyz.pip(build_pyz.resolver(Path({str(tmp_path / 'resolver')!r})), '--target',"
              f" {str(tmp_path / 'isolated')!r}, 'click>=8.1')")
    isolated = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=300)
    assert isolated.returncode == 0, isolated.stderr
    assert "ERROR" not in isolated.stderr, isolated.stderr
    assert (tmp_path / "isolated" / "click").is_dir()
