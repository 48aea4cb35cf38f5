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


# What a [[presentation]] logo may be, and how large.
MEDIA_TYPES = {".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
               ".webp": "image/webp", ".gif": "image/gif"}
MAX_LOGO_BYTES = 2_000_000


def logo_path(study_path: str, logo: str) -> Path | None:
    """Where a [[presentation]] logo lives: beside the study file first, then in the bundled static/."""
    candidates = []
    if study_path and not study_path.startswith("<"):
        candidates.append(Path(study_path).resolve().parent / logo)
    candidates.append(static_dir() / logo)
    return next((path.resolve() for path in candidates if path.is_file()), None)


def logo_problem(study_path: str, logo: str) -> str:
    """What is wrong with a logo setting ("" when nothing)."""
    if Path(logo).suffix.lower() not in MEDIA_TYPES:
        return f"the logo must be one of {', '.join(sorted(MEDIA_TYPES))}: {logo}"
    path = logo_path(study_path, logo)
    if path is None:
        return f"no logo file {logo} beside the study file or in the bundled static/"
    if path.stat().st_size > MAX_LOGO_BYTES:
        return f"the logo {logo} is over {MAX_LOGO_BYTES // 1_000_000} MB"
    return ""
