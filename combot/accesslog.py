"""What the logs may say about a request: never a participant's session token or URL parameters.

The token in `/api/sessions/<token>/...` is all it takes to read and continue someone's
conversation, and the study link's query string carries recruitment-platform ids (personal data).
So the access log and the dashboard's error records show the participant id instead of the token
(the API puts it into the request's scope once it has looked the token up) and no query string.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from hypercorn.logging import Logger

SCOPE_KEY = "combot.participant_id"
_SESSION = re.compile(r"(/api/sessions/)([^/?#]+)")


def public_path(scope: Mapping[str, Any]) -> str:
    """The request path with a session token replaced by its participant id (or `[unknown session]`)."""
    participant = scope.get(SCOPE_KEY) or "[unknown session]"
    return _SESSION.sub(lambda m: m.group(1) + str(participant), str(scope.get("path", "")))


class PrivateLogger(Logger):
    """Hypercorn's logger, fed the public path and no query string (`config.logger_class`)."""

    def atoms(self, request: Any, response: Any, request_time: float) -> Mapping[str, str]:
        shown = dict(request)
        path = public_path(request)
        shown.update(path=path, raw_path=path.encode("utf-8", "replace"), query_string=b"")
        # A plain dict where hypercorn declares its scope TypedDicts: the same keys, with the path replaced.
        return super().atoms(shown, response, request_time)  # type: ignore[arg-type]
