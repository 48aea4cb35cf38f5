"""Timestamps as stored: text that sorts in time order."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone


def now() -> str:
    """UTC, ISO 8601, milliseconds: sorts as text and reads in R, Stata and pandas."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ago(seconds: float) -> str:
    """The `now()` of `seconds` ago, for comparing with stored timestamps as text."""
    moment = datetime.now(timezone.utc) - timedelta(seconds=seconds)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
