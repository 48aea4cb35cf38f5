"""Synthetic participants: the ones `combot bench` (and pilots) create, marked so they never count.

A request that creates a participant is synthetic when it carries the header
`X-Combot-Synthetic: <key>`, where the key is derived from the study's admin token
(HMAC-SHA256 of a fixed phrase). Only a tool given the admin token can compute it, so a participant
cannot mark themselves (or anyone) synthetic; a header with a wrong key is refused with 403, so a
tool with the wrong token fails loudly instead of polluting the study with "real" participants.

Synthetic participants are stored like any other (with `synthetic = 1`) but count towards no
cell, and the dashboard and the export leave them out unless asked (`export --include-synthetic`).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Mapping

from combot.errors import Forbidden

HEADER = "X-Combot-Synthetic"
_PHRASE = b"combot synthetic participant"


def key(admin_token: str) -> str:
    """The header value that marks a participant synthetic on the study with this admin token."""
    return hmac.new(admin_token.encode("utf-8"), _PHRASE, hashlib.sha256).hexdigest()


def headers(admin_token: str) -> dict[str, str]:
    """Headers a tool adds to `POST /api/sessions` (and `/api/declines`) to create synthetic participants."""
    return {HEADER: key(admin_token)}


def is_synthetic(request_headers: Mapping[str, str], admin_token: str) -> bool:
    """Whether the request marks its participant synthetic; a wrong key is a 403."""
    given = request_headers.get(HEADER.lower()) or request_headers.get(HEADER)
    if given is None:
        return False
    if not hmac.compare_digest(given.strip().encode("utf-8", "replace"), key(admin_token).encode("ascii")):
        raise Forbidden(f"the {HEADER} header does not match this study's admin token")
    return True
