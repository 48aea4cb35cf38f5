"""What the dashboard shows, and the two records behind it that the study data cannot give.

- Server errors: `ErrorRecorder` (ASGI middleware) writes an `events` row for every participant
  API request answered with a 5xx (including the 503 of a timed-out request), so the error rate
  counts failures that never produced a message.
- Memory: each worker's `Heartbeat` writes its resident memory (VmRSS from /proc/self/status)
  into `workers` every 10 s; the dashboard lists those seen in the last 30 s.

`dashboard` is one read of the database. Its SQL lives here rather than in combot/store/ because it
is read-only reporting shaped by this page; every write goes through combot/store/.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import sqlite3
from typing import Any, Mapping

from combot import store
from combot.accesslog import public_path
from combot.codebook import problem_meaning
from combot.reply_times import reply_times
from combot.study import Study

log = logging.getLogger("combot.monitor")

HEARTBEAT_SECONDS = 10.0
# Messages of real participants only: synthetic ones (bench, pilots) are left out of every number.
_REAL = "participant_id NOT IN (SELECT id FROM participants WHERE synthetic = 1)"
WORKER_SEEN_SECONDS = 30.0


# --- records --------------------------------------------------------------------------------------

class ErrorRecorder:
    """Count participant API requests that failed on the server's side (status 500 and above)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        status = 0

        async def watching(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watching)
        except Exception as error:
            await _record(scope, 500, type(error).__name__)
            raise
        if status >= 500:
            await _record(scope, status, "")


async def _record(scope: Any, status: int, detail: str) -> None:
    resources = getattr(scope["app"].state, "resources", None)
    if resources is None:
        return
    state = scope["app"].state
    if not hasattr(state, "error_log"):
        state.error_log = ErrorLog(resources.store)
    await state.error_log.add({"at": store.now(), "kind": "error", "pid": os.getpid(), "status": status,
                               "path": f"{scope.get('method', '')} {public_path(scope)}", "detail": detail})


class ErrorLog:
    """A worker's server errors, written one batch at a time.

    Errors come in storms when the server is overloaded (every request then gets a 503): one write
    per error would add a write per failed request to the very queue that is too long. So one write
    is in flight at most; errors that come meanwhile go into the next one, and their requests do not
    wait for it.
    """

    def __init__(self, handle: store.Store):
        self.store = handle
        self._pending: list[dict[str, Any]] = []
        self._writing = False

    async def add(self, event: dict[str, Any]) -> None:
        self._pending.append(event)
        if self._writing:
            return
        self._writing = True
        try:
            while self._pending:
                events, self._pending = self._pending, []
                try:
                    await self.store.run(store.record_events, events)
                except Exception:  # the store may be what failed; the errors are in the log either way
                    log.warning("could not record %d server error(s) for the dashboard", len(events), exc_info=True)
        finally:
            self._writing = False


def rss_bytes() -> int | None:
    """This process's resident memory, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def meminfo() -> dict[str, int]:
    """MemTotal and MemAvailable of this machine in bytes (empty where /proc/meminfo is missing)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    out[name] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


class Heartbeat:
    """Write this worker's memory into the database now and every HEARTBEAT_SECONDS."""

    def __init__(self, handle: store.Store, interval: float = HEARTBEAT_SECONDS):
        self.store = handle
        self.interval = interval
        self.started_at = store.now()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def beat(self) -> None:
        rss = rss_bytes()
        if rss is not None:
            await self.store.run(store.record_worker, pid=os.getpid(), started_at=self.started_at, rss_bytes=rss,
                                 host=socket.gethostname())

    async def _run(self) -> None:
        while True:
            try:
                await self.beat()
            except Exception:  # a busy database must not stop the heartbeat for good
                log.warning("worker heartbeat failed", exc_info=True)
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# --- the dashboard's numbers ----------------------------------------------------------------------

def _percentile(conn: sqlite3.Connection, cte: str, params: tuple[Any, ...], n: int, share: float) -> int | None:
    """Nearest-rank percentile, read with ORDER BY ... OFFSET so no list of latencies is held."""
    if n == 0:
        return None
    offset = max(0, math.ceil(share * n) - 1)
    row = conn.execute(cte + " SELECT ms FROM r ORDER BY ms LIMIT 1 OFFSET ?", (*params, offset)).fetchone()
    return None if row is None else int(row[0])


def dashboard(conn: sqlite3.Connection, study: Study) -> dict[str, Any]:
    """Everything /admin/api/stats returns; see `warnings` for the thresholds of `[admin]`."""
    cfg = study.settings.section("admin")
    window = cfg["window_minutes"]
    since, active_since = store.ago(window * 60), store.ago(study.active_minutes * 60)

    cells: dict[str, dict[str, Any]] = {}
    for cell in study.cells():
        label = study.cell_label(cell)
        cells[label] = {"cell": label, "number": study.cell_number(cell), "factors": cell,
                        "description": study.cell_description(cell),
                        "started": 0, "finished": 0, "active": 0, "abandoned": 0}
    for row in conn.execute(
            "SELECT cell, cell_number, status, updated_at >= ? AS recent, count(*) AS n FROM participants"
            " WHERE status != 'declined' AND synthetic = 0 GROUP BY cell, cell_number, status, recent", (active_since,)):
        entry = cells.setdefault(row["cell"], {"cell": row["cell"], "number": row["cell_number"], "factors": {},
                                               "started": 0, "finished": 0, "active": 0, "abandoned": 0})
        entry["started"] += row["n"]
        if row["status"] == "finished":
            entry["finished"] += row["n"]
        elif row["recent"]:
            entry["active"] += row["n"]
        else:
            entry["abandoned"] += row["n"]
    totals = {key: sum(c[key] for c in cells.values()) for key in ("started", "finished", "active", "abandoned")}
    totals["declined"] = conn.execute("SELECT count(*) FROM participants WHERE status = 'declined'"
                                      " AND synthetic = 0").fetchone()[0]
    # Left out of every number here; the count says they exist (bench runs, pilots).
    synthetic = conn.execute("SELECT count(*) FROM participants WHERE synthetic = 1").fetchone()[0]

    # How far participants got: messages answered in the chat (the e-mail is not one), then finished.
    reached: dict[int, int] = {}
    for row in conn.execute(
            "SELECT CAST(coalesce(json_extract(state, '$.turn'), 0) AS INTEGER) AS t, count(*) AS n"
            " FROM participants WHERE status != 'declined' AND synthetic = 0 GROUP BY t"):
        reached[row["t"]] = row["n"]
    steps = study.followup_turns + 1
    funnel = [{"step": "opened the chat", "n": totals["started"]}]
    for k in range(1, steps + 1):
        label = "first message (problem)" if k == 1 else f"message {k}"
        funnel.append({"step": label, "n": sum(n for t, n in reached.items() if t >= k)})
    funnel.append({"step": "finished (e-mail given or declined)" if study.email_skip_words
                   else "finished (e-mail given)", "n": totals["finished"]})

    problems = {p: 0 for p in study.problem_types}
    unclassified = 0
    for row in conn.execute("SELECT problem_type, count(*) AS n FROM participants WHERE status != 'declined'"
                            " AND synthetic = 0 GROUP BY problem_type"):
        if row["problem_type"] is None:
            unclassified += row["n"]
        else:
            problems[row["problem_type"]] = problems.get(row["problem_type"], 0) + row["n"]
    problem_types = [{"type": p, "n": n, "meaning": problem_meaning(study, p)} for p, n in problems.items()]
    problem_types.append({"type": "not yet", "n": unclassified, "meaning": "no first message yet"})

    # Did the opening describe an experience? Those who never did are flagged (described_experience 0).
    openings = {"described at once": 0, "described after a re-prompt": 0, "never described (flagged)": 0,
                "not yet": 0, "unknown (no opener head)": 0}
    for row in conn.execute(
            "SELECT described_experience AS d, problem_type IS NOT NULL AS settled,"
            " coalesce(json_extract(state, '$.reprompts'), 0) > 0 AS reprompted, count(*) AS n FROM participants"
            " WHERE status != 'declined' AND synthetic = 0 GROUP BY d, settled, reprompted"):
        if row["d"] == 1:
            openings["described after a re-prompt" if row["reprompted"] else "described at once"] += row["n"]
        elif row["d"] == 0:
            openings["never described (flagged)"] += row["n"]
        else:
            openings["unknown (no opener head)" if row["settled"] else "not yet"] += row["n"]
    opening_rows = [{"opening": k, "n": n} for k, n in openings.items() if n or k != "unknown (no opener head)"]

    # One latency per answered participant message: a turn may store several bot messages.
    cte = ("WITH r AS (SELECT max(latency_ms) AS ms FROM messages WHERE sender = 'bot' AND reply_to IS NOT NULL"
           f" AND latency_ms IS NOT NULL AND created_at >= ? AND {_REAL} GROUP BY reply_to)")
    n, mean = conn.execute(cte + " SELECT count(*), avg(ms) FROM r", (since,)).fetchone()
    fallbacks = conn.execute("SELECT count(DISTINCT reply_to) FROM messages WHERE sender = 'bot'"
                             f" AND fallback_reason IS NOT NULL AND created_at >= ? AND {_REAL}", (since,)).fetchone()[0]
    sessions = conn.execute("SELECT count(*) FROM participants WHERE created_at >= ? AND status != 'declined'"
                            " AND synthetic = 0", (since,)).fetchone()[0]
    errors = conn.execute("SELECT count(*) FROM events WHERE kind = 'error' AND at >= ?", (since,)).fetchone()[0]
    attempts = n + sessions + errors
    replies = {
        "window_minutes": window, "replies": n, "sessions_created": sessions, "errors": errors,
        "fallbacks": fallbacks,
        "mean_ms": None if mean is None else round(mean),
        "p50_ms": _percentile(conn, cte, (since,), n, 0.50),
        "p95_ms": _percentile(conn, cte, (since,), n, 0.95),
        "success_percent": None if attempts == 0 else round(100 * (n + sessions) / attempts, 2),
    }
    timeline = _timeline(conn, since)

    seen = store.ago(WORKER_SEEN_SECONDS)
    workers = [{"pid": row["pid"], "host": row["host"], "rss_bytes": row["rss_bytes"], "seen_at": row["seen_at"],
                "started_at": row["started_at"]}
               for row in conn.execute("SELECT * FROM workers WHERE seen_at >= ? ORDER BY pid", (seen,))]
    memory_info = meminfo()
    memory: dict[str, Any] = {"total_bytes": memory_info.get("MemTotal"),
                              "workers_bytes": sum(w["rss_bytes"] or 0 for w in workers), "used_percent": None}
    if memory_info.get("MemTotal") and "MemAvailable" in memory_info:
        used = memory_info["MemTotal"] - memory_info["MemAvailable"]
        memory["used_percent"] = round(100 * used / memory_info["MemTotal"], 1)

    versions = [{"version": row["version"], "participants": row["participants"],
                 "first_served_at": row["first_served_at"], "current": row["version"] == study.version}
                for row in store.study_versions(conn)]

    thresholds = {"memory_percent": cfg["memory_warn_percent"], "reply_seconds": cfg["reply_warn_seconds"],
                  "success_percent": cfg["success_warn_percent"]}
    timing = reply_times(conn, study, since, cfg["timing_drift_percent"])
    return {
        "generated_at": store.now(), "title": study.title, "active_minutes": study.active_minutes,
        "cells": sorted(cells.values(), key=lambda c: (c["number"] is None, c["number"] or 0, c["cell"])),
        "totals": totals, "funnel": funnel, "problem_types": problem_types, "openings": opening_rows,
        "replies": replies,
        "timeline": timeline, "workers": workers, "memory": memory, "thresholds": thresholds,
        "versions": versions, "synthetic_left_out": synthetic, "digest": store.study_digest(conn, reuse=True),
        "reply_timing": timing,
        "warnings": warnings(memory, replies, thresholds) + version_warnings(versions) + timing["warnings"],
    }


def _timeline(conn: sqlite3.Connection, since: str) -> list[dict[str, Any]]:
    """Replies, errors and the mean reply time per minute over the window."""
    minutes: dict[str, dict[str, Any]] = {}
    for row in conn.execute(
            "WITH r AS (SELECT min(created_at) AS at, max(latency_ms) AS ms FROM messages WHERE sender = 'bot'"
            f" AND reply_to IS NOT NULL AND created_at >= ? AND {_REAL} GROUP BY reply_to)"
            " SELECT substr(at, 1, 16) AS minute, count(*) AS n, avg(ms) AS mean FROM r GROUP BY minute", (since,)):
        minutes[row["minute"]] = {"minute": row["minute"], "replies": row["n"], "errors": 0,
                                  "mean_ms": None if row["mean"] is None else round(row["mean"])}
    for row in conn.execute("SELECT substr(at, 1, 16) AS minute, count(*) AS n FROM events WHERE kind = 'error'"
                            " AND at >= ? GROUP BY minute", (since,)):
        minutes.setdefault(row["minute"], {"minute": row["minute"], "replies": 0, "errors": 0, "mean_ms": None})
        minutes[row["minute"]]["errors"] = row["n"]
    return [minutes[key] for key in sorted(minutes)]


def version_warnings(versions: list[dict[str, Any]]) -> list[str]:
    """Participants who saw different versions of the study (combot.toml edited between two serves)."""
    seen = [v for v in versions if v["participants"]]
    if len(seen) < 2:
        return []
    counts = ", ".join(f"{v['version']}: {v['participants']}" for v in seen)
    return [f"Participants span {len(seen)} versions of the study ({counts}); the export holds each version's"
            " text in study/<version>.toml."]


def warnings(memory: Mapping[str, Any], replies: Mapping[str, Any], thresholds: Mapping[str, float]) -> list[str]:
    """Plain sentences for each threshold crossed (the original deployment's own warning signs)."""
    out = []
    if memory.get("used_percent") is not None and memory["used_percent"] > thresholds["memory_percent"]:
        out.append(f"Memory in use is {memory['used_percent']:.0f}% of the machine's total"
                   f" (warning above {thresholds['memory_percent']:.0f}%).")
    if replies.get("mean_ms") is not None and replies["mean_ms"] > thresholds["reply_seconds"] * 1000:
        out.append(f"Replies take {replies['mean_ms'] / 1000:.1f} s on average over the last"
                   f" {replies['window_minutes']} minutes (warning above {thresholds['reply_seconds']:g} s).")
    if replies.get("success_percent") is not None and replies["success_percent"] < thresholds["success_percent"]:
        out.append(f"Only {replies['success_percent']:.1f}% of requests succeeded over the last"
                   f" {replies['window_minutes']} minutes (warning below {thresholds['success_percent']:g}%).")
    return out
