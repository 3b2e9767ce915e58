"""Metrics against values computed by hand or with scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from eval import metrics as m

GOLD = [1, 2, 2, 3, 4, 5, 5, 3, 1, 4]
PRED = [1, 3, 2, 3, 5, 4, 5, 2, 2, 4]


def test_correlations_match_scipy():
    assert m.pearson(GOLD, PRED) == pytest.approx(stats.pearsonr(GOLD, PRED)[0])
    assert m.spearman(GOLD, PRED) == pytest.approx(stats.spearmanr(GOLD, PRED)[0])
    assert m.kendall_tau_b(GOLD, PRED) == pytest.approx(stats.kendalltau(GOLD, PRED)[0])
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=60).round(1), rng.integers(1, 6, 60)
    assert m.kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y)[0])
    assert m.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


def test_kendall_by_hand_and_undefined_cases():
    # pairs of (1,1),(2,3),(3,2): concordant (1,2),(1,3); discordant (2,3) -> (2-1)/3
    assert m.kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert math.isnan(m.pearson([1, 1, 1], [1, 2, 3]))  # constant: undefined, not 0
    assert math.isnan(m.kendall_tau_b([2], [3]))
    with pytest.raises(ValueError):
        m.pearson([1, 2], [1])


def test_bootstrap_ci_is_seeded_and_brackets_value():
    a = m.with_ci(m.spearman, GOLD, PRED, n_boot=300, seed=1)
    b = m.with_ci(m.spearman, GOLD, PRED, n_boot=300, seed=1)
    assert a == b
    assert a["lo"] <= a["value"] <= a["hi"] and a["n"] == 10
    assert a["lo"] < a["hi"]


def test_agreement_by_hand():
    # exact: positions 0,2,3,6,9 -> 5/10; within one: all but none (max gap 1) -> 1.0
    assert m.exact_agreement(GOLD, PRED) == 0.5
    assert m.within_one(GOLD, PRED) == 1.0
    assert m.within_one([1, 5], [3, 5]) == 0.5
    # a mean gold of 3.5 rounds half up to 4
    assert m.exact_agreement([3.5, 2.5], [4, 3]) == 1.0


def test_pairwise_accuracy_tie_policies():
    gold = ["A", "B", "tie", "A", "B"]
    pred = ["A", "A", "A", "tie", "B"]
    # half: gold tie left out; A ok, B wrong, tie half, B ok -> 2.5/4
    assert m.pairwise_accuracy(gold, pred) == pytest.approx(2.5 / 4)
    assert m.pairwise_accuracy(gold, pred, ties="strict") == pytest.approx(2 / 4)
    assert m.pairwise_accuracy(gold, pred, ties="three_way") == pytest.approx(2 / 5)
    with pytest.raises(ValueError):
        m.pairwise_accuracy(gold, pred, ties="coin")


def test_parse_failures_and_position_consistency():
    assert m.parse_failure_rate([1, None, 3, None]) == 0.5
    assert m.drop_missing([1, None, 3], [4, 5, None]) == ([1], [4])
    assert m.position_consistency(["A", "B", "A", None], ["A", "A", "A", "B"]) == pytest.approx(2 / 3)


def test_cohen_kappa_by_hand():
    assert m.cohen_kappa([1, 1, 2, 2], [1, 2, 2, 2]) == pytest.approx(0.5)
    assert m.cohen_kappa([1, 2, 3], [1, 3, 3], weights="linear") == pytest.approx(2 / 3)
    assert m.cohen_kappa([1, 2, 3], [1, 3, 3], weights="quadratic") == pytest.approx(0.8)
    assert m.cohen_kappa([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)


# Krippendorff (2011) "Computing Krippendorff's Alpha-Reliability", example C: 4 observers,
# 12 units, missing values; published alphas: nominal .743, ordinal .815, interval .849.
_K = [
    [1, 1, None, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4],
    [4, 4, 4, 4], [1, 1, 2, 1], [2, 2, 2, 2], [None, 5, 5, 5], [None, None, 1, 1], [None, 3, None, None],
]


def test_krippendorff_alpha_published_example():
    assert m.krippendorff_alpha(_K, "nominal") == pytest.approx(0.743, abs=1e-3)
    assert m.krippendorff_alpha(_K, "ordinal") == pytest.approx(0.815, abs=1e-3)
    assert m.krippendorff_alpha(_K, "interval") == pytest.approx(0.849, abs=1e-3)
    assert m.krippendorff_alpha([[1, 1], [2, 2], [3, 3]], "interval") == pytest.approx(1.0)


def test_paired_bootstrap_prefers_the_better_judge():
    rng = np.random.default_rng(0)
    gold = rng.integers(1, 6, 80).tolist()
    good = [min(5, max(1, g + int(rng.integers(-1, 2)))) for g in gold]
    bad = rng.integers(1, 6, 80).tolist()
    bad[0] = None  # an unparsed item drops out of both sides
    r = m.paired_bootstrap(m.spearman, gold, good, bad, n_boot=300, seed=0)
    assert r["n"] == 79 and r["delta"] > 0.5 and r["lo"] > 0 and r["p_value"] < 0.01
    same = m.paired_bootstrap(m.spearman, gold, good, good, n_boot=100, seed=0)
    assert same["delta"] == 0 and same["p_value"] == 1.0


def test_wilson_interval():
    lo, hi = m.wilson_interval(0, 10)
    assert lo == 0 and 0.2 < hi < 0.35
    lo, hi = m.wilson_interval(5, 10)
    assert lo < 0.5 < hi
