"""virface.stats against scipy and statsmodels on fixed inputs, and against hand-worked numbers."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.power import TTestPower, NormalIndPower

from virface.stats import (accuracy_se, bootstrap_seeds_and_pairs, describe, min_detectable_effect,
                           paired_over_pairs, paired_over_seeds)

# Five seeds of two methods' accuracies (fractions), paired by seed.
METHOD = [0.912, 0.905, 0.921, 0.899, 0.915]
REFERENCE = [0.903, 0.901, 0.910, 0.897, 0.904]


def test_accuracy_se_is_the_binomial_standard_error_over_pairs():
    assert accuracy_se(0.9, 600) == pytest.approx(math.sqrt(0.9 * 0.1 / 600))     # 0.01225
    assert accuracy_se(0.9, 20000) == pytest.approx(0.0021213, abs=1e-7)
    assert accuracy_se(1.0, 10) == 0.0
    with pytest.raises(ValueError):
        accuracy_se(0.5, 0)


def test_paired_over_seeds_matches_scipys_paired_t_test():
    d = paired_over_seeds(METHOD, REFERENCE)
    ref = scipy_stats.ttest_rel(np.array(METHOD) * 100, np.array(REFERENCE) * 100)
    assert d["values"] == pytest.approx([0.9, 0.4, 1.1, 0.2, 1.1])
    assert d["mean"] == pytest.approx(0.74)
    assert d["std"] == pytest.approx(np.std([0.9, 0.4, 1.1, 0.2, 1.1], ddof=1))
    assert d["se"] == pytest.approx(d["std"] / math.sqrt(5))
    assert d["t"] == pytest.approx(ref.statistic)
    assert d["p_value"] == pytest.approx(ref.pvalue)
    lo, hi = ref.confidence_interval(0.95)
    assert d["ci95"] == pytest.approx([lo, hi])
    assert d["signs"] == "+++++"
    assert d["n"] == 5


def test_a_gain_whose_seeds_disagree_is_not_significant():
    d = paired_over_seeds([0.91, 0.89, 0.92, 0.88], [0.90, 0.90, 0.90, 0.90])
    ref = scipy_stats.ttest_rel([91, 89, 92, 88], [90, 90, 90, 90])
    assert d["p_value"] == pytest.approx(ref.pvalue)
    assert d["p_value"] > 0.5
    assert d["signs"] == "+-+-"
    assert "not distinguishable" in describe(d, "x - y")


def test_one_seed_has_no_interval_and_a_rounding_tie_is_a_tie():
    one = paired_over_seeds([0.9], [0.8])
    assert one["mean"] == pytest.approx(10.0)
    assert one["std"] is None and one["p_value"] is None and one["ci95"] is None
    assert "no interval" in describe(one, "x - y")
    tie = paired_over_seeds([0.3 + 0.6, 0.5], [0.9, 0.4])      # 0.3 + 0.6 != 0.9 in floats
    assert tie["signs"] == "0+"


def test_identical_gains_on_every_seed_are_certain_and_zero_gains_are_not():
    same = paired_over_seeds([0.91, 0.92, 0.93], [0.90, 0.91, 0.92])
    assert same["ci95"] == pytest.approx([1.0, 1.0]) and same["p_value"] == 0.0
    none = paired_over_seeds([0.9, 0.8], [0.9, 0.8])
    assert none["p_value"] == 1.0 and none["mean"] == 0.0


def test_paired_over_pairs_matches_statsmodels_exact_mcnemar():
    rng = np.random.default_rng(3)
    a = rng.random(2000) < 0.90
    b = a.copy()
    flip = rng.choice(2000, 150, replace=False)       # 150 discordant pairs, unevenly split
    b[flip[:60]] = ~b[flip[:60]]
    b[flip[60:]] = a[flip[60:]]
    b[flip[60:100]] = ~a[flip[60:100]]
    n_a_only = int(np.sum(a & ~b))
    n_b_only = int(np.sum(~a & b))
    table = [[int(np.sum(a & b)), n_a_only], [n_b_only, int(np.sum(~a & ~b))]]
    d = paired_over_pairs(a, b)
    assert (d["n_a_only"], d["n_b_only"], d["n_pairs"]) == (n_a_only, n_b_only, 2000)
    assert d["p_value"] == pytest.approx(mcnemar(table, exact=True).pvalue)
    assert d["diff"] == pytest.approx(100 * (a.mean() - b.mean()))
    per_pair = a.astype(float) - b.astype(float)
    assert d["se"] == pytest.approx(100 * per_pair.std() / math.sqrt(2000))
    assert d["ci95"][0] < d["diff"] < d["ci95"][1]


def test_paired_over_pairs_on_a_small_table_worked_by_hand():
    # 10 pairs: a right on 8, b right on 6; a alone right on 3, b alone on 1.
    a = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], bool)
    b = np.array([1, 1, 1, 1, 1, 0, 0, 0, 1, 0], bool)
    d = paired_over_pairs(a, b)
    assert d["diff"] == pytest.approx(20.0)
    assert d["p_value"] == pytest.approx(0.625)      # 2 * P(X <= 1), X ~ Bin(4, 1/2) = 2 * 5/16
    assert paired_over_pairs(a, a)["p_value"] == 1.0
    with pytest.raises(ValueError):
        paired_over_pairs(a, b[:5])


def test_bootstrap_over_seeds_and_pairs_is_wider_than_pairs_alone_and_centred():
    rng = np.random.default_rng(0)
    n_pairs = 3000
    truth = rng.random(n_pairs) < 0.9
    # Three seeds; method b is a copy of a with ~2 % of pairs made wrong: a is ahead by ~1.8.
    a = np.stack([truth ^ (rng.random(n_pairs) < 0.03) for _ in range(3)])
    b = a & ~(rng.random(a.shape) < 0.02)
    boot = bootstrap_seeds_and_pairs(a, b, n_boot=600, seed=1)
    observed = 100 * (a.mean() - b.mean())
    assert boot["mean"] == pytest.approx(observed, abs=1e-6)
    assert boot["ci95"][0] < observed < boot["ci95"][1]
    assert boot["p_value"] == pytest.approx(1 / 600)        # every draw is above 0
    # The same seed three times: the seed level adds nothing, the pair level remains.
    same = bootstrap_seeds_and_pairs(a[[0, 0, 0]], b[[0, 0, 0]], n_boot=600, seed=1)
    pairs_only = paired_over_pairs(a[0], b[0])
    assert same["se"] == pytest.approx(pairs_only["se"], rel=0.15)


def test_bootstrap_of_no_difference_is_not_significant():
    rng = np.random.default_rng(2)
    a = rng.random((4, 2000)) < 0.9
    b = a.copy()
    for seed in range(4):            # b loses 60 pairs a gets right and wins 60 a gets wrong
        right, wrong = np.flatnonzero(a[seed]), np.flatnonzero(~a[seed])
        b[seed, right[:60]] = False
        b[seed, wrong[:60]] = True
    boot = bootstrap_seeds_and_pairs(a, b, n_boot=400, seed=0)
    assert boot["p_value"] > 0.05
    assert boot["ci95"][0] <= 0 <= boot["ci95"][1]


def test_min_detectable_effect_matches_statsmodels_power_solver():
    # One-sample (paired) t-test over 5 seeds with a difference std of 0.42 points.
    std, n = 0.42, 5
    effect = TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
    assert min_detectable_effect(std / math.sqrt(n), df=n - 1) == pytest.approx(effect * std, rel=1e-4)
    # z-test: (z_0.975 + z_0.8) * se = 2.80 * se; statsmodels' normal power with ratio 0 is one sample.
    z_effect = NormalIndPower().solve_power(nobs1=100, alpha=0.05, power=0.8, ratio=0)
    assert min_detectable_effect(0.5) == pytest.approx(z_effect * math.sqrt(100) * 0.5, rel=1e-4)
    assert min_detectable_effect(0.5) == pytest.approx(2.8016 * 0.5, abs=1e-3)
    assert min_detectable_effect(0.0, df=4) == 0.0


def test_describe_names_the_verdict():
    d = paired_over_seeds(METHOD, REFERENCE)
    line = describe(d, "VirClass - baseline")
    assert line.startswith("VirClass - baseline: +0.74 ± 0.")
    assert "a gain (p < 0.05)" in line and "+++++" in line


def test_min_detectable_effect_with_two_seeds_where_the_far_tail_underflows():
    # df = 1 (two seeds): the noncentral t's far tail is NaN in scipy beyond delta ~ 8; it is 0.
    std, n = 0.42, 2
    effect = TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
    assert min_detectable_effect(std / math.sqrt(n), df=n - 1) == pytest.approx(effect * std, rel=1e-4)
