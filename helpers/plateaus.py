"""Activation plateaus: move one residual-stream activation and watch the output.

The tools behind notebook 02 (Heimersheim & Mendel 2024; Giglemiani et al. 2024; Janiak et al. 2024;
Lee & Heimersheim 2024):

    from helpers import plateaus as P
    acts = P.activations_at(model, prompts, layer)                  # [n_prompts, d_model], last position
    mean, cov = P.fit_gaussian(P.activations_at(model, prompts, layer, pos=None))
    curve = P.perturbation_curve(model, prompt, layer, directions, steps)   # kl, l2: [n_dirs, n_steps]
    P.blowup_step(steps, curve["kl"][0], threshold=0.5)            # where the curve leaves its plateau
    path = P.interpolate(model, prompt_a, prompt_b, layer, alphas)  # logits, final residual along the path

Everything batches: one forward pass carries many copies of a prompt, each with a different activation
written into the residual stream entering block `layer` at one position (by default the last one, where a
key/value cache of the unchanged prefix lets each copy run a single token). Position 0 (BOS) is never
touched.
"""
from __future__ import annotations

from collections.abc import Sequence
import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor

from helpers import interventions as I
from helpers.geometry import unit
from helpers.probes import single_threaded as _one_thread

# ---------------------------------------------------------------------------------------------
# checks


def _check_prompt(model, prompt: str | Tensor) -> Tensor:
    """[1, pos] tokens of one prompt (BOS prepended), with at least one token after BOS."""
    if isinstance(prompt, Tensor):
        tokens = prompt if prompt.ndim == 2 else prompt.unsqueeze(0)
        if tokens.shape[0] != 1:
            raise ValueError(f"pass one prompt, got a token tensor with batch {tokens.shape[0]}")
        tokens = tokens.to(model.cfg.device)
    elif isinstance(prompt, str):
        tokens = I.to_tokens(model, prompt)
    else:
        raise TypeError(f"prompt must be a str or a [1, pos] token tensor, got {type(prompt).__name__}")
    if tokens.shape[1] < 2:
        raise ValueError("the prompt needs at least one token after BOS")
    return tokens


def _check_position(tokens: Tensor, pos: int) -> int:
    if isinstance(pos, bool) or not isinstance(pos, int):
        raise TypeError(f"pos must be an int, got {type(pos).__name__} {pos!r}")
    n = tokens.shape[1]
    if not -n <= pos < n:
        raise IndexError(f"pos {pos} is out of range for a prompt of {n} tokens")
    pos = pos % n
    if pos == 0:
        raise ValueError("position 0 is the BOS token (an attention sink with huge activations): perturb a later one")
    return pos


def _check_activations(model, activations: Tensor) -> Tensor:
    if not isinstance(activations, Tensor):
        raise TypeError(f"activations must be a torch.Tensor, got {type(activations).__name__}")
    if activations.ndim == 1:
        activations = activations.unsqueeze(0)
    if activations.ndim != 2 or activations.shape[-1] != model.cfg.d_model:
        raise ValueError(f"activations must be [n, d_model={model.cfg.d_model}], got {tuple(activations.shape)}")
    if not torch.isfinite(activations).all():
        raise ValueError("activations contain NaN or inf")
    return activations


# ---------------------------------------------------------------------------------------------
# reading activations


@torch.no_grad()
def activations_at(model, prompts: Sequence[str] | Tensor, layer: int | Sequence[int], pos: int | None = -1,
                   batch_size: int = 32) -> Tensor:
    """Residual stream entering `layer`: [n_prompts, d_model] at `pos` (default the last token), or with
    pos=None every real token after BOS of every prompt stacked as [n_tokens, d_model] (no padding, no BOS).
    With a list of layers, one forward pass gives them all, stacked as [n_layers, ...]."""
    several = not isinstance(layer, (int, np.integer)) or isinstance(layer, bool)
    layers = [I.check_layer(model, int(l), allow_final=True) for l in (layer if several else [layer])]
    tokens = I.to_tokens(model, prompts)
    if pos is not None:
        out = I.residual_stream(model, tokens, layers=layers, pos=pos, batch_size=batch_size)
        return out if several else out[0]
    names = [I.resid_name(model, l) for l in layers]
    rows = []
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start:start + batch_size]
        mask = I.attention_mask(model, chunk).bool()
        cache = _run_until(model, chunk, names, max(layers))
        acts = torch.stack([cache[n] for n in names])  # [layers, batch, pos, d]
        first = mask.float().argmax(1)  # the BOS of each left-padded row
        for b in range(chunk.shape[0]):
            rows.append(acts[:, b, first[b] + 1:][:, mask[b, first[b] + 1:]])
    out = torch.cat(rows, dim=1)
    return out if several else out[0]


@torch.no_grad()
def _run_until(model, tokens: Tensor, names: list[str], deepest: int) -> dict[str, Tensor]:
    """The residual streams `names` of a left-padded batch, running the blocks only up to layer `deepest`
    (the rest of the model is skipped: the same values at a fraction of the cost)."""
    store: dict[str, Tensor] = {}

    def keeper(name: str):
        def keep(act: Tensor, hook: Any = None) -> None:
            store[name] = act.detach().clone()
        return keep

    I.run_until(model, tokens, I.resid_name(model, deepest), [(n, keeper(n)) for n in names],
                attention_mask=I.attention_mask(model, tokens))
    return store


@torch.no_grad()
def last_token_run(model, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """One pass over `prompts` (in batches): the last token's residual stream at `layers`
    [n_layers, n_prompts, d_model] and its next-token logits [n_prompts, vocab]. Keeps only the last
    position, so a few hundred prompts fit in little memory."""
    layers = [I.check_layer(model, int(l), allow_final=True) for l in layers]
    names = [I.resid_name(model, l) for l in layers]
    tokens = I.to_tokens(model, list(prompts))
    acts, logits = [], []
    for start in range(0, tokens.shape[0], batch_size):
        out, cache = I.run_with_cache(model, tokens[start:start + batch_size], names)
        acts.append(torch.stack([cache[n][:, -1] for n in names]))
        logits.append(out[:, -1].float())
    return torch.cat(acts, dim=1), torch.cat(logits)


@_one_thread
def fit_gaussian(samples: Tensor, shrinkage: bool = True) -> tuple[Tensor, Tensor]:
    """Mean [d] and covariance [d, d] of samples [n, d]; Ledoit-Wolf shrinkage (scikit-learn) by default,
    so the covariance is well-conditioned even with fewer samples than dimensions."""
    if samples.ndim != 2 or samples.shape[0] < 2:
        raise ValueError(f"samples must be [n >= 2, d], got {tuple(samples.shape)}")
    x = samples.double().cpu().numpy()
    if shrinkage:
        from sklearn.covariance import LedoitWolf

        cov = LedoitWolf().fit(x).covariance_
    else:
        cov = np.cov(x, rowvar=False)
    return torch.as_tensor(x.mean(0), dtype=samples.dtype), torch.as_tensor(cov, dtype=samples.dtype)


@_one_thread
def ledoit_wolf_shrinkage(samples: Tensor) -> float:
    """The Ledoit-Wolf shrinkage intensity of samples [n, d]: the weight (0..1) that `fit_gaussian` puts on
    an isotropic target (mean variance x identity) instead of the sample covariance."""
    if samples.ndim != 2 or samples.shape[0] < 2:
        raise ValueError(f"samples must be [n >= 2, d], got {tuple(samples.shape)}")
    from sklearn.covariance import ledoit_wolf_shrinkage as lw

    x = samples.double().cpu().numpy()
    return float(lw(x - x.mean(0), assume_centered=True))


def mixture_directions(points: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n unit directions [n, d] between two distinct rows of points [m >= 2, d], unit(X_i - X_j) with i != j
    drawn at random: the "mixture" directions of Lee & Heimersheim (2024), A2 - A3 between two real
    activations or S1 - S2 between two synthetic ones; unlike A2 - A, they carry no -A component."""
    if points.ndim != 2 or points.shape[0] < 2:
        raise ValueError(f"points must be [m >= 2, d], got {tuple(points.shape)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    m = points.shape[0]
    i = torch.randint(m, (n,), generator=generator)
    j = (i + torch.randint(1, m, (n,), generator=generator)) % m  # never equal to i
    return unit(points[i] - points[j])


def drop_outliers(samples: Tensor, factor: float = 3.0) -> Tensor:
    """The rows of samples [n, d] whose norm is at most `factor` x the median norm: drops the few tokens with
    massive activations (secondary attention sinks) that would otherwise dominate a covariance estimate."""
    if samples.ndim != 2:
        raise ValueError(f"samples must be [n, d], got {tuple(samples.shape)}")
    norms = samples.norm(dim=-1)
    return samples[norms <= factor * norms.median()]


def _cholesky(cov: Tensor) -> Tensor:
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be square [d, d], got {tuple(cov.shape)}")
    c = cov.double()
    jitter = 1e-10 * c.diagonal().mean().clamp_min(1e-30)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(c + jitter * torch.eye(c.shape[0], dtype=c.dtype, device=c.device))
        if info == 0:
            return chol
        jitter = jitter * 100
    raise ValueError("cov is not positive semi-definite")


def gaussian_samples(mean: Tensor, cov: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n samples [n, d] from N(mean, cov): synthetic activations with the real ones' first two moments."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    chol = _cholesky(cov)
    if mean.shape != (chol.shape[0],):
        raise ValueError(f"mean has shape {tuple(mean.shape)}, cov is {tuple(cov.shape)}")
    z = torch.randn(n, chol.shape[0], generator=generator, dtype=torch.float64,
                    device=None if generator is None else generator.device)   # draw where the generator lives
    return (mean.double().to(chol.device) + z.to(chol.device) @ chol.T).to(mean.dtype)


def isotropic_directions(n: int, d: int, generator: torch.Generator | None = None) -> Tensor:
    """n unit vectors [n, d] drawn uniformly on the sphere."""
    return unit(torch.randn(n, d, generator=generator))


def covariance_directions(cov: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n unit vectors [n, d] from N(0, cov), normalised: random directions shaped like real activations'
    spread (the improved baseline of Lee & Heimersheim 2024)."""
    return unit(gaussian_samples(torch.zeros(cov.shape[0], dtype=cov.dtype, device=cov.device), cov, n, generator)).float()


# ---------------------------------------------------------------------------------------------
# batched forward passes with one activation replaced


def replace_hook(values: Tensor, pos: int, rows: Tensor | None = None):
    """A hook writing values [n, d_model] into the activation at position `pos` of batch rows `rows`
    (default: every row, n = batch)."""
    def hook(act: Tensor, hook: Any = None) -> Tensor:
        n = act.shape[0] if rows is None else len(rows)
        if n != values.shape[0]:
            raise ValueError(f"hook got {n} rows to write, but {values.shape[0]} values")
        if rows is None:
            act[:, pos] = values.to(act.device, act.dtype)
        else:
            act[rows, pos] = values.to(act.device, act.dtype)
        return act
    return hook


def _final_hook_name(model) -> str:
    return I.resid_name(model, I.n_layers(model))


def _hooks(model, layers: Tensor, values: Tensor, pos: int, store: dict[str, Tensor]) -> list:
    """One writing hook per distinct layer (each writes only its own rows), and one reading the final stream."""
    def keep(act: Tensor, hook: Any = None) -> None:
        store["final"] = act[:, -1].detach().clone()

    hooks = []
    for layer in sorted(set(layers.tolist())):
        rows = torch.nonzero(layers == layer).flatten()
        everyone = len(rows) == len(layers)
        hooks.append((I.resid_name(model, layer),
                      replace_hook(values if everyone else values[rows], pos, None if everyone else rows)))
    return hooks + [(_final_hook_name(model), keep)]


@torch.no_grad()
def _run_full(model, tokens: Tensor, layers: Tensor, values: Tensor, pos: int) -> tuple[Tensor, Tensor]:
    store: dict[str, Tensor] = {}
    logits = model.run_with_hooks(tokens.expand(values.shape[0], -1), fwd_hooks=_hooks(model, layers, values, pos, store))
    return logits[:, -1], store["final"]


@torch.no_grad()
def _prefix_cache(model, tokens: Tensor):
    _, cache = model(tokens[:, :-1], return_type="logits_and_cache", use_cache=True)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise RuntimeError("this model returned no key/value cache")
    return cache


@torch.no_grad()
def _run_kv(model, tokens: Tensor, layers: Tensor, values: Tensor, prefix) -> tuple[Tensor, Tensor]:
    """Only the last position changes, so the prefix's keys and values (computed once, batch 1) are shared:
    each copy runs one token."""
    cache = copy.deepcopy(prefix)
    cache.batch_repeat_interleave(values.shape[0])
    store: dict[str, Tensor] = {}
    last = tokens[:, -1:].expand(values.shape[0], 1)
    with model.hooks(fwd_hooks=_hooks(model, layers, values, -1, store)):
        logits = model(last, past_key_values=cache)
    return logits[:, -1], store["final"]


def _check_layers(model, layer: int | Sequence[int], n: int) -> Tensor:
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
        return torch.full((n,), I.check_layer(model, int(layer), allow_final=True))
    if isinstance(layer, Tensor):
        layer = layer.tolist()
    if not isinstance(layer, Sequence) or len(layer) != n:
        raise ValueError(f"layer must be an int or a sequence of one layer per row ({n} rows)")
    return torch.tensor([I.check_layer(model, int(l), allow_final=True) for l in layer])


@torch.no_grad()
def run_with_activation(model, prompt: str | Tensor, layer: int | Sequence[int], activations: Tensor,
                        pos: int = -1, batch_size: int = 256, method: str = "auto") -> tuple[Tensor, Tensor]:
    """Run one prompt once per row of `activations` [n, d_model], each time writing that row into the
    residual stream entering `layer` (an int, or one layer per row) at position `pos`; returns the last
    position's logits [n, vocab] and final residual stream [n, d_model].

    method: "kv" (the prefix before the last position is computed once and shared through a key/value
    cache; only for the last position), "full" (every copy runs the whole prompt), "auto" (kv when it
    applies and the model supports it, else full). `batch_size` copies go through the model at a time.
    """
    tokens = _check_prompt(model, prompt)
    p = _check_position(tokens, pos)
    activations = _check_activations(model, activations)
    layers = _check_layers(model, layer, activations.shape[0])
    if method not in ("auto", "kv", "full"):
        raise ValueError(f"method must be 'auto', 'kv' or 'full', got {method!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    last = p == tokens.shape[1] - 1
    if method == "kv" and not last:
        raise ValueError("method='kv' only works when the perturbed position is the last one")
    prefix = None
    if method == "kv" or (method == "auto" and last and getattr(model, "_plateaus_kv_ok", True)):
        try:
            prefix = _prefix_cache(model, tokens)
        except (RuntimeError, TypeError, AttributeError, ValueError):
            if method == "kv":
                raise
            model._plateaus_kv_ok = False  # remember: this model gives no usable cache, go the long way
    logits, finals = [], []
    for start in range(0, activations.shape[0], batch_size):
        chunk, chunk_layers = activations[start:start + batch_size], layers[start:start + batch_size]
        if prefix is not None:
            out = _run_kv(model, tokens, chunk_layers, chunk, prefix)
        else:
            out = _run_full(model, tokens, chunk_layers, chunk, p)
        logits.append(out[0].float())
        finals.append(out[1].float())
    return torch.cat(logits), torch.cat(finals)


# ---------------------------------------------------------------------------------------------
# perturbation curves


def perturbation_curve(model, prompt: str | Tensor, layer: int | Sequence[int], directions: Tensor,
                       steps: Sequence[float] | Tensor, base: Tensor | None = None, pos: int = -1,
                       batch_size: int = 256, method: str = "auto", keep_logits: bool = False) -> dict[str, Tensor]:
    """Output change as the activation at (`layer`, `pos`) moves from a start point along each direction.

    layer: an int, or one layer per direction (several layers then share one batched run).
    directions: [n_dirs, d_model], used as given (normalise them for unit steps). steps: distances t starting
    at 0, [n_steps] for every direction or [n_dirs, n_steps]. base: where each direction starts, [d_model] or
    [n_dirs, d_model]; default the prompt's own activation at that layer. All n_dirs x n_steps runs go
    through the model together, in batches of `batch_size`.
    Returns kl [n_dirs, n_steps], KL(P_start || P_t) of the next-token distribution in nats (0 at t = 0 by
    construction: the start is the first point of its own row), and l2 [n_dirs, n_steps], the L2 change of
    the final residual stream at the last position; with keep_logits=True also the logits
    [n_dirs, n_steps, vocab].
    """
    tokens = _check_prompt(model, prompt)
    directions = _check_activations(model, directions)
    n_dirs = directions.shape[0]
    layers = _check_layers(model, layer, n_dirs)
    steps = torch.as_tensor(np.asarray(steps, dtype=np.float32))
    if steps.ndim == 1:
        steps = steps.expand(n_dirs, -1)
    if steps.ndim != 2 or steps.shape[0] != n_dirs or steps.shape[1] < 2 or torch.any(steps[:, 0] != 0):
        raise ValueError("steps must be [n_steps] or [n_dirs, n_steps] with n_steps >= 2, starting at 0 "
                         "(the unperturbed start)")
    if base is None:
        p = _check_position(tokens, pos)
        distinct = sorted(set(layers.tolist()))
        own = activations_at(model, tokens, distinct, pos=p)[:, 0]  # [n_distinct, d]
        base = own[torch.tensor([distinct.index(l) for l in layers.tolist()])]
    base = _check_activations(model, base)
    if base.shape[0] not in (1, n_dirs):
        raise ValueError(f"base must be [d_model] or [n_dirs={n_dirs}, d_model], got {tuple(base.shape)}")
    base = base.expand(n_dirs, -1)
    n_steps = steps.shape[1]
    moved = base[:, None, :] + steps[:, :, None].to(base.device) * directions[:, None, :].to(device=base.device, dtype=base.dtype)  # [n_dirs, n_steps, d]
    kl, l2, kept = [], [], []
    group = max(1, batch_size // n_steps)  # whole directions per batch, so only [batch, vocab] logits live at once
    for g in range(0, n_dirs, group):
        rows = moved[g:g + group]
        logits, finals = run_with_activation(model, tokens, layers[g:g + group].repeat_interleave(n_steps).tolist(),
                                             rows.reshape(-1, base.shape[-1]), pos=pos, batch_size=batch_size,
                                             method=method)
        logits = logits.reshape(rows.shape[0], n_steps, -1)
        finals = finals.reshape(rows.shape[0], n_steps, -1)
        kl.append(I.kl_divergence(logits[:, :1].expand_as(logits), logits))
        l2.append((finals - finals[:, :1]).norm(dim=-1))
        if keep_logits:
            kept.append(logits)
    out = {"kl": torch.cat(kl), "l2": torch.cat(l2)}
    return {**out, "logits": torch.cat(kept)} if keep_logits else out


# ---------------------------------------------------------------------------------------------
# curve statistics


def _curve(steps, values) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    if x.ndim != 1 or y.shape[-1] != x.shape[0] or x.shape[0] < 2:
        raise ValueError(f"steps [n >= 2] and values [..., n] must match, got {x.shape} and {y.shape}")
    if np.any(np.diff(x) <= 0):
        raise ValueError("steps must be strictly increasing")
    return x, y


def blowup_step(steps, values, threshold: float) -> np.ndarray | float:
    """The step at which `values` first exceeds `threshold` (linearly interpolated between grid points);
    NaN where it never does. Works on one curve [n] or a stack [..., n]."""
    x, y = _curve(steps, values)
    if threshold <= 0:
        raise ValueError("threshold must be > 0 (the curve starts at 0)")
    flat = y.reshape(-1, x.shape[0])
    out = np.full(flat.shape[0], np.nan)
    for i, row in enumerate(flat):
        above = np.nonzero(row > threshold)[0]
        if len(above) == 0:
            continue
        j = above[0]
        if j == 0:
            out[i] = x[0]
            continue
        y0, y1 = row[j - 1], row[j]
        out[i] = x[j - 1] + (threshold - y0) / (y1 - y0) * (x[j] - x[j - 1])
    return out.reshape(y.shape[:-1]) if y.ndim > 1 else float(out[0])


def max_slope(steps, values) -> np.ndarray | float:
    """Largest finite-difference slope dy/dx along each curve ([..., n] -> [...])."""
    x, y = _curve(steps, values)
    slope = (np.diff(y, axis=-1) / np.diff(x)).max(-1)
    return slope if y.ndim > 1 else float(slope)


def sharpness(steps, values) -> np.ndarray | float:
    """Max slope divided by the average slope over the whole range: 1 for a straight line, large for a
    plateau followed by a jump (a step). NaN where the curve does not rise at all."""
    x, y = _curve(steps, values)
    mean = (y[..., -1] - y[..., 0]) / (x[-1] - x[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(mean > 0, max_slope(x, y) / mean, np.nan)
    return out if y.ndim > 1 else float(out)


def onset_exponent(steps, values, threshold: float) -> np.ndarray | float:
    """How abruptly a curve leaves zero: p = log2(threshold / value at half the blow-up step). A smooth
    (quadratic) rise such as KL ~ t^2 near an ordinary point gives 2; a plateau that ends in a jump gives
    more. NaN where the curve never crosses `threshold`. Works on [n] or [..., n]."""
    x, y = _curve(steps, values)
    flat = y.reshape(-1, x.shape[0])
    blow = np.atleast_1d(blowup_step(x, flat, threshold))
    out = np.full(flat.shape[0], np.nan)
    for i, (row, b) in enumerate(zip(flat, blow)):
        if np.isfinite(b) and b > x[0]:
            half = np.interp(b / 2, x, row)
            out[i] = np.log2(threshold / half) if half > 0 else np.inf
    return out.reshape(y.shape[:-1]) if y.ndim > 1 else float(out[0])


# ---------------------------------------------------------------------------------------------
# interpolation between two prompts


def interpolate(model, prompt_a: str | Tensor, prompt_b: str | Tensor, layer: int | Sequence[int],
                alphas: Sequence[float] | Tensor, batch_size: int = 256, method: str = "auto") -> dict[str, Tensor]:
    """Walk the last position's residual stream entering `layer` in a straight line from prompt_a's (alpha=0)
    to prompt_b's (alpha=1) activation. The prompts must be identical except for their last token (as in
    Shinkle 2025, after Janiak et al. 2024), so both endpoints are real runs: alpha=0 gives prompt_a's
    output, alpha=1 prompt_b's. Returns the last position's logits [n_alpha, vocab] and final residual stream
    [n_alpha, d_model] along the path, and the alphas. With a list of layers every layer's path runs in the
    same batch and the outputs get a leading [n_layers] dimension."""
    ta, tb = _check_prompt(model, prompt_a), _check_prompt(model, prompt_b)
    if ta.shape != tb.shape or not torch.equal(ta[:, :-1], tb[:, :-1]):
        raise ValueError("the two prompts must have the same tokens except the last one "
                         f"(got {ta.shape[1]} and {tb.shape[1]} tokens)")
    alphas = torch.as_tensor(np.asarray(alphas, dtype=np.float32))
    if alphas.ndim != 1 or len(alphas) < 2:
        raise ValueError("alphas must be a 1-D sequence of at least two values")
    several = not isinstance(layer, (int, np.integer)) or isinstance(layer, bool)
    layers = list(layer) if several else [layer]
    ends = activations_at(model, torch.cat([ta, tb]), layers)  # [n_layers, 2, d]
    al = alphas.to(ends.device)
    path = (1 - al)[None, :, None] * ends[:, :1] + al[None, :, None] * ends[:, 1:]  # [n_layers, n_alpha, d]
    row_layers = [l for l in layers for _ in range(len(alphas))]
    logits, finals = run_with_activation(model, ta, row_layers, path.reshape(-1, path.shape[-1]), pos=-1,
                                         batch_size=batch_size, method=method)
    logits = logits.reshape(len(layers), len(alphas), -1)
    finals = finals.reshape(len(layers), len(alphas), -1)
    if not several:
        logits, finals = logits[0], finals[0]
    return {"logits": logits, "final": finals, "alphas": alphas}


@torch.no_grad()
def interpolate_prompts(model, prompt_a: str | Sequence[str], prompt_b: str | Sequence[str], layer: int,
                        alphas: Sequence[float] | Tensor, batch_size: int = 128) -> dict[str, Tensor]:
    """Walk the residual stream entering `layer` at *every* position after BOS in a straight line from
    prompt_a's (alpha=0) to prompt_b's (alpha=1). The two prompts need the same number of tokens and may
    differ anywhere after BOS (e.g. one word in the middle), so both endpoints are real runs and the points in
    between are inputs no prompt produces. Returns the last position's logits [n_alpha, vocab] and final
    residual stream [n_alpha, d_model], and the alphas. With lists of prompts (pairs a[i], b[i], all of one
    length) every path runs in the same batches and the outputs get a leading [n_pairs] dimension."""
    several = not isinstance(prompt_a, (str, Tensor))
    a_list, b_list = (list(prompt_a), list(prompt_b)) if several else ([prompt_a], [prompt_b])
    if len(a_list) != len(b_list) or not a_list:
        raise ValueError(f"need as many prompts b as prompts a (and at least one), got {len(a_list)} and {len(b_list)}")
    toks = [_check_prompt(model, p) for p in a_list + b_list]
    if len({t.shape[1] for t in toks}) != 1:
        raise ValueError("the two prompts must have the same number of tokens (with lists: every prompt), got "
                         f"{sorted({t.shape[1] for t in toks})}")
    ta, tb = torch.cat(toks[:len(a_list)]), torch.cat(toks[len(a_list):])
    layer = I.check_layer(model, int(layer), allow_final=True)
    alphas = torch.as_tensor(np.asarray(alphas, dtype=np.float32))
    if alphas.ndim != 1 or len(alphas) < 2:
        raise ValueError("alphas must be a 1-D sequence of at least two values")
    name = I.resid_name(model, layer)
    ends = _run_until(model, torch.cat([ta, tb]), [name], layer)[name][:, 1:]  # [2 n_pairs, pos - 1, d]
    a = alphas.to(device=ends.device, dtype=ends.dtype)[None, :, None, None]
    path = ((1 - a) * ends[:len(ta), None] + a * ends[len(ta):, None]).flatten(0, 1)  # [n_pairs n_alpha, pos - 1, d]
    tokens = ta.repeat_interleave(len(alphas), dim=0)
    logits, finals = [], []
    for start in range(0, len(path), batch_size):
        chunk = path[start:start + batch_size]
        store: dict[str, Tensor] = {}

        def write(act: Tensor, hook: Any = None, chunk: Tensor = chunk) -> Tensor:
            act[:, 1:] = chunk.to(act.device, act.dtype)
            return act

        def keep(act: Tensor, hook: Any = None) -> None:
            store["final"] = act[:, -1].detach().clone()

        out = model.run_with_hooks(tokens[start:start + batch_size],
                                   fwd_hooks=[(name, write), (_final_hook_name(model), keep)])
        logits.append(out[:, -1].float())
        finals.append(store["final"].float())
    logits = torch.cat(logits).reshape(len(ta), len(alphas), -1)
    finals = torch.cat(finals).reshape(len(ta), len(alphas), -1)
    if not several:
        logits, finals = logits[0], finals[0]
    return {"logits": logits, "final": finals, "alphas": alphas}


def relative_position(final: Tensor) -> Tensor:
    """Where each point of a path sits between its endpoints: d0 / (d0 + d1) with d0, d1 the L2 distances
    to the first and last rows of final [n, d]. A straight path gives exactly alpha; a flat region with a
    sharp boundary gives a step."""
    if final.ndim != 2 or final.shape[0] < 2:
        raise ValueError(f"final must be [n >= 2, d], got {tuple(final.shape)}")
    d0 = (final - final[0]).norm(dim=-1)
    d1 = (final - final[-1]).norm(dim=-1)
    total = d0 + d1
    return torch.where(total > 0, d0 / total.clamp_min(1e-30), torch.full_like(total, 0.5))


def transition_width(alphas, u, low: float = 0.1, high: float = 0.9) -> float:
    """Length of alpha over which a 0 -> 1 curve u goes from `low` to `high` (0.8 for u = alpha; near 0 for a
    step). Uses the first crossings, linearly interpolated."""
    a, y = _curve(alphas, u)
    lo, hi = blowup_step(a, y, low), blowup_step(a, y, high)
    return float(hi - lo) if np.isfinite(lo) and np.isfinite(hi) else float("nan")


def count_jumps(alphas, u, factor: float = 3.0) -> int:
    """How many separate stretches of a path rise faster than `factor` x the straight-line slope: 1 for
    one sharp boundary, more when the path crosses several regions, 0 for a smooth blend."""
    a, y = _curve(alphas, u)
    mean = (y[-1] - y[0]) / (a[-1] - a[0])
    if mean <= 0:
        return 0
    steep = np.abs(np.diff(y) / np.diff(a)) > factor * abs(mean)
    return int(np.sum(steep[1:] & ~steep[:-1]) + steep[0])


# ---------------------------------------------------------------------------------------------
# discrete output states


def output_features(logits: Tensor, top_k: int = 10) -> tuple[np.ndarray, list[int]]:
    """Next-token log-probabilities [n, n_tokens] restricted to the union of every row's top-k tokens (the
    rest of the vocabulary is noise for clustering), and those token ids."""
    logp = logits.float().log_softmax(-1)
    ids = sorted(set(logp.topk(top_k, dim=-1).indices.flatten().tolist()))
    return logp[:, ids].cpu().numpy(), ids
