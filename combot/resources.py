"""Where the files that ship with Combot live: a source checkout, or the unpacked .pyz."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
# build_pyz.py copies static/, model/ and combot.toml into combot/_bundled/ inside the archive.
_BUNDLED = _PACKAGE / "_bundled"
_CHECKOUT = _PACKAGE.parent


def _find(name: str) -> Path:
    bundled = _BUNDLED / name
    return bundled if bundled.exists() else _CHECKOUT / name


def static_dir() -> Path:
    return Path(os.environ["COMBOT_STATIC_DIR"]) if os.environ.get("COMBOT_STATIC_DIR") else _find("static")


def default_study_path() -> Path:
    return _find("combot.toml")
