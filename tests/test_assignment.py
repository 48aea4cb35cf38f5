from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping

import pytest

from combot import store
from combot.assignment import choose_cell
from combot.errors import ConfigError
from combot.study import load_study
from tests.conftest import DEFAULT_STUDY


def test_balanced_fills_the_least_filled_cell() -> None:
    study = load_study(DEFAULT_STUDY)
    counts: Counter[str] = Counter()
    rng = random.Random(3)
    for _ in range(80):
        label, number, factors, method = choose_cell(study, counts, rng)
        assert study.cell_label(factors) == label and study.cell_number(factors) == number
        assert method == "balanced"
        counts[label] += 1
    assert sorted(counts.values()) == [10] * 8


def test_balanced_picks_an_empty_cell_first() -> None:
    study = load_study(DEFAULT_STUDY)
    counts = {study.cell_label(c): 5 for c in study.cells()}
    counts["bramble-low-low"] = 4
    assert choose_cell(study, counts, random.Random())[0] == "bramble-low-low"


def test_a_seed_makes_the_sequence_reproducible(study_file: Callable[..., Path]) -> None:
    study = load_study(study_file({'assignment = "balanced"': 'assignment = "balanced"\nseed = 2024'}))

    def sequence() -> list[str]:
        counts: Counter[str] = Counter()
        out = []
        for _ in range(16):
            label, _, _, method = choose_cell(study, counts, random.SystemRandom())
            assert method == "balanced (seed 2024)"
            counts[label] += 1
            out.append(label)
        return out

    assert sequence() == sequence()


def test_random_assignment(study_file: Callable[..., Path]) -> None:
    study = load_study(study_file({'assignment = "balanced"': 'assignment = "random"'}))
    labels = {choose_cell(study, {}, random.Random(i))[0] for i in range(200)}
    assert len(labels) == 8
    assert choose_cell(study, {}, random.Random(1))[3] == "random"


def _participant(conn: Any, study: Any, pid: str, fill: str = "started", active_minutes: float = 30,
                 synthetic: bool = False) -> str:
    def greet(factors: Mapping[str, str]) -> tuple[dict[str, Any], list[store.NewMessage]]:
        return {"stage": "chat", "turn": 0}, [store.NewMessage("bot", "greeting", "Hello")]

    row, _ = store.create_participant(conn, participant_id=pid, token="t-" + pid, greet=greet, fill=fill,
                                      active_minutes=active_minutes, synthetic=synthetic,
                                      choose_cell=lambda counts: choose_cell(study, counts, random.Random(pid)))
    return str(row["cell"])


def test_what_counts_as_filled_is_configurable(tmp_path: Path, study_file: Callable[..., Path]) -> None:
    study = load_study(study_file({'assignment = "balanced"': 'assignment = "balanced"\nfill = "finished_or_active"\n'
                                                              'active_minutes = 20'}))
    assert (study.fill, study.active_minutes) == ("finished_or_active", 20)
    conn = store.connect(tmp_path / "fill.db")
    cells = [_participant(conn, study, f"p{i}") for i in range(8)]
    assert sorted(store.cell_counts(conn, "started").values()) == [1] * 8
    # p0 finished, p1 went quiet 30 minutes ago, p2 declined-style rows never count.
    conn.execute("UPDATE participants SET status = 'finished', updated_at = ? WHERE id = 'p0'", (store.ago(7200),))
    conn.execute("UPDATE participants SET updated_at = ? WHERE id = 'p1'", (store.ago(30 * 60),))
    store.record_decline(conn, participant_id="d1", token="t-d1")
    assert store.cell_counts(conn, "started") == {cell: 1 for cell in cells}
    active = store.cell_counts(conn, "finished_or_active", 20)
    assert cells[1] not in active and active[cells[0]] == 1 and sum(active.values()) == 7
    # The next arrival takes the slot the quiet participant left; with "started" it could not tell.
    assert _participant(conn, study, "p8", study.fill, study.active_minutes) == cells[1]


def test_synthetic_arrivals_are_balanced_among_themselves_apart_from_real_ones(tmp_path: Path) -> None:
    # A pilot of a live study needs every cell (balanced among the pilot's participants) without
    # moving the real participants' balance.
    study = load_study(DEFAULT_STUDY)
    conn = store.connect(tmp_path / "synthetic.db")
    real = [_participant(conn, study, f"r{i}") for i in range(3)]
    pilot = [_participant(conn, study, f"s{i}", synthetic=True) for i in range(16)]
    assert sorted(store.cell_counts(conn, synthetic=True).values()) == [2] * 8
    assert store.cell_counts(conn) == {cell: 1 for cell in real}
    more = [_participant(conn, study, f"r{i}") for i in range(3, 8)]
    assert sorted(real + more) == sorted(study.cell_label(c) for c in study.cells())
    assert len(set(pilot[:8])) == 8


def test_an_unknown_fill_rule_is_refused_with_its_line(study_file: Callable[..., Path]) -> None:
    path = study_file({'assignment = "balanced"': 'assignment = "balanced"\nfill = "whenever"'})
    with pytest.raises(ConfigError, match=r"line \d+: \[study.fill\] must be one of started, finished_or_active"):
        load_study(path)
