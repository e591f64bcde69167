"""Matrix geometry: SVDs computed once, spectra (effective rank, entropy, numerical rank), subspace similarity,
projected norms and amplification, intruder dimensions, and the random baselines each is compared with.

    s = geometry.svd(W); geometry.effective_rank(s); geometry.sv_entropy(s, normalized=True)
    geometry.subspace_similarity(A1, A2, side="right")         # Hu et al. 2021, eq. 4
    geometry.intruder_dimensions(W0, W1); geometry.random_like(dW)   # Shuttleworth et al. 2024; the null

Matrices are float32 on the CPU, decomposed on one thread. Every function takes a matrix or its `Svd`.
References: Roy & Vetterli 2007 (effective rank); Hu et al. 2021 (LoRA, §7); Shuttleworth et al. 2024
(intruder dimensions, arXiv 2410.21228). The workbook's models are 4-bit weights dequantized to float32:
`quantization_noise` and `block_levels` show how much of a spectrum that rounding can move.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from helpers.env import torch_threads

# ---------------------------------------------------------------------------------------------
# spectra


def _matrix(m, stack: bool = False) -> Tensor:
    t = torch.as_tensor(m).detach().float()
    if t.ndim != 2 and not (stack and t.ndim > 2):
        raise ValueError(f"expected a 2-D matrix{' or a stack [..., m, n]' if stack else ''}, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("the matrix has NaN or inf entries")
    return t.cpu()


def one_thread() -> AbstractContextManager[None]:
    """Run dense decompositions (SVD, QR, solve) on one thread. Matrices of a few hundred rows gain
    nothing from LAPACK threads, and a threaded call becomes 10-100x slower when the cores are shared
    with other processes (OpenMP threads wait on each other)."""
    return torch_threads(1)


def unit(x: Tensor, dim: int = -1) -> Tensor:
    """x scaled to unit Euclidean norm along `dim` (a zero vector raises)."""
    norm = x.norm(dim=dim, keepdim=True)
    if (norm == 0).any():
        raise ValueError("cannot normalise a zero vector")
    return x / norm


class Svd(NamedTuple):
    """A thin SVD m = U diag(S) Vh (float32, CPU), computed once and passed to the functions below
    in place of the matrix (singular_values, effective_rank, left/right_vectors, max_cosines ...)."""

    U: Tensor    # [out, k]
    S: Tensor    # [k], largest first
    Vh: Tensor   # [k, in]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.Vh.shape[1])


def svd(m) -> Svd:
    """Thin SVD of a matrix (float32 LAPACK on one thread)."""
    if isinstance(m, Svd):
        return m
    with one_thread():
        u, s, vh = torch.linalg.svd(_matrix(m), full_matrices=False)
    return Svd(u, s, vh)


def factored_svd(B, A) -> Svd:
    """Exact thin SVD of the rank-<=r product B @ A (B [out, r], A [r, in]) from two QRs and an r x r
    SVD: O((out + in) r^2) instead of a full SVD. E.g. a LoRA update (alpha / r) * B @ A."""
    B, A = _matrix(B), _matrix(A)
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)} do not multiply")
    with one_thread():
        qb, rb = torch.linalg.qr(B.double())
        qa, ra = torch.linalg.qr(A.T.double())
        u, s, vh = torch.linalg.svd(rb @ ra.T)
    return Svd((qb @ u).float(), s.float(), (vh @ qa.T).float())


def _shape(m) -> tuple[int, int]:
    return m.shape if isinstance(m, Svd) else tuple(_matrix(m).shape)


def singular_values(m, double: bool = False) -> Tensor:
    """Singular values, largest first, of a matrix [m, n] or a stack [..., m, n] (float32 LAPACK unless
    double=True, then float64); an Svd gives its S."""
    if isinstance(m, Svd):
        return m.S
    t = torch.as_tensor(m).detach()
    if t.dtype == torch.float64:                 # keep float64 input in float64 (checks on a float32 view)
        _matrix(t, stack=True)
        t = t.cpu()
    else:
        t = _matrix(t, stack=True)
    with one_thread():
        s = torch.linalg.svdvals(t.double() if double else t)
    return s if double or t.dtype == torch.float64 else s.float()


def sv_entropy(m, normalized: bool = False, rtol: float = 1e-6) -> float:
    """Shannon entropy (nats) of the singular values normalised to sum 1 (values below rtol x the largest
    count as zero); with normalized=True divided by log(min(shape)) so that 1 means a flat spectrum.
    The zero matrix raises. `m`: a matrix or its Svd."""
    s = singular_values(m).double()
    if s.ndim != 1:
        raise ValueError("sv_entropy takes one matrix; use effective_rank for a stack")
    if s[0] <= 0:
        raise ValueError("the zero matrix has no singular-value distribution")
    s = s[s > rtol * s[0]]
    p = s / s.sum()
    h = float(-(p * p.log()).sum())
    if normalized:
        n = min(_shape(m))
        return h / np.log(n) if n > 1 else 0.0
    return h


def effective_rank(m, rtol: float = 1e-6) -> float | np.ndarray:
    """exp(entropy of the normalised singular values) (Roy & Vetterli 2007): 1 for rank one, n for the identity,
    0 for the zero matrix; singular values below rtol x the largest count as zero. `m`: a matrix, its Svd, or
    a stack [..., m, n] (gives an array [...]); matrices are decomposed in float64."""
    s = singular_values(m, double=True).double()
    top = s.max(-1, keepdim=True).values
    s = torch.where(s > rtol * top, s, torch.zeros_like(s))
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(1e-300)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    out = torch.where(total[..., 0] > 0, entropy.exp(), torch.zeros_like(entropy)).numpy()
    return float(out) if out.ndim == 0 else out


def covariance_ranks(cov: Tensor) -> dict[str, float]:
    """Two effective ranks of a covariance [d, d]: the participation ratio (sum λ)^2 / sum λ^2 and the
    entropy rank exp(H(λ / sum λ)) (Roy & Vetterli 2007). Both are d for an isotropic covariance, 1 for rank 1."""
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be square [d, d], got {tuple(cov.shape)}")
    ev = torch.linalg.eigvalsh(cov.double()).clamp_min(0)
    if ev.sum() <= 0:
        raise ValueError("cov has no positive eigenvalue")
    p = ev / ev.sum()
    nz = p[p > 0]
    return {"participation ratio": float(ev.sum() ** 2 / (ev ** 2).sum()),
            "entropy rank": float(torch.exp(-(nz * nz.log()).sum()))}


def top_singular_norm(m, r: int) -> float:
    """sqrt(sum of the top-r squared singular values): the largest <G, X> over rank-r X with ||X||_F = 1
    (randomised SVD, exact when rank(m) <= r + 6)."""
    t = _matrix(m)
    if not 1 <= r <= min(t.shape):
        raise ValueError(f"r must be within 1..{min(t.shape)}")
    gen_state = torch.random.get_rng_state()
    try:
        torch.default_generator.manual_seed(0)   # the CPU generator only (t is on the CPU): CUDA's stream is left alone
        with one_thread():
            _, s, _ = torch.svd_lowrank(t, q=min(r + 6, min(t.shape)), niter=3)
    finally:
        torch.random.set_rng_state(gen_state)
    return float(s[:r].pow(2).sum().sqrt())


def numerical_rank(m, rtol: float = 1e-5) -> int | np.ndarray:
    """Number of singular values above rtol x the largest (0 for the zero matrix); a stack [..., m, n] gives
    an array [...]. Matrices are decomposed in float64."""
    s = singular_values(m, double=True)
    top = s.max(-1, keepdim=True).values if s.shape[-1] else torch.zeros(s.shape[:-1] + (1,), dtype=s.dtype)
    out = ((s > rtol * top) & (top > 0)).sum(-1).numpy()
    return int(out) if out.ndim == 0 else out


# ---------------------------------------------------------------------------------------------
# subspaces


def right_vectors(m, k: int | None = None) -> Tensor:
    """The top-k right singular vectors of m (a matrix or its Svd) as columns [in, k]."""
    vh = svd(m).Vh
    return vh[:k].T if k else vh.T


def left_vectors(m, k: int | None = None) -> Tensor:
    """The top-k left singular vectors of m (a matrix or its Svd) as columns [out, k]."""
    u = svd(m).U
    return u[:, :k] if k else u


def subspace_similarity(m1, m2, side: str = "right", max_i: int | None = None, max_j: int | None = None) -> np.ndarray:
    """φ(i, j) = ||U_i^T U_j||_F^2 / min(i, j) for i = 1..max_i, j = 1..max_j (Hu et al. 2021, eq. 4), with
    U_i the top-i right (or left) singular vectors of m1 and U_j those of m2 (matrices or their Svd).
    1 = one subspace contains the other, 0 = orthogonal. For LoRA's A (r x in) use side='right'."""
    if side not in ("right", "left"):
        raise ValueError("side must be 'right' or 'left'")
    dim = 1 if side == "right" else 0
    sa, sb = _shape(m1), _shape(m2)
    if sa[dim] != sb[dim]:
        raise ValueError(f"the {side} spaces differ in dimension: {sa[dim]} vs {sb[dim]}")
    get = right_vectors if side == "right" else left_vectors
    u1, u2 = get(m1), get(m2)
    max_i = max_i or u1.shape[1]
    max_j = max_j or u2.shape[1]
    if not (1 <= max_i <= u1.shape[1] and 1 <= max_j <= u2.shape[1]):
        raise ValueError(f"max_i, max_j must be within 1..{u1.shape[1]}, 1..{u2.shape[1]}")
    g = (u1[:, :max_i].T @ u2[:, :max_j]).double() ** 2            # [i, j]
    cum = g.cumsum(0).cumsum(1).numpy()
    mins = np.minimum.outer(np.arange(1, max_i + 1), np.arange(1, max_j + 1))
    return cum / mins


def random_orthonormal(n: int, k: int, generator: torch.Generator | None = None, batch: int | None = None) -> Tensor:
    """k random orthonormal columns in R^n (Haar), [n, k]; with `batch`, that many independent draws [batch, n, k]."""
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    shape = (n, k) if batch is None else (batch, n, k)
    with one_thread():
        q, r = torch.linalg.qr(torch.randn(*shape, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)).float()


def random_like(m, generator: torch.Generator | None = None, rtol: float = 1e-5) -> Tensor:
    """A random matrix with exactly m's singular values (so the same rank and Frobenius norm) and
    uniformly random singular vectors: the random-direction control for an update ΔW (m or its Svd)."""
    s = singular_values(m)
    out, inp = _shape(m)
    r = max(1, int((s > rtol * s[0]).sum())) if s[0] > 0 else 1
    u = random_orthonormal(out, r, generator)
    v = random_orthonormal(inp, r, generator)
    return (u * s[:r]) @ v.T


# ---------------------------------------------------------------------------------------------
# amplification (Hu et al. 2021, Table 7)


def projected_norm(W, U: Tensor, V: Tensor) -> float:
    """||U^T W V||_F for orthonormal columns U [out, r] and V [in, r]."""
    W = _matrix(W)
    if U.shape[0] != W.shape[0] or V.shape[0] != W.shape[1]:
        raise ValueError(f"U {tuple(U.shape)} and V {tuple(V.shape)} do not fit W {tuple(W.shape)}")
    return float((U.cpu().T @ W @ V.cpu()).norm())


def random_projection_norms(W, r: int, n: int = 100, generator: torch.Generator | None = None) -> np.ndarray:
    """||U^T W V||_F for `n` independent Haar-random rank-r pairs (U [out, r], V [in, r]): the chance
    distribution that ΔW's directions are compared with. Depends only on W and r, so it can be reused."""
    W = _matrix(W)
    if not 1 <= r <= min(W.shape):
        raise ValueError(f"r must be within 1..{min(W.shape)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    out, chunk = [], max(1, min(n, 2**22 // (max(W.shape) * r)))   # a few tens of MB of draws at a time
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        U = random_orthonormal(W.shape[0], r, generator, batch=b)
        V = random_orthonormal(W.shape[1], r, generator, batch=b)
        out.append((U.transpose(1, 2) @ W @ V).flatten(1).norm(dim=1))
    return torch.cat(out).numpy()


def amplification(W, dW, r: int, generator: torch.Generator | None = None, n_random: int = 100,
                  W_svd: Svd | None = None, random_norms: np.ndarray | None = None) -> dict[str, float]:
    """||U^T W V||_F with U, V the top-r singular directions of ΔW, of W itself, and of `n_random` random
    draws (mean, sd, and the percentile of ΔW's value among them); plus ||ΔW||_F and the amplification
    factor ||ΔW||_F / ||U^T W V||_F for ΔW's directions and for random ones.

    `dW` may be given as its Svd; `W_svd` and `random_norms` (from random_projection_norms(W, r)) skip
    recomputing what depends on W alone."""
    W = _matrix(W)
    if _shape(dW) != tuple(W.shape):
        raise ValueError(f"W {tuple(W.shape)} and ΔW {tuple(_shape(dW))} differ in shape")
    if not 1 <= r <= min(W.shape):
        raise ValueError(f"r must be within 1..{min(W.shape)}")
    d = svd(dW)
    Ws = svd(W) if W_svd is None else W_svd
    delta = projected_norm(W, left_vectors(d, r), right_vectors(d, r))
    own = float(Ws.S[:r].pow(2).sum().sqrt())   # = ||U^T W V|| for W's own top-r directions
    rand = np.asarray(random_norms if random_norms is not None else random_projection_norms(W, r, n_random, generator))
    norm = float(d.S.pow(2).sum().sqrt())
    sd = float(rand.std(ddof=1)) if rand.size > 1 else float("nan")
    return {"delta": delta, "weight": own, "random": float(rand.mean()), "random_sd": sd,
            "percentile": float((rand < delta).mean() * 100), "z": (delta - float(rand.mean())) / sd if sd > 0 else float("nan"),
            "dW_norm": norm, "W_norm": float(W.norm()),
            "factor": norm / delta if delta > 0 else float("inf"),
            "random_factor": norm / float(rand.mean()) if rand.mean() > 0 else float("inf")}


# ---------------------------------------------------------------------------------------------
# intruder dimensions (Shuttleworth et al. 2024)


def max_cosines(W0, W1, k: int = 10, side: str = "left", basis0: Tensor | None = None) -> np.ndarray:
    """For each of the top-k singular vectors of W1, its largest |cosine| with any singular vector of W0
    (W0, W1: matrices or their Svd; `basis0`: W0's singular vectors as columns, if already computed)."""
    if side not in ("right", "left"):
        raise ValueError("side must be 'right' or 'left'")
    s0, s1 = _shape(W0), _shape(W1)
    if tuple(s0) != tuple(s1):
        raise ValueError(f"W0 {tuple(s0)} and W1 {tuple(s1)} differ in shape")
    if not 1 <= k <= min(s0):
        raise ValueError(f"k must be within 1..{min(s0)}")
    get = left_vectors if side == "left" else right_vectors
    basis0 = get(W0) if basis0 is None else basis0.cpu()
    return (get(W1, k).T.double() @ basis0.double()).abs().max(1).values.numpy()


def intruder_dimensions(W0, W1, k: int = 10, eps: float = 0.5, side: str = "left") -> int:
    """How many of the top-k singular vectors of the fine-tuned W1 have max |cos| < eps with every singular
    vector of the pre-trained W0 (Shuttleworth et al. 2024). 0 when W1 == W0."""
    if not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1], got {eps!r}")
    return int((max_cosines(W0, W1, k, side) < eps).sum())


def random_direction_max_cosine(W0, n: int = 200, side: str = "left", generator: torch.Generator | None = None,
                                basis0: Tensor | None = None) -> np.ndarray:
    """max |cos| of `n` random unit vectors with W0's singular vectors: how low a score chance gives."""
    basis = basis0.cpu() if basis0 is not None else (left_vectors(W0) if side == "left" else right_vectors(W0))
    x = torch.randn(basis.shape[0], n, generator=generator, dtype=torch.float64)
    x = x / x.norm(dim=0)
    return (x.T @ basis.double()).abs().max(1).values.numpy()


# ---------------------------------------------------------------------------------------------
# quantization noise, and scoring a read-back over many tokens


def quantization_noise(W, block: int = 32, bits: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Noise the size of one more round of blockwise min/scale quantization (GGUF Q4_1: blocks of `block`
    weights along the input dimension, 2**bits levels): uniform in ±step/2 with step = (max - min) / (2**bits - 1)
    of each block. Add it to W to see how much such rounding moves a spectral statistic."""
    W = _matrix(W).float()
    rows, cols = W.shape
    if cols % block:
        raise ValueError(f"the input dimension {cols} is not a multiple of the block size {block}")
    blocks = W.reshape(rows, cols // block, block)
    step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / (2 ** bits - 1)
    u = torch.rand(blocks.shape, generator=generator) - 0.5
    return (u * step).reshape(rows, cols)


def block_levels(W, block: int = 32) -> float:
    """Mean number of distinct values per block of `block` weights along the input dimension: at most 16 for
    weights dequantized from 4-bit blocks, about `block` for unquantized float weights."""
    W = _matrix(W).float()
    rows, cols = W.shape
    blocks = W[:, : cols - cols % block].reshape(-1, block)
    return float(np.mean([len(torch.unique(b)) for b in blocks[:: max(1, len(blocks) // 2000)]]))
