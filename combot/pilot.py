"""`combot pilot`: simulated participants through every cell, before the first real one.

Starts the real multi-worker server (the bench's launcher) on a temporary copy of the study and a
throwaway database, creates sessions through the page's HTTP flow (consent included) until every
cell holds `per_cell` of them, and walks each through the whole conversation as its persona. Then
it reads back from the pilot database how every bot message was made, checks the balance and the
export, and hands all of it to `pilot_report` for flags and the HTML/JSON report.

The k-th participant of every cell plays the same persona, so cells can be compared turn by turn.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx

from combot import bench, export, recruitment, store
from combot.llm import BadResponse, LLMConfig, parse_completion
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
    concurrency: int = 8


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
            text, _model = parse_completion(response.content, self.model)
        except (BadResponse, httpx.HTTPError):
            self.failures += 1
            text = fallback
        self.history.append({"role": "assistant", "content": text})
        return text[:2000]


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
    values = {name: f"pilot-{run}-{name.lower()}-{index}" for name in recruitment.param_names(study.settings)}
    return values


async def run_conversations(base: str, study: Study, options: PilotOptions,
                            locate: Callable[[str], tuple[str, str, dict[str, str]]],
                            say: Callable[[str], None]) -> list[Conversation]:
    """Create sessions until every cell holds per_cell participants, then walk them all at once.

    `locate(session_id)` gives (participant_id, cell label, factors) from the pilot database.
    """
    personas = choose_personas(options.personas)
    per_cell = options.per_cell or len(personas)
    cells = study.cells()
    wanted = per_cell * len(cells)
    run = f"{os.getpid():x}{int(time.time()) % 100000:x}"
    headers: dict[str, str] = {}
    llm_config = model = None
    if options.participant_llm:
        llm_config = LLMConfig.from_settings(study.settings)
        if llm_config is None:
            raise PilotError("--participant-llm needs an OpenAI-compatible service: set [llm] base_url"
                             " (or COMBOT_LLM_URL) and its key")
        model = options.participant_model or llm_config.model
    limits = httpx.Limits(max_connections=options.concurrency, max_keepalive_connections=options.concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(180.0), limits=limits) as client:
        llm_client = None
        if llm_config is not None:
            key = llm_config.api_key()
            llm_client = httpx.AsyncClient(timeout=httpx.Timeout(max(llm_config.timeout, 30.0)), headers=(
                {"Authorization": f"Bearer {key}"} if key else {}))
        try:
            walker = Walker(base, study, client, headers)
            consent = await walker.consent_needed()
            conversations: list[Conversation] = []
            filled: dict[str, int] = {}
            # Balanced assignment fills every cell in turn; a random one needs more arrivals, so keep
            # going (within a bound) until every cell has its share.
            limit = wanted if study.assignment == "balanced" else wanted * 6
            while len(conversations) < limit:
                index = len(conversations)
                conv = Conversation(index=index, slot=0, persona=personas[0],
                                    params=pilot_params(study, index, run))
                await walker.start(conv, conv.params, consent)
                conv.participant_id, conv.cell, conv.factors = locate(conv.session_id)
                slot = filled.get(conv.cell, 0)
                filled[conv.cell] = slot + 1
                conv.slot = slot
                conv.persona = personas[slot % len(personas)]
                conversations.append(conv)
                if len(filled) == len(cells) and min(filled.values()) >= per_cell:
                    break
            say(f"{len(conversations)} simulated participants in {len(cells)} cells, walking them ...")
            gate = asyncio.Semaphore(options.concurrency)

            async def one(conv: Conversation) -> None:
                async with gate:
                    speaker: ScriptedSpeaker | LLMSpeaker
                    if llm_config is not None and llm_client is not None and model is not None:
                        speaker = LLMSpeaker(conv.persona, llm_config, llm_client, model)
                        conv.player = "llm"
                    else:
                        speaker = ScriptedSpeaker(conv.persona)
                    await walker.walk(conv, speaker)

            await asyncio.gather(*(one(c) for c in conversations))
        finally:
            if llm_client is not None:
                await llm_client.aclose()
    return conversations


# --- what the pilot database says -------------------------------------------------------------------

_OPTIONAL_MESSAGE_FIELDS = ("model", "latency_ms", "fallback_reason", "compute_ms", "shown_ms")


def stored_transcript(conn: sqlite3.Connection, conv: Conversation) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The participant's row and messages as stored, with the links the participant was shown."""
    row = store.participant_by_token(conn, conv.session_id)
    if row is None:
        return {}, []
    links = iter([m["link"] for m in conv.seen if m["from"] == "bot" and m.get("link")])
    out = []
    for message in store.transcript(conn, row["id"]):
        keys = message.keys()
        item: dict[str, Any] = {"from": message["sender"], "turn": message["turn"], "kind": message["kind"],
                                "text": message["text"], "produced_by": message["produced_by"]}
        for name in _OPTIONAL_MESSAGE_FIELDS:
            if name in keys and message[name] is not None:
                item[name] = message[name]
        if message["sender"] == "bot" and message["kind"] == "thanks":
            link = next(links, None)
            if link:
                item["link"] = link
        out.append(item)
    return dict(row), out


def check_export(conn: sqlite3.Connection, study: Study, folder: Path) -> dict[str, Any]:
    """Run the export on the pilot database; every column of every file must be in the codebook."""
    counts = export.export_to_dir(conn, study, folder, fmt="csv")
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
    for name, rows in counts.items():
        with open(folder / f"{name}.csv", encoding="utf-8", newline="") as stream:
            header = next(csv.reader(stream), [])
        files[name] = {"rows": rows, "columns": header,
                       "undocumented": [c for c in header if c not in documented.get(name, set())]}
    return {"files": files, "ok": all(not f["undocumented"] for f in files.values())}


def verify_stored(database: Path, conversations: Sequence[Conversation]) -> dict[str, int]:
    """Every chat message sent and every bot message seen is in the pilot database (bench's check)."""
    people = []
    for conv in conversations:
        person = bench.Participant(session_id=conv.session_id)
        for item in conv.seen:
            if item["from"] == "bot":
                person.received.append(item["text"])
            elif item.get("step") != "email":  # stored as a marker; the address only in the emails table
                person.sent.append(item["text"])
        people.append(person)
    return bench.verify(database, people)


# --- the whole run --------------------------------------------------------------------------------------

def run_pilot(study: Study, options: PilotOptions, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the pilot and return its results (see `pilot_report.build` for the report's shape)."""
    from combot import pilot_report

    started = time.monotonic()
    choose_personas(options.personas)
    with tempfile.TemporaryDirectory(prefix="combot-pilot-") as tmp:
        workdir = Path(tmp)
        copy = workdir / "study.toml"
        shutil.copyfile(study_source(study), copy)
        say(f"starting {options.workers} workers on a throwaway database ...")
        with bench.local_server(options.workers, str(copy), {}, workdir, database_name="pilot.db") as (url, db, _p):
            conn = store.connect(db)
            try:
                def locate(token: str) -> tuple[str, str, dict[str, str]]:
                    row = store.participant_by_token(conn, token)
                    if row is None:
                        raise PilotError("a session the server created is not in its database")
                    return row["id"], row["cell"], json.loads(row["factors"])

                conversations = asyncio.run(run_conversations(url, study, options, locate, say))
            finally:
                conn.close()
        conn = store.connect(db)
        try:
            transcripts = []
            for conv in conversations:
                row, messages = stored_transcript(conn, conv)
                if row:
                    conv.participant_id = row["id"]
                    conv.factors = json.loads(row["factors"])
                    conv.cell = row["cell"]
                transcripts.append((conv, row, messages))
            data: dict[str, Any] = {
                "database": "a throwaway copy, deleted after the pilot",
                "stored": verify_stored(db, conversations),
                "export": check_export(conn, study, workdir / "export"),
            }
            counts = store.cell_counts(conn)
        finally:
            conn.close()
    data["counts"] = counts
    return pilot_report.build(study, options, transcripts, data, time.monotonic() - started)
