"""Sparse autoencoders against generic baselines (PCA, k-means) on cached activations (notebook 07).

    sae = S.train_topk(train_acts, width=4 * d, k=16, steps=300, seed=0)     # TopK SAE (Gao et al. 2024)
    S.fvu(test_acts, sae.reconstruct(test_acts))                             # fraction of variance unexplained
    S.fvu(test_acts, S.kmeans_reconstruct(test_acts, S.fit_kmeans(train_acts, 256), scaled=True))

FVU is ‖x − x̂‖² summed over tokens, divided by the total variance Σ‖x − mean‖² (centred); `fvu_uncentered`
divides by Σ‖x‖² instead, the pitfall that makes every method look better when the mean is large, and
`fvu_per_dim` averages per-dimension ratios (the definition Heimersheim's first k-means numbers used).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from helpers.stats import bootstrap_ratio_ci


def _check_2d(x: Tensor, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be a [n_tokens >= 2, d] tensor, got {getattr(x, 'shape', type(x))}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has NaN or inf entries")
    return x.float()


# ---------------------------------------------------------------------------------------------
# scores
def fvu(x: Tensor, x_hat: Tensor, mean: Tensor | None = None) -> float:
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − mean‖² (mean: of x unless given, e.g. the train mean)."""
    x, x_hat = _check_2d(x), _check_2d(x_hat, "x_hat")
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat differ in shape: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    mu = x.mean(0) if mean is None else mean.float()
    return float(((x - x_hat) ** 2).sum() / ((x - mu) ** 2).sum())


def fvu_uncentered(x: Tensor, x_hat: Tensor) -> float:
    """The pitfall: Σ‖x − x̂‖² / Σ‖x‖², no mean subtracted (flatters every method when ‖mean‖ is large)."""
    x, x_hat = _check_2d(x), _check_2d(x_hat, "x_hat")
    return float(((x - x_hat) ** 2).sum() / (x ** 2).sum())


def fvu_per_dim(x: Tensor, x_hat: Tensor) -> float:
    """The other pitfall: the mean over dimensions of each dimension's own FVU (every direction weighted
    equally, however little variance it has), instead of one ratio of totals."""
    x, x_hat = _check_2d(x), _check_2d(x_hat, "x_hat")
    return float((((x - x_hat) ** 2).sum(0) / ((x - x.mean(0)) ** 2).sum(0).clamp_min(1e-12)).mean())


def fvu_difference_ci(x: Tensor, x_hat_a: Tensor, x_hat_b: Tensor, groups: Tensor, n_boot: int = 1000,
                      level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """FVU(a) − FVU(b) on x and its percentile-bootstrap interval, resampling whole groups (documents)."""
    x = _check_2d(x)
    var = ((x - x.mean(0)) ** 2).sum(1)
    err = ((x - x_hat_a) ** 2).sum(1) - ((x - x_hat_b) ** 2).sum(1)
    _, inv = torch.as_tensor(groups).unique(return_inverse=True)
    n_g = int(inv.max()) + 1
    inv = inv.to(err.device)
    err_g = torch.zeros(n_g, dtype=torch.float64, device=err.device).index_add_(0, inv, err.double())
    var_g = torch.zeros(n_g, dtype=torch.float64, device=err.device).index_add_(0, inv, var.double())
    return bootstrap_ratio_ci(err_g.cpu().numpy(), var_g.cpu().numpy(), n_boot=n_boot, level=level, seed=seed)   # Σ err / Σ var


def split_by_document(doc_ids: Sequence[int] | Tensor, test_fraction: float = 0.25, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Boolean masks (train, test) over tokens such that every document lies wholly on one side."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ids = torch.as_tensor(doc_ids)
    docs = ids.unique()
    if len(docs) < 2:
        raise ValueError("need at least two documents to split")
    perm = docs[torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))]
    test_docs = perm[:max(1, round(test_fraction * len(docs)))]
    test = torch.isin(ids, test_docs)
    return ~test, test


# ---------------------------------------------------------------------------------------------
# PCA and k-means as dictionaries
def fit_pca(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [d] and principal directions [d, d] (columns, by decreasing variance) of x."""
    x = _check_2d(x)
    mu = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mu, full_matrices=False)
    return mu, vh.T


def pca_reconstruct(x: Tensor, pca: tuple[Tensor, Tensor], k: int) -> Tensor:
    """x projected on the mean plus the top-k principal directions (L0 = k)."""
    mu, v = pca
    if not 0 <= k <= v.shape[1]:
        raise ValueError(f"k must be in [0, {v.shape[1]}], got {k}")
    vk = v[:, :k]
    return mu + (_check_2d(x) - mu) @ vk @ vk.T


def fit_kmeans(x: Tensor, k: int, seed: int = 0, batch_size: int = 2048, max_iter: int = 5) -> Tensor:
    """Centroids [k, d] of scikit-learn's MiniBatchKMeans on x (k-means++ init; at most `max_iter` epochs,
    stopping after 3 batches without improvement)."""
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    x = _check_2d(x)
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be in [1, n_tokens={x.shape[0]}], got {k}")
    km = MiniBatchKMeans(k, random_state=seed, batch_size=batch_size, n_init=1, max_iter=max_iter, max_no_improvement=3)
    with threadpool_limits(torch.get_num_threads()):   # OpenMP would take every core (and crawl when they are shared)
        km.fit(x.cpu().numpy())
    return torch.from_numpy(km.cluster_centers_).float().to(x.device)


def kmeans_assign(x: Tensor, centroids: Tensor, scaled: bool = False, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """(index [n], coefficient [n]) of the one active latent. scaled=False: the nearest centroid, coefficient 1.
    scaled=True: the centroid c whose best multiple (x·c / ‖c‖²) c is closest to x, i.e. the largest |x·ĉ|."""
    x, c = _check_2d(x), _check_2d(centroids, "centroids")
    c = c.to(x.device)
    idx, coef = [], []
    sq = (c ** 2).sum(1).clamp_min(1e-12)
    for part in x.split(chunk):
        dots = part @ c.T
        if scaled:
            i = (dots ** 2 / sq).argmax(1)
            idx.append(i)
            coef.append(dots.gather(1, i[:, None])[:, 0] / sq[i])
        else:
            i = (sq - 2 * dots).argmin(1)
            idx.append(i)
            coef.append(torch.ones(len(part), device=part.device))
    return torch.cat(idx), torch.cat(coef)


def kmeans_reconstruct(x: Tensor, centroids: Tensor, scaled: bool = False) -> Tensor:
    """Each row of x replaced by its one-latent reconstruction (see `kmeans_assign`); L0 = 1."""
    idx, coef = kmeans_assign(x, centroids, scaled)
    return coef[:, None] * centroids.to(idx.device)[idx]


# ---------------------------------------------------------------------------------------------
# TopK sparse autoencoder (Gao et al. 2024, arXiv 2406.04093)
@dataclass
class TopKSAE:
    """x̂ = W_dec · TopK(W_enc (x − b_pre) + b_enc) + b_pre, decoder rows of unit norm. Weights in the input's units."""
    W_enc: Tensor   # [d, m]
    b_enc: Tensor   # [m]
    W_dec: Tensor   # [m, d], unit-norm rows
    b_pre: Tensor   # [d]
    k: int
    scale: float    # inputs are divided by this before encoding (mean ‖x − b_pre‖ / sqrt(d) on the train set)

    @property
    def width(self) -> int:
        return self.W_dec.shape[0]

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations [n, m] (before TopK)."""
        return ((_check_2d(x) - self.b_pre) / self.scale) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Sparse codes [n, m] with at most k non-zeros per row (ReLU after TopK)."""
        return _topk(self.pre_acts(x), self.k)

    def reconstruct(self, x: Tensor, chunk: int = 4096) -> Tensor:
        with torch.no_grad():
            return torch.cat([self.encode(p) @ self.W_dec * self.scale + self.b_pre for p in _check_2d(x).split(chunk)])


def _topk(pre: Tensor, k: int) -> Tensor:
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def train_topk(x: Tensor, width: int, k: int, steps: int = 300, batch_size: int = 1024, lr: float = 1e-3,
               seed: int = 0) -> tuple[TopKSAE, list[float]]:
    """Train a TopK SAE with Adam on MSE (Gao et al. 2024: b_pre initialised at the mean, W_enc = W_decᵀ at
    init, decoder rows renormalised after each step, their gradient's parallel part removed). Returns the SAE
    and the training FVU per step (on each batch, against the batch variance)."""
    x = _check_2d(x)
    n, d = x.shape
    if not 1 <= k <= width:
        raise ValueError(f"need 1 <= k <= width, got k={k}, width={width}")
    g = torch.Generator().manual_seed(seed)
    b_pre = x.mean(0)
    scale = float((x - b_pre).norm(dim=1).mean() / math.sqrt(d))
    xs = (x - b_pre) / scale
    W_dec = torch.randn(width, d, generator=g).to(x.device)     # drawn on the CPU: the same init on any device
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()
    b_enc = torch.zeros(width, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec], lr=lr)
    curve = []
    for _ in range(steps):
        batch = xs[torch.randint(n, (min(batch_size, n),), generator=g)]
        x_hat = _topk(batch @ W_enc + b_enc, k) @ W_dec
        loss = ((batch - x_hat) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():   # keep unit-norm decoder rows: drop the gradient along each row, then renormalise
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        curve.append(float(loss.detach()) / float(((batch - batch.mean(0)) ** 2).sum(1).mean()))
    sae = TopKSAE(W_enc.detach(), b_enc.detach(), W_dec.detach(), b_pre, k, scale)
    return sae, curve


def dead_fraction(sae: TopKSAE, x: Tensor, chunk: int = 4096) -> float:
    """Share of latents that never fire on x."""
    fired = torch.zeros(sae.width, dtype=torch.bool)
    with torch.no_grad():
        for part in _check_2d(x).split(chunk):
            fired |= (sae.encode(part) > 0).any(0).cpu()
    return float(1 - fired.float().mean())


def max_cosine(found: Tensor, true: Tensor) -> Tensor:
    """For each true direction [n_true, d], its largest |cosine| with any found direction [n_found, d]."""
    f = found / found.norm(dim=1, keepdim=True).clamp_min(1e-12)
    t = true / true.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (t @ f.T).abs().max(1).values


def synthetic_sparse(n: int, d: int, n_features: int, k: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Data with known sparse features: each row is a sum of exactly k of `n_features` random unit directions
    [n_features, d] with coefficients uniform in [1, 2], plus an offset. Returns (x [n, d], features)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_features, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_features, generator=g).argsort(1)[:, :k]
    codes = torch.zeros(n, n_features).scatter(1, idx, 1 + torch.rand(n, k, generator=g))
    return codes @ feats + 3.0 * torch.randn(d, generator=g), feats


# ---------------------------------------------------------------------------------------------
# interpretability of latents from their top contexts
def top_indices(scores: Tensor, n_top: int) -> Tensor:
    """[n_latents, n_top] indices of the tokens with the largest scores, from scores [n_tokens, n_latents]."""
    if scores.ndim != 2 or n_top > scores.shape[0]:
        raise ValueError(f"scores must be [n_tokens >= n_top, n_latents], got {tuple(scores.shape)}")
    return scores.topk(n_top, dim=0).indices.T


def concentration(labels: Sequence) -> float:
    """Share of the most common label among `labels` (1 = every top context is the same token)."""
    if len(labels) == 0:
        raise ValueError("no labels")
    return Counter(labels).most_common(1)[0][1] / len(labels)


def chance_concentration(labels: Sequence, n_top: int, n_draws: int = 200, seed: int = 0) -> float:
    """Mean `concentration` of n_top labels drawn at random (without replacement) from `labels`: the null."""
    rng = np.random.default_rng(seed)
    arr = np.asarray(labels, dtype=object)
    return float(np.mean([concentration(list(arr[rng.choice(len(arr), n_top, replace=False)])) for _ in range(n_draws)]))


# ---------------------------------------------------------------------------------------------
# the model side: cache activations, splice reconstructions back
@dataclass
class Cache:
    """Residual streams of a corpus, BOS left out: acts [n_layers, n_tokens, d], and per token its id, its
    document and its position inside the document (1 = first token after BOS)."""
    layers: list[int]
    acts: Tensor
    token: Tensor
    doc: Tensor
    pos: Tensor

    def at(self, layer: int) -> Tensor:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} not cached; cached: {self.layers}")
        return self.acts[self.layers.index(layer)]


def doc_tokens(model, texts: Sequence[str], max_len: int = 128) -> list[Tensor]:
    """Each text's token ids, BOS first, cut to at most `max_len` tokens (BOS included)."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    bos = model.tokenizer.bos_token_id
    return [torch.tensor([bos] + model.tokenizer(t, add_special_tokens=False)["input_ids"][:max_len - 1]) for t in texts]


def pad_left(model, seqs: Sequence[Tensor]) -> Tensor:
    """Left-pad token sequences (each starting with BOS) to one [batch, T] tensor."""
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    width = max(len(s) for s in seqs)
    return torch.stack([torch.cat([torch.full((width - len(s),), pad, dtype=s.dtype), s]) for s in seqs])


@torch.no_grad()
def cache_corpus(model, texts: Sequence[str], layers: Sequence[int], max_len: int = 128, batch_size: int = 16) -> Cache:
    """One pass (blocks after max(layers) skipped) over `texts`, batched by length, keeping every token after BOS."""
    from helpers import interventions as I

    layers = [I.check_layer(model, int(layer), allow_final=True) for layer in layers]
    names = [I.resid_name(model, layer) for layer in layers]
    store: dict[str, Tensor] = {}
    hooks = [(n, lambda act, hook=None, n=n: store.__setitem__(n, act.detach())) for n in names]
    seqs = doc_tokens(model, texts, max_len)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    acts, token, doc, pos = [], [], [], []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        tokens = pad_left(model, [seqs[i] for i in rows]).to(model.cfg.device)   # built on the CPU
        mask = I.attention_mask(model, tokens).bool()
        after_bos = I.position_mask(mask, I.AFTER_BOS)
        I.run_until(model, tokens, names[layers.index(max(layers))], fwd_hooks=hooks, attention_mask=mask.long())
        acts.append(torch.stack([store[n][after_bos] for n in names]).float().cpu())   # row by row, in order
        for i in rows:
            token.append(seqs[i][1:])
            doc.append(torch.full((len(seqs[i]) - 1,), i))
            pos.append(torch.arange(1, len(seqs[i])))
    return Cache(layers, torch.cat(acts, 1), torch.cat(token), torch.cat(doc), torch.cat(pos))


@torch.no_grad()
def spliced_loss(model, seqs: Sequence[Tensor], layer: int, replace=None) -> tuple[Tensor, Tensor]:
    """Next-token loss with the residual stream entering `layer` replaced, at every real token after BOS, by
    replace(acts [n, d]) -> [n, d] (None: the clean run; acts arrive on the CPU, where `cache_corpus` keeps
    activations and the fits made from them live). Returns (loss per predicted token [n_pred], logits of
    those predictions [n_pred, vocab]); predictions are every real position before each sequence's last token."""
    from helpers import interventions as I

    tokens = pad_left(model, seqs).to(model.cfg.device)   # built on the CPU; the targets below must match the logits
    mask = I.attention_mask(model, tokens).bool()
    after_bos = I.position_mask(mask, I.AFTER_BOS)

    def hook(resid: Tensor, hook=None) -> Tensor:
        out = resid.clone()
        out[after_bos] = replace(resid[after_bos].float().cpu()).to(device=resid.device, dtype=resid.dtype)
        return out

    hooks = [] if replace is None else [(I.resid_name(model, layer), hook)]
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks, attention_mask=mask.long()).float()
    pred = mask[:, :-1] & mask[:, 1:]                      # a real token followed by a real token
    lg, target = logits[:, :-1][pred], tokens[:, 1:][pred]
    return torch.nn.functional.cross_entropy(lg, target, reduction="none"), lg
