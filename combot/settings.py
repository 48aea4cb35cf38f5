"""Every run-time setting, declared once: name, default, type and help.

The `[server]`, `[classifier]` and `[llm]` tables of combot.toml, the `COMBOT_*` environment
variables and the CLI flags all resolve through these declarations. Precedence, lowest first:
default, file, environment, flags the user actually passed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Option:
    section: str
    name: str
    default: Any
    help: str
    kind: type = str
    env: str | None = None
    # Returns what is wrong with a converted value ("" when it is fine).
    validate: Callable[[Any], str] | None = None

    @property
    def env_name(self) -> str:
        return self.env or f"COMBOT_{self.name.upper()}"

    def to_env(self, value: Any) -> str:
        """The value as its environment variable carries it (what `convert` reads back)."""
        if isinstance(value, dict):
            return json.dumps(value, ensure_ascii=False)
        if isinstance(value, list):
            return ",".join(value)
        return str(value)

    def convert(self, value: Any, source: str) -> Any:
        """Coerce a value from the file or the environment into this option's type, and check it."""
        converted = self._coerce(value, source)
        problem = self.validate(converted) if self.validate is not None and converted is not None else ""
        if problem:
            raise ValueError(f"{self.name} {problem} ({source})")
        return converted

    def _coerce(self, value: Any, source: str) -> Any:
        if value is None:
            return None
        if self.kind is dict:
            if isinstance(value, str) and value.strip().startswith("{"):
                try:
                    value = json.loads(value)
                except ValueError:
                    raise ValueError(f"{self.name} is not valid JSON ({source})") from None
            elif isinstance(value, str):  # from the environment or a flag: "A=Product,B=Delivery"
                pairs = [part.split("=", 1) for part in value.split(",") if part.strip()]
                if not all(len(pair) == 2 for pair in pairs):
                    raise ValueError(f"{self.name} must look like A=Product,B=Delivery ({source})")
                value = {k.strip(): v.strip() for k, v in pairs}
            if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                return dict(value)
            raise ValueError(f"{self.name} must be a table of names, e.g. {{ A = \"Product\" }} ({source})")
        if self.kind is list:
            if isinstance(value, str):
                return [part.strip() for part in value.split(",") if part.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
            raise ValueError(f"{self.name} must be a list of strings ({source})")
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
                return value.lower() in {"1", "true", "yes", "on"}
            raise ValueError(f"{self.name} must be true or false ({source})")
        if self.kind is int:
            if isinstance(value, bool):
                raise ValueError(f"{self.name} must be a whole number ({source})")
            try:
                return int(value)
            except (TypeError, ValueError):
                raise ValueError(f"{self.name} must be a whole number ({source})") from None
        if self.kind is float:
            if isinstance(value, bool):
                raise ValueError(f"{self.name} must be a number ({source})")
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{self.name} must be a number ({source})") from None
        if not isinstance(value, str):
            raise ValueError(f"{self.name} must be a string ({source})")
        return value


def _addresses(values: list[str]) -> str:
    for value in values:
        if value == "*":
            continue
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"must list IP addresses or networks (e.g. 127.0.0.1, 10.0.0.0/8) or '*'; {value!r} is not one"
    return ""


# A CSP source expression for an origin: scheme://host[:port], the host may start with "*.".
_ORIGIN = re.compile(r"https?://(\*\.)?[A-Za-z0-9.-]+(:[0-9]{1,5})?")


def _origins(values: list[str]) -> str:
    for value in values:
        if not _ORIGIN.fullmatch(value):
            return f"must list origins such as https://*.qualtrics.com (scheme, host, optional port); {value!r} is not one"
    return ""


def _base_url(value: str) -> str:
    """An LLM base URL is empty (no LLM) or http(s)://host[:port][/path]."""
    if not value.strip():
        return ""
    try:
        parts = urllib.parse.urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return f"must be an http:// or https:// URL with a host, such as https://api.openai.com/v1; {value!r} is not one"
    return ""


def _optional_file(value: str) -> str:
    return f"names a file that does not exist: {value}" if value and not os.path.isfile(value) else ""


# What [server] reply_timing may say (combot/timing.py has the modes).
REPLY_TIMINGS = ("study", "matched", "typing", "none")


OPTIONS: tuple[Option, ...] = (
    # [server]
    Option("server", "host", "0.0.0.0", "Address to listen on (0.0.0.0: every interface)."),
    Option("server", "port", 8000, "TCP port to listen on.", int),
    Option("server", "workers", 8, "Number of worker processes.", int),
    Option("server", "database", "combot.db", "SQLite database file (created when missing).", str, "COMBOT_DB"),
    Option("server", "request_timeout", 60.0, "Seconds before a request is answered with 503.", float),
    Option("server", "graceful_timeout", 30.0, "Seconds in-flight requests get to finish on shutdown.", float),
    Option("server", "keep_alive_timeout", 75.0, "Seconds an idle keep-alive connection stays open.", float),
    Option("server", "max_requests", 0, "Recycle a worker after this many requests (0: never).", int),
    Option("server", "access_log", "-", "Access log file ('-': standard output, '': off); it names participants by id, never by session"
           " token."),
    Option("server", "trusted_hosts", ["*"], "Host headers to accept (e.g. study.example.org).", list),
    Option("server", "max_message_chars", 2000, "Longest participant message, in characters.", int),
    Option("server", "max_body_bytes", 16384, "Largest request body, in bytes.", int),
    Option("server", "rate_limit", 20, "Messages a participant may send per minute (0: no limit).", int),
    Option("server", "reply_timing", "study", "Reply timing: 'study' follows the study's [[timing]] blocks;"
           " 'none', 'typing' or 'matched' sets that mode for every cell (`combot bench` uses 'none').", str,
           validate=lambda value: "" if value in REPLY_TIMINGS else f"must be one of {', '.join(REPLY_TIMINGS)}"),
    Option("server", "admin_token", "", "Researcher token for /admin (default: generated and stored beside the database)."),
    Option("server", "certfile", "", "TLS certificate chain (PEM): serve HTTPS itself ('': plain HTTP, e.g. behind"
           " a proxy that does TLS).", str, validate=_optional_file),
    Option("server", "keyfile", "", "TLS private key (PEM) of the certificate.", str, validate=_optional_file),
    Option("server", "forwarded_allow_ips", ["127.0.0.1"], "Proxies whose X-Forwarded-For/-Proto/-Host are believed"
           " (addresses or networks; '*': any; empty: none).", list, validate=_addresses),
    Option("server", "session_rate_limit", 0, "New sessions (and declines) one address may start per minute"
           " (0: no limit). Behind a proxy, set forwarded_allow_ips first.", int),
    # [classifier]
    Option("classifier", "model_dir", "", "Directory of the classifier (default: the bundled model)."),
    Option("classifier", "head", "", "A head trained with `combot train` to use instead of the shipped one."),
    Option("classifier", "labels", {}, "How the head's labels map to the study's problem types, e.g."
           " { A = \"Product\" } (labels not named map to themselves).", dict, "COMBOT_CLASSIFIER_LABELS"),
    Option("classifier", "threshold", 0.4, "Top score below which the problem type becomes the study's catch-all"
           " (the last of [study] problem_types).", float),
    Option("classifier", "max_length", 128, "Tokens after which a message is truncated.", int),
    Option("classifier", "threads", 1, "Threads per inference (onnxruntime intra_op_num_threads).", int),
    Option("classifier", "max_batch", 16, "First messages waiting in a worker are classified together, up to this"
           " many (1: one by one; a batch's scores differ from one-by-one ones by ~0.002, as the int8 model"
           " quantizes per batch).", int),
    Option("classifier", "weights_cache", "~/.cache/combot", "Folder for a copy of the encoder whose weights every"
           " worker memory-maps from one file, so they are held once, not once per worker ('': each worker loads"
           " its own).", str, "COMBOT_WEIGHTS_CACHE"),
    # [llm] An OpenAI-compatible chat-completions service for paraphrase turns. The key is never a
    # setting (settings are printed, exported and copied into worker environments): only the name
    # of the environment variable that holds it is.
    Option("llm", "base_url", "", "Chat-completions base URL, e.g. https://api.openai.com/v1"
           " ('': no LLM, the offline paraphraser answers).", str, "COMBOT_LLM_URL", validate=_base_url),
    Option("llm", "model", "gpt-4o-mini", "Model name sent to the service.", str, "COMBOT_LLM_MODEL"),
    Option("llm", "temperature", 0.7, "Sampling temperature.", float, "COMBOT_LLM_TEMPERATURE"),
    Option("llm", "max_tokens", 150, "Longest LLM reply, in tokens.", int, "COMBOT_LLM_MAX_TOKENS"),
    Option("llm", "timeout", 4.0, "Seconds an LLM reply may take in all (waiting for a slot included) before"
           " the offline paraphraser answers instead.", float, "COMBOT_LLM_TIMEOUT"),
    Option("llm", "max_in_flight", 100, "LLM calls in flight at once per worker; others wait, within the timeout.",
           int, "COMBOT_LLM_MAX_IN_FLIGHT"),
    Option("llm", "max_calls_per_participant", 10, "LLM replies per participant (0: no limit); after that the"
           " offline paraphraser answers.", int, "COMBOT_LLM_MAX_CALLS_PER_PARTICIPANT"),
    Option("llm", "breaker_failures", 3, "LLM timeouts or errors in a row (across the server's workers) after"
           " which the LLM is skipped for breaker_cooldown seconds (0: never).", int, "COMBOT_LLM_BREAKER_FAILURES"),
    Option("llm", "breaker_cooldown", 30.0, "Seconds the LLM is skipped after a run of failures; then one probe"
           " call decides whether it is back.", float, "COMBOT_LLM_BREAKER_COOLDOWN"),
    Option("llm", "api_key_env", "OPENAI_API_KEY", "Environment variable that holds the API key (unset: no key"
           " is sent).", str, "COMBOT_LLM_API_KEY_ENV"),
    # [recruitment] What the study URL brings from a recruitment platform. Ethics boards treat these
    # as personal data: they are stored apart from the research data and left out of --anonymise.
    Option("recruitment", "params", ["PROLIFIC_PID", "STUDY_ID", "SESSION_ID", "participant_label"],
           "URL parameters kept with a participant (usable as {NAME} in the survey and completion URLs).",
           list, "COMBOT_RECRUITMENT_PARAMS"),
    Option("recruitment", "platform_id", "PROLIFIC_PID", "The parameter that identifies a person: a returning"
           " one resumes their session instead of getting a new cell ('': none).", str, "COMBOT_PLATFORM_ID"),
    # [consent] A consent or welcome page before the chat; the session starts only after "I agree".
    Option("consent", "enabled", False, "Show the consent page before the chat.", bool, "COMBOT_CONSENT"),
    Option("consent", "title", "Before you start", "Heading of the consent page.", str, "COMBOT_CONSENT_TITLE"),
    Option("consent", "text", "In this study you will chat with a customer-service chatbot about a recent"
           " experience. It takes about ten minutes. Taking part is voluntary and you may stop at any time.",
           "Text of the consent page (a blank line starts a new paragraph).", str, "COMBOT_CONSENT_TEXT"),
    Option("consent", "agree_label", "I agree, start the chat", "The button that starts the chat.", str,
           "COMBOT_CONSENT_AGREE_LABEL"),
    Option("consent", "decline_label", "I do not want to take part", "The button that declines.", str,
           "COMBOT_CONSENT_DECLINE_LABEL"),
    Option("consent", "declined_text", "Thank you. You have chosen not to take part; nothing else will be"
           " recorded. You can close this page now.", "Shown after declining.", str, "COMBOT_CONSENT_DECLINED_TEXT"),
    # [embed] The chat inside another site's page (a Qualtrics question): who may frame it.
    Option("embed", "frame_ancestors", [], "Origins whose pages may show the chat page in a frame, e.g."
           " https://*.qualtrics.com (empty: none; /admin never).", list, "COMBOT_FRAME_ANCESTORS", validate=_origins),
    # [admin] The researcher's dashboard (/admin); the token itself is server.admin_token.
    Option("admin", "window_minutes", 15, "Minutes of recent activity behind reply times and the error rate.", int,
           "COMBOT_ADMIN_WINDOW_MINUTES"),
    Option("admin", "memory_warn_percent", 80.0, "Warn when the machine's memory in use passes this share.", float,
           "COMBOT_ADMIN_MEMORY_WARN_PERCENT"),
    Option("admin", "reply_warn_seconds", 30.0, "Warn when the average reply takes longer than this.", float,
           "COMBOT_ADMIN_REPLY_WARN_SECONDS"),
    Option("admin", "success_warn_percent", 95.0, "Warn when fewer requests than this succeed.", float,
           "COMBOT_ADMIN_SUCCESS_WARN_PERCENT"),
    Option("admin", "timing_drift_percent", 25.0, "Warn when a cell's median reply time is this far from that of"
           " the other cells with the same reply timing.", float, "COMBOT_ADMIN_TIMING_DRIFT_PERCENT"),
)

SECTIONS = sorted({o.section for o in OPTIONS})


def option(section: str, name: str) -> Option:
    for opt in OPTIONS:
        if opt.section == section and opt.name == name:
            return opt
    raise KeyError(f"{section}.{name}")


@dataclass(frozen=True)
class Settings:
    values: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __getitem__(self, dotted: str) -> Any:
        section, name = dotted.split(".", 1)
        return self.values[section][name]

    def section(self, name: str) -> Mapping[str, Any]:
        return self.values[name]


# The range each numeric setting must lie in (inclusive; None: unbounded), checked once at load,
# in the process that reads the file, so no worker ever starts with a value it cannot use.
LIMITS: dict[str, tuple[float | None, float | None]] = {
    "server.port": (1, 65535), "server.workers": (1, 256), "server.request_timeout": (0.1, None),
    "server.graceful_timeout": (0, None), "server.keep_alive_timeout": (1, None), "server.max_requests": (0, None), "server.max_message_chars": (1, None),
    "server.max_body_bytes": (1024, None), "server.rate_limit": (0, None),
    "classifier.threshold": (0.0, 1.0), "classifier.max_length": (2, 512), "classifier.threads": (1, 64),
    "llm.temperature": (0.0, 2.0), "llm.max_tokens": (1, None), "llm.timeout": (0.1, None),
    "llm.max_in_flight": (1, None), "llm.max_calls_per_participant": (0, None),
    "llm.breaker_failures": (0, None), "llm.breaker_cooldown": (0.1, None),
    "admin.window_minutes": (1, 7 * 24 * 60), "admin.memory_warn_percent": (0, 100),
    "admin.reply_warn_seconds": (0, None), "admin.success_warn_percent": (0, 100),
    "admin.timing_drift_percent": (1, None),
}


def out_of_range(dotted: str, value: Any) -> str | None:
    """Why `value` is outside the declared range of the setting, or None when it fits."""
    low, high = LIMITS.get(dotted, (None, None))
    if low is not None and high is not None and not low <= value <= high:
        return f"must be between {low:g} and {high:g}, not {value:g}"
    if low is not None and value < low:
        return f"must be at least {low:g}, not {value:g}"
    if high is not None and value > high:
        return f"must be at most {high:g}, not {value:g}"
    return None


@dataclass(frozen=True)
class Problem:
    """A setting that cannot be used: where its value came from ("file", "environment", "flag") and why."""

    section: str
    name: str
    source: str
    message: str

    @property
    def where(self) -> str:
        opt = option(self.section, self.name)
        if self.source == "environment":
            return f"environment variable {opt.env_name}"
        if self.source == "flag":
            return "--" + self.name.replace("_", "-")
        return f"[{self.section}] {self.name}"


def resolve_checked(
    file_values: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Settings, list[Problem]]:
    """Like `resolve`, but every unusable value (type or range) is collected, not only the first;
    an unusable value leaves the default in its place."""
    environ = os.environ if environ is None else environ
    file_values = file_values or {}
    overrides = overrides or {}
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    problems: list[Problem] = []
    for opt in OPTIONS:
        dotted = f"{opt.section}.{opt.name}"
        value = opt.default
        candidates = []
        from_file = file_values.get(opt.section, {})
        if opt.name in from_file:
            candidates.append(("file", from_file[opt.name], f"[{opt.section}] in the study file"))
        if opt.env_name in environ:
            candidates.append(("environment", environ[opt.env_name], f"environment variable {opt.env_name}"))
        if overrides.get(dotted) is not None:
            candidates.append(("flag", overrides[dotted], f"--{opt.name.replace('_', '-')}"))
        for source, raw, described in candidates:
            try:
                converted = opt.convert(raw, described)
            except ValueError as error:
                problems.append(Problem(opt.section, opt.name, source, str(error).rsplit(" (", 1)[0]
                                        .removeprefix(opt.name + " ")))
                continue
            reason = out_of_range(dotted, converted) if opt.kind in (int, float) else None
            if reason:
                problems.append(Problem(opt.section, opt.name, source, reason))
                continue
            value = converted
        values[opt.section][opt.name] = value
    return Settings(values), problems


def resolve(
    file_values: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Combine defaults, the file's tables, the environment and explicit overrides ("section.name")."""
    environ = os.environ if environ is None else environ
    file_values = file_values or {}
    overrides = overrides or {}
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for opt in OPTIONS:
        value = opt.default
        from_file = file_values.get(opt.section, {})
        if opt.name in from_file:
            value = opt.convert(from_file[opt.name], f"[{opt.section}] in the study file")
        if opt.env_name in environ:
            value = opt.convert(environ[opt.env_name], f"environment variable {opt.env_name}")
        dotted = f"{opt.section}.{opt.name}"
        if overrides.get(dotted) is not None:
            value = opt.convert(overrides[dotted], f"--{opt.name.replace('_', '-')}")
        values[opt.section][opt.name] = value
    return Settings(values)
