"""Balanced assignment and resuming, against the real multi-process server over loopback."""

from __future__ import annotations

import sqlite3
from collections import Counter
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import httpx
import pytest

from tests.conftest import LiveServer

pytestmark = pytest.mark.slow


def wait_for_workers(server: LiveServer, n: int, timeout: float = 90) -> set[int]:
    """Every worker writes a heartbeat when it starts; wait until all n have."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(server.database) as conn:
            pids = {row[0] for row in conn.execute("SELECT pid FROM workers")}
        if len(pids) >= n:
            return pids
        time.sleep(0.2)
    raise AssertionError(f"only {len(pids)} of {n} workers started:\n{server.output()}")


def test_80_concurrent_arrivals_on_8_workers_give_exactly_10_per_cell(live_server: Callable[..., LiveServer]) -> None:
    server = live_server(workers=8)
    workers = wait_for_workers(server, 8)
    arrivals = 80
    barrier = threading.Barrier(arrivals)

    def arrive(_: int) -> tuple[int, int]:
        # One connection per participant: the GET learns which worker holds it, the POST then goes
        # to that same worker once every participant is ready, all at once.
        with httpx.Client(base_url=server.url, timeout=120) as client:
            pid = client.get("healthz").json()["pid"]
            barrier.wait(timeout=120)
            return client.post("api/sessions", json={}).status_code, pid

    with ThreadPoolExecutor(max_workers=arrivals) as pool:
        results = list(pool.map(arrive, range(arrivals)))
    assert [status for status, _ in results] == [201] * arrivals
    served_by = {pid for _, pid in results}
    # The kernel spreads connections over the workers; in practice all 8 take some.
    assert served_by <= workers and len(served_by) >= 2, Counter(pid for _, pid in results)

    with sqlite3.connect(server.database) as conn:
        counts = dict(conn.execute("SELECT cell, count(*) FROM participants GROUP BY cell").fetchall())
        methods = {row[0] for row in conn.execute("SELECT DISTINCT assignment FROM participants")}
    assert len(counts) == 8 and sorted(counts.values()) == [10] * 8, counts
    assert methods == {"balanced"}


def test_a_returning_prolific_id_resumes_over_the_real_server(live_server: Callable[..., LiveServer]) -> None:
    server = live_server(workers=4)
    wait_for_workers(server, 4)
    params = {"PROLIFIC_PID": "5f0c0ffee0ddba11", "STUDY_ID": "st-1", "SESSION_ID": "se-1"}
    barrier = threading.Barrier(12)

    def arrive(_: int) -> tuple[int, str]:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            barrier.wait(timeout=60)
            response = client.post("api/sessions", params=params, json={})
            return response.status_code, response.json()["session_id"]

    # The same person opening the study link in twelve tabs at once still gets one session.
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(arrive, range(12)))
    assert sorted(status for status, _ in results) == [200] * 11 + [201]
    assert len({session for _, session in results}) == 1
    session = results[0][1]

    with httpx.Client(base_url=server.url, timeout=60) as client:
        reply = client.post(f"api/sessions/{session}/messages", json={"text": "My parcel arrived a week late."})
        assert reply.status_code == 200
        # Later, from a new browser (no stored session): the same conversation, where it was left.
        again = client.post("api/sessions", params={"PROLIFIC_PID": params["PROLIFIC_PID"]}, json={})
        assert again.status_code == 200 and again.json()["session_id"] == session
        assert [m["from"] for m in again.json()["messages"]] == ["bot", "participant", "bot"]
        other = client.post("api/sessions", params={"PROLIFIC_PID": "someone-else"}, json={})
        assert other.status_code == 201 and other.json()["session_id"] != session
    with sqlite3.connect(server.database) as conn:
        rows = conn.execute("SELECT platform_id, count(*) FROM participants GROUP BY platform_id").fetchall()
    assert sorted(rows) == [("5f0c0ffee0ddba11", 1), ("someone-else", 1)]
