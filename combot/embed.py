"""The chat inside another site's page (a Qualtrics question): who may frame it, and whom the page
tells that the conversation is over.

`[embed] frame_ancestors` lists origins (`https://*.qualtrics.com`). Only the chat page carries
them, as CSP `frame-ancestors`; with none listed it still refuses every frame, and /admin always
does. The page posts `{type: "combot:done", participant_id}` (or `{type: "combot:declined"}` after a
decline on the consent page) to its parent only when the parent's origin matches that list (never to
"*"), so no other page learns the participant's id.
"""

from __future__ import annotations

from typing import Any, Mapping

from combot.settings import Settings


def origins(settings: Settings) -> list[str]:
    return list(settings["embed.frame_ancestors"])


def page_headers(settings: Settings) -> dict[str, str]:
    """Framing headers of the chat page: the listed origins may frame it, nobody else."""
    allowed = origins(settings)
    if not allowed:
        return {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY"}
    # No X-Frame-Options: it cannot name other origins, and a browser that knows CSP ignores it anyway.
    return {"Content-Security-Policy": "frame-ancestors 'self' " + " ".join(allowed)}


def page_fields(settings: Settings, participant: Any, done: bool) -> Mapping[str, Any]:
    """What a session or turn answer adds for an embedded page: the origins it may tell, and at the
    end the participant id it tells them (the same id the survey link carries)."""
    allowed = origins(settings)
    if not allowed:
        return {}
    fields: dict[str, Any] = {"embed_origins": allowed}
    if done:
        fields["participant_id"] = participant["id"]
    return fields
