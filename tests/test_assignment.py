from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Callable

from combot.assignment import choose_cell
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
