"""`combot pilot`: simulated participants through every cell, before the first real one.

Starts the real multi-worker server (the bench's launcher) on a temporary copy of the study and a
throwaway database, creates sessions through the page's HTTP flow (consent included) until every
cell holds `per_cell` of them, and walks each through the whole conversation as its persona. Then
it reads back from the pilot database how every bot message was made, checks the balance and the
export, and hands all of it to `pilot_report` for flags and the HTML/JSON report.

With a URL (a study already running), the participants carry the synthetic-participant header
(`combot.synthetic`, from the admin token), so they count towards no cell and stay out of the
dashboard and the export; the pilot reads them back through the admin export with them included.

The k-th participant of every cell plays the same persona, so cells can be compared turn by turn.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import httpx

from combot import bench, export, recruitment, store, synthetic
from combot.llm import BadResponse, LLMConfig
from combot.personas import PERSONAS, Persona, ScriptedSpeaker, email_answers
from combot.study import Study

# A conversation that has not ended after this many participant messages is stuck (a loop of
# re-prompts or e-mail retries): it is stopped and reported, never walked forever.
MAX_MESSAGES = 30


@dataclass
class PilotOptions:
    per_cell: int | None = None  # None: every persona of the bank once per cell
    workers: int = 2
    config_path: str | None = None
    participant_llm: bool = False
    participant_model: str | None = None
    personas: tuple[str, ...] = ()  # keys of the bank to use (default: all, in order)
    concurrency: int = 16  # conversations at once (a held reply costs the server an idle coroutine)
    url: str | None = None  # a running server instead of a throwaway one
    admin_token: str = ""  # with url: marks the participants synthetic and reads the export


@dataclass
class Conversation:
    """One simulated participant, as the pilot saw it over HTTP."""

    index: int
    slot: int
    persona: Persona
    session_id: str = ""
    participant_id: str = ""
    cell: str = ""
    factors: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # the recruitment parameters it arrived with
    seen: list[dict[str, Any]] = field(default_factory=list)  # what the page would show, in order
    expects: str = "message"
    turn: int | None = None  # the turn the server expects next (sent back with each message)
    redirect: dict[str, Any] | None = None
    error: str | None = None
    player: str = "script"
    player_fallbacks: int = 0


class PilotError(Exception):
    """The pilot cannot run (no LLM for --participant-llm, an unknown persona, a server that fails)."""


def choose_personas(keys: Sequence[str]) -> tuple[Persona, ...]:
    if not keys:
        return PERSONAS
    by_key = {p.key: p for p in PERSONAS}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise PilotError(f"unknown persona {', '.join(unknown)} (known: {', '.join(by_key)})")
    return tuple(by_key[k] for k in keys)


def study_source(study: Study) -> Path:
    """The file the study was loaded from (the bundled default when it came from none)."""
    from combot.resources import default_study_path

    return Path(study.path) if study.path and Path(study.path).is_file() else default_study_path()


# --- the participant's side ---------------------------------------------------------------------

class LLMSpeaker:
    """A persona played by an OpenAI-compatible model: the bot's messages are its 'user' turns.

    The persona's instructions exist only in this client's requests to the participant's LLM; the
    study's server only ever receives the model's chat message. A failed call falls back to the
    persona's script for that message, counted on the conversation.
    """

    def __init__(self, persona: Persona, config: LLMConfig, client: httpx.AsyncClient, model: str):
        self.persona = persona
        self.config = config
        self.client = client
        self.model = model
        self.script = ScriptedSpeaker(persona)
        self.history: list[dict[str, str]] = []
        self.failures = 0

    def heard(self, bot_text: str) -> None:
        if self.history and self.history[-1]["role"] == "user":
            self.history[-1]["content"] += "\n" + bot_text
        else:
            self.history.append({"role": "user", "content": bot_text})

    async def next_message(self, bot_said: Sequence[str]) -> str:
        fallback = self.script.next_message(bot_said)  # keeps the script in step either way
        messages = [{"role": "system", "content": self.persona.system_prompt()}, *self.history]
        try:
            response = await self.client.post(self.config.endpoint, json={
                "model": self.model, "messages": messages, "temperature": self.config.temperature,
                "max_tokens": max(self.config.max_tokens, 200)})
            if response.status_code != 200:
                raise BadResponse(f"http {response.status_code}")
            text = persona_reply(response.content)
        except (BadResponse, httpx.HTTPError):
            self.failures += 1
            text = fallback
        self.history.append({"role": "assistant", "content": text})
        return text[:2000]


def persona_reply(body: bytes) -> str:
    """The chat message in a chat-completions answer. Unlike the bot's replies it is not held to the
    bot's rules (no markup, no links): a participant may write anything, and the study must cope."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BadResponse("not a chat completion") from None
    if not isinstance(content, str) or not content.strip():
        raise BadResponse("empty")
    return " ".join(content.split())[:2000]


class Walker:
    """Walks conversations over HTTP as the chat page does."""

    def __init__(self, base: str, study: Study, client: httpx.AsyncClient, headers: dict[str, str]):
        self.base = base
        self.study = study
        self.client = client
        self.headers = headers

    async def consent_needed(self) -> bool:
        response = await self.client.get(self.base + "api/consent", headers=self.headers)
        return response.status_code == 200 and bool(response.json().get("enabled"))

    async def start(self, conv: Conversation, params: dict[str, str], consent: bool) -> None:
        # As the page does: a client key (a retry never makes a second participant), consent if asked.
        body: dict[str, Any] = {"client_key": secrets.token_urlsafe(24)}
        if consent:
            body["consent"] = True
        response = await self.client.post(self.base + "api/sessions", json=body, params=params, headers=self.headers)
        if response.status_code not in (200, 201):
            raise PilotError(f"creating a session: HTTP {response.status_code} {response.text[:200]}")
        data = response.json()
        conv.session_id = data["session_id"]
        conv.expects = data["expects"]
        conv.turn = data.get("turn")
        conv.seen += [{"from": "bot", "text": m["text"], **({"link": m["link"]} if m.get("link") else {})}
                      for m in data["messages"] if m.get("from") == "bot"]

    async def send(self, conv: Conversation, text: str, message_id: str, step: str = "message") -> None:
        url = f"{self.base}api/sessions/{conv.session_id}/messages"
        body: dict[str, Any] = {"text": text, "client_message_id": message_id}
        if conv.turn is not None:
            body["turn"] = conv.turn  # the turn this answers, as the page sends it
        response = await self.client.post(url, json=body, headers=self.headers)
        if response.status_code != 200:
            raise PilotError(f"message {message_id}: HTTP {response.status_code} {response.text[:200]}")
        data = response.json()
        conv.seen.append({"from": "participant", "text": text, "step": step})
        for reply in data["replies"]:
            conv.seen.append({"from": "bot", "text": reply["text"], **({"link": reply["link"]} if reply.get("link") else {})})
        conv.expects = data["expects"]
        conv.turn = data.get("turn")
        if data.get("redirect"):
            conv.redirect = data["redirect"]

    async def walk(self, conv: Conversation, speaker: ScriptedSpeaker | LLMSpeaker) -> None:
        sent = 0
        try:
            heard = 0
            while conv.expects == "message" and sent < MAX_MESSAGES:
                bot_said = [m["text"] for m in conv.seen if m["from"] == "bot"]
                if isinstance(speaker, LLMSpeaker):
                    for text in bot_said[heard:]:
                        speaker.heard(text)
                    heard = len(bot_said)
                    text = await speaker.next_message(bot_said)
                else:
                    text = speaker.next_message(bot_said)
                await self.send(conv, text, f"pilot-{sent}")
                sent += 1
            if conv.expects == "email":
                for text in email_answers(conv.persona, self.study.email_skip_words):
                    await self.send(conv, text, f"pilot-{sent}", step="email")
                    sent += 1
                    if conv.expects != "email":
                        break
            if conv.expects != "done":
                conv.error = f"the conversation did not end: still expecting {conv.expects!r} after {sent} messages"
        except (PilotError, httpx.HTTPError) as error:
            conv.error = f"{type(error).__name__}: {error}"[:300]
        if isinstance(speaker, LLMSpeaker):
            conv.player_fallbacks = speaker.failures


def pilot_params(study: Study, index: int, run: str) -> dict[str, str]:
    """The recruitment parameters a platform would append, with recognisable pilot values."""
    return {name: f"pilot-{run}-{name.lower()}-{index}" for name in recruitment.param_names(study.settings)}


class Run:
    """The HTTP side of one pilot: creates sessions, gives each its persona, walks them all."""

    def __init__(self, base: str, study: Study, options: PilotOptions, headers: dict[str, str]):
        self.base = base
        self.study = study
        self.options = options
        self.headers = headers
        self.personas = choose_personas(options.personas)
        self.per_cell = options.per_cell or len(self.personas)
        self.conversations: list[Conversation] = []
        self.filled: dict[str, int] = {}
        self.run_id = f"{os.getpid():x}{int(time.time()) % 100000:x}"
        self.llm_config: LLMConfig | None = None
        self.model = ""
        if options.participant_llm:
            self.llm_config = LLMConfig.from_settings(study.settings)
            if self.llm_config is None:
                raise PilotError("--participant-llm needs an OpenAI-compatible service: set [llm] base_url"
                                 " (or COMBOT_LLM_URL) and its key")
            self.model = options.participant_model or self.llm_config.model

    async def __aenter__(self) -> Run:
        limits = httpx.Limits(max_connections=self.options.concurrency,
                              max_keepalive_connections=self.options.concurrency)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(180.0), limits=limits)
        self.llm_client: httpx.AsyncClient | None = None
        if self.llm_config is not None:
            key = self.llm_config.api_key()
            self.llm_client = httpx.AsyncClient(timeout=httpx.Timeout(max(self.llm_config.timeout, 30.0)),
                                                headers={"Authorization": f"Bearer {key}"} if key else {})
        self.walker = Walker(self.base, self.study, self.client, self.headers)
        self.consent = await self.walker.consent_needed()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()
        if self.llm_client is not None:
            await self.llm_client.aclose()

    def missing(self) -> int:
        """Participants still needed for every cell to hold per_cell."""
        return sum(max(0, self.per_cell - self.filled.get(self.study.cell_label(cell), 0))
                   for cell in self.study.cells())

    async def create(self) -> Conversation:
        index = len(self.conversations)
        conv = Conversation(index=index, slot=0, persona=self.personas[0],
                            params=pilot_params(self.study, index, self.run_id))
        await self.walker.start(conv, conv.params, self.consent)
        self.conversations.append(conv)
        return conv

    def place(self, conv: Conversation, participant_id: str, cell: str, factors: dict[str, str]) -> None:
        """The k-th participant of a cell plays the k-th persona, in every cell alike."""
        if cell not in {self.study.cell_label(c) for c in self.study.cells()}:
            raise PilotError(f"the server put a participant in cell '{cell}', which {self.study.path} does not"
                             " have: give the study file the server runs with --config")
        conv.participant_id, conv.cell, conv.factors = participant_id, cell, factors
        conv.slot = self.filled.get(cell, 0)
        self.filled[cell] = conv.slot + 1
        conv.persona = self.personas[conv.slot % len(self.personas)]

    async def walk_all(self, say: Callable[[str], None]) -> None:
        say(f"{len(self.conversations)} simulated participants in {len(self.filled)} cells, walking them ...")
        gate = asyncio.Semaphore(self.options.concurrency)

        async def one(conv: Conversation) -> None:
            async with gate:
                speaker: ScriptedSpeaker | LLMSpeaker
                if self.llm_config is not None and self.llm_client is not None:
                    speaker = LLMSpeaker(conv.persona, self.llm_config, self.llm_client, self.model)
                    conv.player = "llm"
                else:
                    speaker = ScriptedSpeaker(conv.persona)
                await self.walker.walk(conv, speaker)

        await asyncio.gather(*(one(c) for c in self.conversations))


# --- what was stored ----------------------------------------------------------------------------------

_OPTIONAL_MESSAGE_FIELDS = ("model", "latency_ms", "fallback_reason", "compute_ms", "shown_ms")


def _message(row: Mapping[str, Any], links: Iterator[dict[str, str]]) -> dict[str, Any]:
    item: dict[str, Any] = {"from": row["sender"], "turn": row["turn"], "kind": row["kind"], "text": row["text"],
                            "produced_by": row["produced_by"]}
    for name in _OPTIONAL_MESSAGE_FIELDS:
        if row.get(name) is not None:
            item[name] = row[name]
    if row["sender"] == "bot" and row["kind"] == "thanks":
        link = next(links, None)
        if link:
            item["link"] = link
    return item


def _links(conv: Conversation) -> Iterator[dict[str, str]]:
    return iter([m["link"] for m in conv.seen if m["from"] == "bot" and m.get("link")])


def stored_transcript(conn: sqlite3.Connection, conv: Conversation) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The participant's row and messages as stored, with the links the participant was shown."""
    row = store.participant_by_token(conn, conv.session_id)
    if row is None:
        return {}, []
    links = _links(conv)
    return dict(row), [_message(dict(message), links) for message in store.transcript(conn, row["id"])]


def check_export(folder: Path) -> dict[str, Any]:
    """Every column of every exported CSV file must be described in the codebook beside it."""
    book = (folder / "codebook.md").read_text(encoding="utf-8")
    documented: dict[str, set[str]] = {}
    section = ""
    for line in book.splitlines():
        heading = re.match(r"^## (\w+)\.csv", line)
        if heading:
            section = heading.group(1)
        column = re.match(r"^\| `([^`]+)` \|", line)
        if column and section:
            documented.setdefault(section, set()).add(column.group(1))
    files: dict[str, Any] = {}
    for path in sorted(folder.glob("*.csv")):
        with open(path, encoding="utf-8", newline="") as stream:
            reader = csv.reader(stream)
            header = next(reader, [])
            rows = sum(1 for _ in reader)
        name = path.stem
        files[name] = {"rows": rows, "columns": header,
                       "undocumented": [c for c in header if c not in documented.get(name, set())]}
    return {"files": files, "ok": all(not f["undocumented"] for f in files.values())}


def verify_seen(collected: Sequence[tuple[Conversation, Mapping[str, Any], list[dict[str, Any]]]]) -> dict[str, int]:
    """Every chat message sent and every bot message seen over HTTP is among the stored messages."""
    expected = found = 0
    for conv, _row, messages in collected:
        stored = {"bot": [m["text"] for m in messages if m["from"] == "bot"],
                  "participant": [m["text"] for m in messages if m["from"] == "participant"]}
        for item in conv.seen:
            if item.get("step") == "email":
                continue  # stored as a marker; an address only in the emails table
            expected += 1
            pool = stored["bot" if item["from"] == "bot" else "participant"]
            if item["text"] in pool:
                pool.remove(item["text"])  # each stored message matches one seen message only
                found += 1
    return {"messages_expected": expected, "messages_found": found, "messages_missing": expected - found}


# --- a local server on a throwaway database -----------------------------------------------------------

async def _walk_local(url: str, study: Study, options: PilotOptions, conn: sqlite3.Connection,
                      say: Callable[[str], None]) -> list[Conversation]:
    async with Run(url, study, options, {}) as run:
        # Balanced assignment fills every cell in turn; a random one needs more arrivals, so keep
        # going (within a bound) until every cell has its share.
        limit = run.missing() * (1 if study.assignment == "balanced" else 6)
        while run.missing() and len(run.conversations) < limit:
            conv = await run.create()
            row = store.participant_by_token(conn, conv.session_id)
            if row is None:
                raise PilotError("a session the server created is not in its database")
            run.place(conv, row["id"], row["cell"], json.loads(row["factors"]))
        await run.walk_all(say)
    return run.conversations


def _run_local(study: Study, options: PilotOptions, say: Callable[[str], None]) -> tuple[list[Any], dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="combot-pilot-") as tmp:
        workdir = Path(tmp)
        copy = workdir / "study.toml"
        shutil.copyfile(study_source(study), copy)
        say(f"starting {options.workers} workers on a throwaway database ...")
        # Every pilot participant arrives from this one address: no per-address start limit.
        env = {"COMBOT_SESSION_RATE_LIMIT": "0"}
        with bench.local_server(options.workers, str(copy), env, workdir, database_name="pilot.db") as (url, db, _p):
            conn = store.connect(db)
            try:
                conversations = asyncio.run(_walk_local(url, study, options, conn, say))
            finally:
                conn.close()
        conn = store.connect(db)
        try:
            collected = [(conv, *stored_transcript(conn, conv)) for conv in conversations]
            export.export_to_dir(conn, study, workdir / "export", fmt="csv")
            data: dict[str, Any] = {
                "database": "a throwaway copy, deleted after the pilot",
                "stored": verify_seen(collected),
                "export": check_export(workdir / "export"),
                "counts": store.cell_counts(conn),
            }
        finally:
            conn.close()
    return collected, data


# --- a running server (--url) --------------------------------------------------------------------------

# Rounds of new arrivals on a live server: synthetic participants count towards no cell, so cells
# are whatever assignment gives them; after this many rounds the pilot reports what it got.
REMOTE_ROUNDS = 6


class AdminExport:
    """The running study's export (synthetic participants included), read with its admin token."""

    def __init__(self, client: httpx.AsyncClient, base: str, token: str):
        self.client = client
        self.url = base + "admin/export.zip"
        self.token = token

    async def files(self, fmt: str, into: Path | None = None) -> dict[str, bytes]:
        response = await self.client.get(self.url, params={"include_synthetic": "1", "format": fmt},
                                         headers={"Authorization": f"Bearer {self.token}"})
        if response.status_code != 200:
            raise PilotError(f"reading the study's export: HTTP {response.status_code} {response.text[:200]}"
                             + (" (is the admin token right?)" if response.status_code == 401 else ""))
        with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
            names = [n for n in archive.namelist() if "/" not in n]
            if into is not None:
                archive.extractall(into, members=names)
            return {name: archive.read(name) for name in names}

    async def rows(self) -> dict[str, list[dict[str, Any]]]:
        files = await self.files("jsonl")
        return {name.rsplit(".", 1)[0]: [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
                for name, data in files.items() if name.endswith(".jsonl")}


def _ours(rows: Mapping[str, list[dict[str, Any]]], conversations: Sequence[Conversation]
          ) -> dict[int, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Each pilot conversation's exported participant row and messages, found by its URL parameters."""
    by_value = {value: conv.index for conv in conversations for value in conv.params.values()}
    owner = {}
    for row in rows.get("personal", []):
        for value in row.values():
            if value in by_value:
                owner[row["participant_id"]] = by_value[value]
                break
    out: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for row in rows.get("participants", []):
        if row["participant_id"] in owner:
            out[owner[row["participant_id"]]] = (row, [])
    for message in rows.get("messages", []):
        if message["participant_id"] in owner and owner[message["participant_id"]] in out:
            out[owner[message["participant_id"]]][1].append(message)
    return out


async def _walk_remote(base: str, study: Study, options: PilotOptions, token: str, workdir: Path,
                       say: Callable[[str], None]) -> tuple[list[Any], dict[str, Any]]:
    async with Run(base, study, options, synthetic.headers(token)) as run:
        if not recruitment.param_names(study.settings):
            raise PilotError("--url needs a kept URL parameter ([recruitment] params) to find the pilot's"
                             " participants in the study's export")
        admin = AdminExport(run.client, base, token)
        for _ in range(REMOTE_ROUNDS):
            if not run.missing():
                break
            new = [await run.create() for _ in range(run.missing())]
            found = _ours(await admin.rows(), new)
            for conv in new:
                if conv.index not in found:
                    raise PilotError("a participant the pilot created is not in the study's export")
                row = found[conv.index][0]
                factors = {name: row.get(name) or row.get(f"factor_{name}") or "" for name in study.factors}
                run.place(conv, row["participant_id"], row["cell"], factors)
        await run.walk_all(say)
        final = _ours(await admin.rows(), run.conversations)
        await admin.files("csv", into=workdir)
    collected = []
    for conv in run.conversations:
        row, messages = final.get(conv.index, ({}, []))
        links = _links(conv)
        collected.append((conv, row, [_message(m, links) for m in sorted(messages, key=lambda m: m["message_id"])]))
    data = {"database": "the running study's own, through its export (the pilot's participants are marked"
                        " synthetic: they count towards no cell and are left out of the dashboard and export)",
            "stored": verify_seen(collected), "export": check_export(workdir),
            "remote_cells": dict(run.filled)}
    return collected, data


def _run_remote(study: Study, options: PilotOptions, say: Callable[[str], None]) -> tuple[list[Any], dict[str, Any]]:
    if not options.admin_token:
        raise PilotError("--url needs the study's admin token (--admin-token or COMBOT_ADMIN_TOKEN), so the"
                         " simulated participants are marked synthetic and their data can be read back")
    base = (options.url or "").rstrip("/") + "/"
    with tempfile.TemporaryDirectory(prefix="combot-pilot-") as tmp:
        return asyncio.run(_walk_remote(base, study, options, options.admin_token, Path(tmp), say))


# --- the whole run --------------------------------------------------------------------------------------

def run_pilot(study: Study, options: PilotOptions, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the pilot and return its report (see `pilot_report.build` for its shape)."""
    from combot import pilot_report

    started = time.monotonic()
    choose_personas(options.personas)
    collected, data = (_run_remote if options.url else _run_local)(study, options, say)
    return pilot_report.build(study, options, collected, data, time.monotonic() - started)
