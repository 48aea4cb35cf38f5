"""The study version: a digest of the study as it is served, stamped on every participant.

The effective study is the study file after defaults, written out again as canonical TOML (so a
comment or a re-ordered key in combot.toml changes nothing, while any setting a participant can
notice does), headed by the SHA-256 of the classifier head and encoder. The version is the first
12 hex digits of the SHA-256 of that text, so `sha256sum study/<version>.toml` in an export starts
with its own name. Settings that only run the machine (host, port, workers, database, log, admin
token and dashboard thresholds, the classifier's paths and threads) are left out: changing them is
not a new version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Mapping

from combot.modelinfo import ENCODER_FILE, OPENER_FILE, file_sha256, model_paths
from combot.settings import OPTIONS
from combot.study import BLOCK_KINDS, Study

# Settings that run the machine rather than the study (see the module docstring).
OPERATIONAL = {
    "server": {"host", "port", "workers", "database", "access_log", "admin_token", "graceful_timeout",
               "max_requests", "trusted_hosts", "request_timeout"},
    "classifier": {"model_dir", "head", "threads"},
    "admin": {o.name for o in OPTIONS if o.section == "admin"},
    "llm": {"api_key_env", "max_in_flight"},
}
VERSION_LENGTH = 12
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON's escapes (\n, \", \\, \uXXXX) are all valid in a TOML basic string.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump_toml(document: Mapping[str, Any]) -> str:
    """Tables of plain values, and arrays of tables (lists of dicts), as TOML; tomllib reads it back."""
    out: list[str] = []
    for name, table in document.items():
        if isinstance(table, list):
            for entry in table:
                out.append(f"[[{_key(name)}]]")
                out += [f"{_key(k)} = {_value(v)}" for k, v in entry.items()]
                out.append("")
        else:
            out.append(f"[{_key(name)}]")
            out += [f"{_key(k)} = {_value(v)}" for k, v in table.items()]
            out.append("")
    return "\n".join(out)


def effective_document(study: Study) -> dict[str, Any]:
    """The study after defaults, as the tables of a study file."""
    doc: dict[str, Any] = {
        "study": {"title": study.title, "followup_turns": study.followup_turns,
                  "problem_types": list(study.problem_types), "assignment": study.assignment,
                  **({"seed": study.seed} if study.seed is not None else {}),
                  "fill": study.fill, "active_minutes": study.active_minutes,
                  "email_skip_words": list(study.email_skip_words), "max_reprompts": study.max_reprompts},
        "factors": {name: list(levels) for name, levels in study.factors.items()},
        "survey": {"url": study.survey_url, "link_label": study.survey_label, "completion_url": study.completion_url,
                   "completion_label": study.completion_label},
    }
    for section, values in study.settings.values.items():
        kept = {name: value for name, value in values.items() if name not in OPERATIONAL.get(section, set())}
        if kept:
            doc[section] = kept
    for kind in BLOCK_KINDS:
        entries = [{**({"when": dict(block.when)} if block.when else {}), **block.values}
                   for block in study.blocks.get(kind, ())]
        if entries:
            doc[kind] = entries
    return doc


def effective_text(study: Study, head_sha256: str, encoder_sha256: str, opener_sha256: str | None = None) -> str:
    # The opener head decides re-prompts, so it is part of what participants saw.
    opener = f"# classifier opener head sha256: {opener_sha256}\n" if opener_sha256 else ""
    return (f"# The study as Combot served it (defaults filled in; a study file that loads as it is).\n"
            f"# classifier head sha256: {head_sha256}\n# classifier encoder sha256: {encoder_sha256}\n{opener}\n"
            + dump_toml(effective_document(study)))


def version_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:VERSION_LENGTH]


def model_digests(study: Study) -> tuple[str, str]:
    """SHA-256 of the classifier head and encoder the study's settings select."""
    model_dir, head = model_paths(study.settings)
    return file_sha256(head), file_sha256(model_dir / ENCODER_FILE)


def stamp(study: Study) -> Study:
    """The study with its version, the version's text and the model digests filled in."""
    head_sha, encoder_sha = model_digests(study)
    opener = model_paths(study.settings)[0] / OPENER_FILE
    text = effective_text(study, head_sha, encoder_sha, file_sha256(opener) if opener.is_file() else None)
    return dataclasses.replace(study, version=version_of(text), version_text=text, head_sha256=head_sha,
                               encoder_sha256=encoder_sha)
