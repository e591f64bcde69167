"""Hook utilities on top of TransformerLens: read, steer, patch, compare.

Conventions (compatibility mode, see notebooks/README.md):
- "layer L" of the residual stream means the stream *entering* block L (``blocks.L.hook_resid_pre``), for
  L = 0 .. n_layers; L = n_layers is the stream after the last block (``blocks.{n-1}.hook_resid_post``).
- Batches of prompts are left-padded (pads, then BOS, then the prompt).
- Positions (`pos`, `return_pos`) count inside each prompt, read off the attention mask: 0 is that prompt's
  BOS, 1 its first real token, -1 its last token, and ``slice(1, None)`` every real token after its BOS,
  whatever the padding. ``AFTER_BOS`` names that last set (the default of `add_vector` and `steering`);
  ``None`` means every real token, BOS included. Padding is never read or written. Only `patch`, which
  copies between two aligned token tensors, takes plain columns.
- Under `steering`, `model.generate` with its key/value cache is steered at the positions asked for at every
  step: the new token of each step is steered whenever the positions include it (AFTER_BOS, -1, ...).
- Every function takes a prompt, a list of prompts, or a [batch, pos] token tensor; a prompt longer than
  the model's context (``cfg.n_ctx``) raises ValueError at once.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Inputs = Union[str, Sequence[str], Tensor]
Positions = Union[int, Sequence[int], slice, str, None]

AFTER_BOS = "after_bos"   # every real token after each prompt's BOS (padding and BOS left alone)

HOOK_KINDS = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "resid_post": "blocks.{L}.hook_resid_post",
    "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "mlp_post": "blocks.{L}.mlp.hook_post",
    "z": "blocks.{L}.attn.hook_z",
    "q": "blocks.{L}.attn.hook_q",
    "k": "blocks.{L}.attn.hook_k",
    "v": "blocks.{L}.attn.hook_v",
    "pattern": "blocks.{L}.attn.hook_pattern",
}


# ---------------------------------------------------------------------------------------------
# names and checks
def n_layers(model) -> int:
    return int(model.cfg.n_layers)


def check_layer(model, layer: int, allow_final: bool = False) -> int:
    """Return `layer` (negative counts from the end) or raise IndexError naming the valid range."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__} {layer!r}")
    top = n_layers(model) + (1 if allow_final else 0)
    if not -top <= layer < top:
        raise IndexError(f"layer {layer} is out of range: valid layers are 0..{top - 1} "
                         f"(the model has {n_layers(model)} blocks)")
    return layer % top


def resid_name(model, layer: int) -> str:
    """Hook name of the residual stream entering block `layer` (layer = n_layers: after the last block)."""
    layer = check_layer(model, layer, allow_final=True)
    if layer == n_layers(model):
        return f"blocks.{layer - 1}.hook_resid_post"
    return f"blocks.{layer}.hook_resid_pre"


def hook_name(model, kind: str, layer: int) -> str:
    """Hook name of `kind` (one of HOOK_KINDS, or "resid" for `resid_name`) at block `layer`."""
    if kind == "resid":
        return resid_name(model, layer)
    if kind not in HOOK_KINDS:
        raise ValueError(f"unknown hook kind {kind!r}; choose from {['resid', *HOOK_KINDS]}")
    return HOOK_KINDS[kind].format(L=check_layer(model, layer))


# ---------------------------------------------------------------------------------------------
# tokens
def _check_length(model, tokens: Tensor) -> Tensor:
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and tokens.shape[-1] > n_ctx:
        raise ValueError(f"the input is {tokens.shape[-1]} tokens long (BOS included), longer than the model's "
                         f"context of {n_ctx} tokens (cfg.n_ctx): shorten the prompt or split it")
    return tokens


def to_tokens(model, inputs: Inputs, padding_side: str = "left") -> Tensor:
    """[batch, pos] tokens, BOS prepended, left-padded so position -1 is each prompt's last token.
    Raises ValueError when a prompt is longer than the model's context (nothing is silently truncated)."""
    if isinstance(inputs, Tensor):
        tokens = inputs if inputs.ndim == 2 else inputs.unsqueeze(0)
        return _check_length(model, tokens).to(model.cfg.device)
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, Sequence) or not all(isinstance(p, str) for p in inputs) or len(inputs) == 0:
        raise TypeError("inputs must be a prompt, a non-empty list of prompts, or a [batch, pos] token tensor")
    # truncate=False: the bridge would otherwise cut a long prompt at n_ctx and run it for minutes.
    return _check_length(model, model.to_tokens(list(inputs), padding_side=padding_side, truncate=False))


def attention_mask(model, tokens: Tensor) -> Tensor:
    """1 where a token is real, 0 on left padding (a leading BOS that shares the pad id stays 1)."""
    from transformer_lens.utilities.tokenize_utils import get_attention_mask

    return get_attention_mask(model.tokenizer, tokens, prepend_bos=bool(model.cfg.default_prepend_bos),
                              padding_side="left")


def _forward(model, tokens: Tensor, **kwargs: Any) -> Tensor:
    return model(tokens, attention_mask=attention_mask(model, tokens), **kwargs)


# ---------------------------------------------------------------------------------------------
# positions, counted inside each prompt
def _check_positions(pos: Positions) -> None:
    if pos is None or isinstance(pos, slice):
        return
    if isinstance(pos, str):
        if pos != AFTER_BOS:
            raise ValueError(f"unknown position name {pos!r}; use {AFTER_BOS!r} (or an int, a list, a slice, None)")
        return
    items = [pos] if isinstance(pos, int) else pos
    if isinstance(pos, bool) or not isinstance(items, Sequence) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in items):
        raise TypeError(f"pos must be an int, a list of ints, a slice, {AFTER_BOS!r} or None, got {pos!r}")


def position_mask(mask: Tensor, pos: Positions) -> Tensor:
    """[batch, seq] bool: the positions `pos` picks in each row of a [batch, seq] attention mask, counted
    inside each row's real tokens (0 = its BOS, -1 = its last token; see the module docstring). Padding is
    never picked. An int or a list of ints out of range for some row raises IndexError."""
    _check_positions(pos)
    real = mask.bool()
    if pos is None:
        return real
    rank = real.long().cumsum(1) - 1                   # index of each real token inside its own prompt
    n_real = real.sum(1, keepdim=True)                 # [batch, 1]
    if pos == AFTER_BOS:
        return real & (rank >= 1)
    if isinstance(pos, slice):
        out = torch.zeros_like(real)
        for n in n_real[:, 0].unique().tolist():       # rows of one length pick the same positions
            wanted = torch.zeros(int(n), dtype=torch.bool, device=real.device)
            wanted[pos] = True
            rows = n_real[:, 0] == n
            out[rows] = real[rows] & wanted[rank[rows].clamp(0, max(int(n) - 1, 0))]
        return out
    out = torch.zeros_like(real)
    for p in [pos] if isinstance(pos, int) else pos:
        target = torch.full_like(n_real, p) if p >= 0 else n_real + p
        if ((target < 0) | (target >= n_real)).any():
            raise IndexError(f"position {p} is outside a prompt of {int(n_real.min())} tokens (BOS included)")
        out |= real & (rank == target)
    return out


def _columns(mask: Tensor, pos: int | Sequence[int]) -> Tensor:
    """Column index of position `pos` (an int: [batch]; a list: [batch, k]) in each row, counted inside
    each row's real tokens."""
    single = isinstance(pos, int)
    cols = []
    for p in [pos] if single else list(pos):
        cols.append(position_mask(mask, p).float().argmax(1))
    return cols[0] if single else torch.stack(cols, 1)


def _take(out: Tensor, mask: Tensor, pos: Positions) -> Tensor:
    """`out[:, pos]` with `pos` counted inside each prompt ([batch, ...] for an int, [batch, k, ...] for a
    list). A slice or a position name needs rows of equal length: allowed only without padding."""
    if pos is None:
        return out
    _check_positions(pos)
    rows = torch.arange(out.shape[0], device=out.device)
    if isinstance(pos, int):
        return out[rows, _columns(mask, pos).to(out.device)]
    if isinstance(pos, (slice, str)):
        if not mask.bool().all():
            raise ValueError(f"pos={pos!r} picks a different number of tokens in each padded prompt: pass an int, a "
                             "list of ints, or pos=None and select with `attention_mask`")
        return out[:, position_mask(mask, pos)[0].to(out.device)]
    return out[rows[:, None], _columns(mask, pos).to(out.device)]


def token_id(model, word: str) -> int:
    """The id of `word` if it is exactly one token (mind the leading space: " Paris"), else ValueError."""
    ids = model.tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise ValueError(f"{word!r} is {len(ids)} tokens {pieces}, not one")
    return ids[0]


def is_single_token(model, word: str) -> bool:
    return len(model.tokenizer.encode(word, add_special_tokens=False)) == 1


# ---------------------------------------------------------------------------------------------
# reading
@torch.no_grad()
def run_with_cache(model, inputs: Inputs, names: str | Sequence[str] | Callable[[str], bool]) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and a dict of only the activations named (a name, a list of names, or a predicate)."""
    tokens = to_tokens(model, inputs)
    if isinstance(names, str):
        wanted = {names}
        names_filter: Callable[[str], bool] = wanted.__contains__
    elif callable(names):
        names_filter, wanted = names, set()
    else:
        wanted = set(names)
        names_filter = wanted.__contains__
    unknown = wanted - set(model.hook_dict)
    if unknown:
        raise KeyError(f"unknown hook names {sorted(unknown)}; see helpers.interventions.hook_name")
    logits, cache = model.run_with_cache(tokens, names_filter=names_filter,
                                         attention_mask=attention_mask(model, tokens))
    return logits, {k: v for k, v in cache.items() if names_filter(k)}


class StopForward(Exception):
    """Raised by a hook to end a forward pass early: see `run_until` and `module_input`."""


def run_until(model, tokens: Tensor, stop_at: str, fwd_hooks: Sequence[tuple[str, Callable]] = (), **kwargs: Any) -> None:
    """Run the model on `tokens` with `fwd_hooks`, and stop the forward pass right after the hooks at `stop_at`
    have run: the blocks above it (and the unembedding) are skipped. Hooks store what they need themselves.
    kwargs go to the model (e.g. `attention_mask=`). Works under torch.func transforms."""
    if stop_at not in model.hook_dict:
        raise KeyError(f"unknown hook name {stop_at!r}; see helpers.interventions.hook_name")

    def stop(act: Tensor, hook: Any = None) -> None:
        raise StopForward

    try:
        with model.hooks(fwd_hooks=list(fwd_hooks) + [(stop_at, stop)]):
            model(tokens, **kwargs)
    except StopForward:
        return
    raise RuntimeError(f"the forward pass never reached {stop_at!r}")


def module_input(model, module: torch.nn.Module, **inputs: Any) -> tuple:
    """The positional inputs of `module` in a forward pass of a plain PyTorch / Hugging Face `model` on
    `inputs`, stopping the pass there (nothing above the module runs)."""
    grabbed: dict[str, tuple] = {}

    def grab(mod: torch.nn.Module, args: tuple) -> None:
        grabbed["args"] = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        raise StopForward

    handle = module.register_forward_pre_hook(grab)
    try:
        model(**inputs)
    except StopForward:
        pass
    finally:
        handle.remove()
    if "args" not in grabbed:
        raise RuntimeError("the forward pass never reached the module")
    return grabbed["args"]


@torch.no_grad()
def residual_stream(model, inputs: Inputs, layers: Sequence[int] | None = None, pos: Positions = -1,
                    batch_size: int = 32) -> Tensor:
    """Residual stream at `layers` (default all 0..n_layers): [n_sel_layers, batch, d_model] for an int
    `pos`, [n_sel_layers, batch, n_pos, d_model] for a list of positions or pos=None (every column, padding
    included: select with `attention_mask`). Positions count inside each prompt (0 = its BOS, -1 = its last
    token), so they pick the same token of every prompt of a left-padded batch."""
    tokens = to_tokens(model, inputs)
    layers = list(range(n_layers(model) + 1)) if layers is None else [check_layer(model, l, True) for l in layers]
    names = [resid_name(model, l) for l in layers]
    _check_positions(pos)
    chunks = []
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start:start + batch_size]
        _, cache = run_with_cache(model, chunk, names)
        stack = torch.stack([cache[n] for n in names])  # [layers, batch, pos, d]
        if pos is None:
            chunks.append(stack)
        else:
            picked = _take(stack.permute(1, 2, 0, 3), attention_mask(model, chunk), pos)  # [batch, (k,) layers, d]
            chunks.append(picked.permute(1, 0, 2) if picked.ndim == 3 else picked.permute(2, 0, 1, 3))
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def logits(model, inputs: Inputs, pos: Positions = -1) -> Tensor:
    """Logits at `pos` ([batch, vocab] for an int; positions count inside each prompt)."""
    tokens = to_tokens(model, inputs)
    return _take(_forward(model, tokens), attention_mask(model, tokens), pos)


def unembed(model, resid: Tensor) -> Tensor:
    """Final norm then unembedding of residual-stream vectors [..., d_model] -> logits [..., vocab]."""
    shape = resid.shape
    flat = resid.reshape(-1, 1, shape[-1])  # the bridge's components expect [batch, pos, d]
    out = model.unembed(model.ln_final(flat))
    return out.reshape(*shape[:-1], out.shape[-1])


@torch.no_grad()
def logit_lens(model, inputs: Inputs, pos: int = -1) -> Tensor:
    """Log-probabilities read off the residual stream at every layer 0..n_layers: [n_layers+1, batch, vocab].
    The last row equals the model's own output."""
    resid = residual_stream(model, inputs, pos=pos)  # [L+1, batch, d]
    return unembed(model, resid).log_softmax(-1)


# ---------------------------------------------------------------------------------------------
# writing
def steering_hook(vector: Tensor, scale: float = 1.0, pos: Positions = None,
                  mask: Tensor | Callable[[], Tensor | None] | None = None) -> Callable:
    """A hook function adding scale * vector ([d_model], or [batch, d_model]) at positions `pos`, counted
    inside each prompt of `mask` ([batch, seq] attention mask of the whole sequence, or a function returning
    the current one; None: every column is a real token). When the hooked activation covers only the last
    T columns of the sequence (a key/value-cached generation step), those columns are the ones steered."""
    _check_positions(pos)

    def hook(resid: Tensor, hook: Any = None) -> Tensor:
        batch, width = resid.shape[:2]
        full = mask() if callable(mask) else mask
        if full is None or full.shape[0] != batch or full.shape[1] < width:
            full = torch.ones(batch, width, dtype=torch.long, device=resid.device)
        where = position_mask(full.to(resid.device), pos)[:, -width:]
        v = (scale * vector).to(resid.dtype).to(resid.device)
        if v.ndim == 2:  # per-prompt vectors
            v = v[:, None, :]
        return resid + where[..., None].to(resid.dtype) * v

    return hook


def _check_vector(model, vector: Tensor, scale: float = 1.0) -> Tensor:
    if not isinstance(vector, Tensor):
        vector = torch.as_tensor(vector, dtype=torch.float32)
    if vector.shape[-1] != model.cfg.d_model:
        raise ValueError(f"vector has last dimension {vector.shape[-1]}, the model's d_model is {model.cfg.d_model}")
    if not torch.isfinite(vector).all():
        bad = (~torch.isfinite(vector)).sum().item()
        raise ValueError(f"the steering vector has {bad} NaN or inf entries: it would turn every logit into NaN")
    try:
        finite = math.isfinite(float(scale)) and not isinstance(scale, bool)
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return vector


@torch.no_grad()
def add_vector(model, inputs: Inputs, vector: Tensor, layer: int, scale: float = 1.0,
               pos: Positions = AFTER_BOS, return_pos: Positions = -1) -> Tensor:
    """Logits (at `return_pos`) with scale * vector ([d_model], or [batch, d_model]: one per prompt) added
    to the residual stream entering `layer` at positions `pos` (default AFTER_BOS: every real token after
    each prompt's BOS). Positions count inside each prompt, so a left-padded batch is steered exactly as each
    prompt alone: ``slice(1, None)`` is the same as AFTER_BOS."""
    vector = _check_vector(model, vector, scale)
    tokens = to_tokens(model, inputs)
    if vector.ndim == 2 and vector.shape[0] != tokens.shape[0]:
        raise ValueError(f"{vector.shape[0]} vectors for {tokens.shape[0]} prompts")
    mask = attention_mask(model, tokens)
    out = model.run_with_hooks(tokens, fwd_hooks=[(resid_name(model, layer), steering_hook(vector, scale, pos, mask))],
                               attention_mask=mask)
    return _take(out, mask, return_pos)


def _call_mask(model, args: tuple, kwargs: dict) -> Tensor | None:
    """The attention mask of the whole sequence a forward call works on (cached columns included), or None
    when it cannot be told (then every column counts as a real token)."""
    given = kwargs.get("attention_mask")
    if isinstance(given, Tensor) and given.ndim == 2:
        return given
    if given is not None:       # a 4-D mask (packed prompts): no per-row positions to read
        return None
    tokens = args[0] if args else kwargs.get("input")
    if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.ndim != 2:
        return None
    new = attention_mask(model, tokens)
    past = kwargs.get("past_key_values")
    n_past = int(past.get_seq_length()) if past is not None and hasattr(past, "get_seq_length") else 0
    if n_past:
        new = torch.cat([torch.ones(new.shape[0], n_past, dtype=new.dtype, device=new.device), new], 1)
    return new


@contextmanager
def steering(model, vector: Tensor, layer: int, scale: float = 1.0, pos: Positions = AFTER_BOS) -> Iterator[None]:
    """Keep a steering vector in place for everything run inside the block (e.g. `model.generate`).

    Positions count inside each prompt and are read from each forward call's attention mask (default
    AFTER_BOS: every real token after BOS). Under `model.generate` with its key/value cache, every step's
    new token is steered too whenever `pos` includes it, so a steered generation equals, step by step, a
    full forward pass of the same tokens with the same steering."""
    vector = _check_vector(model, vector, scale)
    _check_positions(pos)
    state: dict[str, Tensor | None] = {}

    def before(module, args, kwargs):
        state["mask"] = _call_mask(model, args, kwargs)

    def after(module, args, kwargs, output):
        state.pop("mask", None)

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True, always_call=True)]
    try:
        with model.hooks(fwd_hooks=[(resid_name(model, layer), steering_hook(vector, scale, pos, lambda: state.get("mask")))]):
            yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def patch(model, inputs: Inputs, source: dict[str, Tensor], pos: Positions = None,
          return_pos: Positions = -1) -> Tensor:
    """Logits of `inputs` with the named activations replaced by `source[name]` (same shape, e.g. from
    `run_with_cache` on another prompt of the same length) at positions `pos` (default: all).

    Unlike the rest of this module, `pos` and `return_pos` here are plain columns of the token tensor: a
    patch copies between two aligned tensors (same width, same padding), column for column."""
    if pos is None:
        index: Any = slice(None)
    elif isinstance(pos, slice):
        index = pos
    else:
        index = [pos] if isinstance(pos, int) else list(pos)
    tokens = to_tokens(model, inputs)

    def make_hook(value: Tensor) -> Callable:
        def hook(act: Tensor, hook: Any = None) -> Tensor:
            if value.shape[1:] != act.shape[1:] or value.shape[0] not in (1, act.shape[0]):
                raise ValueError(f"patch for {hook.name if hook else '?'} has shape {tuple(value.shape)}, "
                                 f"the activation has {tuple(act.shape)}")
            act[:, index] = value.to(act.device, act.dtype).expand_as(act)[:, index]
            return act
        return hook

    unknown = set(source) - set(model.hook_dict)
    if unknown:
        raise KeyError(f"unknown hook names {sorted(unknown)}")
    out = model.run_with_hooks(tokens, fwd_hooks=[(n, make_hook(v)) for n, v in source.items()],
                               attention_mask=attention_mask(model, tokens))
    return out if return_pos is None else out[:, return_pos]


# ---------------------------------------------------------------------------------------------
# comparing outputs
def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(P || Q) over the last dimension, from logits; one number per row, in nats."""
    logp = F.log_softmax(logits_p.float(), dim=-1)
    logq = F.log_softmax(logits_q.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


def top_k_changes(model, logits_before: Tensor, logits_after: Tensor, k: int = 5):
    """The tokens whose probability rose and fell most (one prompt's [vocab] logits): a DataFrame."""
    import pandas as pd

    if logits_before.ndim != 1 or logits_after.shape != logits_before.shape:
        raise ValueError("pass one prompt's [vocab] logits, before and after")
    p0, p1 = logits_before.float().softmax(-1), logits_after.float().softmax(-1)
    delta = p1 - p0
    rows = []
    for direction, idx in (("up", delta.topk(k).indices), ("down", (-delta).topk(k).indices)):
        for i in idx.tolist():
            rows.append(dict(change=direction, token=model.tokenizer.decode([i]), p_before=p0[i].item(),
                             p_after=p1[i].item(), delta=delta[i].item()))
    return pd.DataFrame(rows)


def top_tokens(model, logits_row: Tensor, k: int = 5) -> list[tuple[str, float]]:
    """The k most likely next tokens and their probabilities, from one [vocab] row of logits."""
    probs = logits_row.float().softmax(-1)
    top = probs.topk(k)
    return [(model.tokenizer.decode([i]), p) for i, p in zip(top.indices.tolist(), top.values.tolist())]


def mean_difference(model, prompts_a: Sequence[str], prompts_b: Sequence[str], layer: int, pos: int = -1) -> Tensor:
    """Difference of mean residual streams (a minus b) entering `layer` at `pos`: a steering vector."""
    a = residual_stream(model, prompts_a, layers=[layer], pos=pos)[0]
    b = residual_stream(model, prompts_b, layers=[layer], pos=pos)[0]
    return a.mean(0) - b.mean(0)
