"""Participants: a new session assigned to a cell (with its greeting), a decline, and finding a
participant again by token, client key or recruitment-platform id."""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Callable, Mapping, Sequence

from combot.errors import Conflict
from combot.store.digests import refuse_when_closed
from combot.store.links import _Chain
from combot.store.timestamps import ago, now
from combot.store.transactions import transaction
from combot.store.turns import NewMessage, _insert_messages


def create_participant(
    conn: sqlite3.Connection,
    *,
    participant_id: str,
    token: str,
    choose_cell: Callable[[Mapping[str, int]], tuple[str, int, Mapping[str, str], str]],
    greet: Callable[[Mapping[str, str]], tuple[Mapping[str, Any], Sequence[NewMessage]]],
    user_agent: str = "",
    url_params: Mapping[str, str] | None = None,
    platform_id: str | None = None,
    fill: str = "started",
    active_minutes: float = 30,
    consented: bool = False,
    client_key: str | None = None,
    study_version: str | None = None,
    synthetic: bool = False,
) -> tuple[sqlite3.Row, bool]:
    """Assign a cell and store a new participant with the greeting, atomically across processes.

    `choose_cell` sees the number of participants per cell (counted inside the write lock, so
    concurrent arrivals never over-fill a cell; `fill` says who counts, see `cell_counts`). A
    known `client_key` (a retry of this request) or a returning platform id gets its old row back
    (second value False) instead of a new draw; both are looked up inside the write lock, so
    concurrent retries in several worker processes still make one participant. A key that
    declined earlier (then reloaded the consent page and agreed) becomes that same row's session. A
    `synthetic` participant (bench, pilot) is stored like any other but counts towards no real
    participant's cell: synthetic arrivals are balanced among themselves (so a pilot of a live study
    still meets every cell) and real ones among real ones.
    """
    with transaction(conn):
        declined = None
        if client_key:
            existing = participant_by_client_key(conn, client_key)
            if existing is not None and existing["status"] != "declined":
                return existing, False
            declined = existing
        if platform_id:
            existing = participant_by_platform_id(conn, platform_id)
            if existing is not None:
                return existing, False
        refuse_when_closed(conn)
        counts = cell_counts(conn, fill, active_minutes, synthetic=synthetic)
        label, number, factors, method = choose_cell(counts)
        state, greeting = greet(factors)
        stamp = now()
        if declined is not None:
            participant_id = declined["id"]
            # The decline becomes this session: its chain starts again with the session (as its row does).
            conn.execute("DELETE FROM status_changes WHERE participant_id = ?", (participant_id,))
            conn.execute("DELETE FROM participants WHERE id = ?", (participant_id,))
        conn.execute(
            "INSERT INTO participants (id, token, cell, cell_number, factors, assignment, state, version, status,"
            " turns, created_at, updated_at, user_agent, url_params, platform_id, consented_at, client_key,"
            " study_version, synthetic) VALUES (?, ?, ?, ?, ?, ?, ?, 0, 'started', 0, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (participant_id, token, label, number, json.dumps(dict(factors)), method, json.dumps(state), stamp, stamp,
             user_agent[:500], json.dumps(dict(url_params or {})), platform_id, stamp if consented else None,
             client_key, study_version, int(synthetic)),
        )
        links = _Chain.new(conn, participant_id, stamp)
        _insert_messages(conn, links, 0, greeting, None, stamp)
        links.save()
        row = conn.execute("SELECT * FROM participants WHERE id = ?", (participant_id,)).fetchone()
    return row, True


def cell_counts(conn: sqlite3.Connection, fill: str = "started", active_minutes: float = 30,
                synthetic: bool = False) -> dict[str, int]:
    """Participants per cell label as balanced assignment counts them.

    "started": everyone ever given the cell. "finished_or_active": those who finished plus those
    who wrote within the last `active_minutes`, so an abandoned session frees its slot. A decline
    never has a cell and never counts. Real participants and synthetic ones (bench, pilot) are
    counted apart: `synthetic` says which.
    """
    if fill == "finished_or_active":
        rows = conn.execute(
            "SELECT cell, count(*) AS n FROM participants WHERE synthetic = ? AND (status = 'finished'"
            " OR (status = 'started' AND updated_at >= ?)) GROUP BY cell", (int(synthetic), ago(active_minutes * 60)))
    else:
        # Kept by triggers (schema v8): eight rows, however many participants are stored.
        rows = conn.execute("SELECT cell, n FROM cell_fill WHERE synthetic = ? AND n > 0", (int(synthetic),))
    return {row["cell"]: row["n"] for row in rows}


def participant_by_platform_id(conn: sqlite3.Connection, platform_id: str) -> sqlite3.Row | None:
    """The first session of this recruitment-platform id (a decline is not a session to resume)."""
    return conn.execute("SELECT * FROM participants WHERE platform_id = ? AND status != 'declined'"
                        " ORDER BY created_at LIMIT 1", (platform_id,)).fetchone()


def record_decline(conn: sqlite3.Connection, *, participant_id: str, token: str, user_agent: str = "",
                   url_params: Mapping[str, str] | None = None, platform_id: str | None = None,
                   client_key: str | None = None, study_version: str | None = None,
                   synthetic: bool = False) -> tuple[sqlite3.Row, bool]:
    """A person who saw the consent page and declined: a row without a cell, so it fills none.

    A known `client_key` returns its row (second value False) and stores nothing; a key whose
    session has started is a Conflict.
    """
    stamp = now()
    with transaction(conn):
        if client_key:
            existing = participant_by_client_key(conn, client_key)
            if existing is not None:
                if existing["status"] != "declined":
                    raise Conflict("this session has already started")
                return existing, False
        refuse_when_closed(conn)
        conn.execute(
            "INSERT INTO participants (id, token, cell, factors, state, version, status, turns, created_at,"
            " updated_at, user_agent, url_params, platform_id, client_key, study_version, synthetic) VALUES (?, ?,"
            " '', '{}', '{}', 0, 'declined', 0, ?, ?, ?, ?, ?, ?, ?, ?)",
            (participant_id, token, stamp, stamp, user_agent[:500], json.dumps(dict(url_params or {})), platform_id,
             client_key, study_version, int(synthetic)))
        _Chain.new(conn, participant_id, stamp).save()
        row = conn.execute("SELECT * FROM participants WHERE id = ?", (participant_id,)).fetchone()
    return row, True


def participant_by_client_key(conn: sqlite3.Connection, client_key: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM participants WHERE client_key = ?", (client_key,)).fetchone()


def participant_by_token(conn: sqlite3.Connection, token: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM participants WHERE token = ?", (token,)).fetchone()
