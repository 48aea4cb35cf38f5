"""The LLM's circuit breaker: open after a run of failures, one probe at a time, closed by a success.

Time is a fake clock everywhere, so nothing here waits for a cool-down.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Callable

from starlette.testclient import TestClient

from combot.breaker import OPEN_REASON, CircuitBreaker, counts_as_failure
from combot.fakellm import FakeLLM
from combot.llm import LLM, Fallback, LLMConfig, LLMReply
from combot.study import load_study


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_which_fallbacks_count_as_failures() -> None:
    for reason in ("timeout", "busy", "connection", "http 500", "http 429", "error: KeyError"):
        assert counts_as_failure(reason)
    # The service answered (quickly) with something unfit to show: it is alive.
    assert not counts_as_failure("bad response: contains a link")
    assert not counts_as_failure(OPEN_REASON)


def test_a_run_of_failures_opens_it_and_one_probe_closes_it() -> None:
    clock = Clock()
    breaker = CircuitBreaker(3, 30.0, clock=clock, probe_lease=5.0)
    for _ in range(2):
        assert breaker.admit() == "call"
        breaker.record(failed=True)
    assert breaker.admit() == "call"
    breaker.record(failed=False)  # a success in between: the run starts again
    for _ in range(3):
        assert breaker.admit() == "call"
        breaker.record(failed=True)
    assert breaker.admit() is None  # open
    clock.now += 29.9
    assert breaker.admit() is None
    clock.now += 0.2
    assert breaker.admit() == "probe"  # half-open: one probe ...
    assert breaker.admit() is None  # ... and nobody else meanwhile
    breaker.record(failed=True, probe=True)  # still down: another cool-down
    assert breaker.admit() is None
    clock.now += 30.1
    assert breaker.admit() == "probe"
    breaker.record(failed=False, probe=True)
    assert breaker.admit() == "call" and breaker.admit() == "call"  # closed


def test_a_probe_that_never_reports_back_lets_another_probe_after_its_lease() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 10.0, clock=clock, probe_lease=5.0)
    breaker.record(failed=True)
    clock.now += 11
    assert breaker.admit() == "probe"
    clock.now += 4.9
    assert breaker.admit() is None
    clock.now += 0.2
    assert breaker.admit() == "probe"


def test_calls_already_in_flight_do_not_extend_the_cool_down() -> None:
    clock = Clock()
    breaker = CircuitBreaker(2, 10.0, clock=clock)
    for _ in range(2):
        breaker.record(failed=True)
    opened = breaker.state().open_until
    clock.now += 5
    breaker.record(failed=True)  # a call started before it opened, timing out now
    assert breaker.state().open_until == opened


def test_zero_failures_means_no_breaker() -> None:
    breaker = CircuitBreaker(0, 10.0)
    for _ in range(50):
        breaker.record(failed=True)
    assert breaker.admit() == "call"


def test_workers_share_it_through_the_file(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "combot.db.llm-breaker"
    one = CircuitBreaker(2, 10.0, path=path, clock=clock)
    two = CircuitBreaker(2, 10.0, path=path, clock=clock)
    one.record(failed=True)
    two.record(failed=True)  # the run counts across workers
    assert one.admit() is None and two.admit() is None
    clock.now += 10.5
    assert two.admit() == "probe" and one.admit() is None  # one probe for the whole server
    two.record(failed=False, probe=True)
    assert one.admit() == "call"
    one.close()
    two.close()


def test_the_adapter_answers_at_once_while_open_and_recovers_through_a_probe(reset_fake: FakeLLM) -> None:
    clock = Clock()

    async def go() -> None:
        config = LLMConfig(base_url=reset_fake.url, timeout=0.3, breaker_failures=2, breaker_cooldown=30.0)
        async with LLM(config) as llm:
            llm.breaker.clock = clock
            reset_fake.configure(behaviour="slow")
            for _ in range(2):
                outcome = await llm.complete("Paraphrase.", "My parcel never came.")
                assert isinstance(outcome, Fallback) and outcome.reason == "timeout"
            outcome = await llm.complete("Paraphrase.", "My parcel never came.")
            assert isinstance(outcome, Fallback) and outcome.reason == OPEN_REASON and outcome.latency_ms == 0
            assert reset_fake.stats()["requests"] == 2  # the open breaker sent nothing
            reset_fake.configure(behaviour="answer")
            clock.now += 31
            probe, other = await asyncio.gather(llm.complete("Paraphrase.", "My parcel never came at all."),
                                                llm.complete("Paraphrase.", "It was a birthday present."))
            assert isinstance(probe, LLMReply)
            assert isinstance(other, Fallback) and other.reason == OPEN_REASON  # one probe at a time
            assert isinstance(await llm.complete("Paraphrase.", "My parcel never came."), LLMReply)
            assert reset_fake.stats()["requests"] == 4

    asyncio.run(go())


def test_through_the_app_the_skipped_calls_are_recorded_as_circuit_open(
        reset_fake: FakeLLM, tmp_path: Path, study_file: Callable[..., Path],
        started_app: Callable[..., TestClient]) -> None:
    path = study_file(replace={'when = { think = "high" }\nmode = "questions"':
                               'when = { think = "high" }\nmode = "paraphrase"'})
    study = load_study(path, environ={"COMBOT_LLM_URL": reset_fake.url, "COMBOT_LLM_TIMEOUT": "0.3",
                                      "COMBOT_LLM_BREAKER_FAILURES": "2", "COMBOT_REPLY_TIMING": "none"})
    reset_fake.configure(behaviour="slow")
    c = started_app(study, tmp_path / "breaker.db")
    token = c.post("/api/sessions", json={}).json()["session_id"]
    for turn in range(4):
        response = c.post(f"/api/sessions/{token}/messages", json={"text": f"My parcel was lost, part {turn}."})
        assert response.status_code == 200, response.text
    conn = sqlite3.connect(tmp_path / "breaker.db")
    reasons = [r[0] for r in conn.execute("SELECT fallback_reason FROM messages WHERE kind = 'paraphrase' ORDER BY id")]
    conn.close()
    assert reasons == ["timeout", "timeout", OPEN_REASON, OPEN_REASON]
    assert reset_fake.stats()["requests"] == 2
    assert (tmp_path / "breaker.db.llm-breaker").exists()
