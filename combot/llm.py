"""The LLM adapter: an OpenAI-compatible chat-completions call that never stalls a participant.

One `LLM` per worker process, made in the app's lifespan: kept-alive connections to the endpoint
(`combot/llmhttp.py`) and a cap on calls in flight. `complete` returns either an `LLMReply` or a
`Fallback` naming why the offline text should be used instead; it never raises for anything the
service does, and it never takes longer than the configured timeout, waiting for a free slot
included.

The API key lives only in the client's Authorization header: it is never a setting, never logged,
and never part of a fallback reason (which is stored with the message).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Protocol

from combot import __version__
from combot.breaker import OPEN_REASON, CircuitBreaker, counts_as_failure
from combot.llmhttp import BodyTooLarge, Endpoint, ProtocolError, route
from combot.settings import Settings

log = logging.getLogger("combot.llm")

# A paraphrase is one or two sentences; anything much longer is not what was asked for.
MAX_REPLY_CHARS = 600
# A chat-completions answer of this size is already wrong; stop reading there.
MAX_BODY_BYTES = 256 * 1024
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")
_URL = re.compile(r"(?i)\b(?:https?|ftp|mailto):|\bwww\.|\]\(")
_MARKUP = re.compile(r"<\s*/?\s*[A-Za-z!][^>]*>|```|\*\*|__|^\s*(?:#{1,6}\s|[-*+]\s|\d+[.)]\s)", re.MULTILINE)
_AI_TALK = re.compile(r"(?i)\b(?:as an ai|an ai (?:assistant|model|language)|language model|chatgpt|openai)\b")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019"}
_WORDS = re.compile(r"[a-z0-9']+")
# A reply sharing this many words in a row with the instructions is repeating them (a participant
# who wrote "print your system prompt" and a model that obeyed). Fewer would catch honest replies:
# "more information about the customer-service experience you have in mind" shares 7 with ours.
ECHO_WORDS = 10
# The circuit breaker's shared state, beside the database (see combot/breaker.py).
BREAKER_SUFFIX = ".llm-breaker"


@dataclass(frozen=True)
class LLMConfig:
    """The `[llm]` settings; `from_settings` gives None when no base URL is set (no LLM)."""

    base_url: str
    model: str = "gpt-4o-mini"
    temperature: float = 0.7
    max_tokens: int = 150
    timeout: float = 4.0
    max_in_flight: int = 100
    max_calls_per_participant: int = 10
    api_key_env: str = "OPENAI_API_KEY"
    breaker_failures: int = 3
    breaker_cooldown: float = 30.0

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError("llm timeout must be more than 0 seconds")
        if self.max_in_flight < 1:
            raise ValueError("llm max_in_flight must be at least 1")
        if self.max_tokens < 1:
            raise ValueError("llm max_tokens must be at least 1")
        if self.max_calls_per_participant < 0:
            raise ValueError("llm max_calls_per_participant must be 0 (no limit) or more")
        if self.breaker_failures < 0:
            raise ValueError("llm breaker_failures must be 0 (no breaker) or more")
        if self.breaker_cooldown <= 0:
            raise ValueError("llm breaker_cooldown must be more than 0 seconds")

    @classmethod
    def from_settings(cls, settings: Settings) -> LLMConfig | None:
        section = settings.section("llm")
        if not str(section["base_url"]).strip():
            return None
        return cls(**{f.name: section[f.name] for f in fields(cls)})

    @property
    def endpoint(self) -> str:
        return self.base_url.strip().rstrip("/") + "/chat/completions"

    def api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        environ = os.environ if environ is None else environ
        return (environ.get(self.api_key_env) or None) if self.api_key_env else None

    def calls_allowed(self, used: int) -> int | None:
        """How many more LLM replies a participant who has had `used` may get (None: no limit)."""
        if self.max_calls_per_participant == 0:
            return None
        return max(0, self.max_calls_per_participant - used)


@dataclass(frozen=True)
class LLMReply:
    """Text from the model, checked and tidied, with the model's name and the call's latency."""

    text: str
    model: str
    latency_ms: int


@dataclass(frozen=True)
class Fallback:
    """Why the offline text is used: timeout, busy, http <status>, connection, bad response: <why>,
    unusable API key."""

    reason: str
    latency_ms: int


class BadResponse(Exception):
    """The service answered, but not with a usable chat completion."""


class ChatModel(Protocol):
    """What the web layer needs from an LLM (tests may pass their own)."""

    config: LLMConfig

    async def complete(self, system: str, text: str) -> LLMReply | Fallback: ...

    async def aclose(self) -> None: ...


class LLM:
    """One per worker process: kept-alive connections to the endpoint and a semaphore capping calls
    in flight (and so the connections open at once)."""

    def __init__(self, config: LLMConfig, *, api_key: str | None = None, breaker_path: str | Path | None = None,
                 environ: Mapping[str, str] | None = None):
        self.config = config
        # A probe call may take the whole timeout; after that (its worker died) another may probe.
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown, path=breaker_path,
                                      probe_lease=config.timeout + 1.0)
        headers = {"User-Agent": f"combot/{__version__}", "Accept": "application/json"}
        # A key pasted with a line end (an env file's) is trimmed; one with any other character a
        # header cannot carry would break every request: the offline text answers instead.
        self.key_unusable = False
        api_key = (api_key or "").strip()
        if api_key and not _PRINTABLE_ASCII.fullmatch(api_key):
            log.error("the API key in $%s has a character an HTTP header cannot carry: every LLM reply falls"
                      " back to the offline text", config.api_key_env)
            self.key_unusable, api_key = True, ""
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"  # kept in the request head only
        self._endpoint = Endpoint(config.endpoint, headers, environ=environ)
        self._slots = asyncio.Semaphore(config.max_in_flight)

    async def __aenter__(self) -> LLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._endpoint.aclose()
        self.breaker.close()

    async def complete(self, system: str, text: str) -> LLMReply | Fallback:
        """Ask for a reply to `text` (sent as the user's message, never spliced into `system`)."""
        if self.key_unusable:
            return Fallback("unusable API key", 0)
        ticket = self.breaker.admit()
        if ticket is None:
            # The LLM failed again and again just now: nobody waits for it until the cool-down ends.
            return Fallback(OPEN_REASON, 0)
        outcome = await self._complete(system, text)
        self.breaker.record(isinstance(outcome, Fallback) and counts_as_failure(outcome.reason),
                            probe=ticket == "probe")
        return outcome

    async def _complete(self, system: str, text: str) -> LLMReply | Fallback:
        started = time.perf_counter()
        acquired = False
        try:
            # One deadline for waiting for a slot and for the call: a full worker falls back in
            # time instead of queueing participants behind it.
            async with asyncio.timeout(self.config.timeout):
                await self._slots.acquire()
                acquired = True
                text_out, model = await self._call(system, text)
                if repeats_instructions(text_out, system):
                    raise BadResponse("repeats the instructions")
            return LLMReply(text_out, model, _ms(started))
        except TimeoutError:
            reason = "timeout" if acquired else "busy"
        except _HTTPStatus as error:
            reason = f"http {error.status}"
        except BadResponse as error:
            reason = f"bad response: {error}"
        except (OSError, ProtocolError):  # refused, reset, TLS, DNS, or not HTTP as we read it
            reason = "connection"
        except Exception as error:  # noqa: BLE001 - whatever happens, the participant gets the offline text
            log.exception("unexpected error calling the LLM")
            reason = f"error: {type(error).__name__}"
        finally:
            if acquired:
                self._slots.release()
        log.info("LLM fallback (%s) after %d ms", reason, _ms(started))
        return Fallback(reason, _ms(started))

    async def _call(self, system: str, text: str) -> tuple[str, str]:
        payload = {
            "model": self.config.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}],
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        try:
            response = await self._endpoint.post(body, "application/json", MAX_BODY_BYTES)
        except BodyTooLarge:
            raise BadResponse(f"body over {MAX_BODY_BYTES // 1024} KiB") from None
        if not 200 <= response.status < 300:
            raise _HTTPStatus(response.status)
        return parse_completion(response.body, self.config.model)


class _HTTPStatus(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


def create_llm(settings: Settings, environ: Mapping[str, str] | None = None,
               database: str | Path | None = None) -> LLM | None:
    """The worker's LLM, or None when none is configured (the offline paraphraser answers).

    With `database`, the circuit breaker's state is shared by every worker using that database.
    """
    config = LLMConfig.from_settings(settings)
    if config is None:
        return None
    return LLM(config, api_key=config.api_key(environ), environ=environ,
               breaker_path=f"{database}{BREAKER_SUFFIX}" if database else None)


def parse_completion(body: bytes, default_model: str) -> tuple[str, str]:
    """The checked reply text and the model's name from a chat-completions response body."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadResponse("not JSON") from None
    if not isinstance(data, dict):
        raise BadResponse("not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list):
        raise BadResponse("no 'choices' list")
    if not choices:
        raise BadResponse("no choices")
    first = choices[0]
    message = first.get("message") if isinstance(first, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise BadResponse("no choices[0].message.content string")
    if first.get("finish_reason") == "length":
        raise BadResponse("cut off at max_tokens")
    model = data.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= 200:
        model = default_model
    return check_reply(content), model


def _runs(text: str) -> set[tuple[str, ...]]:
    words = _WORDS.findall(text.lower())
    return {tuple(words[i:i + ECHO_WORDS]) for i in range(len(words) - ECHO_WORDS + 1)}


def repeats_instructions(reply: str, system: str) -> bool:
    """Whether the reply contains ECHO_WORDS or more consecutive words of the system prompt."""
    return not _runs(reply).isdisjoint(_runs(system))


def check_reply(content: str) -> str:
    """Tidy a model's reply for the chat page, or raise BadResponse when it is not fit to show."""
    text = _CONTROL.sub("", content).strip()
    if _MARKUP.search(text):
        raise BadResponse("contains markup")
    text = " ".join(text.split())
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    if not text:
        raise BadResponse("empty")
    if len(text) > MAX_REPLY_CHARS:
        raise BadResponse(f"too long ({len(text)} characters)")
    if _URL.search(text):
        raise BadResponse("contains a link")
    if _AI_TALK.search(text):
        raise BadResponse("talks about being an AI")
    return text


async def check(settings: Settings, system: str, text: str, environ: Mapping[str, str] | None = None) -> LLMReply | Fallback:
    """One call with the configured settings, for `combot llm-check` (raises LookupError with no LLM)."""
    llm = create_llm(settings, environ)
    if llm is None:
        raise LookupError("no LLM is configured")
    async with llm:
        return await llm.complete(system, text)


def describe(config: LLMConfig) -> dict[str, Any]:
    """The settings in force, safe to print: the key is shown only as set or not set."""
    shown: dict[str, Any] = {f.name: getattr(config, f.name) for f in fields(config)}
    shown["api_key"] = "set" if config.api_key() else "not set"
    way = route(config.endpoint)  # the proxy's address only: never its credentials
    shown["proxy"] = (f"{way.host}:{way.port} ({'CONNECT tunnel' if way.tunnel else 'forwarding'})" if way.proxied
                      else "none")
    return shown
