"""The two-sample tests behind the reply-timing proof, against values worked out by hand."""

from __future__ import annotations

import math
import random

import pytest

from combot.stats import kolmogorov_q, ks_2samp, mann_whitney_u, percentile


def test_the_kolmogorov_tail_has_its_textbook_values() -> None:
    # The classic critical values: P(K > 1.36) = 0.05, P(K > 1.63) = 0.01.
    assert kolmogorov_q(1.358) == pytest.approx(0.05, abs=0.001)
    assert kolmogorov_q(1.628) == pytest.approx(0.01, abs=0.0005)
    assert kolmogorov_q(1.0) == pytest.approx(0.27, abs=0.001)
    assert kolmogorov_q(0.1) == 1.0


def test_ks_distance_and_p_value() -> None:
    d, p = ks_2samp([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    assert d == 1.0 and p < 0.01
    d, p = ks_2samp([1, 2, 3], [1, 2, 3])
    assert d == 0.0 and p == 1.0
    d, _ = ks_2samp([1, 2, 3, 4], [3, 4, 5, 6])  # F_a(2) = 0.5, F_b(2) = 0
    assert d == 0.5
    with pytest.raises(ValueError):
        ks_2samp([], [1])


def test_mann_whitney_matches_the_normal_approximation() -> None:
    u, p = mann_whitney_u([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    # U = 0; z = (12.5 - 0.5) / sqrt(25 * 11 / 12); two-sided p = erfc(z / sqrt 2) = 0.01219
    assert u == 0 and p == pytest.approx(math.erfc(12 / math.sqrt(25 * 11 / 12) / math.sqrt(2)))
    assert p == pytest.approx(0.01219, abs=0.00001)
    u_ab, p_ab = mann_whitney_u([1, 1, 2, 5], [1, 2, 2, 3, 3])
    u_ba, p_ba = mann_whitney_u([1, 2, 2, 3, 3], [1, 1, 2, 5])
    assert u_ab + u_ba == 4 * 5 and p_ab == pytest.approx(p_ba)


def test_same_distribution_not_rejected_different_rejected() -> None:
    rng = random.Random(5)
    a = [rng.lognormvariate(0, 0.3) for _ in range(300)]
    b = [rng.lognormvariate(0, 0.3) for _ in range(300)]
    c = [rng.lognormvariate(0.2, 0.3) for _ in range(300)]
    assert ks_2samp(a, b)[1] > 0.05 and mann_whitney_u(a, b)[1] > 0.05
    assert ks_2samp(a, c)[1] < 0.001 and mann_whitney_u(a, c)[1] < 0.001


def test_percentile_interpolates() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 90) == 5
    assert math.isnan(percentile([], 50))
