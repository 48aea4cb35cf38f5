"""Logos under opaque, content-hashed, relative names: nothing a participant fetches names a condition."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
from starlette.testclient import TestClient

from combot.errors import ConfigError
from combot.resources import static_dir
from combot.study import load_study
from tests.inprocess import Client, client_factory

LEVELS = ("basic", "bramble", "high", "low", "brand", "think", "feel")


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_app: Callable[..., TestClient]) -> Client:
    return client_factory(tmp_path, monkeypatch, started_app)


def test_every_cell_gets_a_logo_whose_name_says_nothing(client: Client) -> None:
    c = client()
    logos: dict[str, bytes] = {}
    for _ in range(16):  # balanced assignment: two rounds through all eight cells
        session = c.post("/api/sessions", json={}).json()
        logo = session["bot"]["logo"]
        assert re.fullmatch(r"assets/[0-9a-f]{20}\.svg", logo), logo
        fetched = c.get("/" + logo)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/svg+xml"
        assert "immutable" in fetched.headers["cache-control"]
        assert "sandbox" in fetched.headers["content-security-policy"]
        logos[logo] = fetched.content
        # The brand's name is the manipulation and is shown; which level or factor it is, is not.
        assert not any(level in logo for level in LEVELS)
        assert set(session["bot"]) == {"name", "colour", "logo"}
    # Each brand's own file, named by its content.
    on_disk = {(static_dir() / "logos" / name).read_bytes() for name in ("basic.svg", "bramble.svg")}
    assert set(logos.values()) == on_disk
    assert all(name[len("assets/"):20 + len("assets/")] == hashlib.sha256(content).hexdigest()[:20]
               for name, content in logos.items())
    page = c.get("/").text.lower()
    assert not re.search(r"\b(" + "|".join(LEVELS) + r")\b", page)
    assert 'href="static/' in page and 'src="static/chat.js"' in page and '="/' not in page


def test_the_old_names_and_unknown_assets_are_not_served(client: Client) -> None:
    c = client()
    for path in ("/static/logos/basic.svg", "/static/logos/bramble.svg", "/static/logos/", "/static/./logos/basic.svg",
                 "/assets/basic.svg", "/assets/" + "0" * 20 + ".svg", "/assets/..%2fstatic%2fchat.js"):
        assert c.get(path).status_code == 404, path
    assert c.get("/static/chat.js").status_code == 200


def test_a_logo_beside_the_study_file(client: Client, study_file: Callable[..., Path], tmp_path: Path) -> None:
    shutil.copyfile(static_dir() / "favicon.svg", tmp_path / "our-brand.svg")
    path = study_file(replace={'logo = "logos/bramble.svg"': 'logo = "our-brand.svg"'})
    c = client(path)
    seen = {c.post("/api/sessions", json={}).json()["bot"]["logo"] for _ in range(8)}
    assert len(seen) == 2
    assert (tmp_path / "our-brand.svg").read_bytes() in {c.get("/" + logo).content for logo in seen}


@pytest.mark.parametrize("logo, problem", [("logos/missing.svg", "no logo file logos/missing.svg"),
                                           ("logos/basic.txt", "the logo must be one of")])
def test_a_bad_logo_names_its_line(study_file: Callable[..., Path], logo: str, problem: str) -> None:
    path = study_file(replace={'logo = "logos/bramble.svg"': f'logo = "{logo}"'})
    with pytest.raises(ConfigError) as error:
        load_study(path, environ={})
    line = path.read_text().splitlines().index(f'logo = "{logo}"') + 1
    assert problem in str(error.value) and f"line {line}:" in str(error.value)
