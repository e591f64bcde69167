"""Known-answer tests of helpers.calibration (no model needed)."""
import numpy as np
import pytest

from helpers import calibration as C


def test_calibrated_predictor_has_small_ece():
    rng = np.random.default_rng(0)
    conf = rng.random(20000)
    correct = rng.random(20000) < conf            # outcomes drawn at exactly the stated confidence
    for strategy in ("width", "mass"):
        assert C.ece(conf, correct, strategy=strategy) < 0.02
    null = C.ece_null(conf[:2000], n_draws=50)
    assert null.mean() < 0.05 and (null >= 0).all()


def test_constant_predictor_ece_is_gap_to_accuracy():
    correct = np.array([1] * 30 + [0] * 70)
    assert C.ece(np.full(100, 0.9), correct) == pytest.approx(0.6)
    assert C.ece(np.full(100, 0.9), correct, strategy="mass") == pytest.approx(0.6)
    assert C.brier(np.full(100, 0.3), correct) == pytest.approx(0.3 * 0.49 + 0.7 * 0.09)


def test_reliability_bins_and_mass_bins():
    conf = np.array([0.05, 0.15, 0.15, 0.95])
    r = C.reliability(conf, [0, 1, 0, 1], n_bins=10)
    assert r["count"].tolist() == [1, 2, 1] and r["accuracy"].tolist() == [0.0, 0.5, 1.0]
    idx = C.bin_index(np.linspace(0, 1, 103), n_bins=10, strategy="mass")
    assert np.bincount(idx).min() >= 10 and np.bincount(idx).max() <= 11 and len(np.bincount(idx)) == 10
    assert C.bin_index([1.0], 10).tolist() == [9]          # p = 1 lands in the last bin


def test_ece_difference_is_exact_and_bad_input_raises():
    correct = np.array([1, 0] * 50)
    d, lo, hi = C.ece_difference(np.full(100, 0.9), np.full(100, 0.5), correct, n_boot=200)
    assert d == pytest.approx(0.4) and lo <= d <= hi
    with pytest.raises(ValueError):
        C.ece([0.2, 1.5], [0, 1])
    with pytest.raises(ValueError):
        C.ece([0.2, 0.5], [0, 2])
    with pytest.raises(ValueError):
        C.bin_index([0.2], strategy="quantile")


def test_out_of_fold_probe_separable_and_never_sees_group():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 60)
    X = rng.normal(size=(120, 5)) + 3.0 * y[:, None]
    groups = np.repeat(np.arange(60), 2)
    p = C.out_of_fold_probe(X, y, groups, n_folds=4)
    assert np.isfinite(p).all() and ((p > 0.5) == y).mean() > 0.95
    with pytest.raises(ValueError):
        C.out_of_fold_probe(X, y, np.zeros(120), n_folds=4)


def test_ptrue_prompt_contains_question_and_answer():
    s = C.ptrue_prompt("The capital of France is", " Paris")
    assert "The capital of France is" in s and "Proposed answer: Paris" in s and s.endswith("is")


def test_base_rate_uses_the_probe_folds_and_other_folds_only():
    groups = np.arange(40)
    strata = np.array(["a"] * 20 + ["b"] * 20)
    y = np.array([1] * 20 + [0] * 20)
    fold = C.group_folds(groups, n_folds=4, seed=3)
    assert sorted(np.bincount(fold)) == [10, 10, 10, 10]
    b = C.out_of_fold_base_rate(y, strata, groups, n_folds=4, seed=3)
    assert np.array_equal(b, y.astype(float))                  # each stratum's rate: all 1 or all 0
    y2 = np.array([1, 0] * 20)                                  # a row's own outcome never enters its rate
    b2 = C.out_of_fold_base_rate(y2, np.zeros(40), groups, n_folds=4, seed=3)
    for k in range(4):
        assert b2[fold == k] == pytest.approx(y2[fold != k].mean())


def test_ece_bootstrap_and_group_gap():
    conf = np.array([0.9] * 50 + [0.1] * 50)
    correct = np.array([1] * 45 + [0] * 5 + [0] * 45 + [1] * 5)
    e, lo, hi = C.ece_bootstrap(conf, correct, n_boot=200)
    assert e == pytest.approx(0.0, abs=1e-12) and lo == 0 and hi > 0   # bias-shifted: the interval holds the estimate
    groups = np.array(["x"] * 50 + ["y"] * 50)
    assert C.group_gap(conf, correct, groups) == pytest.approx(0.0)
    # two tasks miscalibrated in opposite directions: pooled ECE can be 0, the task-binned gap is not
    conf2, correct2 = np.full(100, 0.5), np.array([1] * 50 + [0] * 50)
    assert C.ece(conf2, correct2) == pytest.approx(0.0) and C.group_gap(conf2, correct2, groups) == pytest.approx(0.5)
    assert C.group_gap_null(conf2, groups, n_draws=50).max() < 0.5


def test_ece_bootstrap_all_resamples_at_once_equals_one_at_a_time():
    rng = np.random.default_rng(5)
    conf = rng.uniform(0, 1, 90)
    y = (rng.random(90) < conf ** 2).astype(float)
    e, lo, hi = C.ece_bootstrap(conf, y, 10, n_boot=200, seed=7)
    draws = np.random.default_rng(7)
    boots = np.array([C.ece(conf[i], y[i], 10) for i in (draws.integers(0, 90, 90) for _ in range(200))])
    want = np.quantile(boots, [0.025, 0.975]) - (boots.mean() - e)
    assert e == C.ece(conf, y, 10) and np.allclose([lo, hi], np.maximum(want, 0), atol=1e-12)


def test_equivalence_power_grows_with_n_and_margin():
    rng = np.random.default_rng(11)
    small, large = rng.uniform(0.05, 0.95, 60), rng.uniform(0.05, 0.95, 2000)
    assert C.equivalence_power(small, 0.10, n_sim=30, seed=1) < 0.5      # the ECE's bias alone fails it
    assert C.equivalence_power(large, 0.10, n_sim=30, seed=1) > 0.95
    assert C.equivalence_power(large, 0.005, n_sim=10, seed=1) == 0.0
    with pytest.raises(ValueError):
        C.equivalence_power(small, 0.0)
