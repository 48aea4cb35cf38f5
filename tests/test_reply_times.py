"""The dashboard's reply times per cell: histograms, quantiles, and the drift warning."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable

from combot import monitor, store
from combot.reply_times import _quantile, reply_times
from combot.study import Study, load_study


def fill(conn: sqlite3.Connection, study: Study, shown_by_cell: dict[str, list[int]], synthetic: bool = False) -> None:
    """One participant per cell label, one answered message per value (its first reply shown at that ms)."""
    stamp = store.now()
    for label, values in shown_by_cell.items():
        pid = ("s" if synthetic else "p") + label
        conn.execute("INSERT INTO participants (id, token, cell, factors, state, version, status, created_at, synthetic)"
                     " VALUES (?, ?, ?, '{}', '{}', 0, 'started', ?, ?)", (pid, "t" + pid, label, stamp, int(synthetic)))
        for turn, shown in enumerate(values, start=1):
            cursor = conn.execute("INSERT INTO messages (participant_id, turn, sender, kind, text, created_at)"
                                  " VALUES (?, ?, 'participant', 'message', 'x', ?)", (pid, turn, stamp))
            for extra in (0, 1500):  # the turn's second reply must not count
                conn.execute("INSERT INTO messages (participant_id, turn, sender, kind, text, reply_to, compute_ms,"
                             " shown_ms, created_at) VALUES (?, ?, 'bot', 'question', 'y', ?, 5, ?, ?)",
                             (pid, turn, cursor.lastrowid, shown + extra, stamp))


def test_quantiles_are_read_from_the_histogram() -> None:
    histogram = [0] * 100
    histogram[9] = 10  # ten replies between 900 and 1000 ms
    assert _quantile(histogram, 0.5) == 950 and _quantile(histogram, 0.9) == 990
    assert _quantile([0] * 100, 0.5) is None


def test_a_cell_that_drifts_from_the_others_with_its_design_is_a_warning(tmp_path: Path,
                                                                         study_file: Callable[..., Path]) -> None:
    study = load_study(study_file(), environ={"COMBOT_LLM_URL": "http://127.0.0.1:9/v1"})  # every cell "matched"
    conn = store.connect(tmp_path / "d.db")
    labels = [study.cell_label(c) for c in study.cells()]
    shown = {label: [950 + 10 * (i % 10) for i in range(30)] for label in labels}
    shown[labels[3]] = [2950 + 10 * (i % 10) for i in range(30)]  # this one is held three times as long
    fill(conn, study, shown)
    fill(conn, study, {labels[0]: [9000] * 50}, synthetic=True)  # bench and pilot participants never count
    report = reply_times(conn, study, store.ago(600), drift_percent=25)
    by_cell = {c["cell"]: c for c in report["cells"]}
    assert by_cell[labels[0]]["turns"] == 30 and 950 <= by_cell[labels[0]]["shown_p50_ms"] <= 1050
    assert by_cell[labels[0]]["compute_p50_ms"] is not None and by_cell[labels[0]]["mode"] == "matched"
    assert [c["cell"] for c in report["cells"] if c["drifts"]] == [labels[3]]
    assert len(report["warnings"]) == 1 and f"cell 4 ({study.cell_description(study.cells()[3])})" in report["warnings"][0]
    numbers = monitor.dashboard(conn, study)
    assert numbers["reply_timing"]["cells"][3]["drifts"] and report["warnings"][0] in numbers["warnings"]
    conn.close()


def test_cells_designed_to_differ_are_not_compared(tmp_path: Path, study_file: Callable[..., Path]) -> None:
    path = study_file(append='\n[[timing]]\nwhen = { think = "low" }\nmode = "typing"\nmin = 3\nmax = 4\n')
    study = load_study(path, environ={})
    conn = store.connect(tmp_path / "d.db")
    fill(conn, study, {study.cell_label(c): [3500 if c["think"] == "low" else 10] * 30 for c in study.cells()})
    assert reply_times(conn, study, store.ago(600), drift_percent=25)["warnings"] == []
    conn.close()
