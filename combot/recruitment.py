"""Recruitment platforms and the hand-off at the end: which URL parameters are kept, who is returning,
and the links a finished participant is sent on with. Pure: no I/O.

Prolific appends `?PROLIFIC_PID=...&STUDY_ID=...&SESSION_ID=...` to the study URL; `[recruitment]`
names the parameters to keep (personal data: they go to personal.csv only) and the one that
identifies a person. At the end, `[survey] url` (e.g. Qualtrics) and/or `[survey] completion_url`
(e.g. `https://app.prolific.com/submissions/complete?cc=CODE`) are filled with URL-encoded values.
An e-mail address never goes into either.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping
from urllib.parse import urlsplit

from combot.engine import fill_template
from combot.settings import Settings
from combot.study import Study

MAX_PARAM_LENGTH = 200
# Seconds the page waits before following a completion redirect, so the thank-you can be read.
REDIRECT_DELAY_SECONDS = 5
_LOOKS_LIKE_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def param_names(settings: Settings) -> tuple[str, ...]:
    """The parameters to keep: the configured ones, and the platform id's even if not listed."""
    names = list(settings["recruitment.params"])
    platform = settings["recruitment.platform_id"]
    if platform and platform not in names:
        names.append(platform)
    return tuple(names)


def captured_params(query: Mapping[str, str], settings: Settings) -> dict[str, str]:
    """The configured parameters present (and non-empty) in a request's query string, cut to length."""
    return {name: str(query[name])[:MAX_PARAM_LENGTH] for name in param_names(settings) if query.get(name)}


def platform_id(params: Mapping[str, str], settings: Settings) -> str | None:
    name = settings["recruitment.platform_id"]
    return params.get(name) or None if name else None


def link_values(participant: Any) -> dict[str, str]:
    """Placeholder values for the survey and completion URLs of a stored participant.

    `{participant_id}`, `{cell}` (the cell number, not its label: it names no condition) and each
    captured parameter. A captured value that looks like an e-mail address is left out, so no
    template can put one into a URL.
    """
    values = {"participant_id": participant["id"], "cell": str(participant["cell_number"] or "")}
    for name, value in json.loads(participant["url_params"] or "{}").items():
        if name not in values and not _LOOKS_LIKE_EMAIL.search(str(value)):
            values[name] = str(value)
    return values


def completion_redirect(study: Study, values: Mapping[str, str]) -> dict[str, Any] | None:
    """What the final reply carries as `redirect`, or None without `[survey] completion_url`.

    With a survey link as well, the page must not leave before the survey is done, so
    `after_seconds` is None and the page only shows the link; otherwise it follows it after
    `REDIRECT_DELAY_SECONDS`.
    """
    if not study.completion_url:
        return None
    return {
        "url": fill_template(study.completion_url, values),
        "label": study.completion_label,
        "after_seconds": None if study.survey_url else REDIRECT_DELAY_SECONDS,
    }


# A participant as `check` and `serve` show the links: what a real one would get, with made-up values.
SAMPLE_PARTICIPANT = "p3f0a9c1d2e4b"


def sample_values(study: Study) -> dict[str, str]:
    """Placeholder values of a made-up participant in cell 1 who opened the link with every kept parameter."""
    values = {"participant_id": SAMPLE_PARTICIPANT, "cell": "1"}
    for name in param_names(study.settings):
        values[name] = f"{name}-123"
    return values


def sample_links(study: Study) -> list[tuple[str, str]]:
    """The survey and completion links as that participant would get them (label, URL)."""
    values = sample_values(study)
    links = []
    if study.survey_url:
        links.append(("survey link", fill_template(study.survey_url, values)))
    if study.completion_url:
        links.append(("completion link", fill_template(study.completion_url, values)))
    return links


def link_warnings(study: Study) -> list[str]:
    """Mistakes in the hand-off that are legal but probably unintended."""
    out = []
    for key, url in (("url", study.survey_url), ("completion_url", study.completion_url)):
        host = (urlsplit(url).hostname or "") if url else ""
        if "example" in host.split("."):
            out.append(f"[survey] {key} still points at {host}, an example address: put your own link there.")
    prolific = [name for name in param_names(study.settings) if name.upper().startswith("PROLIFIC")]
    if prolific and not study.completion_url:
        out.append(f"[recruitment] keeps Prolific's {', '.join(prolific)} but [survey] completion_url is empty:"
                   " Prolific participants are not sent back with their completion code. Set completion_url ="
                   " \"https://app.prolific.com/submissions/complete?cc=YOUR_CODE\", or drop Prolific's"
                   " parameters from [recruitment] params.")
    return out
