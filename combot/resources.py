"""Where the files that ship with Combot live: inside the package (an installed wheel, the unpacked
.pyz), or at the top of a source checkout."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
# The wheel (pyproject's package data) and build_pyz.py put static/, model/ and combot.toml into
# combot/_bundled/; a checkout (or an editable install) has them beside the package.
_BUNDLED = _PACKAGE / "_bundled"
_CHECKOUT = _PACKAGE.parent


def _find(name: str) -> Path:
    bundled = _BUNDLED / name
    return bundled if bundled.exists() else _CHECKOUT / name


def static_dir() -> Path:
    return Path(os.environ["COMBOT_STATIC_DIR"]) if os.environ.get("COMBOT_STATIC_DIR") else _find("static")


def default_study_path() -> Path:
    return _find("combot.toml")


def model_dir() -> Path:
    """The shipped classifier: $COMBOT_MODEL_DIR, else the bundled or checked-out model/."""
    return Path(os.environ["COMBOT_MODEL_DIR"]) if os.environ.get("COMBOT_MODEL_DIR") else _find("model")


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
