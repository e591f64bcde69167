"""Attention patterns as weighted directed graphs: per-head statistics, random-graph nulls, spectral
embeddings (ASE, omnibus), the Zhu-Ghodsi elbow, a latent-distribution two-sample test, LapEigvals features.

    from helpers import graphs as G
    A = G.crop_patterns(pattern, mask)[0]             # [heads, n, n] one prompt, padding dropped
    dims = G.elbow_dimension(np.linalg.svd(A[:, 1:, 1:], compute_uv=False))   # Zhu & Ghodsi 2006
    stat, p = G.latent_distribution_test(A[0, 1:, 1:], A[1, 1:, 1:], d=2)       # Tang et al. 2017

Conventions: a pattern A has rows = queries, columns = keys, lower-triangular, rows summing to 1; index 0 is
the BOS token. Graph statistics other than `sink_mass` and `attention_entropy` use the graph without BOS.
Definitions follow graspologic (Chung et al. 2019, JMLR 20:158) where it has one: `ase` is its adjacency
spectral embedding, `select_dimension` its Zhu-Ghodsi profile-likelihood elbow, `omnibus_matrix` its omnibus
matrix (Levin et al. 2017); `latent_distribution_test` follows Tang et al. 2017 (Bernoulli 23(3)): embed,
align, then a nonparametric two-sample test on the latent positions (here energy distance with permutations,
Szekely & Rizzo 2004, in place of hyppo's Dcorr/MMD).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.sparse.linalg import LinearOperator, eigsh

from helpers.probes import single_threaded   # small BLAS calls: threads only wait on a shared CPU
from helpers.stats import bootstrap_auroc  # noqa: F401  (notebook 11 reads it here; it lives with the statistics)


def _as_square(A: np.ndarray, name: str = "A") -> np.ndarray:
    A = np.asarray(A, dtype=float)
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name} must be [..., n, n] square, got shape {A.shape}")
    if not np.isfinite(A).all():
        raise ValueError(f"{name} has NaN or inf entries")
    return A


# ---------------------------------------------------------------------------------------------
# patterns
def crop_patterns(pattern, mask) -> list[np.ndarray]:
    """Per-prompt [heads, n, n] patterns with left padding dropped: `pattern` [batch, heads, pos, pos], `mask`
    [batch, pos] (1 on real tokens, BOS included). Each row of a result sums to 1 over its real keys."""
    pattern, mask = np.asarray(pattern, dtype=float), np.asarray(mask)
    if pattern.ndim != 4 or mask.shape != (pattern.shape[0], pattern.shape[-1]):
        raise ValueError(f"need pattern [batch, heads, pos, pos] and mask [batch, pos], got {pattern.shape}, {mask.shape}")
    out = []
    for b in range(pattern.shape[0]):
        start = int(np.argmax(mask[b] > 0))
        out.append(pattern[b, :, start:, start:])
    return out


def attention_entropy(A: np.ndarray) -> np.ndarray:
    """Mean entropy (nats) of each query's attention over rows 1.. (row 0, BOS, has one key): [...]."""
    A = _as_square(A)
    rows = A[..., 1:, :]
    h = -(rows * np.log(np.clip(rows, 1e-30, None))).sum(-1)
    return h.mean(-1)


def sink_mass(A: np.ndarray) -> np.ndarray:
    """Mean attention on key 0 (the BOS sink) over queries 1..: [...]."""
    A = _as_square(A)
    return A[..., 1:, 0].mean(-1)


def uniform_causal(n: int) -> np.ndarray:
    """The uniform causal pattern: query i spreads 1/(i+1) over keys 0..i."""
    if n < 2:
        raise ValueError(f"need n >= 2, got {n}")
    return np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]


def binarize(A: np.ndarray, ratio: float = 2.0) -> np.ndarray:
    """Binary graph without BOS and without self-loops: edge i -> j (j < i) when query i gives key j more
    than `ratio` times the uniform weight 1/(i+1) of its row (i counted with BOS). [..., n-1, n-1]."""
    A = _as_square(A)
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    n = A.shape[-1]
    level = ratio / np.arange(1, n + 1)[:, None]
    B = (A > level) & np.tril(np.ones((n, n), dtype=bool), -1)
    return B[..., 1:, 1:].astype(float)


def density(B: np.ndarray) -> np.ndarray:
    """Fraction of the m(m-1)/2 strictly causal pairs that are edges: [...]."""
    B = _as_square(B, "B")
    m = B.shape[-1]
    return np.tril(B, -1).sum((-1, -2)) / (m * (m - 1) / 2)


def er_causal(m: int, p, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` Erdos-Renyi causal graphs per edge probability: each pair j < i is an edge i -> j with
    probability p. A scalar p gives [size, m, m]; an array p gives [*p.shape, size, m, m]."""
    p = np.asarray(p, dtype=float)
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p must be in [0, 1], got {p}")
    u = rng.random(p.shape + (size, m, m))
    return (u < p[..., None, None, None]) * np.tril(np.ones((m, m)), -1)


def causal_rewire(B: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` random causal graphs with the out-degree of every query of B kept: query i's k_i edges go to
    k_i keys drawn uniformly without replacement among keys 0..i-1. B [..., m, m] gives [..., size, m, m]."""
    B = _as_square(B, "B")
    if np.triu(B).any():
        raise ValueError("B must be strictly lower-triangular (causal, no self-loops)")
    m = B.shape[-1]
    k = B.sum(-1).astype(int)[..., None, :, None]                       # [..., 1, m, 1]
    scores = np.where(np.tril(np.ones((m, m), bool), -1), rng.random(B.shape[:-2] + (size, m, m)), -1.0)
    kth = np.take_along_axis(-np.sort(-scores, axis=-1), np.broadcast_to(np.maximum(k - 1, 0), scores.shape[:-1] + (1,)), -1)
    return ((scores >= kth) & (k > 0) & (scores >= 0)).astype(float)     # the k_i largest scores of row i


def in_degree(B: np.ndarray) -> np.ndarray:
    """In-degree of each key (column sums): [..., m]."""
    return _as_square(B, "B").sum(-2)


def gini(x: np.ndarray) -> np.ndarray:
    """Gini coefficient along the last axis (0: all equal; (m-1)/m: one holds everything; 0 if all are 0)."""
    x = np.sort(np.asarray(x, dtype=float), axis=-1)
    if (x < 0).any():
        raise ValueError("gini needs non-negative values")
    m = x.shape[-1]
    total = x.sum(-1)
    ranks = np.arange(1, m + 1)
    g = (2 * (ranks * x).sum(-1) / np.where(total > 0, total, 1) - (m + 1)) / m
    return np.where(total > 0, g, 0.0)


@single_threaded
def clustering(B: np.ndarray) -> np.ndarray:
    """Average clustering coefficient of the undirected, unweighted graph B or B^T (networkx's
    `average_clustering`: nodes of degree < 2 count 0). [...]."""
    B = _as_square(B, "B")
    U = ((B + np.swapaxes(B, -1, -2)) > 0).astype(float)
    U = U * (1 - np.eye(U.shape[-1]))
    tri = ((U @ U) * U).sum(-1) / 2                                   # triangles through each node
    deg = U.sum(-1)
    pairs = deg * (deg - 1) / 2
    c = np.where(pairs > 0, tri / np.where(pairs > 0, pairs, 1), 0.0)
    return c.mean(-1)


@single_threaded
def laplacian_spectrum(W: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of the symmetric normalised Laplacian I - D^-1/2 S D^-1/2 of S = (W + W^T)/2 with
    the diagonal removed (scipy.sparse.csgraph.laplacian(normed=True); an isolated node gives eigenvalue 0).
    Index 1 is the Fiedler value (algebraic connectivity). [..., n]."""
    W = _as_square(W, "W")
    S = (W + np.swapaxes(W, -1, -2)) / 2 * (1 - np.eye(W.shape[-1]))
    d = S.sum(-1)
    inv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0.0)
    L = np.eye(W.shape[-1]) * (d > 0)[..., None, :] - inv[..., :, None] * S * inv[..., None, :]
    return np.linalg.eigvalsh(L)


# ---------------------------------------------------------------------------------------------
# dimension selection and embeddings
def profile_likelihood(d: np.ndarray) -> np.ndarray:
    """Zhu & Ghodsi (2006) profile log-likelihood of each split q = 1..p of sorted values d (first q vs the
    rest, two Gaussians with a pooled variance), batched over leading axes: [..., p]."""
    d = -np.sort(-np.asarray(d, dtype=float), axis=-1)
    p = d.shape[-1]
    if p < 2:
        raise ValueError("need at least two values")
    q = np.arange(1, p + 1)
    c1, c2 = np.cumsum(d, -1), np.cumsum(d ** 2, -1)
    tot1, tot2 = c1[..., -1:], c2[..., -1:]
    sse1 = c2 - c1 ** 2 / q
    n2 = np.maximum(p - q, 1)
    sse2 = np.where(q < p, (tot2 - c2) - (tot1 - c1) ** 2 / n2, 0.0)
    dof = np.maximum(np.where(q < p, p - 2, p - 1), 1)    # graspologic divides by 0 when p = 2
    var = np.maximum(np.maximum(sse1 + sse2, 0) / dof, 1e-12 * np.maximum(tot2 / p, 1e-300))
    return -p / 2 * np.log(2 * np.pi * var) - (sse1 + sse2) / (2 * var)


def select_dimension(d: Sequence[float], n_elbows: int = 2) -> list[int]:
    """Elbows of a scree plot by Zhu & Ghodsi's profile likelihood, as graspologic's `select_dimension`: the
    first elbow is argmax_q of the likelihood, the next is found among the values after it. Returns the
    elbows as numbers of leading components (1-based)."""
    d = -np.sort(-np.asarray(d, dtype=float))
    if d.ndim != 1 or len(d) < 2 or n_elbows < 1:
        raise ValueError("need a 1-D array of at least two values and n_elbows >= 1")
    elbows, start = [], 0
    for _ in range(n_elbows):
        if len(d) - start < 2:
            break
        start += int(np.argmax(profile_likelihood(d[start:]))) + 1
        elbows.append(start)
        if start >= len(d):
            break
    return elbows


def elbow_dimension(svs: np.ndarray) -> np.ndarray:
    """First Zhu-Ghodsi elbow of each row of `svs` (batched): [...] ints."""
    return np.argmax(profile_likelihood(svs), axis=-1) + 1


def ase(A: np.ndarray, d: int) -> np.ndarray:
    """Adjacency spectral embedding of a symmetric matrix: the d eigenvectors of largest |eigenvalue| scaled
    by sqrt|eigenvalue| ([n, d]). For a directed graph, pass (A + A^T)/2."""
    A = _as_square(A)
    if A.ndim != 2 or not np.allclose(A, A.T):
        raise ValueError("ase needs one symmetric [n, n] matrix (symmetrise a directed graph first)")
    if not 1 <= d <= A.shape[0]:
        raise ValueError(f"d must be in 1..{A.shape[0]}, got {d}")
    vals, vecs = np.linalg.eigh(A)
    idx = np.argsort(-np.abs(vals))[:d]
    X = vecs[:, idx] * np.sqrt(np.abs(vals[idx]))
    return X * np.sign(X.sum(0) + 1e-300)      # a fixed sign per column


def omnibus_matrix(graphs: np.ndarray) -> np.ndarray:
    """Omnibus matrix of m graphs on one vertex set (Levin et al. 2017): block (i, j) is (A_i + A_j)/2.
    [m n, m n]."""
    G = _as_square(graphs, "graphs")
    if G.ndim != 3:
        raise ValueError(f"graphs must be [m, n, n], got {G.shape}")
    m, n, _ = G.shape
    return ((G[:, None] + G[None, :]) / 2).transpose(0, 2, 1, 3).reshape(m * n, m * n)


@single_threaded
def omnibus_embedding(graphs: np.ndarray, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Omnibus embedding without forming the matrix: (latent positions [m, n, d], eigenvalues [d]).
    Symmetric graphs only; top-d eigenpairs by magnitude via ARPACK on the matrix-free product
    (M x)_i = (A_i sum_j x_j + sum_j A_j x_j) / 2."""
    G = _as_square(graphs, "graphs")
    if G.ndim != 3 or not np.allclose(G, np.swapaxes(G, 1, 2)):
        raise ValueError("graphs must be [m, n, n] symmetric matrices")
    m, n, _ = G.shape
    if not 1 <= d < m * n:
        raise ValueError(f"d must be in 1..{m * n - 1}, got {d}")

    def matvec(x):
        X = np.asarray(x, dtype=float).reshape(m, n)
        return ((G @ X.sum(0) + np.einsum("jab,jb->a", G, X)[None]) / 2).ravel()

    op = LinearOperator((m * n, m * n), matvec=matvec, dtype=float)
    v0 = np.random.default_rng(seed).standard_normal(m * n)
    vals, vecs = eigsh(op, k=d, which="LM", v0=v0)
    order = np.argsort(-np.abs(vals))
    vals, vecs = vals[order], vecs[:, order]
    Z = vecs * np.sqrt(np.abs(vals))
    Z = Z * np.sign(Z.sum(0) + 1e-300)
    return Z.reshape(m, n, d), vals


def procrustes(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Orthogonal W minimising ||X W - Y||_F (rows matched)."""
    X, Y = np.asarray(X, dtype=float), np.asarray(Y, dtype=float)
    if X.shape != Y.shape or X.ndim != 2:
        raise ValueError(f"X and Y must be equal-shape 2-D arrays, got {X.shape}, {Y.shape}")
    U, _, Vt = np.linalg.svd(X.T @ Y)
    return U @ Vt


# ---------------------------------------------------------------------------------------------
# two-sample tests
def energy_distance(X: np.ndarray, Y: np.ndarray) -> float:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| between two samples of points (Szekely & Rizzo 2004;
    V-statistic form)."""
    X, Y = np.atleast_2d(np.asarray(X, float)), np.atleast_2d(np.asarray(Y, float))
    Z = np.concatenate([X, Y])
    D = np.linalg.norm(Z[:, None] - Z[None], axis=-1)
    a = len(X)
    return float(2 * D[:a, a:].mean() - D[:a, :a].mean() - D[a:, a:].mean())


def energy_test(X: np.ndarray, Y: np.ndarray, n_perm: int = 500, seed: int = 0) -> tuple[float, float]:
    """(energy distance, permutation p) for H0: X and Y are samples of one distribution (p counts the
    observed split among n_perm + 1)."""
    X, Y = np.atleast_2d(np.asarray(X, float)), np.atleast_2d(np.asarray(Y, float))
    if len(X) < 2 or len(Y) < 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"need two samples of >= 2 points of one dimension, got {X.shape}, {Y.shape}")
    Z = np.concatenate([X, Y])
    D = np.linalg.norm(Z[:, None] - Z[None], axis=-1)
    a, b, rng = len(X), len(Y), np.random.default_rng(seed)
    splits = np.zeros((n_perm + 1, len(Z)))
    splits[0, :a] = 1
    for r in range(n_perm):
        splits[r + 1, rng.permutation(len(Z))[:a]] = 1
    DG = splits @ D                                                     # [splits, N]
    xx, yy = (DG * splits).sum(1), ((D.sum(0) - DG) * (1 - splits)).sum(1)
    xy = (DG * (1 - splits)).sum(1)
    stat = 2 * xy / (a * b) - xx / a ** 2 - yy / b ** 2
    return float(stat[0]), float((stat >= stat[0] - 1e-12).sum() / (n_perm + 1))


@single_threaded
def latent_distribution_test(A1: np.ndarray, A2: np.ndarray, d: int, n_perm: int = 500,
                             seed: int = 0) -> tuple[float, float]:
    """Tang et al. (2017) latent-distribution test of two graphs: ASE of each symmetrised graph in d
    dimensions, orthogonal Procrustes alignment of the second onto the first, then an energy-distance
    permutation test on the latent positions. Returns (statistic, p)."""
    sym = [(np.asarray(A) + np.asarray(A).T) / 2 for A in (A1, A2)]
    X, Y = ase(sym[0], d), ase(sym[1], d)
    return energy_test(X, Y @ procrustes(Y, X), n_perm=n_perm, seed=seed)


# ---------------------------------------------------------------------------------------------
# head scores, LapEigvals (ranks of matrices: helpers.geometry)
def previous_token_score(A: np.ndarray) -> np.ndarray:
    """Mean attention from query i to key i-1 over queries 2.. (not the query right after BOS): [...]."""
    A = _as_square(A)
    return np.diagonal(A, offset=-1, axis1=-2, axis2=-1)[..., 1:].mean(-1)


def induction_score(A: np.ndarray, period: int) -> np.ndarray:
    """On BOS + a random block repeated (period = block length): mean attention from each token of the second
    copy to the token after its first occurrence (key i - period + 1). [...]."""
    A = _as_square(A)
    n = A.shape[-1]
    if period < 2 or 1 + 2 * period > n:
        raise ValueError(f"need 2 <= period and 1 + 2 period <= n = {n}, got period {period}")
    q = np.arange(1 + period, 1 + 2 * period)
    return A[..., q, q - period + 1].mean(-1)


def lap_eigvals(A: np.ndarray, k: int) -> np.ndarray:
    """LapEigvals features (Binkowski et al. 2025, arXiv 2502.17598, §3): the attention map as a directed graph,
    Laplacian L = D - A with D_jj = (sum_i A_ij) / (n - j) (in-degree over the queries that can see key j);
    L is lower-triangular so its eigenvalues are its diagonal D_jj - A_jj; the k largest, sorted ([..., k])."""
    A = _as_square(A)
    n = A.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    deg = A.sum(-2) / (n - np.arange(n))
    ev = deg - np.diagonal(A, axis1=-2, axis2=-1)
    return -np.sort(-ev, axis=-1)[..., :k]


def sbm(sizes: Sequence[int], B: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A symmetric stochastic-block-model graph without self-loops and its block labels."""
    B = np.asarray(B, float)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    P = B[labels][:, labels]
    upper = np.triu(rng.random(P.shape) < P, 1)
    return (upper | upper.T).astype(float), labels


# ---------------------------------------------------------------------------------------------
# model plumbing
def attention_patterns(model, tokens, batch_size: int = 8) -> np.ndarray:
    """Every layer's attention pattern for a [batch, pos] token tensor WITHOUT padding (every row real, BOS
    first): float32 [batch, layers, heads, pos, pos]. For padded prompts use `crop_patterns` per batch."""
    import torch

    from helpers import interventions as I

    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2 or not bool(I.attention_mask(model, tokens).all()):
        raise ValueError("tokens must be a [batch, pos] tensor without padding (cut prompts to one length)")
    names = [I.hook_name(model, "pattern", L) for L in range(I.n_layers(model))]
    out = []
    for s in range(0, len(tokens), batch_size):
        _, cache = I.run_with_cache(model, tokens[s:s + batch_size], names)
        out.append(torch.stack([cache[n] for n in names], 1).float().cpu().numpy())
    return np.concatenate(out)
