"""Reply timing: [[timing]] blocks per cell, the pure plan, the cached LLM sample, and the server's hold.

Statistics are computed on a simulated clock (the plan is pure), so no test depends on how fast
this machine is; the real-server proof is bench/timing_matched.py.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest
from starlette.testclient import TestClient

from combot import store
from combot.errors import ConfigError
from combot.stats import ks_2samp, mann_whitney_u, percentile
from combot.study import load_study
from combot.timing import Outgoing, Punctual, RecentLatencies, Timing, plan, typing_ms
from tests.inprocess import Client, client_factory

FIXED = Timing(mode="typing", base=1.0, chars_per_second=10.0, jitter=0.0, min=0.0, max=30.0)
LLM = {"COMBOT_LLM_URL": "http://127.0.0.1:9/v1"}


# --- the study file -----------------------------------------------------------------------------

def test_without_blocks_the_mode_follows_whether_an_llm_is_configured(study_file: Callable[..., Path]) -> None:
    path = study_file()
    assert {load_study(path, environ={}).timing(c).mode for c in load_study(path, environ={}).cells()} == {"none"}
    with_llm = load_study(path, environ=LLM)
    assert {with_llm.timing(c).mode for c in with_llm.cells()} == {"matched"}


def test_the_most_specific_block_wins_and_the_server_setting_overrides(study_file: Callable[..., Path]) -> None:
    path = study_file(append='\n[[timing]]\nmode = "typing"\nbase = 2\n\n'
                             '[[timing]]\nwhen = { think = "low" }\nmode = "none"\n\n'
                             '[[timing]]\nwhen = { think = "low", feel = "high" }\nmode = "typing"\nmax = 9.5\n')
    study = load_study(path, environ={})
    by_cell = {study.cell_label(c): study.timing(c) for c in study.cells()}
    assert by_cell["basic-high-low"] == Timing(mode="typing", base=2.0)
    assert by_cell["basic-low-low"].mode == "none"
    assert by_cell["bramble-low-high"] == Timing(mode="typing", max=9.5)
    forced = load_study(path, environ={"COMBOT_REPLY_TIMING": "none"})
    assert {forced.timing(c).mode for c in forced.cells()} == {"none"}
    assert forced.timing(forced.cells()[0]).base == 2.0


@pytest.mark.parametrize("block, needle, message", [
    ('mode = "fast"', 'mode = "fast"', "mode must be one of matched, typing, none"),
    ('mode = "typing"\nmin = 7', "min = 7", "min (7 s) is more than max (6 s)"),
    ('mode = "typing"\nbase = -1', "base = -1", "must be between 0 and 30"),
    ('mode = "typing"\nbase = "slow"', 'base = "slow"', "must be a number"),
    ('mode = "typing"\njitter = 1.5', "jitter = 1.5", "must be between 0 and 0.9"),
    ('mode = "typing"\nchars_per_second = 0', "chars_per_second = 0", "must be between 0.1 and 10000"),
    ('mode = "typing"\ndelay = 2', "delay = 2", "unknown key 'delay'"),
    ('when = { tone = "warm" }\nmode = "none"', 'tone = "warm"', "'when' names 'tone'"),
])
def test_a_bad_timing_block_names_its_line(study_file: Callable[..., Path], block: str, needle: str,
                                           message: str) -> None:
    path = study_file(append=f"\n[[timing]]\n{block}\n")
    with pytest.raises(ConfigError) as caught:
        load_study(path, environ={})
    assert message in str(caught.value)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), start=1) if needle in text)
    assert caught.value.line == line


def test_a_bad_reply_timing_setting_is_refused(study_file: Callable[..., Path]) -> None:
    with pytest.raises(ConfigError, match="environment variable COMBOT_REPLY_TIMING must be one of study"):
        load_study(study_file(), environ={"COMBOT_REPLY_TIMING": "sometimes"})


# --- the plan -----------------------------------------------------------------------------------

def test_mode_none_shows_everything_when_computed() -> None:
    replies = [Outgoing("Thank you."), Outgoing("Your e-mail address, please.")]
    assert plan(Timing(mode="none"), replies, 12, [900], random.Random(1)) == [12, 12]


def test_typing_grows_with_length_is_clipped_and_never_hides_a_slow_reply() -> None:
    rng = random.Random(1)
    assert typing_ms(FIXED, "x" * 20, rng) == 3000  # 1 s + 20 characters at 10 per second
    assert typing_ms(Timing(mode="typing", jitter=0.0, min=2.0, max=4.0, base=0.0), "", rng) == 2000
    assert typing_ms(Timing(mode="typing", jitter=0.0, min=2.0, max=4.0, base=0.0), "x" * 9999, rng) == 4000
    assert plan(FIXED, [Outgoing("x" * 20, by_llm=True)], 5000, [], rng) == [5000]  # took longer: shown when ready
    # A later reply of the turn follows the one before after its own typing delay.
    assert plan(FIXED, [Outgoing("x" * 20), Outgoing("y" * 10)], 40, [], rng) == [3000, 5000]
    jittery = Timing(mode="typing", base=1.0, chars_per_second=10.0, jitter=0.2, min=0.0, max=30.0)
    draws = {typing_ms(jittery, "x" * 20, rng) for _ in range(200)}
    assert min(draws) >= 2400 and max(draws) <= 3600 and len(draws) > 50


def test_matched_draws_from_the_sample_and_falls_back_to_typing() -> None:
    matched = Timing(mode="matched", base=1.0, chars_per_second=10.0, jitter=0.0, min=0.0, max=30.0)
    rng = random.Random(3)
    sample = [900, 1100, 1300]
    assert {plan(matched, [Outgoing("A scripted question?")], 8, sample, rng)[0] for _ in range(100)} == set(sample)
    assert plan(matched, [Outgoing("An LLM's paraphrase.", by_llm=True)], 1042, sample, rng) == [1042]
    assert plan(matched, [Outgoing("x" * 20)], 8, [], rng) == [3000]  # no LLM reply yet: the typing model
    assert plan(matched, [Outgoing("x")], 2500, sample, rng) == [2500]  # computed later than any draw


def simulate(mode: str, turns: int, seed: int) -> tuple[list[int], list[int]]:
    """Follow-up turns of think-low (the LLM writes them, ~1.0 s) and think-high (scripted, ~5 ms)
    cells through the plan, on a simulated clock: each LLM reply joins the sample, as in the study."""
    rng = random.Random(seed)
    timing = Timing(mode=mode)
    sample: list[int] = []
    low, high = [], []
    for _ in range(turns):
        llm_ms = int(1000 + rng.expovariate(1 / 40))  # a fake LLM at 1.0 s plus its network and queueing
        low.append(plan(timing, [Outgoing("So your parcel was lost?", by_llm=True)], llm_ms, sample[-200:], rng)[0])
        sample.append(llm_ms)
        high.append(plan(timing, [Outgoing("When did you first notice the problem?")], 3 + rng.randrange(6),
                         sample[-200:], rng)[0])
    return low, high


def compare(low: Sequence[int], high: Sequence[int]) -> dict[str, float]:
    return {"median_ratio": statistics.median(high) / statistics.median(low),
            "p90_ratio": percentile(high, 90) / percentile(low, 90),
            "ks_p": ks_2samp(low, high)[1], "mw_p": mann_whitney_u(low, high)[1]}


def test_matched_timing_removes_the_confound_and_none_shows_it() -> None:
    matched = compare(*simulate("matched", 250, seed=14))
    assert abs(matched["median_ratio"] - 1) < 0.10 and abs(matched["p90_ratio"] - 1) < 0.15
    assert matched["ks_p"] > 0.05 and matched["mw_p"] > 0.05
    confounded = compare(*simulate("none", 250, seed=14))
    assert confounded["median_ratio"] < 0.05  # scripted replies come ~200 times sooner
    assert confounded["ks_p"] < 1e-6 and confounded["mw_p"] < 1e-6


# --- the worker's sample ------------------------------------------------------------------------

def test_held_replies_end_on_time_on_a_loop_that_wakes_late() -> None:
    """A loop that wakes 1.5-2.5 ms late from every timed sleep: after a few sleeps the held replies
    end, on average, at their designed moment; a sleep shorter than the lateness is not made negative."""
    now = [0.0]
    rng = random.Random(3)
    slept: list[float] = []

    async def late_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds + rng.uniform(0.0015, 0.0025)

    async def run() -> list[float]:
        punctual = Punctual(clock=lambda: now[0], sleep=late_sleep)
        ended = []
        for _ in range(200):
            began = now[0]
            await punctual.sleep(1.0)
            ended.append(now[0] - began)
        before = len(slept)
        await punctual.sleep(0.001)  # shorter than the lateness: starts at once, never a negative sleep
        assert slept[before] >= 0
        await punctual.sleep(0)  # nothing to wait: no sleep at all
        assert len(slept) == before + 1
        return ended

    ended = asyncio.run(run())
    assert ended[0] > 1.0015  # the first sleep knows nothing yet
    assert abs(statistics.mean(ended[20:]) - 1.0) < 0.0003
    assert abs(statistics.median(ended[20:]) - 1.0) < 0.0003


def test_the_sample_is_read_once_per_refresh_and_in_the_background() -> None:
    now = [0.0]
    loads: list[int] = []

    async def load() -> list[int]:
        loads.append(1)
        return [1000 + len(loads)]

    async def go() -> None:
        latencies = RecentLatencies(load, refresh=5.0, clock=lambda: now[0])
        assert await latencies.get() == (1001,)  # the very first call waits for the read
        now[0] = 4.9
        assert await latencies.get() == (1001,) and len(loads) == 1
        now[0] = 5.0
        assert await latencies.get() == (1001,)  # stale: answered from the old sample ...
        assert latencies._pending is not None
        await latencies._pending  # ... while the new one is read
        assert await latencies.get() == (1002,) and len(loads) == 2

    asyncio.run(go())


def test_an_empty_sample_is_read_again_soon_and_waited_for() -> None:
    now = [0.0]
    stored: list[int] = []
    loads: list[int] = []

    async def load() -> list[int]:
        loads.append(1)
        return list(stored)

    async def go() -> None:
        latencies = RecentLatencies(load, refresh=5.0, empty_refresh=0.5, clock=lambda: now[0])
        assert await latencies.get() == ()
        now[0] = 0.4
        assert await latencies.get() == () and len(loads) == 1  # not on every request
        stored.append(980)  # the study's first LLM reply
        now[0] = 0.5
        assert await latencies.get() == (980,)  # waited for: used at once
        stored.append(1010)
        now[0] = 1.0
        assert await latencies.get() == (980,) and len(loads) == 2  # a sample: every 5 s again

    asyncio.run(go())


def test_the_store_gives_the_latest_llm_reply_times(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "t.db")
    conn.execute("INSERT INTO participants (id, token, cell, factors, state, version, status, created_at)"
                 " VALUES ('p', 't', 'c', '{}', '{}', 0, 'started', 'x')")
    rows = [("llm", 900, None), ("script", 5, 5), ("llm", 950, 1000), ("template", 4000, 4000), ("llm", 1200, 1250)]
    for produced_by, latency, compute in rows:
        conn.execute("INSERT INTO messages (participant_id, turn, sender, kind, text, produced_by, latency_ms,"
                     " compute_ms, created_at) VALUES ('p', 1, 'bot', 'paraphrase', 'x', ?, ?, ?, 'x')",
                     (produced_by, latency, compute))
    assert store.recent_llm_reply_ms(conn) == [1250, 1000, 900]  # compute_ms, else latency_ms; newest first
    assert store.recent_llm_reply_ms(conn, limit=2) == [1250, 1000]
    assert store.recent_llm_reply_ms(conn, scan=2) == [1250]
    conn.close()


def test_openings_and_follow_ups_are_sampled_apart(tmp_path: Path) -> None:
    """An opening's LLM reply also waited for the classifier: held replies draw from their own kind."""
    conn = store.connect(tmp_path / "t.db")
    conn.execute("INSERT INTO participants (id, token, cell, factors, state, version, status, created_at)"
                 " VALUES ('p', 't', 'c', '{}', '{}', 0, 'started', 'x')")
    for turn, scores, ms in [(1, '{"A": 0.9}', 1080), (2, None, 1010), (3, None, 1020)]:
        incoming = conn.execute("INSERT INTO messages (participant_id, turn, sender, kind, text, scores, created_at)"
                                " VALUES ('p', ?, 'participant', 'message', 'x', ?, 'x')", (turn, scores)).lastrowid
        conn.execute("INSERT INTO messages (participant_id, turn, sender, kind, text, produced_by, compute_ms,"
                     " reply_to, created_at) VALUES ('p', ?, 'bot', 'paraphrase', 'x', 'llm', ?, ?, 'x')",
                     (turn, ms, incoming))
    assert store.recent_llm_reply_ms(conn, classified=True) == [1080]
    assert store.recent_llm_reply_ms(conn, classified=False) == [1020, 1010]
    assert store.recent_llm_reply_ms(conn) == [1020, 1010, 1080]
    conn.close()


# --- through the app ----------------------------------------------------------------------------

@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_app: Callable[..., TestClient]) -> Client:
    return client_factory(tmp_path, monkeypatch, started_app)


def test_the_server_holds_each_turn_and_the_page_gets_each_replys_delay(
        client: Client, study_file: Callable[..., Path], tmp_path: Path) -> None:
    # A fixed 0.2 s per reply (no jitter, min = max), so the designed times are exact.
    path = study_file(append='\n[[timing]]\nmode = "typing"\nbase = 0.2\njitter = 0\nmin = 0.2\nmax = 0.2\n')
    c = client(path)
    closing_turns = []
    for person in range(8):  # balanced assignment: one participant per cell
        token = c.post("/api/sessions", json={}).json()["session_id"]
        answer, turn = None, 0
        while answer is None or answer["expects"] == "message":
            started = time.perf_counter()
            answer = c.post(f"/api/sessions/{token}/messages",
                            json={"text": "My parcel never arrived at all.", "client_message_id": f"m{turn}"}).json()
            assert time.perf_counter() - started >= 0.2  # held at least until the first reply was due
            turn += 1
        closing_turns.append([r["delay_ms"] for r in answer["replies"]])
        again = c.post(f"/api/sessions/{token}/messages",
                       json={"text": "My parcel never arrived at all.", "client_message_id": f"m{turn - 1}"}).json()
        assert again["replies"] == answer["replies"]  # a repeat carries the same delays
    # Feel-high cells: the empathy statement, then 0.2 s later the closing question; feel-low: the closing alone.
    assert sorted(closing_turns) == [[0]] * 4 + [[0, 200]] * 4
    conn = sqlite3.connect(tmp_path / "web.db")
    rows = conn.execute("SELECT reply_to, compute_ms, shown_ms FROM messages WHERE sender = 'bot' AND reply_to IS NOT"
                        " NULL ORDER BY id").fetchall()
    greeting = conn.execute("SELECT compute_ms, shown_ms FROM messages WHERE kind = 'greeting'").fetchall()
    conn.close()
    assert greeting and set(greeting) == {(None, None)}
    firsts: dict[int, int] = {}
    for reply_to, compute_ms, shown_ms in rows:
        assert compute_ms is not None and 0 <= compute_ms <= shown_ms
        if reply_to not in firsts:
            firsts[reply_to] = shown_ms
            assert shown_ms == max(compute_ms, 200)
        else:
            assert shown_ms == firsts[reply_to] + 200


@pytest.mark.slow
def test_the_benchmark_measures_the_confound_with_mode_none() -> None:
    """bench/timing_matched.py at a small size: the statistic is computed from real client timings and
    finds the scripted cells faster than the LLM ones when nothing matches them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("timing_matched", Path(__file__).parent.parent / "bench" / "timing_matched.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.run(["none", "matched"], users=8, warmup=2, think_time=0.2, llm_latency=0.5, workers=2, seed=3)
    none, matched = report["modes"]["none"], report["modes"]["matched"]
    for result in (none, matched):
        assert result["n_high"] >= 8 and result["n_low"] >= 8
        assert 0 <= result["ks_p"] <= 1 and 0 <= result["mann_whitney_p"] <= 1
    # Scripted replies take milliseconds, the fake LLM half a second: unmistakable, however busy the machine.
    assert none["median_ratio"] < 0.5 and none["ks_p"] < 0.01
    assert none["compute_median_high_ms"] < none["compute_median_low_ms"]
    # Matched: the scripted replies were held (their compute stays small, what the client saw did not).
    assert matched["compute_median_high_ms"] < 200 <= matched["median_high_ms"]


class Gate:
    """Stands in for the hold's sleep: each hold waits until the test lets it go, so a test knows a
    request is holding (not merely sent) and decides which held turn reaches the store first."""

    def __init__(self) -> None:
        self.entered: list[threading.Event] = []
        self.released: list[threading.Event] = []
        self.open = False  # while open, holds end at once (to walk a conversation to the step under test)

    async def sleep(self, seconds: float) -> None:
        if self.open:
            return
        entered, released = threading.Event(), threading.Event()
        self.released.append(released)
        self.entered.append(entered)
        entered.set()
        while not released.is_set():
            await asyncio.sleep(0.005)

    def wait_holding(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.entered) < count:
            assert time.monotonic() < deadline, f"{len(self.entered)} of {count} requests holding"
            time.sleep(0.005)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    from combot import replies
    g = Gate()
    monkeypatch.setattr(replies, "_punctual", Punctual(sleep=g.sleep))
    return g


HELD = '\n[[timing]]\nmode = "typing"\nbase = 5\njitter = 0\nmin = 5\nmax = 5\n'


def _post_in_thread(c: TestClient, path: str, body: dict) -> Callable[[], Any]:
    done: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: done.setdefault("response", c.post(path, json=body)))
    thread.start()

    def result() -> Any:
        thread.join(30)
        assert not thread.is_alive()
        return done["response"]
    return result


def _turns(database: Path, token: str) -> list[tuple[str, str | None]]:
    conn = sqlite3.connect(database)
    rows = conn.execute("SELECT m.sender, m.client_message_id FROM messages m JOIN participants p"
                        " ON p.id = m.participant_id WHERE p.token = ? AND m.kind != 'greeting' ORDER BY m.id",
                        (token,)).fetchall()
    conn.close()
    return rows


@pytest.mark.parametrize("first_stored", ["first", "retry"])
def test_a_retry_while_the_first_request_holds_is_stored_once_and_answered_alike(
        client: Client, study_file: Callable[..., Path], tmp_path: Path, gate: Gate, first_stored: str) -> None:
    """The page lost its connection and sent the same message again while the server held the first
    request's answer (nothing stored yet): whichever reaches the store first decides; the message and
    one answer are stored once, and both requests get that same answer."""
    c = client(study_file(append=HELD))
    token = c.post("/api/sessions", json={}).json()["session_id"]
    path, body = f"/api/sessions/{token}/messages", {"text": "My parcel never arrived at all.",
                                                      "client_message_id": "m0", "turn": 1}
    first = _post_in_thread(c, path, body)
    gate.wait_holding(1)
    retry = _post_in_thread(c, path, body)
    gate.wait_holding(2)
    order = [0, 1] if first_stored == "first" else [1, 0]
    answers = {}
    for i in order:
        gate.released[i].set()
        answers[i] = (first, retry)[i]()
    assert answers[0].status_code == answers[1].status_code == 200, (answers[0].text, answers[1].text)
    assert answers[0].json() == answers[1].json()
    rows = _turns(tmp_path / "web.db", token)
    assert [r for r in rows if r[0] == "participant"] == [("participant", "m0")]
    assert len(rows) == 1 + len(answers[0].json()["replies"])


@pytest.mark.parametrize("winner", [0, 1])
def test_two_tabs_sending_for_one_turn_while_one_holds_store_one_turn(
        client: Client, study_file: Callable[..., Path], tmp_path: Path, gate: Gate, winner: int) -> None:
    """Two tabs send different messages for the same turn, both held: the one stored first is the turn;
    the other tab gets a 409 with the conversation as it now is (its message not stored)."""
    c = client(study_file(append=HELD))
    token = c.post("/api/sessions", json={}).json()["session_id"]
    path = f"/api/sessions/{token}/messages"
    tabs = [_post_in_thread(c, path, {"text": "My parcel never arrived at all.", "client_message_id": "tab-a",
                                      "turn": 1})]
    gate.wait_holding(1)
    tabs.append(_post_in_thread(c, path, {"text": "The shop sent the wrong size.", "client_message_id": "tab-b",
                                          "turn": 1}))
    gate.wait_holding(2)
    gate.released[winner].set()
    won = tabs[winner]()
    gate.released[1 - winner].set()
    lost = tabs[1 - winner]()
    assert won.status_code == 200 and lost.status_code == 409, (won.text, lost.text)
    sent = ("tab-a", "tab-b")[winner]
    assert [m["from"] for m in lost.json()["messages"]].count("participant") == 1
    assert [r for r in _turns(tmp_path / "web.db", token) if r[0] == "participant"] == [("participant", sent)]
    # the losing tab's message, sent again (the page keeps its id), is still refused: the turn moved on
    again = c.post(path, json={"text": "x", "client_message_id": ("tab-a", "tab-b")[1 - winner], "turn": 1})
    assert again.status_code == 409


def test_a_hold_never_runs_into_the_request_timeout(
        client: Client, study_file: Callable[..., Path], tmp_path: Path) -> None:
    """A designed delay longer than the request timeout allows: were the request cut into a 503 while
    holding, nothing would be stored and every retry would be held and cut again, for ever. The hold
    ends in time (at most half the request timeout) and `shown_ms` records when it really ended."""
    path = study_file(append='\n[[timing]]\nmode = "typing"\nbase = 3\njitter = 0\nmin = 3\nmax = 3\n')
    c = client(path, environ={"COMBOT_REQUEST_TIMEOUT": "2"})
    token = c.post("/api/sessions", json={}).json()["session_id"]
    answer = c.post(f"/api/sessions/{token}/messages",
                    json={"text": "My parcel never arrived at all.", "client_message_id": "m0"})
    assert answer.status_code == 200, answer.text
    conn = sqlite3.connect(tmp_path / "web.db")
    shown = conn.execute("SELECT compute_ms, shown_ms FROM messages WHERE sender = 'bot' AND reply_to IS NOT NULL"
                         " ORDER BY id LIMIT 1").fetchone()
    conn.close()
    assert shown[1] == max(shown[0], 1000)


def test_no_first_reply_is_held_past_the_limit_but_a_slow_one_is_shown_when_ready() -> None:
    rng = random.Random(1)
    long = [Outgoing("x" * 200), Outgoing("y" * 10)]  # designed 21 s, then 2 s more
    assert plan(FIXED, long, 5, (), rng, limit_ms=2000) == [2000, 4000]
    assert plan(FIXED, long, 2500, (), rng, limit_ms=2000) == [2500, 4500]
    assert plan(FIXED, long, 5, (), rng) == [21000, 23000]


def test_the_email_step_retried_while_held_stores_one_address_and_both_get_the_redirect(
        client: Client, study_file: Callable[..., Path], tmp_path: Path, gate: Gate) -> None:
    """The last message (the e-mail step) is held like any other; a retry while it holds leaves one
    address and one finished turn, and both requests get the same end, redirect included."""
    path = study_file(replace={"# completion_url = ": "completion_url = "}, append=HELD)
    c = client(path)
    token = c.post("/api/sessions", json={}).json()["session_id"]
    gate.open = True
    answer, turn = None, 0
    while answer is None or answer["expects"] == "message":
        answer = c.post(f"/api/sessions/{token}/messages",
                        json={"text": "My parcel never arrived at all.", "client_message_id": f"m{turn}"}).json()
        turn += 1
    assert answer["expects"] == "email"
    gate.open = False
    body = {"text": "someone@example.com", "client_message_id": "email", "turn": answer["turn"]}
    first = _post_in_thread(c, f"/api/sessions/{token}/messages", body)
    gate.wait_holding(1)
    retry = _post_in_thread(c, f"/api/sessions/{token}/messages", body)
    gate.wait_holding(2)
    gate.released[1].set()
    late = retry()
    gate.released[0].set()
    early = first()
    assert early.status_code == late.status_code == 200
    assert early.json() == late.json()
    assert early.json()["expects"] == "done" and early.json()["redirect"]["url"].startswith("https://")
    conn = sqlite3.connect(tmp_path / "web.db")
    assert conn.execute("SELECT count(*) FROM emails").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM messages WHERE client_message_id = 'email'").fetchone()[0] == 1
    assert conn.execute("SELECT status FROM participants WHERE token = ?", (token,)).fetchone()[0] == "finished"
    conn.close()
