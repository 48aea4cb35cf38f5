"""One person, one participant; one answer, one question (issue 11), attacked at scale.

Starts the real 8-worker server on a temporary database and
1. creates sessions the way a bad network does: per person, one request given up at once (its
   answer lost), `--retries` concurrent retries with the same client_key, then a reload (the key
   once more); reports requests sent vs participants made (must equal the people);
2. drives `--sessions` conversations from two "tabs" each that answer at the same moment, and
   now and then from a tab left behind showing an old question; reports stale-tab answers
   attempted vs answers stored after a bot message the sending tab did not show (must be 0).

    python bench/invariants.py --people 200 --retries 5 --sessions 40
"""

from __future__ import annotations

import argparse
import random
import secrets
import sqlite3
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from combot.bench import local_server


def create_sessions(url: str, database: Path, people: int, retries: int) -> dict[str, Any]:
    keys = [secrets.token_urlsafe(18) for _ in range(people)]
    answers: list[tuple[int, int, str]] = []
    lock = threading.Lock()

    def create(person: int, timeout: float) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            try:
                answer = http.post("api/sessions", json={"client_key": keys[person]})
            except httpx.TimeoutException:
                outcome = (person, 0, "")
            else:
                outcome = (person, answer.status_code, answer.json().get("session_id", ""))
        with lock:
            answers.append(outcome)

    jobs = [(p, 0.005) for p in range(people)] + [(p, 60.0) for p in range(people) for _ in range(retries)]
    random.Random(11).shuffle(jobs)
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(lambda job: create(*job), jobs))
    with ThreadPoolExecutor(max_workers=32) as pool:  # every tab reloaded afterwards
        list(pool.map(lambda p: create(p, 60.0), range(people)))
    conn = sqlite3.connect(database)
    try:
        stored = dict(conn.execute("SELECT client_key, token FROM participants").fetchall())
        greetings = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        conn.close()
    answered = [a for a in answers if a[1]]
    return {
        "people": people, "requests": len(answers), "lost": len(answers) - len(answered),
        "participants": len(stored), "greetings": greetings,
        "created_201": sum(1 for a in answered if a[1] == 201),
        "other_status": sorted({a[1] for a in answered} - {200, 201}),
        "answered_another_session": sum(1 for p, _, sid in answered if stored.get(keys[p]) != sid),
    }


def two_tabs(url: str, database: Path, sessions: int, seed: int = 5) -> dict[str, Any]:
    sent: dict[str, str] = {}  # client_message_id -> the last bot text its tab showed
    counts = {"answers": 0, "race_refused": 0, "behind_attempted": 0, "behind_stored": 0}
    lock = threading.Lock()

    def view(http: httpx.Client, sid: str) -> tuple[int, str, str]:
        body = http.get(f"api/sessions/{sid}").json()
        return body["turn"], body["expects"], [m["text"] for m in body["messages"] if m["from"] == "bot"][-1]

    def after(body: dict[str, Any], ok: bool) -> tuple[int, str, str]:
        last = body["replies"][-1]["text"] if ok else [m["text"] for m in body["messages"] if m["from"] == "bot"][-1]
        return body["turn"], body["expects"], last

    def post(http: httpx.Client, sid: str, shown: tuple[int, str, str], cmid: str, text: str) -> httpx.Response:
        with lock:
            sent[cmid] = shown[2]
            counts["answers"] += 1
        body = {"text": "someone@example.com" if shown[1] == "email" else text, "turn": shown[0],
                "client_message_id": cmid}
        return http.post(f"api/sessions/{sid}/messages", json=body)

    def converse(sid: str, rng: random.Random) -> None:
        with httpx.Client(base_url=url, timeout=60) as a, httpx.Client(base_url=url, timeout=60) as b:
            tabs = (a, b)
            views = [view(a, sid), view(b, sid)]
            for round_ in range(20):
                if views[0][1] == views[1][1] == "done":
                    return
                before = list(views)
                with ThreadPoolExecutor(max_workers=2) as pool:
                    results = list(pool.map(lambda i: post(tabs[i], sid, views[i], f"{sid[:10]}-{i}-{round_}",
                                                           f"tab {i}, round {round_}: it was awful."), (0, 1)))
                for i, answer in enumerate(results):
                    if answer.status_code == 409:
                        with lock:
                            counts["race_refused"] += 1
                    elif answer.status_code != 200:
                        raise AssertionError(answer.text)
                    views[i] = after(answer.json(), answer.status_code == 200)
                if rng.random() < 0.5:
                    behind = rng.randrange(2)
                    now = view(tabs[1 - behind], sid)
                    if now[0] == before[behind][0]:
                        continue
                    answer = post(tabs[behind], sid, before[behind], f"{sid[:10]}-behind-{round_}", "late answer")
                    with lock:
                        counts["behind_attempted"] += 1
                        counts["behind_stored"] += answer.status_code == 200
                    views[behind] = now

    with httpx.Client(base_url=url, timeout=60) as http:
        sids = [http.post("api/sessions", json={"client_key": secrets.token_urlsafe(18)}).json()["session_id"]
                for _ in range(sessions)]
    with ThreadPoolExecutor(max_workers=min(32, sessions)) as pool:
        list(pool.map(lambda n: converse(sids[n], random.Random(seed + n)), range(sessions)))

    conn = sqlite3.connect(database)
    wrong = 0
    try:
        for participant_id, message_id, cmid in conn.execute(
                "SELECT participant_id, id, client_message_id FROM messages WHERE sender = 'participant'"):
            shown_before = conn.execute("SELECT text FROM messages WHERE participant_id = ? AND sender = 'bot'"
                                        " AND id < ? ORDER BY id DESC LIMIT 1", (participant_id, message_id)).fetchone()
            wrong += shown_before[0] != sent[cmid]
        stored = conn.execute("SELECT count(*) FROM messages WHERE sender = 'participant'").fetchone()[0]
    finally:
        conn.close()
    return {**counts, "sessions": sessions, "stored_answers": stored, "stored_against_wrong_question": wrong,
            "stale_attempted": counts["race_refused"] + counts["behind_attempted"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=200)
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    env = {"COMBOT_RATE_LIMIT": "0"}
    with tempfile.TemporaryDirectory(prefix="combot-invariants-") as tmp:
        (Path(tmp) / "a").mkdir()
        (Path(tmp) / "b").mkdir()
        with local_server(args.workers, None, env, Path(tmp) / "a") as (url, database, _process):
            created = create_sessions(url, database, args.people, args.retries)
        with local_server(args.workers, None, env, Path(tmp) / "b") as (url, database, _process):
            tabs = two_tabs(url, database, args.sessions)
    print(f"session creation: {created['requests']} requests ({created['lost']} answers lost) for"
          f" {created['people']} people -> {created['participants']} participants, {created['greetings']} greetings,"
          f" {created['created_201']} answered 201, {created['answered_another_session']} answered with another"
          f" person's session, other statuses {created['other_status'] or 'none'}")
    print(f"two tabs: {tabs['sessions']} sessions, {tabs['answers']} answers sent, {tabs['stale_attempted']}"
          f" stale-tab answers attempted ({tabs['race_refused']} lost a race, {tabs['behind_attempted']} from a tab"
          f" left behind, {tabs['behind_stored']} of those stored); {tabs['stored_answers']} answers stored,"
          f" {tabs['stored_against_wrong_question']} against a question the sending tab did not show")


if __name__ == "__main__":
    main()
