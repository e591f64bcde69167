"""Tools for testing the linear representation hypothesis (notebook 03).

Four families of functions:

- **Concept directions in the unembedding** (Park, Choe & Veitch 2023, arXiv 2311.03658): the unembedding
  vectors ``gamma``, differences over counterfactual word pairs, leave-one-out projections, and the *causal
  inner product* ``<x, y>_C = x^T Cov(gamma)^-1 y`` (``CausalInnerProduct``).
- **Directions in the residual stream**: difference of means and projections (intensity as magnitude).
- **Additivity** of template-built inputs: one-hot designs with or without pairwise interactions, fitted by
  ridge regression and scored by held-out R^2 (``crossval_r2``).
- **Linear relational embeddings** (Hernandez et al. 2023, arXiv 2308.09124): the map from a subject's
  hidden state at layer L to the last-layer hidden state at the last position, its Jacobian with
  ``torch.func`` (``jacobian`` in full, ``jvp_batch`` to apply it to many vectors at the price of a few),
  and ``estimate_lre`` / ``LinearRelation``.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from helpers import interventions as I
from helpers.geometry import unit
from helpers.probes import mean_difference  # noqa: F401  (re-exported)

# ---------------------------------------------------------------------------------------------
# 1. unembedding geometry


def unembedding(model) -> Tensor:
    """The unembedding vectors gamma(y), one row per token: [vocab, d_model] (float32, detached).

    In compatibility mode the final norm's scale is folded into ``W_U``, so these are the vectors that
    multiply the *normalised* last hidden state: logit(y) = lambda^T gamma(y) (+ bias, if any)."""
    return model.W_U.detach().T.float().contiguous()


def token_ids(model, words: Sequence[str], prefix: str = " ") -> list[int]:
    """Ids of `prefix + word` for each word; ValueError naming the first word that is not one token."""
    if isinstance(words, str):
        raise TypeError("words must be a list of strings, not one string")
    return [I.token_id(model, prefix + w) for w in words]


def single_token_pairs(model, pairs: Sequence[Sequence[str]], prefix: str = " ") -> list[tuple[str, str]]:
    """The (base, target) pairs whose two words are each one token (with `prefix`) and differ as tokens."""
    kept = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"a pair must have two words, got {pair!r}")
        base, target = pair
        if I.is_single_token(model, prefix + base) and I.is_single_token(model, prefix + target) \
                and I.token_id(model, prefix + base) != I.token_id(model, prefix + target):
            kept.append((base, target))
    return kept


def pair_differences(vectors: Tensor, base_ids: Sequence[int], target_ids: Sequence[int]) -> Tensor:
    """vectors[target] - vectors[base] for each pair: [n_pairs, d]."""
    if len(base_ids) != len(target_ids) or len(base_ids) == 0:
        raise ValueError(f"need as many base ids as target ids, and at least one (got {len(base_ids)}, {len(target_ids)})")
    return vectors[list(target_ids)] - vectors[list(base_ids)]


def concept_direction(diffs: Tensor) -> Tensor:
    """The unit mean of a set of difference vectors [n, d] -> [d]."""
    if diffs.ndim != 2:
        raise ValueError(f"diffs must be [n_pairs, d], got shape {tuple(diffs.shape)}")
    return unit(diffs.mean(0))


def loo_projections(diffs: Tensor) -> Tensor:
    """Leave-one-out: each difference projected on the unit mean of all the *other* differences: [n]."""
    n = diffs.shape[0] if diffs.ndim == 2 else 0
    if n < 2:
        raise ValueError(f"leave-one-out needs at least 2 differences [n, d], got shape {tuple(diffs.shape)}")
    others = (diffs.sum(0, keepdim=True) - diffs) / (n - 1)  # row i: the mean of all rows but i
    return (unit(others) * diffs).sum(-1)


def random_pair_differences(vectors: Tensor, n: int, candidates: Sequence[int] | None = None,
                            seed: int = 0) -> Tensor:
    """Differences between `n` random pairs of rows (drawn from `candidates`, default all rows): [n, d]."""
    pool = torch.as_tensor(list(candidates) if candidates is not None else range(vectors.shape[0]))
    if len(pool) < 2:
        raise ValueError("need at least two candidate rows")
    g = torch.Generator().manual_seed(seed)
    a = pool[torch.randint(len(pool), (n,), generator=g)]
    b = pool[torch.randint(len(pool), (n,), generator=g)]
    return vectors[a] - vectors[b]


def disjoint_bases(base_a: Sequence[int], base_b: Sequence[int], seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the pairs of two concepts to keep so that no base token is used by both: each shared base
    token goes (alternately, in a seeded random order) to one concept only. Returns (keep_a, keep_b)."""
    shared = sorted(set(base_a) & set(base_b))
    order = np.random.default_rng(seed).permutation(len(shared))
    to_a = {shared[i] for i in order[0::2]}
    to_b = {shared[i] for i in order[1::2]}
    keep_a = [i for i, b in enumerate(base_a) if b not in to_b]
    keep_b = [i for i, b in enumerate(base_b) if b not in to_a]
    return keep_a, keep_b


@dataclass
class CausalInnerProduct:
    """<x, y>_C = x^T Cov(gamma)^-1 y, estimated from the unembedding vectors (Park et al. 2023, sec. 3).

    ``whiten(x) = x @ Cov^-1/2`` maps unembedding-space vectors to coordinates where the causal inner product
    is the Euclidean one (the paper's ``g(y)``); ``to_embedding(x) = Cov^-1 x`` maps an unembedding
    representation to the matching embedding (residual-stream) representation."""

    mean: Tensor            # [d] mean unembedding vector
    cov: Tensor             # [d, d]
    inv_sqrt: Tensor        # [d, d] Cov^-1/2
    sqrt: Tensor            # [d, d] Cov^1/2

    @property
    def matrix(self) -> Tensor:
        """Cov^-1, the metric of the causal inner product."""
        return self.inv_sqrt @ self.inv_sqrt

    def whiten(self, x: Tensor) -> Tensor:
        return x @ self.inv_sqrt

    def inner(self, x: Tensor, y: Tensor) -> Tensor:
        """<x, y>_C along the last dimension."""
        return (self.whiten(x) * self.whiten(y)).sum(-1)

    def to_embedding(self, x: Tensor) -> Tensor:
        """Cov^-1 x: the direction in the (normalised) final hidden state that represents the same concept."""
        return x @ self.matrix


def causal_inner_product(gamma: Tensor, eps: float = 0.0) -> CausalInnerProduct:
    """Estimate the causal inner product from unembedding vectors gamma [vocab, d] (vocab > d).

    `eps` (relative to the mean eigenvalue) is added to the diagonal when Cov is close to singular."""
    if gamma.ndim != 2 or gamma.shape[0] <= gamma.shape[1]:
        raise ValueError(f"gamma must be [vocab, d] with vocab > d, got shape {tuple(gamma.shape)}")
    gamma = gamma.double()
    mean = gamma.mean(0)
    centred = gamma - mean
    cov = centred.T @ centred / gamma.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    if eps:
        evals = evals + eps * evals.mean()
    if evals.min() <= 1e-10 * evals.max():  # rounding leaves a singular matrix's zero eigenvalues at ~±1e-17
        raise ValueError("Cov(gamma) is singular: pass eps > 0")
    inv_sqrt = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    sqrt = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    f = torch.float32
    return CausalInnerProduct(mean.to(f), cov.to(f), inv_sqrt.to(f), sqrt.to(f))


def random_metric(d: int, seed: int = 0) -> Tensor:
    """A random positive semi-definite metric M = R R^T with R = |N(0, 1)| [d, d], as in Park et al.'s code."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(d, d, generator=g).abs()
    return r @ r.T


def cosine_matrix(directions: Tensor, metric: Tensor | None = None) -> Tensor:
    """Cosines between rows of `directions` [k, d] under x^T M y (M = identity when None): [k, k]."""
    if directions.ndim != 2:
        raise ValueError(f"directions must be [k, d], got shape {tuple(directions.shape)}")
    gram = directions @ directions.T if metric is None else directions @ metric.to(directions.device) @ directions.T
    norms = gram.diagonal().clamp_min(1e-30).sqrt()
    return gram / norms[:, None] / norms[None, :]


# ---------------------------------------------------------------------------------------------
# 2. directions in the residual stream


def projections(acts: Tensor, direction: Tensor) -> Tensor:
    """Scalar projection of each row of acts [n, d] on the unit `direction` [d]: [n]."""
    return acts @ unit(direction)


# ---------------------------------------------------------------------------------------------
# 3. additivity


def factor_design(levels: np.ndarray, interactions: bool = False) -> np.ndarray:
    """Design matrix for factors coded as integers levels [n, n_factors]: an intercept, one-hot columns per
    factor (first level dropped), and with `interactions` every product of two columns of different factors."""
    levels = np.asarray(levels)
    if levels.ndim != 2 or not np.issubdtype(levels.dtype, np.integer):
        raise ValueError(f"levels must be an integer array [n, n_factors], got {levels.dtype} {levels.shape}")
    blocks = []
    for j in range(levels.shape[1]):
        values = np.unique(levels[:, j])
        blocks.append(np.stack([(levels[:, j] == v).astype(float) for v in values[1:]], 1)
                      if len(values) > 1 else np.zeros((len(levels), 0)))
    columns = [np.ones((len(levels), 1))] + blocks
    if interactions:
        for a, b in itertools.combinations(range(len(blocks)), 2):
            if blocks[a].shape[1] and blocks[b].shape[1]:
                columns.append((blocks[a][:, :, None] * blocks[b][:, None, :]).reshape(len(levels), -1))
    return np.concatenate(columns, axis=1)


def heldout_r2(X_train: np.ndarray, Y_train: np.ndarray, X_test: np.ndarray, Y_test: np.ndarray,
               alpha: float = 1e-3) -> float:
    """Fit ridge Y ~ X (closed form, no extra intercept: put one in X) on the training rows and return the
    variance-weighted R^2 on the test rows: 1 - total squared error / total variance of Y_test around its mean."""
    if len(X_train) != len(Y_train) or len(X_test) != len(Y_test):
        raise ValueError("X and Y must have the same number of rows")
    if X_train.shape[1] != X_test.shape[1]:
        raise ValueError(f"train and test designs differ in width: {X_train.shape[1]} vs {X_test.shape[1]}")
    gram = X_train.T @ X_train + alpha * np.eye(X_train.shape[1])
    weights = np.linalg.solve(gram, X_train.T @ Y_train)
    resid = Y_test - X_test @ weights
    total = ((Y_test - Y_test.mean(0)) ** 2).sum()
    return float(1 - (resid ** 2).sum() / total)


def crossval_r2(levels: np.ndarray, Y: np.ndarray | Tensor, interactions: bool = False,
                factors: Sequence[int] | None = None, n_splits: int = 5, seed: int = 0,
                alpha: float = 1e-3, per_fold: bool = False) -> float | list[float]:
    """Mean held-out R^2 over `n_splits` folds of combinations (KFold, shuffled with `seed`); the list of
    the folds' scores with `per_fold` (the same folds for the same `seed` and number of rows: pair them).

    `factors` restricts the model to some factors (e.g. [2]: the last word alone)."""
    from sklearn.model_selection import KFold

    levels = np.asarray(levels)
    Y = Y.detach().cpu().numpy() if isinstance(Y, Tensor) else np.asarray(Y)
    if len(levels) != len(Y):
        raise ValueError(f"{len(levels)} rows of levels but {len(Y)} rows of Y")
    cols = levels if factors is None else levels[:, list(factors)]
    X = factor_design(cols, interactions)
    scores = [heldout_r2(X[tr], Y[tr], X[te], Y[te], alpha)
              for tr, te in KFold(n_splits, shuffle=True, random_state=seed).split(X)]
    return [float(x) for x in scores] if per_fold else float(np.mean(scores))


# ---------------------------------------------------------------------------------------------
# 4. linear relational embeddings


def jacobian(fn: Callable[[Tensor], Tensor], x: Tensor, chunk_size: int | None = None) -> Tensor:
    """The Jacobian d fn(x) / dx of a vector function [d_in] -> [d_out]: [d_out, d_in].

    Forward mode (torch.func.jvp on each basis vector, vmapped `chunk_size` at a time), like torch.func.jacfwd."""
    if x.ndim != 1:
        raise ValueError(f"x must be a vector [d], got shape {tuple(x.shape)}")
    basis = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    return jvp_batch(fn, x, basis, chunk_size=chunk_size)[1].T


def jvp_batch(fn: Callable[[Tensor], Tensor], x: Tensor, tangents: Tensor,
              chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """fn(x) and the Jacobian applied to each row of tangents [k, d_in]: ([d_out], [k, d_out]).

    Costs about one forward pass per tangent (batched with vmap), against d_in of them for the full Jacobian."""
    if x.ndim != 1 or tangents.ndim != 2 or tangents.shape[1] != x.shape[0]:
        raise ValueError(f"need x [d] and tangents [k, d]; got {tuple(x.shape)} and {tuple(tangents.shape)}")
    out = fn(x)
    jv = torch.func.vmap(lambda v: torch.func.jvp(fn, (x,), (v,))[1], chunk_size=chunk_size)(tangents)
    return out, jv


def subject_position(model, template: str, subject: str) -> int:
    """Index (in the model's tokens, BOS included) of the subject's last token in ``template.format(subject)``.

    The template must contain one ``{}``; raises when the subject does not end on a token boundary."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}', got {template!r}")
    prefix = template.split("{}")[0] + subject
    full = model.to_tokens(template.format(subject))[0]
    head = model.to_tokens(prefix)[0]
    if len(head) > len(full) or not torch.equal(full[:len(head)], head):
        raise ValueError(f"the subject {subject!r} does not end on a token boundary in {template.format(subject)!r}")
    return len(head) - 1


def hidden_to_output(model, prompt: str, layer: int, pos: int) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
    """The map h -> z of one prompt: h replaces the residual stream entering block `layer` at position `pos`,
    z is the residual stream after the last block at the last position. Returns (fn, h, z) at the model's
    own h. fn runs the model with hooks (skipping the unembedding) and works under torch.func transforms."""
    layer = I.check_layer(model, layer)  # h must enter a block: 0 .. n_layers - 1
    tokens = I.to_tokens(model, prompt)
    if not -tokens.shape[1] <= pos < tokens.shape[1]:
        raise IndexError(f"position {pos} is outside the prompt's {tokens.shape[1]} tokens")
    batch_fn, h, z = hidden_to_output_batch(model, [prompt], layer, [pos % tokens.shape[1]])
    return (lambda v: batch_fn(v[None])[0]), h[0], z[0]


@dataclass
class LinearRelation:
    """o(s) = beta * W s + bias, an LRE at `layer` (Hernandez et al. 2023). `weight` is None when the map
    was only applied to given vectors (``estimate_lre(..., full=False)``): then call it with no argument."""

    layer: int
    bias: Tensor                          # [d] mean of z_i - J_i h_i
    beta: float = 1.0
    weight: Tensor | None = None          # [d, d] mean Jacobian
    applied: Tensor | None = None         # [n, d] mean_i J_i applied to the vectors given as `apply_to`
    h_train: Tensor | None = None         # [k, d] the training subjects' hidden states
    z_train: Tensor | None = None         # [k, d] the matching last-layer outputs

    def __call__(self, h: Tensor | None = None, beta: float | None = None) -> Tensor:
        """beta * W h + bias for rows h [n, d] (needs `weight`), or for the `apply_to` vectors (h=None)."""
        beta = self.beta if beta is None else beta
        if h is None:
            if self.applied is None:
                raise ValueError("this LRE was fitted without apply_to vectors; pass h")
            return beta * self.applied + self.bias
        if self.weight is None:
            raise ValueError("this LRE has no weight matrix (fitted with full=False); use apply_to at fit time")
        return beta * (h @ self.weight.T) + self.bias


def hidden_to_output_batch(model, prompts: Sequence[str], layer: int, positions: Sequence[int]
                           ) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
    """``hidden_to_output`` for several prompts at once (left-padded, with the attention mask): fn maps
    H [b, d] (row i replaces the residual stream entering block `layer` at position positions[i] of prompt i,
    counted as in ``subject_position``: BOS is 0) to the last-layer hidden states at the last position [b, d].
    Rows do not interact, so d z_i / d h_j = 0 for i != j."""
    n = I.n_layers(model)
    layer = I.check_layer(model, layer)
    tokens = I.to_tokens(model, list(prompts))
    attn = I.attention_mask(model, tokens)
    if len(positions) != tokens.shape[0]:
        raise ValueError(f"need one position per prompt, got {len(positions)} for {tokens.shape[0]}")
    rows = torch.arange(tokens.shape[0])
    cols = (attn.shape[1] - attn.long().sum(1)).cpu() + torch.as_tensor(list(positions))   # skip the left padding
    in_name, out_name = I.resid_name(model, layer), I.resid_name(model, n)
    mask = torch.zeros(tokens.shape[0], tokens.shape[1], 1, device=tokens.device)
    mask[rows, cols] = 1.0
    padded = {} if bool(attn.all()) else {"attention_mask": attn}   # without padding, the plain (faster) path

    def fn(H: Tensor) -> Tensor:
        store = {}

        def put(resid, hook=None):
            return resid + mask.to(resid.dtype) * (H[:, None, :].to(resid.dtype) - resid)

        def take(resid, hook=None):
            store["z"] = resid[:, -1]

        I.run_until(model, tokens, out_name, [(in_name, put), (out_name, take)], **padded)
        if "z" not in store:
            raise RuntimeError(f"the hook on {out_name} never ran")
        return store["z"]

    with torch.no_grad():
        _, cache = I.run_with_cache(model, tokens, [in_name, out_name])
    return fn, cache[in_name][rows, cols].clone(), cache[out_name][:, -1].clone()



def estimate_lre(model, template: str, subjects: Sequence[str], layer: int, apply_to: Tensor | None = None,
                 full: bool = False, beta: float = 1.0, chunk_size: int | None = 64) -> LinearRelation:
    """Estimate an LRE from a few subjects in one prompt template: W = mean_i J_i, bias = mean_i (z_i - J_i h_i),
    with J_i the Jacobian of the last-layer hidden state (last position) with respect to the subject's
    last-token hidden state entering block `layer`, in ``template.format(subject_i)``.

    full=True forms W (d_model Jacobian-vector products per subject); otherwise only W applied to the rows of
    `apply_to` [n, d] is computed (n + 1 products per subject): the same numbers for a fraction of the cost.
    Subjects whose prompts have the same number of tokens are linearised together in one batch (the cost is
    compute-bound, so batching saves the per-call overhead without padding waste)."""
    if isinstance(subjects, str) or len(subjects) == 0:
        raise ValueError("subjects must be a non-empty list of strings")
    if not full and apply_to is None:
        raise ValueError("pass apply_to (the vectors to map) or full=True")
    if apply_to is not None and (apply_to.ndim != 2 or apply_to.shape[1] != model.cfg.d_model):
        raise ValueError(f"apply_to must be [n, d_model], got shape {tuple(apply_to.shape)}")
    by_length: dict[int, list[int]] = {}
    for i, subject in enumerate(subjects):
        by_length.setdefault(I.to_tokens(model, template.format(subject)).shape[1], []).append(i)
    groups = list(by_length.values())
    hs, zs, jhs, applied, weights = [], [], [], [], []
    for group in groups:
        names = [subjects[i] for i in group]
        pos = [subject_position(model, template, s) for s in names]
        fn, H, Z = hidden_to_output_batch(model, [template.format(s) for s in names], layer, pos)
        with torch.no_grad():  # forward-mode AD still runs; no reverse-mode graph is recorded
            jh, jv, J = _linearise_batch(fn, H, apply_to, full, chunk_size)
        hs.append(H)
        zs.append(Z)
        jhs.append(jh)
        if jv is not None:
            applied.append(jv)
        if full:
            weights.append(J)
    back = torch.as_tensor([s for g in groups for s in g]).argsort()   # the subjects' own order again
    H, Z = torch.cat(hs)[back], torch.cat(zs)[back]
    return LinearRelation(
        layer=layer, bias=(Z - torch.cat(jhs)).mean(0), beta=beta,
        weight=torch.cat(weights).mean(0) if full else None,
        applied=torch.cat(applied).mean(0) if applied else None,
        h_train=H, z_train=Z)


def _linearise_batch(fn, H, apply_to, full, chunk_size):
    """For b same-length prompts: (J_i h_i [b, d], J_i applied to the rows of apply_to [b, n, d] or None,
    J_i [b, d, d] or None). Each tangent perturbs every row at once; rows do not interact."""
    b, d = H.shape
    rows = [H[None]]
    if apply_to is not None:
        rows.append(apply_to.to(H.device)[:, None, :].expand(-1, b, -1))
    if full:
        rows.append(torch.eye(d, dtype=H.dtype, device=H.device)[:, None, :].expand(-1, b, -1))
    tangents = torch.cat(rows)                                           # [k, b, d]
    jv = torch.func.vmap(lambda v: torch.func.jvp(fn, (H,), (v,))[1], chunk_size=chunk_size)(tangents)  # [k, b, d]
    n = 0 if apply_to is None else apply_to.shape[0]
    applied = jv[1:1 + n].transpose(0, 1) if apply_to is not None else None
    J = jv[1 + n:].permute(1, 2, 0) if full else None                   # [b, d_out, d_in]
    return jv[0], applied, J


@torch.no_grad()
def subject_states(model, template: str, subjects: Sequence[str], layers: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Hidden states of each subject's last token entering each block in `layers` ([n_layers_sel, n, d]) and
    the last-layer hidden state at the last position ([n, d]), for ``template.format(subject)``."""
    n = I.n_layers(model)
    names = [I.resid_name(model, I.check_layer(model, l)) for l in layers]
    out_name = I.resid_name(model, n)
    hs, zs = [], []
    for subject in subjects:
        pos = subject_position(model, template, subject)
        _, cache = I.run_with_cache(model, template.format(subject), names + [out_name])
        hs.append(torch.stack([cache[nm][0, pos] for nm in names]))
        zs.append(cache[out_name][0, -1])
    return torch.stack(hs, 1), torch.stack(zs)


@torch.no_grad()
def decode_top(model, z: Tensor) -> Tensor:
    """Top token id of final norm + unembedding of hidden states z [n, d]: [n]."""
    return I.unembed(model, z).argmax(-1)


def faithfulness(predicted: Tensor | Sequence[int], target: Tensor | Sequence[int]) -> float:
    """Fraction of rows whose predicted top token equals the target token."""
    predicted, target = torch.as_tensor(predicted), torch.as_tensor(target)
    target = target.to(predicted.device)
    if predicted.shape != target.shape or predicted.numel() == 0:
        raise ValueError(f"need two non-empty id lists of the same length; got {tuple(predicted.shape)}, {tuple(target.shape)}")
    return float((predicted == target).float().mean())


def choose_beta(model, lre: LinearRelation, targets: Tensor, betas: Sequence[float], rows: slice | Sequence[int]) -> float:
    """The beta (from `betas`) whose LRE outputs give the highest mean log-probability to `targets` on the
    given rows of the `apply_to` vectors (use training rows only)."""
    if len(betas) == 0:
        raise ValueError("betas is empty")
    targets = torch.as_tensor(targets)
    scores = []
    for beta in betas:
        logp = I.unembed(model, lre(beta=beta)[rows]).log_softmax(-1)
        scores.append(logp.gather(1, targets.to(logp.device)[:, None]).mean().item())
    return float(betas[int(np.argmax(scores))])


BETAS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0)  # default grid of LRE scale factors


def lre_layer_sweep(model, template: str, train: Sequence[str], test: Sequence[str], layers: Sequence[int],
                    betas: Sequence[float] = BETAS, val: Sequence[str] = ()) -> list[dict]:
    """Faithfulness of an LRE fitted on `train` subjects, at each layer, on `val` subjects (to choose a layer)
    and on held-out `test` subjects, against two baselines: identity (decode s itself) and translation
    (decode s + mean(z - s) over train).

    The target of each subject is the model's own top token on its prompt. beta is chosen per layer on
    the training subjects (``choose_beta``). Returns one dict per layer, with hit counts (``*_hits``) for
    intervals; ``lre_val`` is NaN when there are no `val` subjects."""
    if len(train) == 0 or len(test) == 0:
        raise ValueError("need at least one training and one test subject")
    subjects = list(train) + list(val) + list(test)
    H, Z = subject_states(model, template, subjects, layers)  # [n_sel_layers, n, d], [n, d]
    targets = decode_top(model, Z)
    n_tr, n_val = len(train), len(val)
    tr, va, te = slice(0, n_tr), slice(n_tr, n_tr + n_val), slice(n_tr + n_val, None)
    rows = []
    for li, layer in enumerate(layers):
        h = H[li]
        lre = estimate_lre(model, template, list(train), layer, apply_to=h)
        beta = choose_beta(model, lre, targets[tr], betas, tr)
        top = decode_top(model, lre(beta=beta))
        hits = top == targets
        shift = (Z[tr] - h[tr]).mean(0)
        rows.append(dict(
            layer=layer, beta=beta,
            lre=faithfulness(top[te], targets[te]), lre_hits=int(hits[te].sum()), n_test=len(test),
            lre_val=faithfulness(top[va], targets[va]) if n_val else float("nan"), n_val=n_val,
            lre_train=faithfulness(top[tr], targets[tr]),
            identity=faithfulness(decode_top(model, h[te]), targets[te]),
            translation=faithfulness(decode_top(model, h[te] + shift), targets[te]),
        ))
    return rows


@torch.no_grad()
def known_facts(model, template: str, samples: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
    """The (subject, object) samples whose object's first token (with a leading space) is the model's top
    next token after ``template.format(subject)``: the facts the model knows, as Hernandez et al. evaluate."""
    samples = [tuple(s) for s in samples]
    if not samples or any(len(s) != 2 for s in samples):
        raise ValueError("samples must be a non-empty list of (subject, object) pairs")
    top = I.logits(model, [template.format(s) for s, _ in samples]).argmax(-1).tolist()
    first = [model.tokenizer.encode(" " + o, add_special_tokens=False)[0] for _, o in samples]
    return [s for s, t, f in zip(samples, top, first) if t == f]


def graded_prompts(concepts: dict) -> dict[str, np.ndarray]:
    """Fill every template with every word of every level: arrays prompt, concept, template (index), level.

    `concepts` maps a name to {"levels": [[words of level 0], [level 1], ...], "templates": ["... {} ..."]}."""
    rows = []
    for name, spec in concepts.items():
        for t, template in enumerate(spec["templates"]):
            if template.count("{}") != 1:
                raise ValueError(f"template {template!r} of {name!r} must contain exactly one '{{}}'")
            for level, words in enumerate(spec["levels"]):
                rows += [(template.format(w), name, t, level) for w in words]
    prompt, concept, template, level = zip(*rows)
    return dict(prompt=np.array(prompt), concept=np.array(concept), template=np.array(template), level=np.array(level))


# ---------------------------------------------------------------------------------------------
# 5. causality: editing a subject with the LRE's low-rank inverse (Hernandez et al. 2023, sec. 4)


def low_rank_pinv(weight: Tensor, rank: int) -> Tensor:
    """The rank-`rank` pseudo-inverse of weight [d_out, d_in]: V_k diag(1/s_k) U_k^T, [d_in, d_out], from the
    top `rank` singular values (Hernandez et al.'s LowRankPInvEditor; the full inverse is poorly conditioned)."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be a matrix, got shape {tuple(weight.shape)}")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank must be in 1 .. {min(weight.shape)}, got {rank}")
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (vh[:rank].T @ torch.diag(1 / s[:rank]) @ u[:, :rank].T).to(weight.dtype)


def edit_targets(answers: Sequence[int], candidates: Sequence[int] | None = None) -> list[int | None]:
    """For each row i, the index j of the first row after it (cyclically) in `candidates` (default all rows)
    whose answer differs from answers[i]; None when every candidate shares i's answer."""
    answers = [int(a) for a in answers]
    pool = list(range(len(answers))) if candidates is None else list(candidates)
    out = []
    for i, a in enumerate(answers):
        start = next((k for k, j in enumerate(pool) if j > i), 0)
        order = pool[start:] + pool[:start]
        out.append(next((j for j in order if j != i and answers[j] != a), None))
    return out


def same_norm_random(deltas: Tensor, n: int, seed: int = 0) -> Tensor:
    """n random directions per row of deltas [k, d], each scaled to that row's norm: [n, k, d]."""
    g = torch.Generator().manual_seed(seed)
    dirs = unit(torch.randn(n, *deltas.shape, generator=g).to(device=deltas.device, dtype=deltas.dtype))
    return dirs * deltas.norm(dim=-1, keepdim=True)


@torch.no_grad()
def edited_top(model, template: str, subjects: Sequence[str], layer: int, deltas: Tensor) -> Tensor:
    """The model's top next token after ``template.format(subject_i)`` when deltas[i] is added to the subject's
    last-token hidden state entering block `layer` (the model's own downstream computation does the rest): [n]."""
    if deltas.shape != (len(subjects), model.cfg.d_model):
        raise ValueError(f"need one delta [d_model] per subject, got shape {tuple(deltas.shape)}")
    pos = [subject_position(model, template, s) for s in subjects]
    fn, H, _ = hidden_to_output_batch(model, [template.format(s) for s in subjects], layer, pos)
    return decode_top(model, fn(H + deltas.to(device=H.device, dtype=H.dtype)))


def lre_causality(model, template: str, weight: Tensor, layer: int, sources: Sequence[str],
                  targets: Sequence[str], rank: int, n_random: int = 0, seed: int = 0) -> dict:
    """Hernandez et al.'s causality: edit each source subject's hidden state s -> s + W_k^+ (o' - o), with o and o'
    the last-layer states (last position) of the source and its target subject, and count a success when the
    model's top next token becomes the target's own answer. `targets[i]` is source i's target subject (its answer
    should differ). With `n_random`, the null: the same edit norm in `n_random` random directions per pair.

    Returns dict(hits, n, random_hits, random_n, edit_norm (mean ||delta||), hit [n] bool array)."""
    if len(sources) != len(targets) or len(sources) == 0:
        raise ValueError(f"need one target per source, and at least one (got {len(sources)}, {len(targets)})")
    _, z_src = subject_states(model, template, list(sources), [layer])
    _, z_tgt = subject_states(model, template, list(targets), [layer])
    want = decode_top(model, z_tgt)
    deltas = (z_tgt - z_src) @ low_rank_pinv(weight, rank).T
    hit = edited_top(model, template, sources, layer, deltas) == want
    out = dict(hits=int(hit.sum()), n=len(sources), random_hits=0, random_n=0,
               edit_norm=float(deltas.norm(dim=-1).mean()), hit=hit.cpu().numpy())
    if n_random:
        rand = same_norm_random(deltas, n_random, seed).reshape(-1, deltas.shape[-1])
        top = edited_top(model, template, list(sources) * n_random, layer, rand)
        out.update(random_hits=int((top == want.repeat(n_random)).sum()), random_n=len(top))
    return out


def choose_rank(model, template: str, weight: Tensor, layer: int, sources: Sequence[str], targets: Sequence[str],
                ranks: Sequence[int]) -> tuple[int, list[float]]:
    """The rank (from `ranks`) with the highest causality on the given (validation) pairs, the smallest on ties;
    and the causality of every rank."""
    if len(ranks) == 0:
        raise ValueError("ranks is empty")
    scores = [lre_causality(model, template, weight, layer, sources, targets, r)["hits"] / len(sources) for r in ranks]
    return int(ranks[int(np.argmax(scores))]), scores
