"""Files a participant's page fetches whose names could say which condition they belong to (logos),
served under opaque, content-hashed names: `assets/3f9c0a1b2d4e5f60a7b8.svg`.

`bot.logo` in the API and everything the page loads carry no factor or level name, and the URL is
relative, so a study served under a proxy's sub-path (`/study1/`) finds it. A hashed name never
changes meaning, so browsers may keep it for a year.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from combot.errors import NotFound
from combot.resources import MEDIA_TYPES, logo_path, static_dir

if TYPE_CHECKING:
    from combot.study import Study

PREFIX = "assets/"
_HEADERS = {
    "Cache-Control": "public, max-age=31536000, immutable",
    # An SVG opened on its own is a document: it may not run script or load anything.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; sandbox",
}


@dataclass(frozen=True)
class Asset:
    content: bytes
    media_type: str


class Assets:
    """The hashed files of one study, read once per worker: a logo setting -> its opaque name."""

    def __init__(self, files: Mapping[str, Path]):
        self.by_name: dict[str, Asset] = {}
        self.names: dict[str, str] = {}
        for setting, path in files.items():
            content = path.read_bytes()
            suffix = path.suffix.lower()
            name = hashlib.sha256(content).hexdigest()[:20] + suffix
            self.by_name[name] = Asset(content, MEDIA_TYPES[suffix])
            self.names[setting] = name

    @classmethod
    def for_study(cls, study: Study) -> Assets:
        blocks = study.blocks.get("presentation", ())
        logos = {str(block.values["logo"]) for block in blocks if block.values.get("logo")}
        found = {logo: logo_path(study.path, logo) for logo in logos}
        return cls({logo: path for logo, path in found.items() if path is not None})

    def url(self, setting: str) -> str | None:
        """The relative URL the page loads a file from, given its setting (e.g. logos/basic.svg)."""
        name = self.names.get(setting)
        return PREFIX + name if name else None


class PageFiles(StaticFiles):
    """static/ without logos/: a logo is served only under its hashed name, never under one that could
    name a condition (static/logos/bramble.svg)."""

    def lookup_path(self, path: str) -> tuple[str, object | None]:  # type: ignore[override]
        if Path(path).parts[:1] == ("logos",):
            return "", None
        return super().lookup_path(path)


def page_files() -> PageFiles:
    return PageFiles(directory=static_dir())


async def serve_asset(request: Request) -> Response:
    found = request.app.state.resources.assets.by_name.get(request.path_params["name"])
    if found is None:
        raise NotFound("no such file")
    return Response(found.content, media_type=found.media_type, headers=_HEADERS)


def routes() -> list[Route]:
    return [Route("/assets/{name}", serve_asset)]
