"""Causal tracing and activation patching, batched: many (layer, position) restorations in one forward pass.

    cols = patching.subject_cols(model, prompt, subject); toks = model.to_tokens(prompt)
    grid = patching.grid(model, "resid", layers=range(n), cols=range(cols[0], toks.shape[1]))
    tr = patching.causal_trace(model, toks, answer_id, cols, grid, noise=patching.gaussian_noise(3 * std, 4, cols, d))

One *restoration* is a tuple of `Patch`es (hook name, column, source run) applied together in one row of the
batch; the base run (the prompt, with Gaussian noise added to the subject's embeddings, or a counterfactual
prompt) is repeated along the batch and each row gets its own restoration. Several base-run *variants* (noise
samples) can run side by side: row r uses variant r % S. Conventions follow ROME (Meng et al. 2022,
kmeng01/rome `experiments/causal_trace.py`): noise added at the token embeddings of the subject, indirect
effect = p_restored(answer) - p_corrupted(answer) averaged over noise samples, MLP / attention restored over a
window of layers, "severed" = restore the residual stream while the MLP (or attention) outputs above it at
that token keep their corrupted values. Sites: "resid" (the block's *output*, ROME's h_L = resid layer L + 1), "mlp_out",
"attn_out". Columns are plain token columns of a single prompt (BOS at column 0); no padding anywhere.
Attribution patching (Nanda 2023) replaces each exact patch by (a_source - a_base) . d metric / d a_base.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from helpers import interventions as I

KINDS = ("resid", "mlp_out", "attn_out")
METRICS = ("prob", "logprob", "logit")
GROUPS = ("first subject", "middle subject", "last subject", "first after", "further", "last")


@dataclass(frozen=True)
class Patch:
    """Write run `source`'s activation at hook `name`, column `col`, into the base run."""
    name: str
    col: int
    source: str = "clean"


Restoration = tuple[Patch, ...]


def site_name(model, kind: str, layer: int) -> str:
    """Hook name of a site: "resid" is block `layer`'s output (ROME's h_layer), the others its MLP / attention output."""
    if kind not in KINDS:
        raise ValueError(f"unknown site kind {kind!r}; choose from {KINDS}")
    if kind == "resid":
        return I.resid_name(model, I.check_layer(model, layer) + 1)
    return I.hook_name(model, kind, layer)


def grid(model, kind: str, layers: Sequence[int], cols: Sequence[int], window: int = 1,
         sever: bool | str = False, source: str = "clean") -> list[Restoration]:
    """Restorations for every (layer, col), layer-major. `window` > 1 restores `kind` at the layers
    [L - window//2, L + ceil(window/2)) as ROME does for MLP and attention; `sever` (resid only) also keeps
    the MLP outputs (`sever=True` or "mlp_out") or the attention outputs (`sever="attn_out"`) of blocks above L
    at that column at their base-run ('corrupt') values (ROME fig. 3)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if sever not in (False, True, "mlp_out", "attn_out"):
        raise ValueError(f"sever must be False, True, 'mlp_out' or 'attn_out', got {sever!r}")
    if sever and kind != "resid":
        raise ValueError("sever needs kind='resid' (restore the stream, keep the MLPs or attention above it corrupted)")
    severed = "mlp_out" if sever is True else sever
    n = I.n_layers(model)
    out = []
    for L in layers:
        L = I.check_layer(model, int(L))
        span = range(max(0, L - window // 2), min(n, L - (-window // 2))) if window > 1 else [L]
        for c in cols:
            patches = [Patch(site_name(model, kind, l), int(c), source) for l in span]
            if sever:
                patches += [Patch(I.hook_name(model, severed, l), int(c), "corrupt") for l in range(L + 1, n)]
            out.append(tuple(patches))
    return out


def subject_cols(model, prompt: str, subject: str) -> tuple[int, int]:
    """(start, end) token columns of `subject` in `model.to_tokens(prompt)` (BOS at column 0, end exclusive):
    every token whose characters overlap the subject's first occurrence."""
    at = prompt.find(subject)
    if not subject or at < 0:
        raise ValueError(f"subject {subject!r} is not in {prompt!r}")
    ids = model.to_tokens(prompt)[0].tolist()
    n_bos = len(ids) - len(model.tokenizer.encode(prompt, add_special_tokens=False))
    ends = [len(model.tokenizer.decode(ids[n_bos:i + 1])) for i in range(n_bos, len(ids))]
    starts = [0] + ends[:-1]
    hit = [n_bos + i for i, (s, e) in enumerate(zip(starts, ends)) if s < at + len(subject) and e > at]
    if not hit:
        raise ValueError(f"no token of {prompt!r} overlaps {subject!r}")
    return hit[0], hit[-1] + 1


def aligned_positions(start: int, end: int, n_tokens: int) -> dict[str, list[int]]:
    """ROME's six position groups (columns): first / middle / last subject token, first token after the
    subject, further tokens, last token. A one-token subject is both first and last; an empty group is []."""
    if not 0 < start < end <= n_tokens - 1:
        raise ValueError(f"need 0 < start < end <= n_tokens - 1 (the subject is not the last token), got {start}, {end}, {n_tokens}")
    return {"first subject": [start], "middle subject": list(range(start + 1, end - 1)), "last subject": [end - 1],
            "first after": [end] if end < n_tokens - 1 else [], "further": list(range(end + 1, n_tokens - 1)),
            "last": [n_tokens - 1]}


def representative_cols(groups: dict[str, list[int]]) -> list[int]:
    """One column per non-empty group (the middle one of a group), sorted: a cheap grid for CPU runs."""
    return sorted({g[len(g) // 2] for g in groups.values() if g})


def gaussian_noise(scale: float, n_samples: int, cols: tuple[int, int], d_model: int,
                   generator: torch.Generator | None = None) -> Tensor:
    """[n_samples, end - start, d_model] N(0, scale^2) noise for the subject's embeddings (ROME: scale = 3 x std)."""
    if not scale > 0 or n_samples < 1:
        raise ValueError(f"need scale > 0 and n_samples >= 1, got {scale}, {n_samples}")
    return scale * torch.randn(n_samples, cols[1] - cols[0], d_model, generator=generator)


def _embed_hook(noise: Tensor | None, cols: tuple[int, int] | None, n_variants: int) -> list[tuple[str, Callable]]:
    if noise is None:
        return []
    if cols is None or noise.shape[1] != cols[1] - cols[0]:
        raise ValueError(f"noise covers {noise.shape[1]} tokens, the subject columns are {cols}")

    def add(x: Tensor, hook=None) -> Tensor:
        x = x.clone()
        rows = torch.arange(x.shape[0], device=x.device) % n_variants
        x[:, cols[0]:cols[1]] += noise.to(x.device, x.dtype)[rows]
        return x

    return [("hook_embed", add)]


def _metric(model, resid: Tensor, answer: int, metric: str) -> Tensor:
    logits = I.unembed(model, resid) if hasattr(model, "ln_final") else resid
    if metric == "logit":
        return logits[:, answer]
    lp = logits.float().log_softmax(-1)[:, answer]
    return lp.exp() if metric == "prob" else lp


def _forward_metric(model, tokens: Tensor, answer: int, metric: str, hooks: list) -> Tensor:
    """metric of `answer` at the last column of every row, under `hooks` (stops before the unembedding when it can)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
    if not hasattr(model, "ln_final"):  # e.g. a model without a final norm: run it whole
        with model.hooks(fwd_hooks=hooks):
            return _metric(model, model(tokens)[:, -1], answer, metric)
    last = I.resid_name(model, I.n_layers(model))
    held = {}
    I.run_until(model, tokens, last, hooks + [(last, lambda x, hook=None: held.setdefault("x", x[:, -1]))])
    return _metric(model, held["x"], answer, metric)


def _variants(noise: Tensor | None, sources: dict[str, dict[str, Tensor]]) -> int:
    sizes = {noise.shape[0]} if noise is not None else set()
    sizes |= {t.shape[0] for src in sources.values() for t in src.values()} - {1}
    if len(sizes) > 1:
        raise ValueError(f"noise and sources disagree on the number of variants: {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def run_grid(model, tokens: Tensor, answer: int, restorations: Sequence[Restoration],
             sources: dict[str, dict[str, Tensor]], noise: Tensor | None = None, noise_cols: tuple[int, int] | None = None,
             metric: str = "prob", batch_size: int = 64) -> Tensor:
    """[n_restorations, S] metric of `answer` after each restoration, for each of the S base-run variants.

    tokens: [1, seq] the base run's prompt; noise [S, k, d] is added to its embeddings at `noise_cols`;
    sources: {source name: {hook name: [1 or S, seq, d] activations}} (e.g. from `cache`). Rows are
    restorations x variants, about `batch_size` rows (whole restorations) at a time; an empty restoration () is the base run."""
    tokens = I._check_length(model, tokens if tokens.ndim == 2 else tokens[None])
    if tokens.shape[0] != 1:
        raise ValueError("run_grid takes one prompt ([1, seq] tokens)")
    S = _variants(noise, sources)
    jobs = [(i, v) for i in range(len(restorations)) for v in range(S)]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch_size = max(S, batch_size - batch_size % S)          # whole restorations per forward pass
    out = torch.empty(len(jobs))
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b:b + batch_size]
        spec: dict[str, list[tuple[int, int, str, int]]] = defaultdict(list)
        for row, (i, v) in enumerate(chunk):
            for p in restorations[i]:
                if p.source not in sources or p.name not in sources[p.source]:
                    raise KeyError(f"no cached activation {p.name!r} for source {p.source!r}")
                spec[p.name].append((row, p.col, p.source, v))
        hooks = _embed_hook(noise, noise_cols, S) + [(name, _writer(items, sources, name)) for name, items in spec.items()]
        with torch.no_grad():
            out[b:b + len(chunk)] = _forward_metric(model, tokens.expand(len(chunk), -1), answer, metric, hooks).cpu()
    return out.reshape(len(restorations), S)


def _writer(items: list[tuple[int, int, str, int]], sources: dict[str, dict[str, Tensor]], name: str) -> Callable:
    rows = torch.tensor([r for r, _, _, _ in items])
    cols = torch.tensor([c for _, c, _, _ in items])
    values = torch.stack([sources[s][name][v if sources[s][name].shape[0] > 1 else 0, c] for _, c, s, v in items])

    def write(x: Tensor, hook=None) -> Tensor:
        x = x.clone()
        x[rows.to(x.device), cols.to(x.device)] = values.to(x.device, x.dtype)
        return x

    return write


@torch.no_grad()
def cache(model, tokens: Tensor, names: Sequence[str], noise: Tensor | None = None,
          noise_cols: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """{name: [S, seq, d]} activations of the base run (S noise variants; S = 1 without noise)."""
    tokens = tokens if tokens.ndim == 2 else tokens[None]
    S = 1 if noise is None else noise.shape[0]
    held: dict[str, Tensor] = {}
    grab = [(n, lambda x, hook=None, n=n: held.__setitem__(n, x.detach().clone())) for n in names]
    with model.hooks(fwd_hooks=_embed_hook(noise, noise_cols, S) + grab):
        model(tokens.expand(S, -1))
    return held


@dataclass
class Trace:
    """A causal trace in `metric` units: the clean value, the corrupted one (per variant) and the value after each
    restoration; effect = restored - corrupted. A log-prob trace also gives probabilities (`as_prob`)."""
    clean: float
    corrupted: Tensor          # [S]
    restored: Tensor           # [n_restorations, S]
    metric: str = "prob"

    @property
    def effect(self) -> Tensor:
        """Indirect effect of each restoration: mean over variants of restored - corrupted (ROME, in metric units)."""
        return (self.restored - self.corrupted[None]).mean(1)

    def as_prob(self) -> "Trace":
        """The same trace in probabilities (exp of a log-prob trace); a prob trace is returned as is."""
        if self.metric == "prob":
            return self
        if self.metric != "logprob":
            raise ValueError(f"a {self.metric!r} trace cannot be turned into probabilities")
        return Trace(float(torch.tensor(self.clean).exp()), self.corrupted.exp(), self.restored.exp(), "prob")


def names_of(restorations: Sequence[Restoration]) -> list[str]:
    return sorted({p.name for r in restorations for p in r})


def causal_trace(model, tokens: Tensor, answer: int, cols: tuple[int, int], restorations: Sequence[Restoration],
                 noise: Tensor, metric: str = "prob", batch_size: int = 64) -> Trace:
    """Denoising: corrupt the subject's embeddings (`noise` [S, k, d] at `cols`) and restore the clean run's
    states, one restoration per row (ROME's causal tracing, batched)."""
    names = names_of(restorations)
    clean = cache(model, tokens, names)
    corrupt = cache(model, tokens, names, noise, cols)
    sources = {"clean": clean, "corrupt": corrupt}
    with torch.no_grad():
        p_clean = _forward_metric(model, tokens if tokens.ndim == 2 else tokens[None], answer, metric, []).item()
    base = run_grid(model, tokens, answer, [()], sources, noise, cols, metric, batch_size=noise.shape[0])[0]
    return Trace(p_clean, base, run_grid(model, tokens, answer, restorations, sources, noise, cols, metric, batch_size), metric)


def attribution(model, tokens: Tensor, answer: int, names: Sequence[str], source: dict[str, Tensor],
                noise: Tensor | None = None, noise_cols: tuple[int, int] | None = None, metric: str = "prob",
                base_tokens: Tensor | None = None) -> dict[str, Tensor]:
    """Attribution patching: {name: [seq]} first-order estimates (a_source - a_base) . d metric / d a_base of
    patching each (name, column) from `source` ({name: [1, seq, d]}) into the base run, averaged over variants.
    The base run is `base_tokens` (default `tokens`) with `noise` at `noise_cols`: one forward and one backward."""
    base = tokens if base_tokens is None else base_tokens
    base = base if base.ndim == 2 else base[None]
    S = 1 if noise is None else noise.shape[0]
    acts: dict[str, Tensor] = {}
    zeros: dict[str, Tensor] = {}

    def keep(x: Tensor, name: str) -> Tensor:
        # add a zero that requires grad: d metric / d zero = d metric / d activation, and upstream sites keep theirs
        acts[name], zeros[name] = x.detach(), torch.zeros_like(x, requires_grad=True)
        return x + zeros[name]

    hooks = _embed_hook(noise, noise_cols, S) + [(n, lambda x, hook=None, n=n: keep(x, n)) for n in names]
    with torch.enable_grad():
        m = _forward_metric(model, base.expand(S, -1), answer, metric, hooks)
        grads = torch.autograd.grad(m.sum(), [zeros[n] for n in names], allow_unused=True)
    out = {}
    for n, g in zip(names, grads):
        g = torch.zeros_like(acts[n]) if g is None else g
        out[n] = ((source[n].to(g.device) - acts[n]) * g).sum(-1).mean(0).detach().cpu()
    return out


def group_means(values: Tensor, groups: dict[str, list[int]], cols: Sequence[int]) -> Tensor:
    """[..., len(GROUPS)] means of `values` [..., len(cols)] over the columns of each ROME group (NaN if a group
    has none of `cols`)."""
    index = {int(c): i for i, c in enumerate(cols)}
    out = []
    for g in GROUPS:
        have = [index[c] for c in groups[g] if c in index]
        out.append(values[..., have].mean(-1) if have else torch.full(values.shape[:-1], float("nan")))
    return torch.stack(out, -1)


def subject_embedding_std(model, prompts: Sequence[str], subjects: Sequence[str]) -> float:
    """Standard deviation of every entry of the subjects' token embeddings over a set of prompts (ROME's
    noise scale is 3 x this)."""
    if len(prompts) != len(subjects) or not prompts:
        raise ValueError("need one subject per prompt, and at least one prompt")
    rows = []
    for prompt, subject in zip(prompts, subjects):
        start, end = subject_cols(model, prompt, subject)
        held = {}
        I.run_until(model, model.to_tokens(prompt), "hook_embed",
                    [("hook_embed", lambda x, hook=None: held.setdefault("e", x[0, start:end].detach()))])
        rows.append(held["e"].float().cpu())
    return torch.cat(rows).std().item()


MAP_KINDS = ("resid", "mlp_out", "attn_out", "severed", "attn_severed")
SEVERED = {"severed": "mlp_out", "attn_severed": "attn_out"}     # map kind -> the outputs kept corrupted above L


def trace_maps(model, tokens: Tensor, answer: int, cols: tuple[int, int], layers: Sequence[int], pos_cols: Sequence[int],
               noise: Tensor, window: int = 1, kinds: Sequence[str] = MAP_KINDS, metric: str = "prob",
               batch_size: int = 64) -> tuple[Trace, dict[str, Tensor]]:
    """Causal tracing of one prompt for several site kinds in one batched sweep: the Trace (all rows) and
    {kind: [len(layers), len(pos_cols)] indirect effects in metric units; `split_maps(tr.as_prob(), ...)` gives
    probabilities from a log-prob trace}. "mlp_out"/"attn_out" restore a `window` of layers, "severed" restores the
    residual stream with the MLP outputs above it kept corrupted, "attn_severed" with the attention outputs above it."""
    rest: list[Restoration] = []
    for k in kinds:
        if k not in MAP_KINDS:
            raise ValueError(f"unknown map kind {k!r}; choose from {MAP_KINDS}")
        rest += grid(model, "resid" if k in SEVERED else k, layers, pos_cols,
                     window=window if k in ("mlp_out", "attn_out") else 1, sever=SEVERED.get(k, False))
    tr = causal_trace(model, tokens, answer, cols, rest, noise, metric, batch_size)
    return tr, split_maps(tr, kinds, len(layers), len(pos_cols))


def split_maps(tr: Trace, kinds: Sequence[str], n_layers: int, n_cols: int) -> dict[str, Tensor]:
    """{kind: [n_layers, n_cols]} effects of a `trace_maps` trace (kinds in the order it was run)."""
    if tr.restored.shape[0] != len(kinds) * n_layers * n_cols:
        raise ValueError(f"the trace has {tr.restored.shape[0]} restorations, not {len(kinds)} x {n_layers} x {n_cols}")
    return dict(zip(kinds, tr.effect.reshape(len(kinds), n_layers, n_cols)))
