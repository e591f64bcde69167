"""Probes and clustering: linear read-outs of activations with a penalty chosen on held-out rows, mass-mean
(difference-of-means) directions, and k-means with the number of clusters chosen by silhouette.

    W, b, alphas = probes.fit_affine_cv(X, Y, val)              # ridge map X -> Y, penalty chosen on rows `val`
    fit = probes.logistic_probe(X[tr], y[tr], X[va], y[va]); fit.score(X[te], y[te])   # C chosen on validation
    probes.kmeans_by_silhouette(x, range(2, 9))["k"]; probes.mean_difference(acts, labels, 1, 0)

Everything runs scikit-learn / BLAS on one thread (small matrices; thread pools stall on a shared CPU).
Split train / validation / test by the unit that could leak (text, subject, word) before calling these.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def single_threaded(fn):
    """Run scikit-learn / BLAS work on one thread: these matrices are small, and thread pools that spin
    while waiting make them many times slower on a shared or busy CPU."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):
            return fn(*args, **kwargs)
    return wrapper


# ---------------------------------------------------------------------------------------------
# linear maps (ridge regression in closed form)
RIDGE_ALPHAS: tuple[float, ...] = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _ridge_solutions(X: Tensor, Y: Tensor, alphas: Sequence[float]) -> Iterator[tuple[Tensor, Tensor]]:
    """(W, b) in float64 for each relative ridge penalty, from one eigendecomposition of the centred X'X."""
    X64, Y64 = X.double(), Y.double()
    mx, my = X64.mean(0), Y64.mean(0)
    Xc = X64 - mx
    evals, V = torch.linalg.eigh(Xc.T @ Xc)
    proj = V.T @ (Xc.T @ (Y64 - my))                                      # [d_in, d_out]
    scale = evals.clamp_min(0).mean().clamp_min(1e-12)
    for alpha in alphas:
        W = V @ (proj / (evals.clamp_min(0) + alpha * scale)[:, None])
        yield W, my - mx @ W


def fit_affine_cv(X: Tensor, Y: Tensor, val: Tensor, alphas: Sequence[float] = RIDGE_ALPHAS,
                  n_blocks: int = 1) -> tuple[Tensor, Tensor, list[float]]:
    """Ridge regression whose penalty is chosen on a validation split: fit on rows ~val for each alpha (relative,
    as in `fit_affine`), keep the alpha with the lowest validation mean squared error, separately for each of
    `n_blocks` equal column blocks of Y (e.g. several targets N side by side), then refit on every row.
    Returns (W [d_in, d_out], b [d_out], the chosen alpha per block)."""
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0] or val.shape != (X.shape[0],):
        raise ValueError(f"need X [n, d_in], Y [n, d_out], val [n] bool; got {tuple(X.shape)}, {tuple(Y.shape)}, "
                         f"{tuple(val.shape)}")
    if Y.shape[1] % n_blocks or not alphas or min(alphas) < 0:
        raise ValueError("Y's columns must split into n_blocks equal blocks, and alphas must be >= 0")
    if val.all() or not val.any():
        raise ValueError("val must mark some rows, not all")
    d = Y.shape[1] // n_blocks
    errors = torch.stack([((X[val].double() @ W + b - Y[val].double()) ** 2).reshape(-1, n_blocks, d).mean((0, 2))
                          for W, b in _ridge_solutions(X[~val], Y[~val], alphas)])       # [alpha, block]
    chosen = [float(alphas[i]) for i in errors.argmin(0).tolist()]
    fits = {a: wb for a, wb in zip(sorted(set(chosen)), _ridge_solutions(X, Y, sorted(set(chosen))))}
    W = torch.cat([fits[a][0][:, k * d:(k + 1) * d] for k, a in enumerate(chosen)], dim=1)
    b = torch.cat([fits[a][1][k * d:(k + 1) * d] for k, a in enumerate(chosen)])
    return W.to(X.dtype), b.to(X.dtype), chosen


def fit_affine(X: Tensor, Y: Tensor, alpha: float = 1e-3, prior: str = "zero") -> tuple[Tensor, Tensor]:
    """Ridge regression Y ≈ X @ W + b in closed form; returns (W [d_in, d_out], b [d_out]).

    alpha is relative: the penalty is alpha * mean eigenvalue of the centred X'X, so it means the same at every
    layer whatever the residual norm. prior="identity" shrinks W towards the identity instead of zero (needs
    d_in == d_out): a tuned-lens translator that becomes the logit lens as alpha grows."""
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"X [n, d_in] and Y [n, d_out] must have the same n; got {tuple(X.shape)}, {tuple(Y.shape)}")
    if alpha < 0:
        raise ValueError("alpha must be >= 0")
    if prior not in ("zero", "identity"):
        raise ValueError(f"prior must be 'zero' or 'identity', got {prior!r}")
    if prior == "identity" and X.shape[1] != Y.shape[1]:
        raise ValueError("prior='identity' needs d_in == d_out")
    X64, Y64 = X.double(), Y.double()
    mx, my = X64.mean(0), Y64.mean(0)
    Xc, Yc = X64 - mx, Y64 - my
    if prior == "identity":
        Yc = Yc - Xc
    gram = Xc.T @ Xc
    lam = alpha * gram.diagonal().mean().clamp_min(1e-12)
    W = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), Xc.T @ Yc)
    if prior == "identity":
        W = W + torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    b = my - mx @ W
    return W.to(X.dtype), b.to(X.dtype)


# ---------------------------------------------------------------------------------------------
# classification probes


def mean_difference(acts: Tensor, labels: Sequence[int] | Tensor, high, low) -> Tensor:
    """mean(acts[labels == high]) - mean(acts[labels == low]) for acts [n, d]."""
    labels = torch.as_tensor(np.asarray(labels))
    if acts.ndim != 2 or len(labels) != acts.shape[0]:
        raise ValueError(f"acts must be [n, d] with one label per row; got {tuple(acts.shape)} and {len(labels)} labels")
    hi, lo = labels == high, labels == low
    if not hi.any() or not lo.any():
        raise ValueError(f"no rows with label {high!r} or {low!r}")
    return acts[hi].mean(0) - acts[lo].mean(0)


LOGISTIC_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


@single_threaded
def logistic_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                   Cs: Sequence[float] = LOGISTIC_CS, seed: int = 0):
    """A logistic-regression probe (standardised features, scikit-learn) whose inverse penalty C is the one
    with the best accuracy on the validation rows (ties: the strongest penalty), refitted on train + validation.
    Returns the fitted pipeline; `.C_` holds the chosen C and `.val_scores_` the validation accuracy of each."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_val = np.asarray(x_train, dtype=float), np.asarray(x_val, dtype=float)
    y_train, y_val = np.asarray(y_train), np.asarray(y_val)
    if x_train.ndim != 2 or len(x_train) != len(y_train) or x_val.ndim != 2 or len(x_val) != len(y_val):
        raise ValueError("need x [n, features] with one label per row, for both train and validation")
    if len(np.unique(y_train)) < 2:
        raise ValueError("the training rows hold a single class")
    if not Cs or min(Cs) <= 0:
        raise ValueError("Cs must be positive")
    make = lambda C: make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
    scores = {float(C): float(make(C).fit(x_train, y_train).score(x_val, y_val)) for C in sorted(Cs)}
    best = max(scores, key=lambda C: (scores[C], -C))
    fit = make(best).fit(np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]))
    fit.C_, fit.val_scores_ = best, scores
    return fit


# ---------------------------------------------------------------------------------------------
# clustering and cross-validated classification


@single_threaded
def kmeans_by_silhouette(x: np.ndarray, ks: Sequence[int] = range(2, 9), seed: int = 0,
                         n_init: int = 10) -> dict[str, Any]:
    """K-means for each k in `ks`, keeping the k with the best silhouette score (scikit-learn).
    Returns k, labels, and the silhouette of every k tried."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = np.asarray(x, dtype=float)
    ks = [k for k in ks if 2 <= k < len(x)]
    if not ks:
        raise ValueError(f"need some k with 2 <= k < n_samples={len(x)}")
    scores, labels = {}, {}
    for k in ks:
        lab = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)
        scores[k] = float(silhouette_score(x, lab)) if len(set(lab)) > 1 else -1.0
        labels[k] = lab
    best = max(scores, key=scores.get)
    return {"k": best, "labels": labels[best], "silhouette": scores}


@single_threaded
def kmeans_labels(x: np.ndarray, k: int, seed: int = 0, n_init: int = 4, standardise: bool = True) -> np.ndarray:
    """K-means cluster labels of the rows of x (standardised features by default); duplicate points are fine."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(x, dtype=float)
    if standardise:
        x = StandardScaler().fit_transform(x)
    with warnings.catch_warnings():  # identical points (e.g. every prompt ends in the same token at layer 0)
        warnings.simplefilter("ignore")
        return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)


@single_threaded
def probe_accuracy(x: np.ndarray, y: np.ndarray, folds: int = 3, seed: int = 0, alpha: float = 1.0) -> float:
    """Cross-validated accuracy of a linear probe (standardised features, scikit-learn's closed-form
    RidgeClassifier, one-vs-rest) predicting labels y from x. Classes with fewer members than `folds` are
    kept in training but folds never exceed the smallest class (at least 2)."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = np.asarray(x, dtype=float), np.asarray(y)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"x must be [n, features] and y [n], got {x.shape} and {y.shape}")
    if len(np.unique(y)) < 2:
        return 1.0
    counts = np.unique(y, return_counts=True)[1]
    folds = max(2, min(folds, int(counts.min())))
    probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=alpha))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    import warnings

    with warnings.catch_warnings():  # "the least populated class has only 1 member": fine, said above
        warnings.simplefilter("ignore", UserWarning)
        return float(cross_val_score(probe, x, y, cv=cv).mean())
