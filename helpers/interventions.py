"""Hook utilities on top of TransformerLens: read, steer, patch, compare.

Conventions (compatibility mode, see notebooks/README.md):
- "layer L" of the residual stream means the stream *entering* block L (``blocks.L.hook_resid_pre``), for
  L = 0 .. n_layers; L = n_layers is the stream after the last block (``blocks.{n-1}.hook_resid_post``).
- Batches of prompts are left-padded, so position -1 is every prompt's last real token.
- Every function takes a prompt, a list of prompts, or a [batch, pos] token tensor.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Inputs = Union[str, Sequence[str], Tensor]
Positions = Union[int, Sequence[int], slice, None]

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
def to_tokens(model, inputs: Inputs, padding_side: str = "left") -> Tensor:
    """[batch, pos] tokens, BOS prepended, left-padded so position -1 is each prompt's last token."""
    if isinstance(inputs, Tensor):
        tokens = inputs if inputs.ndim == 2 else inputs.unsqueeze(0)
        return tokens.to(model.cfg.device)
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, Sequence) or not all(isinstance(p, str) for p in inputs) or len(inputs) == 0:
        raise TypeError("inputs must be a prompt, a non-empty list of prompts, or a [batch, pos] token tensor")
    return model.to_tokens(list(inputs), padding_side=padding_side)


def attention_mask(model, tokens: Tensor) -> Tensor:
    """1 where a token is real, 0 on left padding (a leading BOS that shares the pad id stays 1)."""
    from transformer_lens.utilities.tokenize_utils import get_attention_mask

    return get_attention_mask(model.tokenizer, tokens, prepend_bos=bool(model.cfg.default_prepend_bos),
                              padding_side="left")


def _forward(model, tokens: Tensor, **kwargs: Any) -> Tensor:
    return model(tokens, attention_mask=attention_mask(model, tokens), **kwargs)


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


@torch.no_grad()
def residual_stream(model, inputs: Inputs, layers: Sequence[int] | None = None, pos: Positions = -1,
                    batch_size: int = 32) -> Tensor:
    """Residual stream at `layers` (default all 0..n_layers): [n_sel_layers, batch, d_model] for an int
    `pos`, [n_sel_layers, batch, n_pos, d_model] for a list of positions or pos=None (all)."""
    tokens = to_tokens(model, inputs)
    layers = list(range(n_layers(model) + 1)) if layers is None else [check_layer(model, l, True) for l in layers]
    names = [resid_name(model, l) for l in layers]
    chunks = []
    for start in range(0, tokens.shape[0], batch_size):
        _, cache = run_with_cache(model, tokens[start:start + batch_size], names)
        stack = torch.stack([cache[n] for n in names])  # [layers, batch, pos, d]
        chunks.append(stack if pos is None else stack[:, :, pos])
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def logits(model, inputs: Inputs, pos: Positions = -1) -> Tensor:
    """Logits at `pos` ([batch, vocab] for an int)."""
    out = _forward(model, to_tokens(model, inputs))
    return out if pos is None else out[:, pos]


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
def _positions_index(pos: Positions):
    if pos is None:
        return slice(None)
    if isinstance(pos, slice):
        return pos
    return [pos] if isinstance(pos, int) else list(pos)


def steering_hook(vector: Tensor, scale: float = 1.0, pos: Positions = None) -> Callable:
    """A hook function adding scale * vector ([d_model], or [batch, d_model]) at positions `pos`."""
    index = _positions_index(pos)

    def hook(resid: Tensor, hook: Any = None) -> Tensor:
        v = (scale * vector).to(resid.dtype).to(resid.device)
        if v.ndim == 2:  # per-prompt vectors
            v = v[:, None, :]
        resid[:, index] = resid[:, index] + v
        return resid

    return hook


def _check_vector(model, vector: Tensor) -> Tensor:
    if not isinstance(vector, Tensor):
        vector = torch.as_tensor(vector, dtype=torch.float32)
    if vector.shape[-1] != model.cfg.d_model:
        raise ValueError(f"vector has last dimension {vector.shape[-1]}, the model's d_model is {model.cfg.d_model}")
    return vector


@torch.no_grad()
def add_vector(model, inputs: Inputs, vector: Tensor, layer: int, scale: float = 1.0,
               pos: Positions = None, return_pos: Positions = -1) -> Tensor:
    """Logits (at `return_pos`) with scale * vector added to the residual stream entering `layer`
    at positions `pos` (default: every position)."""
    vector = _check_vector(model, vector)
    tokens = to_tokens(model, inputs)
    out = model.run_with_hooks(tokens, fwd_hooks=[(resid_name(model, layer), steering_hook(vector, scale, pos))],
                               attention_mask=attention_mask(model, tokens))
    return out if return_pos is None else out[:, return_pos]


@contextmanager
def steering(model, vector: Tensor, layer: int, scale: float = 1.0, pos: Positions = None) -> Iterator[None]:
    """Keep a steering vector in place for everything run inside the block (e.g. `model.generate`)."""
    vector = _check_vector(model, vector)
    with model.hooks(fwd_hooks=[(resid_name(model, layer), steering_hook(vector, scale, pos))]):
        yield


@torch.no_grad()
def patch(model, inputs: Inputs, source: dict[str, Tensor], pos: Positions = None,
          return_pos: Positions = -1) -> Tensor:
    """Logits of `inputs` with the named activations replaced by `source[name]` (same shape, e.g. from
    `run_with_cache` on another prompt of the same length) at positions `pos` (default: all)."""
    index = _positions_index(pos)
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
