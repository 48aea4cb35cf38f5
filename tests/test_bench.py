"""`combot bench`: its histogram, its HTTP client, the first-message barrier, and the data check."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
from pathlib import Path
from typing import Callable

import pytest

from combot import bench
from tests.conftest import LiveServer


def exact_percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q / 100 * (len(ordered) - 1))]


def test_the_histogram_gives_percentiles_within_one_percent_without_keeping_samples() -> None:
    rng = random.Random(7)
    samples = [rng.lognormvariate(-3, 1.2) for _ in range(20_000)] + [0.00001, 120.0]
    histogram = bench.Histogram()
    for value in samples:
        histogram.add(value)
    assert len(histogram.counts) == bench.Histogram.BUCKETS  # fixed size, whatever the number of samples
    for q in (50, 95, 99):
        assert histogram.percentile(q) == pytest.approx(exact_percentile(samples, q), rel=0.011)
    summary = histogram.summary()
    assert summary["count"] == len(samples) and summary["max"] == 120.0
    assert summary["mean"] == pytest.approx(sum(samples) / len(samples))


def test_histograms_merge_and_an_empty_one_has_no_percentiles() -> None:
    a, b, both = bench.Histogram(), bench.Histogram(), bench.Histogram()
    for i in range(1, 500):
        (a if i % 2 else b).add(i / 1000)
        both.add(i / 1000)
    a.merge(b)
    assert a.counts == both.counts and a.count == both.count and a.max == both.max
    empty = bench.Histogram()
    assert empty.summary()["count"] == 0 and empty.percentile(95) != empty.percentile(95)  # NaN
    few = bench.Histogram()
    for value in (0.010, 0.079, 0.162):
        few.add(value)
    # Interpolated between ranks, as numpy does: 0.079 + 0.9 * (0.162 - 0.079), within the bucket width.
    assert few.percentile(95) == pytest.approx(0.1537, rel=0.011) and few.percentile(100) == 0.162


def test_the_client_reads_lengths_and_chunks_and_reconnects_after_the_server_closes_an_idle_connection() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{\"a\":1}",
        b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"b\r\n4\r\n\":2}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
    ]
    received: list[bytes] = []

    async def scenario() -> list[tuple[int, bytes]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                received.append(head + await reader.readexactly(length))
                writer.write(answers.pop(0))
                await writer.drain()
                if len(received) == 1:
                    break  # closes the kept-alive connection after the first answer, as a server may
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = bench.Connection(f"http://127.0.0.1:{port}/prefix/")
        try:
            return [await conn.send(conn.request(path, {"n": i})) for i, path in enumerate(("a", "b", "c"))]
        finally:
            conn.close()
            server.close()
            await server.wait_closed()

    results = asyncio.run(scenario())
    assert results == [(200, b'{"a":1}'), (201, b'{"b":2}'), (200, b"{}")]
    assert [r.split(b" ")[1] for r in received] == [b"/prefix/a", b"/prefix/b", b"/prefix/c"]
    assert received[2].endswith(b'{"n": 2}') and b"Host: 127.0.0.1:" in received[0]


@pytest.mark.slow
def test_first_messages_wait_until_every_session_exists_and_everything_sent_is_stored(
        live_server: Callable[..., LiveServer]) -> None:
    server = live_server(workers=2, env={**os.environ, "COMBOT_RATE_LIMIT": "0"})
    people, _, load = asyncio.run(bench.run_load(server.url, 12, 0.0, "first-message", 0.0, 3, show_progress=False))
    report = bench.summarise(people, 1.0, load)
    assert report["succeeded"] == 12 and report["latency"]["first message"]["count"] == 12
    assert report["first_messages_sent_within_ms"] >= 0
    conn = sqlite3.connect(server.database)
    last_session = conn.execute("SELECT max(created_at) FROM participants").fetchone()[0]
    first_message = conn.execute("SELECT min(created_at) FROM messages WHERE sender = 'participant'").fetchone()[0]
    conn.close()
    # The barrier: no first message reached the server before the last session had been created.
    assert first_message >= last_session
    data = bench.verify(Path(server.database), people)
    assert data["messages_missing"] == 0 and data["messages_found"] == data["messages_expected"] > 12 * 2
    assert data["integrity_ok"]
    compute = bench.compute_times(Path(server.database))
    assert compute["first message"]["count"] == 12 and compute["every reply"]["count"] == 12
    assert 0 <= compute["first message"]["p50"] <= compute["first message"]["max"]

    people, _, load = asyncio.run(bench.run_load(server.url, 4, 0.0, "full", 0.0, 4, show_progress=False))
    report = bench.summarise(people, 1.0, load)
    assert report["succeeded"] == 4 and "first_messages_sent_within_ms" not in report
    assert {"start", "first message", "follow-up", "e-mail"} <= set(report["latency"])
    assert bench.verify(Path(server.database), people)["messages_missing"] == 0


@pytest.mark.slow
def test_the_local_server_runs_the_combot_pythonpath_names_not_the_one_in_the_current_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/ab.py runs two versions side by side through PYTHONPATH: started from a source
    checkout, `python -m combot` would import that checkout's combot/ instead (the current folder
    comes first on sys.path), and both sides would run the same code."""
    decoy = tmp_path / "checkout"
    (decoy / "combot").mkdir(parents=True)
    (decoy / "combot" / "__init__.py").write_text("raise SystemExit('the Combot of the current folder ran')\n")
    monkeypatch.chdir(decoy)
    workdir = tmp_path / "work"
    workdir.mkdir()
    with bench.local_server(1, None, {"COMBOT_REPLY_TIMING": "none"}, workdir) as (url, _database, process):
        assert Path(f"/proc/{process.pid}/cwd").resolve() == workdir.resolve()
        assert url.startswith("http://127.0.0.1:")
