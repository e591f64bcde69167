"""Calibration of probabilities: expected calibration error (equal-width or equal-mass bins), reliability-diagram
data, Brier score, the ECE a perfectly calibrated predictor would show by chance, P(True) self-evaluation prompts,
and out-of-fold probabilities of a probe (so its calibration is measured on rows it never saw).

    calibration.ece(conf, correct, n_bins=10, strategy="mass")        # 0 = perfectly calibrated
    calibration.reliability(conf, correct)                           # per bin: confidence, accuracy, count
    p = calibration.out_of_fold_probe(X, y, groups); calibration.ece(p, y)

Shared-methods layer: imports only infrastructure (interventions) and probes.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from helpers import interventions as I
from helpers import probes

STRATEGIES = ("width", "mass")


def _check(conf: Sequence[float], correct: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    conf, correct = np.asarray(conf, dtype=float), np.asarray(correct, dtype=float)
    if conf.ndim != 1 or conf.shape != correct.shape or len(conf) == 0:
        raise ValueError(f"need two equal-length non-empty 1-D arrays, got {conf.shape} and {correct.shape}")
    if not np.isfinite(conf).all() or conf.min() < 0 or conf.max() > 1:
        raise ValueError("confidences must be finite probabilities in [0, 1]")
    if not np.isin(correct, (0.0, 1.0)).all():
        raise ValueError("correct must hold 0/1 (or False/True) outcomes")
    return conf, correct


def bin_index(conf: Sequence[float], n_bins: int = 10, strategy: str = "width") -> np.ndarray:
    """The bin of each confidence: equal-width bins on [0, 1] ("width"), or bins cut at the quantiles of the
    confidences so each holds about the same number of predictions ("mass"; equal confidences share a bin)."""
    conf = np.asarray(conf, dtype=float)
    if n_bins < 1 or strategy not in STRATEGIES:
        raise ValueError(f"n_bins must be >= 1 and strategy one of {STRATEGIES}; got {n_bins}, {strategy!r}")
    if strategy == "width":
        return np.clip((conf * n_bins).astype(int), 0, n_bins - 1)
    edges = np.quantile(conf, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.searchsorted(edges, conf, side="left")


def reliability(conf: Sequence[float], correct: Sequence[float], n_bins: int = 10,
                strategy: str = "width") -> dict[str, np.ndarray]:
    """Reliability-diagram data for the non-empty bins: mean confidence, accuracy and count per bin."""
    conf, correct = _check(conf, correct)
    idx = bin_index(conf, n_bins, strategy)
    bins = np.unique(idx)
    return {"confidence": np.array([conf[idx == b].mean() for b in bins]),
            "accuracy": np.array([correct[idx == b].mean() for b in bins]),
            "count": np.array([(idx == b).sum() for b in bins])}


def ece(conf: Sequence[float], correct: Sequence[float], n_bins: int = 10, strategy: str = "width") -> float:
    """Expected calibration error: sum over bins of (bin share) * |mean confidence - accuracy|."""
    r = reliability(conf, correct, n_bins, strategy)
    return float((r["count"] * np.abs(r["confidence"] - r["accuracy"])).sum() / r["count"].sum())


def brier(conf: Sequence[float], correct: Sequence[float]) -> float:
    """Brier score: mean squared difference between confidence and outcome (0 best; 0.25 = always 0.5)."""
    conf, correct = _check(conf, correct)
    return float(((conf - correct) ** 2).mean())


def ece_null(conf: Sequence[float], n_draws: int = 500, n_bins: int = 10, strategy: str = "width",
             seed: int = 0) -> np.ndarray:
    """ECEs of a perfectly calibrated predictor with these confidences (outcomes drawn as Bernoulli(conf)):
    how large an ECE sampling error alone produces with this many predictions."""
    conf = np.asarray(conf, dtype=float)
    rng = np.random.default_rng(seed)
    return np.array([ece(conf, rng.random(len(conf)) < conf, n_bins, strategy) for _ in range(n_draws)])


def ptrue_prompt(question: str, answer: str) -> str:
    """A self-evaluation prompt in the style of Kadavath et al. (2022, §4): the question, a proposed answer,
    and a request to judge it; the next token is read as " true" or " false"."""
    return (f"Question: {question.strip()} ...\nProposed answer: {answer.strip()}\n"
            "Is the proposed answer true or false?\nThe proposed answer is")


@torch.no_grad()
def two_way_probability(model, prompts: Sequence[str], pairs: Sequence[tuple[str, str]] = ((" true", " false"),),
                        batch_size: int = 32) -> np.ndarray:
    """P(yes) / (P(yes) + P(no)) of the next token of each prompt, for each (yes, no) pair of single-token words,
    from one forward pass: [n_prompts, n_pairs]."""
    for w in (w for pair in pairs for w in pair):
        if not I.is_single_token(model, w):
            raise ValueError(f"{w!r} is not a single token of this model")
    ids = torch.tensor([[I.token_id(model, y), I.token_id(model, n)] for y, n in pairs])     # [pairs, 2]
    out = [I.logits(model, list(prompts[i:i + batch_size]))[:, ids].float().softmax(-1)[..., 0]
           for i in range(0, len(prompts), batch_size)]
    return torch.cat(out).cpu().numpy()


def ece_difference(conf_a: Sequence[float], conf_b: Sequence[float], correct: Sequence[float], n_bins: int = 10,
                   strategy: str = "width", n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """ECE(a) - ECE(b) on the same predictions' outcomes, with a 95% bootstrap interval over rows."""
    a, y = _check(conf_a, correct)
    b, _ = _check(conf_b, correct)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        diffs.append(ece(a[i], y[i], n_bins, strategy) - ece(b[i], y[i], n_bins, strategy))
    return ece(a, y, n_bins, strategy) - ece(b, y, n_bins, strategy), *map(float, np.quantile(diffs, [0.025, 0.975]))


def group_folds(groups: Sequence, n_folds: int = 5, seed: int | np.random.Generator = 0) -> np.ndarray:
    """The fold (0 .. n_folds - 1) of each row, whole groups to one fold: the folds `out_of_fold_probe` uses
    with the same seed."""
    groups = np.asarray(groups)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    uniq = rng.permutation(np.unique(groups))
    if len(uniq) < 2 * n_folds:
        raise ValueError(f"need at least {2 * n_folds} groups for {n_folds} folds, got {len(uniq)}")
    fold_of = {g: i % n_folds for i, g in enumerate(uniq)}
    return np.array([fold_of[g] for g in groups])


def out_of_fold_base_rate(y: Sequence[int], strata: Sequence, groups: Sequence, n_folds: int = 5,
                          seed: int = 0) -> np.ndarray:
    """Out-of-fold base-rate predictor with the folds of `out_of_fold_probe(..., seed=seed)`: each row gets the
    share of y = 1 among the other folds' rows of its stratum (e.g. its task), or among all other folds' rows
    when its stratum has none there. The baseline a probe must beat to show more than 'which task is easy'."""
    y, strata = np.asarray(y).astype(float), np.asarray(strata)
    fold = group_folds(groups, n_folds, seed)
    out = np.full(len(y), np.nan)
    for k in range(n_folds):
        tr = fold != k
        for s in np.unique(strata[fold == k]):
            ref = tr & (strata == s)
            out[(fold == k) & (strata == s)] = y[ref].mean() if ref.any() else y[tr].mean()
    return out


def _ece_width_rows(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> np.ndarray:
    """`ece(..., strategy="width")` of every row of two (rows, n) arrays at once: per bin |sum(conf - correct)| / n."""
    rows, n = conf.shape
    idx = np.clip((conf * n_bins).astype(int), 0, n_bins - 1) + n_bins * np.arange(rows)[:, None]
    gap = np.bincount(idx.ravel(), (conf - correct).ravel(), minlength=rows * n_bins).reshape(rows, n_bins)
    return np.abs(gap).sum(1) / n


def ece_bootstrap(conf: Sequence[float], correct: Sequence[float], n_bins: int = 10, strategy: str = "width",
                  n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(ECE, low, high): the ECE with a 95% bootstrap interval over predictions. Resampling inflates an ECE (sampling
    noise only adds to |confidence - accuracy|), so the percentile interval is shifted down by the bootstrap bias
    (mean of the resampled ECEs minus the ECE) and clipped at 0; otherwise it can lie wholly above the estimate.
    That re-centres the interval on the ECE; it does not remove the ECE's own upward bias at small n (see
    `ece_null` for its size, and `equivalence_power` for what that does to a test on `high`)."""
    conf, correct = _check(conf, correct)
    rng = np.random.default_rng(seed)
    if strategy == "width":          # every resample at once (the same draws as one resample at a time)
        rows = rng.integers(0, len(conf), (n_boot, len(conf)))
        boots = _ece_width_rows(conf[rows], correct[rows], n_bins)
    else:
        boots = np.array([ece(conf[i], correct[i], n_bins, strategy) for i in (rng.integers(0, len(conf), len(conf))
                                                                               for _ in range(n_boot))])
    e = ece(conf, correct, n_bins, strategy)
    lo, hi = np.quantile(boots, [0.025, 0.975]) - (boots.mean() - e)
    return e, max(0.0, float(lo)), max(0.0, float(hi))


def equivalence_power(conf: Sequence[float], margin: float, n_bins: int = 10, strategy: str = "width",
                      n_sim: int = 100, n_boot: int = 1000, seed: int = 0) -> float:
    """How often a perfectly calibrated predictor with these confidences passes the equivalence test
    `ece_bootstrap(...)[2] < margin`: outcomes drawn as Bernoulli(confidence) `n_sim` times. At small n the
    ECE's upward bias alone can keep the upper bound above the margin, so a failed test means little when this
    is low."""
    conf, _ = _check(conf, np.zeros(len(np.asarray(conf))))
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin!r}")
    rng = np.random.default_rng(seed)
    passed = [ece_bootstrap(conf, (rng.random(len(conf)) < conf).astype(float), n_bins, strategy, n_boot,
                            seed=int(rng.integers(2**31)))[2] < margin for _ in range(n_sim)]
    return float(np.mean(passed))


def group_gap(conf: Sequence[float], correct: Sequence[float], groups: Sequence) -> float:
    """Calibration error with the groups (e.g. tasks) as bins: sum over groups of (group share) *
    |mean confidence - accuracy|. Pooled ECE can hide groups whose errors cancel; this cannot."""
    conf, correct = _check(conf, correct)
    groups = np.asarray(groups)
    return float(sum((groups == g).mean() * abs(conf[groups == g].mean() - correct[groups == g].mean())
                     for g in np.unique(groups)))


def group_gap_null(conf: Sequence[float], groups: Sequence, n_draws: int = 500, seed: int = 0) -> np.ndarray:
    """`group_gap` of a perfectly calibrated predictor with these confidences (outcomes ~ Bernoulli(conf))."""
    conf = np.asarray(conf, dtype=float)
    rng = np.random.default_rng(seed)
    return np.array([group_gap(conf, rng.random(len(conf)) < conf, groups) for _ in range(n_draws)])


def out_of_fold_probe(X: np.ndarray, y: Sequence[int], groups: Sequence, n_folds: int = 5, seed: int = 0,
                      val_frac: float = 0.25) -> np.ndarray:
    """P(y = 1) for every row from a `probes.logistic_probe` that never saw the row's group: groups go to
    `n_folds` folds; inside each fold's training part, a quarter of the groups choose C."""
    X, y, groups = np.asarray(X, dtype=float), np.asarray(y).astype(int), np.asarray(groups)
    if X.ndim != 2 or len(X) != len(y) or len(y) != len(groups):
        raise ValueError("need X [n, d] with one label and one group per row")
    rng = np.random.default_rng(seed)
    fold = group_folds(groups, n_folds, rng)
    out = np.full(len(y), np.nan)
    for k in range(n_folds):
        train_groups = rng.permutation(np.unique(groups[fold != k]))
        val_groups = set(train_groups[:max(1, int(val_frac * len(train_groups)))])
        is_val = np.array([g in val_groups for g in groups]) & (fold != k)
        is_tr = (fold != k) & ~is_val
        fit = probes.logistic_probe(X[is_tr], y[is_tr], X[is_val], y[is_val], seed=seed)
        out[fold == k] = fit.predict_proba(X[fold == k])[:, 1]
    return out


def reliability_plot(ax, conf: Sequence[float], correct: Sequence[float], label: str, n_bins: int = 10,
                     strategy: str = "width", **style) -> None:
    """Draw a reliability curve (accuracy against mean confidence per bin, marker size ~ bin count) on `ax`,
    with the diagonal of perfect calibration."""
    r = reliability(conf, correct, n_bins, strategy)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.plot(r["confidence"], r["accuracy"], marker="o", label=f"{label} (ECE {ece(conf, correct, n_bins, strategy):.2f})",
            **style)
    ax.scatter(r["confidence"], r["accuracy"], s=8 + 120 * r["count"] / r["count"].max(), alpha=0.3,
               color=ax.lines[-1].get_color())
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (mean per bin)", ylabel="accuracy (per bin)")
