"""The resolvable difference (power) and Holm's correction: pinned on hand-computed values, and the resolvable
difference checked by simulation against the project's own paired test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peftsum.evaluation.metrics import holm, paired_bootstrap, resolvable_difference


def test_resolvable_difference_by_hand():
    # differences 1 and 3: sd (ddof 1) sqrt(2), n 2, so (1.95996 + 0.84162) * sqrt(2) / sqrt(2)
    assert resolvable_difference([3.0, 5.0], [2.0, 2.0]) == pytest.approx(2.801585218, abs=1e-8)
    assert resolvable_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.0
    assert resolvable_difference([4.0], [1.0]) is None  # one document: no spread
    with pytest.raises(ValueError, match="equal lengths"):
        resolvable_difference([1.0, 2.0], [1.0])


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running maximum 0.02, 0.03, 0.06, 0.06
    adjusted = holm([0.01, 0.04, 0.03, 0.005, None])
    assert adjusted[4] is None
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.3, 0.9]) == pytest.approx([0.6, 0.9]) and holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == []


def _detection_rate(true_difference: float, sd: float, n: int, draws: int = 400) -> float:
    """Share of simulated comparisons the paired bootstrap (200 resamples) calls significant at 5%."""
    rng = np.random.default_rng(0)
    found = 0
    for draw in range(draws):
        b = rng.uniform(20, 40, n)  # one system's per-document ROUGE-1
        a = b + rng.normal(true_difference, sd, n)  # the other's, with paired differences of mean true_difference
        found += paired_bootstrap(a, b, samples=200, seed=draw)["p_value"] < 0.05
    return found / draws


def test_the_stated_resolvable_difference_is_found_about_80_percent_of_the_time():
    sd, n = 10.0, 60
    mde = (1.959963984540054 + 0.8416212335729143) * sd / math.sqrt(n)
    rng = np.random.default_rng(1)  # a large sample states the same MDE as the formula
    b = rng.normal(0, 1, 100_000)
    assert resolvable_difference(b + rng.normal(0, sd, b.size), b) == pytest.approx(mde * math.sqrt(60 / 100_000),
                                                                                    rel=0.02)
    assert 0.72 <= _detection_rate(mde, sd, n) <= 0.88
    assert 0.02 <= _detection_rate(0.0, sd, n) <= 0.09  # no true difference: about 5% false positives
