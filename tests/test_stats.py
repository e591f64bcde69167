import numpy as np
import pytest

from helpers import stats


def test_empirical_p_and_percentile():
    null = np.arange(99.0)
    assert stats.empirical_p(1000, null) == pytest.approx(1 / 100)
    assert stats.empirical_p(-1, null) == 1.0
    assert stats.empirical_p(-1, null, alternative="less") == pytest.approx(1 / 100)
    assert stats.percentile_in_null(50.5, null) == pytest.approx(100 * 51 / 99)
    with pytest.raises(ValueError):
        stats.empirical_p(1, [])


def test_permutation_and_sign_flip_find_a_real_shift_and_not_a_null():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 40), rng.normal(0, 1, 40)
    assert stats.permutation_test(a, b)[1] < 0.01
    assert stats.permutation_test(b, b + 0.0)[1] > 0.3
    assert stats.sign_flip_test(a)[1] < 0.01
    mean, p = stats.sign_flip_test([1.0, 1.0, 1.0])      # exact: 1 of 8 sign patterns is as large
    assert mean == 1.0 and p == pytest.approx(1 / 8)


def test_clustered_se_counts_clusters_not_rows():
    rng = np.random.default_rng(1)
    item = rng.normal(0, 1, 30)
    values = np.repeat(item, 10)                          # each item copied 10 times
    clusters = np.repeat(np.arange(30), 10)
    naive = stats.standard_error(values)
    clustered = stats.clustered_se(values, clusters)
    assert clustered > 2.5 * naive                        # ~sqrt(10) wider
    assert clustered == pytest.approx(stats.standard_error(item) * np.sqrt(29 / 30), rel=0.05)


def test_bootstrap_auroc_on_perfect_and_reversed_scores():
    y = np.array([0, 0, 0, 1, 1, 1], bool)
    auc, lo, hi = stats.bootstrap_auroc(np.arange(6.0), y, n_boot=200)
    assert auc == 1.0 and lo == 1.0
    assert stats.bootstrap_auroc(-np.arange(6.0), y, n_boot=200)[0] == 0.0
    with pytest.raises(ValueError):
        stats.bootstrap_auroc(np.arange(3.0), np.ones(3, bool))


def test_two_level_bootstrap_widens_with_seed_spread():
    from helpers.stats import two_level_bootstrap_ci

    rng = np.random.default_rng(0)
    items = rng.normal(size=200)
    same = np.stack([items, items])
    apart = np.stack([items - 1, items + 1])
    m0, lo0, hi0 = two_level_bootstrap_ci(same)
    m1, lo1, hi1 = two_level_bootstrap_ci(apart)
    assert m0 == pytest.approx(m1) and hi1 - lo1 > 2 * (hi0 - lo0)
    with pytest.raises(ValueError):
        two_level_bootstrap_ci(np.ones(3))
