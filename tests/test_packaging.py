"""`pip install .` gives a working `combot`: a wheel built from the checkout, installed into a fresh
venv, serves a whole conversation with the page, the model and the default study it carries."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Callable

import httpx
import pytest

from tests.conftest import ROOT, LiveServer, walk_conversation

pytestmark = pytest.mark.slow

BUNDLED = ("static/index.html", "static/chat.js", "static/logos/bramble.svg", "model/encoder.int8.onnx",
           "model/tokenizer.json", "model/head.json", "model/opener.json", "combot.toml", "LICENSE")


def checkout_copy(target: Path) -> Path:
    """The checkout's files (tracked, or new and not ignored), so the build sees no venv, cache or build/."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, timeout=60)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = checkout_copy(tmp_path_factory.mktemp("src"))
    dist = tmp_path_factory.mktemp("dist")
    # pip builds it in an isolated environment (setuptools from the index or pip's cache).
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(source)],
                           capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr
    (found,) = dist.glob("combot-*.whl")
    return found


def test_the_wheel_carries_the_page_the_model_and_the_study(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for bundled in BUNDLED:
        assert f"combot/_bundled/{bundled}" in names, bundled
    assert not any("__pycache__" in name or name.startswith(("tests/", "bench/", "tools/")) for name in names)


def test_installed_into_a_fresh_venv_it_serves_a_whole_conversation(
        wheel: Path, tmp_path: Path, live_server: Callable[..., LiveServer]) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies (starlette, onnxruntime, ...) come from this test venv, appended to the fresh
    # venv's path; Combot itself comes only from the wheel (this venv's editable Combot is a path hook
    # in a .pth file there, which a path added this way does not run).
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMBOT_", "PYTHON"))}
    found = subprocess.run([str(python), "-c", "import combot, combot.resources as r;"
                            "print(combot.__file__, r.static_dir(), r.model_dir(), r.default_study_path(), sep='\\n')"],
                           capture_output=True, text=True, check=True, env=env, cwd=tmp_path).stdout.split()
    assert len(found) == 4 and all(path.startswith(str(site)) for path in found), found

    workdir = tmp_path / "empty"
    workdir.mkdir()
    server = live_server(workers=2, command=[str(venv / "bin" / "combot")], cwd=workdir, env=env)
    assert "the bundled default study" in server.output()
    with httpx.Client(timeout=60) as client:
        seen = walk_conversation(client, server.url)
        assert seen["final"]["expects"] == "done"
        page = client.get(server.url)
        assert page.status_code == 200 and "static/chat.js" in page.text
        assert client.get(server.url + "static/chat.js").status_code == 200
        logo = client.post(server.url + "api/sessions", json={}).json()["bot"]["logo"]
        assert client.get(server.url + logo).headers["content-type"] == "image/svg+xml"
