"""Simulated participants for the fault tests: they walk the study as the page does, retry a cut
request with the same client message id, and remember exactly what they were acknowledged.

`Person.seen` is the conversation as that participant's page shows it, in order: only what came
back in a 200 (or 201) is in it. After the faults, the database must hold exactly that.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

FIRSTS = [
    "I bought a blender online and it stopped working after three days; the motor just died.",
    "My parcel was supposed to arrive on Monday but it is now two weeks late and tracking hasn't moved.",
    "The cashier rolled her eyes and was really rude when I asked to pay with coins.",
    "The jacket I ordered had a broken zip and the stitching was coming loose on the sleeve.",
    "The courier marked my package as delivered but it was never here.",
    "I was charged twice for the same order and it took a month to get the money back.",
]
FOLLOW_UPS = [
    "It happened about two weeks ago and I was really annoyed about it.",
    "I contacted them twice by email but nobody got back to me.",
    "They offered me a voucher in the end but it was not enough.",
    "Honestly I just wanted someone to apologise.",
]
EMAIL_SHOWN = "[e-mail address]"  # what the transcript holds for a valid address (the emails table has it)


@dataclass
class Person:
    index: int
    platform_id: str
    session_id: str = ""
    seen: list[tuple[str, str]] = field(default_factory=list)
    expects: str = ""
    turn: int = 0
    pending: tuple[str, str] | None = None  # (text, client_message_id) sent but not acknowledged
    in_flight: bool = False
    cut: int = 0  # requests that ended in a connection error
    unavailable: int = 0  # 503 answers
    errors: list[str] = field(default_factory=list)
    finished: bool = False

    @property
    def acknowledged(self) -> int:
        return len(self.seen)

    def next_message(self, rng: random.Random) -> tuple[str, str]:
        if self.expects == "email":
            return f"person{self.index}@example.com", "email"
        text = rng.choice(FIRSTS if self.turn == 0 else FOLLOW_UPS)
        return text, f"m{self.turn}"

    def take_session(self, body: dict[str, Any]) -> None:
        self.session_id = body["session_id"]
        self.seen = [("bot" if m["from"] == "bot" else "participant", m["text"]) for m in body["messages"]]
        self.expects = body["expects"]

    def take_answer(self, text: str, body: dict[str, Any]) -> None:
        self.seen.append(("participant", EMAIL_SHOWN if self.expects == "email" else text))
        self.seen += [("bot", r["text"]) for r in body["replies"]]
        self.expects = body["expects"]
        self.turn += 1
        self.pending = None
        self.finished = self.expects == "done"


@dataclass
class Crowd:
    """Participants arriving over `arrive_over` seconds, each pausing `think` seconds between messages.

    Every request that is cut (connection error) or answered 503 is retried with the same body
    after a short pause, as the page does (with `retry_cut` false, a cut request is left pending),
    until `deadline` (monotonic) passes; then nobody sends anything new.
    """

    base: str
    size: int
    think: tuple[float, float] = (0.2, 0.5)
    arrive_over: float = 5.0
    deadline: float = float("inf")
    seed: int = 8
    retry_cut: bool = True
    people: list[Person] = field(default_factory=list)
    other_status: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.people = [Person(i, f"fault-{self.seed}-{i}") for i in range(self.size)]

    # --- what is happening now --------------------------------------------------------------------

    def under_load(self) -> int:
        """Participants who have a session and have not finished."""
        return sum(1 for p in self.people if p.session_id and not p.finished)

    def in_flight(self) -> int:
        return sum(1 for p in self.people if p.in_flight)

    # --- running ------------------------------------------------------------------------------------

    async def run(self, client: httpx.AsyncClient) -> None:
        """Everyone walks on from where they are (a second run resumes: same sessions, same pending messages)."""
        await asyncio.gather(*(self._walk(client, person) for person in self.people if not person.finished))

    async def _walk(self, client: httpx.AsyncClient, person: Person) -> None:
        rng = random.Random(f"{self.seed}-{person.index}-{person.turn}")
        await asyncio.sleep(rng.uniform(0, self.arrive_over))
        try:
            if not person.session_id:
                body = await self._request(client, person, "POST", "api/sessions", {},
                                           params={"PROLIFIC_PID": person.platform_id})
                if body is None:
                    return
                person.take_session(body)
            while person.expects in ("message", "email"):
                await asyncio.sleep(rng.uniform(*self.think))
                if self._stopped() and person.pending is None:
                    return
                text, message_id = person.pending or person.next_message(rng)
                person.pending = (text, message_id)
                body = await self._request(client, person, "POST", f"api/sessions/{person.session_id}/messages",
                                           {"text": text, "client_message_id": message_id})
                if body is None:
                    return
                person.take_answer(text, body)
        except Exception as error:  # counted and asserted on, never hidden
            person.errors.append(f"{type(error).__name__}: {error}")

    def _stopped(self) -> bool:
        return time.monotonic() > self.deadline

    async def _request(self, client: httpx.AsyncClient, person: Person, method: str, path: str, body: dict[str, Any],
                       params: dict[str, str] | None = None) -> dict[str, Any] | None:
        rng = random.Random()
        while True:
            person.in_flight = True
            try:
                response = await client.request(method, self.base + path, json=body, params=params)
            except httpx.TransportError:
                person.cut += 1
                if not self.retry_cut or self._stopped():
                    return None
                await asyncio.sleep(rng.uniform(0.2, 0.5))
                continue
            finally:
                person.in_flight = False
            if response.status_code in (200, 201):
                return response.json()  # type: ignore[no-any-return]
            if response.status_code == 503:
                person.unavailable += 1
                if self._stopped():
                    return None
                await asyncio.sleep(rng.uniform(0.2, 0.5))
                continue
            self.other_status.append(response.status_code)
            person.errors.append(f"{method} {path}: HTTP {response.status_code} {response.text[:200]}")
            return None


def client(size: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=size + 10, max_keepalive_connections=size + 10)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(90.0))


# --- what is on disk ----------------------------------------------------------------------------------

def stored(database: Path, people: list[Person]) -> dict[str, list[tuple[str, str]]]:
    """Each participant's transcript as stored, by session id."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        out: dict[str, list[tuple[str, str]]] = {}
        for person in people:
            if not person.session_id:
                continue
            rows = conn.execute("SELECT m.sender, m.text FROM messages m JOIN participants p ON p.id = m.participant_id"
                                " WHERE p.token = ? ORDER BY m.id", (person.session_id,)).fetchall()
            out[person.session_id] = [(sender, text) for sender, text in rows]
        return out
    finally:
        conn.close()


@dataclass
class Tally:
    acknowledged: int = 0
    found: int = 0
    missing: int = 0
    unacknowledged_stored: int = 0
    duplicate_client_ids: int = 0
    out_of_order: int = 0


def tally(database: Path, people: list[Person]) -> Tally:
    """Match what every participant was acknowledged against the database, message by message.

    `found` counts acknowledged messages present in the participant's stored transcript (as a
    multiset); `unacknowledged_stored` counts stored messages no participant was ever shown, which
    is where a twice-stored turn would show up; `out_of_order` counts participants whose stored
    transcript is not exactly what they saw.
    """
    result = Tally()
    transcripts = stored(database, people)
    for person in people:
        rows = list(transcripts.get(person.session_id, []))
        for message in person.seen:
            result.acknowledged += 1
            if message in rows:
                rows.remove(message)
                result.found += 1
            else:
                result.missing += 1
        result.unacknowledged_stored += len(rows)
        if person.session_id and transcripts.get(person.session_id) != person.seen:
            result.out_of_order += 1
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        result.duplicate_client_ids = conn.execute(
            "SELECT count(*) FROM (SELECT participant_id, client_message_id FROM messages WHERE client_message_id"
            " IS NOT NULL GROUP BY participant_id, client_message_id HAVING count(*) > 1)").fetchone()[0]
    finally:
        conn.close()
    return result


def integrity(database: Path) -> str:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()
