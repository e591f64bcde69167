"""Faster TransformerLens bridge forwards: fused attention, single-pass norms and a bias-free unembedding
whenever no hook needs the slow path.

In compatibility mode TransformerLens (4.3) pays for hook points that nobody may be using (issue 24):

1. **Attention** is recomputed step by step (scores, mask, softmax, NaN scrub, pattern) so that
   ``hook_attn_scores`` and ``hook_pattern`` can fire. That rules out PyTorch's fused
   ``scaled_dot_product_attention`` (SDPA). `install` gives each attention layer a forward that, **when
   neither of those two hook points has a hook** (and the layer is not training with dropout), computes the
   same attention with SDPA. Every other hook point fires as before (``hook_q``, ``hook_k``, ``hook_v``,
   ``hook_rot_q``, ``hook_rot_k``, ``hook_z``, the attention's ``hook_out``, the residual stream), with the
   bridge's mask semantics: the mask is built by the layer's own ``_apply_reconstruct_attention_mask`` and a
   query that sees no key (a left pad) gets a zero output, as the bridge's NaN scrub gives it. Hooking or
   caching a pattern (``run_with_cache`` without a names filter, notebook 11) sends that layer back to the
   step-by-step path for that call. SDPA computes the same attention with another kernel (a blocked, online
   softmax), so in float32 the logits move by rounding: max |Δ| 6e-5 on a 4 x 64 batch and 1.9e-4 on an
   8 x 128 one, of logits up to ~35, for SmolLM2-135M, the same as between the raw Hugging Face model's own
   SDPA and eager attention (tests hold it to 1e-5 x the largest logit). The fused path runs in float32 and
   float64 only: TransformerLens rounds scores and patterns to a half-precision model's dtype, SDPA does not,
   so bf16/fp16 models keep the step-by-step attention.
2. **The unembedding** of a folded model carries a bias of zeros, and adding it means broadcasting it over
   the whole [tokens, vocabulary] output first (~3% of a forward pass for SmolLM2). While that bias is all
   zeros and nothing hooks the Hugging Face head itself, the head's matrix product runs without it: on CPU
   bit-identical logits (tested; on CUDA a bias epilogue may round differently).
3. **Norms** compute the normalisation twice: once to fire ``hook_scale`` / ``hook_normalized``, then the
   Hugging Face module's own forward, whose output is returned. When neither hook point has a hook, the
   single-pass norm calls only the Hugging Face module: bit-identical output.

`load_model(fast=False)` or `uninstall(model)` gives TransformerLens's own paths everywhere.
Architectures with features the fused attention does not reproduce (soft-capping, attention sinks, gated
queries, Q/K clipping, partial or interleaved rotary, pre-reshape Q/K norms, split-QKV inputs) keep the
step-by-step attention, and so does every call inside a torch.func transform or a forward-mode AD level
(PyTorch 2.13 has no forward-mode derivative for SDPA on CPU; notebook 03's Jacobians use `torch.func.jvp`).

Also on the step-by-step path: any call while a hook sits on the attention module itself (a hook there may
read the pattern it returns; the fused layer returns None in its place), while a global module hook is
registered, or once compatibility mode is off. `output_attentions=True` (which `run_with_cache` always
passes) does not force the slow path: the bridge's forward returns logits only, and transformers collects
attention weights by hooking its own attention modules (`LlamaAttention` ...), which the bridge wraps but
never calls, so neither path returns them.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.nn.functional as F


def _bridge_classes() -> dict[str, tuple[type, ...]]:
    """The TransformerLens component classes each fast path replaces the forward of (exact types only)."""
    from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )
    from transformer_lens.model_bridge.generalized_components.rms_normalization import RMSNormalizationBridge
    from transformer_lens.model_bridge.generalized_components.unembedding import UnembeddingBridge

    return {"attention": (PositionEmbeddingsAttentionBridge,), "norm": (NormalizationBridge, RMSNormalizationBridge),
            "unembed": (UnembeddingBridge,)}


def _components(model) -> dict[str, list]:
    """The model's attention layers, norms and unembedding, by kind, in one walk over its modules."""
    kinds = _bridge_classes()
    found: dict[str, list] = {kind: [] for kind in kinds}
    for m in model.modules():
        for kind, classes in kinds.items():
            if type(m) in classes:
                found[kind].append(m)
    return found


def _attention_layers(model) -> list:
    return _components(model)["attention"]


def why_not(attn) -> str | None:
    """Why this attention layer cannot use the fused path at all (None: it can)."""
    hf = attn.original_component
    cfg = attn.config
    if hf is None:
        return "no original component"
    if not getattr(attn, "compatibility_mode", False):
        return "not in compatibility mode (its mask semantics differ)"
    if not attn.is_causal or attn.is_cross_attention:
        return "not causal self-attention"
    for attr in ("attn_logit_softcapping", "sinks", "key_multiplier"):
        if getattr(hf, attr, None) is not None:
            return f"the attention has {attr}"
    if getattr(getattr(hf, "config", None), "clip_qkv", None) is not None:
        return "clip_qkv"
    rope = getattr(getattr(hf, "config", None), "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
        return "llama-4 query scaling"
    for flag in ("gated_q_proj", "rotary_interleaved_cos_sin", "rotary_adjacent_pairs", "qk_norm_after_rope"):
        if getattr(cfg, flag, False):
            return flag
    if attn._modules.get("gate") is not None:
        return "a gate on the attention output"
    if attn._qk_norm_phase not in (None, "post_reshape"):
        return f"Q/K norm phase {attn._qk_norm_phase!r}"
    if type(attn)._pre_output_projection is not _bridge_classes()["attention"][0]._pre_output_projection:
        return "a sub-layer before the output projection"
    if not hasattr(hf, "head_dim"):
        return "no head_dim"
    return None


def _has_hooks(module: torch.nn.Module | None) -> bool:
    return module is not None and bool(module._forward_hooks or module._forward_pre_hooks
                                       or module._backward_hooks or module._backward_pre_hooks)


def _transformed() -> bool:
    """Inside torch.func (jvp, vmap, jacfwd ...) or a forward-mode AD dual level."""
    from torch.autograd import forward_ad

    return torch._C._functorch.maybe_current_level() is not None or forward_ad._current_level >= 0


def _global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks)


def _fused_now(attn, kwargs: dict, hidden_states: Any) -> bool:
    """Whether this call may take the fused path (checked on every call: hooks come and go)."""
    if _has_hooks(getattr(attn, "hook_attn_scores", None)) or _has_hooks(getattr(attn, "hook_pattern", None)):
        return False
    if _has_hooks(attn) or _global_hooks() or not attn.compatibility_mode:
        return False
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dtype not in (torch.float32, torch.float64):
        return False
    if _transformed():  # forward-mode AD through SDPA is not implemented on CPU (torch 2.13)
        return False
    cfg = attn.config
    if any(getattr(cfg, f, False) for f in ("use_split_qkv_input", "use_attn_in", "use_attn_result")):
        return False
    if attn.training and getattr(attn.original_component, "attention_dropout", 0.0) > 0:
        return False
    pe = kwargs.get("position_embeddings")
    head_dim = attn.original_component.head_dim
    return isinstance(pe, tuple) and len(pe) == 2 and pe[0].shape[-1] == head_dim


_LAST_MASK: dict[str, tuple] = {}  # the last mask checked (weak reference, version, shape) and the answer


def _plain_causal(attn, mask: torch.Tensor | None, q_len: int, kv_len: int) -> bool:
    """True when `mask` hides exactly the future (no padding, no sliding window): SDPA's is_causal then."""
    if q_len != kv_len:
        return False
    if mask is None:
        return True
    key = (mask._version, tuple(mask.shape), str(mask.device))  # an in-place edit bumps _version
    last = _LAST_MASK.get("mask")
    if last is not None and last[0]() is mask and last[1] == key:  # every layer gets the same mask in one forward
        return last[2]
    ok = False
    if mask.ndim == 4 and mask.shape[-2] == q_len and mask.shape[-1] == kv_len:
        future = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).triu(1)
        if mask.dtype == torch.bool:
            ok = bool((mask == ~future).all())  # True = may attend
        else:
            hidden = mask <= torch.finfo(mask.dtype).min / 2
            ok = bool((hidden == future).all() and (mask.masked_fill(future, 0) == 0).all())
    _LAST_MASK["mask"] = (weakref.ref(mask), key, ok)
    return ok


def _fused_forward(self, *args: Any, **kwargs: Any) -> Any:
    """The bridge's attention forward with SDPA in place of scores -> softmax -> pattern."""
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
    if not _fused_now(self, kwargs, hidden_states):
        return type(self).forward(self, *args, **kwargs)
    hf_attn = self.original_component
    kwargs.pop("hidden_states", None)
    position_embeddings = kwargs.pop("position_embeddings")
    attention_mask = kwargs.pop("attention_mask", None)
    hidden_states = self.hook_in(hidden_states)
    input_shape = hidden_states.shape[:-1]
    head_dim = hf_attn.head_dim
    shape = (*input_shape, -1, head_dim)
    q = self.q(hidden_states).view(shape).transpose(1, 2)
    k = self.k(hidden_states).view(shape).transpose(1, 2)
    v = self.v(hidden_states).view(shape).transpose(1, 2)
    if "q_norm" in self.submodules and self._qk_norm_phase == "post_reshape":  # Gemma-3: norm per head
        flip = self._qk_norm_per_head
        q = self.hook_q_normed(self.q_norm(q.transpose(1, 2)).transpose(1, 2) if flip else self.q_norm(q))
        if "k_norm" in self.submodules:
            k = self.hook_k_normed(self.k_norm(k.transpose(1, 2)).transpose(1, 2) if flip else self.k_norm(k))
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = self._apply_position_embedding_hooks(position_embeddings)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if hasattr(self, "hook_rot_q"):
        q = self.hook_rot_q(q)
    if hasattr(self, "hook_rot_k"):
        k = self.hook_rot_k(k)
    k, v = self._update_kv_cache(k, v, **kwargs)
    q_len, kv_len = q.shape[-2], k.shape[-2]
    scale = getattr(hf_attn, "scaling", head_dim ** -0.5)
    gqa = k.shape[1] != q.shape[1]
    if _plain_causal(self, attention_mask, q_len, kv_len):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:  # padding, a sliding window or a cache: the bridge's own mask, as additive -inf
        mask = self._apply_reconstruct_attention_mask(
            torch.zeros(1, 1, q_len, kv_len, dtype=q.dtype, device=q.device), attention_mask, kv_len, q_len)
        blind = torch.isneginf(mask).all(dim=-1, keepdim=True)  # queries that see no key (left pads)
        any_blind = bool(blind.any())
        if any_blind:
            mask = mask.masked_fill(blind, 0.0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        if any_blind:
            out = out.masked_fill(blind, 0.0)
    out = out.transpose(1, 2).reshape(*input_shape, -1)
    o_weight = getattr(getattr(self.o, "original_component", None), "weight", None)
    if isinstance(o_weight, torch.Tensor) and o_weight.dtype.is_floating_point and out.dtype != o_weight.dtype:
        out = out.to(o_weight.dtype)
    return self.hook_out(self.o(out)), None


def _single_pass_now(norm) -> bool:
    """Whether TransformerLens's own norm forward would return the Hugging Face module's output unchanged."""
    native = norm.use_native_layernorm_autograd or getattr(norm.config, "layer_norm_folding", False)
    return (native and not isinstance(norm.original_component, torch.nn.Identity)
            and not _has_hooks(norm.hook_scale) and not _has_hooks(norm.hook_normalized) and not _global_hooks())


def _single_pass_norm_forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The bridge's norm forward without the second, hook-only normalisation (same output, bit for bit)."""
    if not _single_pass_now(self):
        return type(self).forward(self, hidden_states, **kwargs)
    x = self.hook_in(hidden_states)
    result = self.original_component(x)
    if result.dtype != x.dtype:
        result = result.to(x.dtype)
    return self.hook_out(result)


def _zero_bias(unembed, head: torch.nn.Linear) -> bool:
    """The head has no bias or an all-zero one (checked again only after the bias changes: no GPU sync per call)."""
    bias = head.bias
    if bias is None:
        return True
    key = (bias.data_ptr(), bias._version)
    last = unembed.__dict__.get("_workbook_zero_bias")
    if last is None or last[0] != key:
        last = (key, not bool(bias.any()))
        unembed.__dict__["_workbook_zero_bias"] = last
    return last[1]


def _lean_unembed_forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The bridge's unembedding without adding a bias of zeros (same logits, bit for bit)."""
    head = self.original_component
    if kwargs or type(head) is not torch.nn.Linear or _has_hooks(head) or _global_hooks() or not _zero_bias(self, head):
        return type(self).forward(self, hidden_states, **kwargs)
    x = self.hook_in(hidden_states)
    return self.hook_out(F.linear(x, head.weight))


_FAST_FORWARDS = {"attention": _fused_forward, "norm": _single_pass_norm_forward, "unembed": _lean_unembed_forward}


def install(model) -> dict[str, int]:
    """Give every eligible attention layer, norm and unembedding of `model` its fast path; returns how many got one."""
    counts = {}
    for kind, modules in _components(model).items():
        chosen = [m for m in modules if kind != "attention" or why_not(m) is None]
        for m in chosen:  # into the instance's own __dict__ (the bridge's __setattr__ would hand it to the HF
            # module), as a partial (it pickles; a bound method does not)
            m.__dict__["forward"] = functools.partial(_FAST_FORWARDS[kind], m)
        counts[kind] = len(chosen)
    return counts


def uninstall(model) -> None:
    """Back to TransformerLens's own attention, norm and unembedding forwards everywhere."""
    for modules in _components(model).values():
        for m in modules:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_workbook_zero_bias", None)


def installed(model) -> dict[str, int]:
    """How many attention layers, norms and unembeddings of `model` take their fast path when no hook needs it."""
    return {kind: sum("forward" in m.__dict__ for m in modules) for kind, modules in _components(model).items()}
