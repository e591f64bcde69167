"""Statistics every notebook's claims need: intervals, nulls, paired tests, clustered standard errors.

    from helpers import stats
    mean, low, high = stats.bootstrap_ci(per_prompt_effect)           # percentile bootstrap of the mean
    p = stats.empirical_p(observed, null_draws)                       # where a value falls in a null
    se = stats.clustered_se(values, clusters=item_ids)                # s.e. of the mean, clustered by item
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% by default); (0, 1) when n = 0."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}, {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile-bootstrap interval."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    alpha = (1 - level) / 2
    return float(values.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def two_level_bootstrap_ci(values: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                           seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) for values [seeds, items]: each draw resamples seeds, then items (the same items for
    every seed in a draw, since they are paired), so the interval carries seed-to-seed and item-to-item spread."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"values must be a non-empty [seeds, items] array, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, values.shape[0], size=(n_boot, values.shape[0]))
    i_idx = rng.integers(0, values.shape[1], size=(n_boot, values.shape[1]))
    means = np.array([values[s][:, i].mean() for s, i in zip(s_idx, i_idx)])
    alpha = (1 - level) / 2
    return float(values.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_difference(a: Sequence[float], b: Sequence[float], **kwargs: Any) -> tuple[float, float, float]:
    """Mean of a - b over paired items (same questions), with a bootstrap interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    return bootstrap_ci(a - b, **kwargs)


def bootstrap_ratio_ci(num: Sequence[float], den: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
    """(ratio, low, high) for mean(num) / mean(den) over paired items, with a percentile-bootstrap interval
    (e.g. the fraction of a full answer swap that a patch achieves)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if num.shape != den.shape or num.ndim != 1 or len(num) == 0:
        raise ValueError(f"num and den must be equal-length 1-D arrays, got {num.shape}, {den.shape}")
    if den.mean() == 0:
        raise ValueError("mean(den) is 0: the ratio is undefined")
    idx = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))
    ratios = num[idx].mean(1) / den[idx].mean(1)
    alpha = (1 - level) / 2
    return float(num.mean() / den.mean()), float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1 - alpha))


def empirical_p(observed: float, null: Sequence[float] | np.ndarray, alternative: str = "greater") -> float:
    """One-sided empirical p of `observed` against draws from a null, with the +1 correction
    ((1 + #{null >= observed}) / (1 + n)); alternative='less' counts null <= observed."""
    null = np.asarray(null, dtype=float).ravel()
    if len(null) == 0:
        raise ValueError("the null needs at least one draw")
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    hits = (null >= observed).sum() if alternative == "greater" else (null <= observed).sum()
    return float((1 + hits) / (1 + len(null)))


def percentile_in_null(observed: float, null: Sequence[float] | np.ndarray) -> float:
    """Percentage of null draws strictly below `observed` (100: above every draw)."""
    null = np.asarray(null, dtype=float).ravel()
    if len(null) == 0:
        raise ValueError("the null needs at least one draw")
    return float(100.0 * (null < observed).mean())


def permutation_test(a: Sequence[float], b: Sequence[float], n_perm: int = 5000, seed: int = 0,
                     alternative: str = "greater") -> tuple[float, float]:
    """(mean(a) - mean(b), p) by permuting the group labels of two independent samples."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("both samples need at least one value")
    both, rng = np.concatenate([a, b]), np.random.default_rng(seed)
    observed = a.mean() - b.mean()
    perms = np.stack([rng.permutation(both) for _ in range(n_perm)])
    null = perms[:, :len(a)].mean(1) - perms[:, len(a):].mean(1)
    return float(observed), empirical_p(observed, null, alternative)


def sign_flip_test(diffs: Sequence[float], n_perm: int = 5000, seed: int = 0,
                   alternative: str = "greater") -> tuple[float, float]:
    """(mean difference, p) for paired differences by random sign flips (exact when 2^n <= n_perm)."""
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError(f"diffs must be a non-empty 1-D array, got shape {d.shape}")
    n = len(d)
    if 2 ** n <= n_perm:
        signs = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2 - 1
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_perm, n))
    null = (signs * d).mean(1)
    hits = (null >= d.mean()).sum() if alternative == "greater" else (null <= d.mean()).sum()
    return float(d.mean()), float(hits / len(null))


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean (ddof=1); nan for fewer than two values."""
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def clustered_se(values: Sequence[float], clusters: Sequence[Any]) -> float:
    """Standard error of the overall mean when observations share clusters (the same item under two
    templates is not two samples): the s.e. of the cluster means' weighted average (CR1-style)."""
    v = np.asarray(values, dtype=float)
    labels = np.asarray(clusters)
    if v.shape != labels.shape or v.ndim != 1:
        raise ValueError(f"values and clusters must be equal-length 1-D arrays, got {v.shape}, {labels.shape}")
    groups = np.unique(labels)
    g = len(groups)
    if g < 2:
        return float("nan")
    resid = v - v.mean()
    sums = np.array([resid[labels == k].sum() for k in groups])
    var = g / (g - 1) * (sums ** 2).sum() / len(v) ** 2
    return float(math.sqrt(var))


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` for boolean `labels` (scikit-learn's roc_auc_score; ties count
    half): the probability that a random positive outscores a random negative. 0.5 is chance."""
    from sklearn.metrics import roc_auc_score

    s, y = np.asarray(scores, dtype=float).ravel(), np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError("scores and labels must have the same length")
    if y.all() or not y.any():
        raise ValueError("need at least one positive and one negative")
    return float(roc_auc_score(y, s))


def bootstrap_auroc(scores: Sequence[float], labels: Sequence[bool], n_boot: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """(AUROC, low, high): AUROC with a 95% percentile bootstrap over items (resamples with one class skipped)."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    if s.shape != y.shape:
        raise ValueError("scores and labels must have the same length")
    auc = auroc(s, y)                                  # raises unless both classes are present
    rng, boots = np.random.default_rng(seed), []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if y[i].any() and not y[i].all():
            boots.append(auroc(s[i], y[i]))
    return auc, float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))
