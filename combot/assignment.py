"""Which cell a new participant joins: the least-filled one (ties at random), or a plain random draw."""

from __future__ import annotations

import random
from typing import Mapping

from combot.study import Study


def choose_cell(study: Study, counts: Mapping[str, int], rng: random.Random) -> tuple[str, int, dict[str, str], str]:
    """Return (cell label, cell number, factor levels, method) given participants per cell label.

    With `[study] seed`, ties are broken by a generator seeded from the seed and the number of
    participants so far, so the sequence of assignments can be replayed for an audit.
    """
    cells = study.cells()
    if study.seed is not None:
        rng = random.Random(f"{study.seed}:{sum(counts.values())}")
    if study.assignment == "random":
        chosen = rng.choice(cells)
        method = "random"
    else:
        fewest = min(counts.get(study.cell_label(cell), 0) for cell in cells)
        candidates = [cell for cell in cells if counts.get(study.cell_label(cell), 0) == fewest]
        chosen = rng.choice(candidates)
        method = "balanced"
    if study.seed is not None:
        method += f" (seed {study.seed})"
    return study.cell_label(chosen), study.cell_number(chosen), chosen, method
