"""The full text of every study version served, kept the first time it is served."""

from __future__ import annotations

import sqlite3

from combot.store.timestamps import now
from combot.store.transactions import transaction


def record_study_version(conn: sqlite3.Connection, *, version: str, text: str, combot_version: str,
                         head_sha256: str, encoder_sha256: str) -> None:
    """Keep the full text of a study version the first time it is served (later serves change nothing)."""
    with transaction(conn):
        conn.execute("INSERT OR IGNORE INTO study_versions (version, text, combot_version, head_sha256,"
                     " encoder_sha256, first_served_at) VALUES (?, ?, ?, ?, ?, ?)",
                     (version, text, combot_version, head_sha256, encoder_sha256, now()))


def study_versions(conn: sqlite3.Connection, include_synthetic: bool = False) -> list[sqlite3.Row]:
    """Every stored study version, oldest first, with how many participants (declines included) saw it."""
    return conn.execute(
        "SELECT v.*, (SELECT count(*) FROM participants p WHERE p.study_version = v.version"
        " AND (? OR p.synthetic = 0)) AS participants FROM study_versions v ORDER BY v.first_served_at, v.version",
        (int(include_synthetic),)).fetchall()
