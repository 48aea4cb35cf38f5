"""The dashboard's reply times per cell: designed (the cell's reply timing) against actual.

Per cell, over the dashboard's window, the turn's first reply of every answered participant message:
how many, `shown_ms` (when participants saw it) and `compute_ms` (how long it took to make) as a
histogram of 100 ms buckets with the median and 90th percentile read from it, beside the cell's
design in words. Cells with the same design should show the same distribution: a cell whose median
is more than `[admin] timing_drift_percent` away from the median of the others with that design is a
warning (in mode "none" that is exactly the confound of reply speed with a manipulation).

Read-only reporting SQL, like combot/monitor.py: one grouped query, no list of times held.
"""

from __future__ import annotations

import sqlite3
import statistics
from typing import Any

from combot.study import Study

BUCKET_MS = 100
BUCKETS = 100  # 0-10 s in 100 ms steps; the last bucket holds everything slower
# Fewer turns than this in a cell (or in the others together) say too little to warn about.
MIN_TURNS = 20


def _quantile(histogram: list[int], share: float) -> int | None:
    """The value below which `share` of the turns fall, interpolated inside its 100 ms bucket."""
    total = sum(histogram)
    if not total:
        return None
    target = share * total
    seen = 0
    for index, count in enumerate(histogram):
        if count and seen + count >= target:
            return round(BUCKET_MS * (index + (target - seen) / count))
        seen += count
    return BUCKET_MS * len(histogram)


def reply_times(conn: sqlite3.Connection, study: Study, since: str, drift_percent: float) -> dict[str, Any]:
    """Everything the dashboard's "Reply timing per cell" shows, and its warnings."""
    rows = conn.execute(
        "SELECT p.cell AS cell, min(m.shown_ms / ?, ?) AS shown_b, min(m.compute_ms / ?, ?) AS compute_b, count(*) AS n"
        " FROM messages m JOIN participants p ON p.id = m.participant_id"
        " WHERE m.sender = 'bot' AND m.reply_to IS NOT NULL AND m.shown_ms IS NOT NULL AND m.created_at >= ?"
        " AND p.synthetic = 0 AND m.id = (SELECT min(x.id) FROM messages x WHERE x.reply_to = m.reply_to)"
        " GROUP BY cell, shown_b, compute_b",
        (BUCKET_MS, BUCKETS - 1, BUCKET_MS, BUCKETS - 1, since)).fetchall()
    shown: dict[str, list[int]] = {}
    compute: dict[str, list[int]] = {}
    for row in rows:
        shown.setdefault(row["cell"], [0] * BUCKETS)[row["shown_b"]] += row["n"]
        compute.setdefault(row["cell"], [0] * BUCKETS)[row["compute_b"]] += row["n"]
    cells: list[dict[str, Any]] = []
    for cell in study.cells():
        label = study.cell_label(cell)
        timing = study.timing(cell)
        histogram = shown.get(label, [0] * BUCKETS)
        cells.append({
            "cell": label, "description": study.cell_description(cell), "number": study.cell_number(cell),
            "mode": timing.mode, "design": timing.describe(),
            "turns": sum(histogram), "histogram": histogram, "bucket_ms": BUCKET_MS,
            "shown_p50_ms": _quantile(histogram, 0.5), "shown_p90_ms": _quantile(histogram, 0.9),
            "compute_p50_ms": _quantile(compute.get(label, []), 0.5),
            "compute_p90_ms": _quantile(compute.get(label, []), 0.9),
            "_design": timing,
        })
    warnings = []
    for entry in cells:
        others = [c for c in cells if c is not entry and c["_design"] == entry["_design"] and c["turns"]]
        if entry["turns"] < MIN_TURNS or sum(c["turns"] for c in others) < MIN_TURNS:
            continue
        reference = statistics.median(c["shown_p50_ms"] for c in others)
        mine = entry["shown_p50_ms"]
        if reference and abs(mine - reference) / reference * 100 > drift_percent:
            entry["drifts"] = True
            warnings.append(
                f"Reply timing drifts in cell {entry['number']} ({entry['description']}): its replies are shown after"
                f" {mine / 1000:.2f} s at the median, the other cells with the same design ({entry['mode']}) after"
                f" {reference / 1000:.2f} s (warning above {drift_percent:g}% apart).")
    for entry in cells:
        entry.pop("_design")
        entry.setdefault("drifts", False)
    return {"cells": cells, "drift_percent": drift_percent, "warnings": warnings}
