"""Weight editing: a ROME-style rank-one edit of an MLP output matrix (keys, values, the closed-form update)
and reading an edit back from ΔW alone.

    k = editing.subject_key(hf, tok, prompts, subject, layer); C = editing.second_moment(editing.mlp_keys(hf, tok, texts, layer)[0])
    delta = editing.optimize_value(hf, tok, prompts, subject, target, layer)     # v* = W k + delta
    dW = editing.rome_edit(W, k, W @ k + delta, C); editing.read_back(dW, probe_keys)

References: Meng et al. 2022 (ROME, eq. 2; kmeng01/rome). Works on the raw model of `helpers.load_hf()`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from helpers.interventions import module_input
from helpers.finetune import Prefix, _frozen, get_module, get_weight, make_batch, mlp_out_name, single_token_id
from helpers.geometry import Svd, _matrix, effective_rank, numerical_rank, one_thread, random_orthonormal, right_vectors, svd

@torch.no_grad()
def mlp_keys(model, tokenizer, prompts: Sequence[str], layer: int, skip_first: bool = True) -> tuple[Tensor, list[tuple[int, int]]]:
    """Inputs of the MLP output matrix ("keys", [n_tokens, d_mlp]) at every token of every prompt, and
    (prompt index, position) of each row. The forward pass stops at that layer."""
    module = get_module(model, mlp_out_name(model, layer))
    keys, where = [], []
    for i, p in enumerate(prompts):
        ids = tokenizer(p, return_tensors="pt")["input_ids"].to(module.weight.device)
        k = module_input(model, module, input_ids=ids, use_cache=False)[0][0].float().cpu()
        start = 1 if skip_first and k.shape[0] > 1 else 0
        keys.append(k[start:])
        where += [(i, t) for t in range(start, k.shape[0])]
    return torch.cat(keys), where


def subject_position(tokenizer, prompt: str, subject: str) -> int:
    """Index of the subject's last token in `prompt` (tokenized without special tokens)."""
    at = prompt.find(subject)
    if at < 0:
        raise ValueError(f"subject {subject!r} is not in {prompt!r}")
    n = len(tokenizer(prompt[: at + len(subject)], add_special_tokens=False)["input_ids"])
    n_bos = len(tokenizer(prompt)["input_ids"]) - len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return n - 1 + n_bos


def second_moment(keys: Tensor, shrink: float = 0.1) -> Tensor:
    """C = E[k k^T] over rows of `keys`, shrunk toward its mean eigenvalue (few samples, many dims)."""
    if not 0 <= shrink <= 1:
        raise ValueError("shrink must be in [0, 1]")
    k = keys.double()
    C = k.T @ k / k.shape[0]
    return ((1 - shrink) * C + shrink * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)).float()


def rome_edit(W, key: Tensor, value: Tensor, C: Tensor | None = None) -> Tensor:
    """The rank-one ΔW = (v - W k) (C^{-1} k)^T / (k^T C^{-1} k) (Meng et al. 2022, eq. 2) so that
    (W + ΔW) k = v exactly, while keys C^{-1}-orthogonal to k are untouched. C = None: the identity."""
    W = _matrix(W)
    key, value = torch.as_tensor(key).float().flatten().cpu(), torch.as_tensor(value).float().flatten().cpu()
    if key.shape[0] != W.shape[1] or value.shape[0] != W.shape[0]:
        raise ValueError(f"key {tuple(key.shape)} / value {tuple(value.shape)} do not fit W {tuple(W.shape)}")
    with one_thread():
        u = key.double() if C is None else torch.linalg.solve(_matrix(C).double(), key.double())
    denom = u @ key.double()
    if denom.abs() < 1e-12:
        raise ValueError("k^T C^{-1} k is zero: the key is empty")
    resid = value.double() - W.double() @ key.double()
    return (torch.outer(resid, u) / denom).float()


def optimize_value(model, tokenizer, prompts: Sequence[str], subject: str, target: str, layer: int,
                   steps: int = 25, lr: float = 0.5, max_norm_factor: float = 4.0, weight_decay: float = 0.05,
                   stop_loss: float = 0.05) -> Tensor:
    """The residual vector δ that, added to block `layer`'s MLP output at the subject's last token of
    every prompt, makes `target` the next token (ROME's v* = W k* + δ). Adam on δ, stopping once the
    cross-entropy is below `stop_loss`; δ is clamped to `max_norm_factor` x the output's norm. Returns δ [d_model]."""
    name = mlp_out_name(model, layer)
    module = get_module(model, name)
    tgt = torch.full((len(prompts),), single_token_id(tokenizer, target))
    batch = make_batch(tokenizer, prompts, [target] * len(prompts), device=module.weight.device)
    n_pad = (batch.attention_mask == 0).sum(-1)
    subj = torch.tensor([subject_position(tokenizer, p, subject) for p in prompts]) + n_pad.cpu()
    d_model = get_weight(model, name).shape[0]
    delta = torch.zeros(d_model, requires_grad=True)
    prefix = Prefix(model, batch, start_layer=layer)
    rows = torch.arange(len(prompts))
    holder = {}

    def hook(mod, args, out):
        holder.setdefault("norm", out[rows, subj].detach().norm(dim=-1).mean().cpu())   # δ lives on the CPU
        out = out.clone()
        out[rows, subj] = out[rows, subj] + delta.to(device=out.device, dtype=out.dtype)
        return out

    handle = module.register_forward_hook(hook)
    opt = torch.optim.Adam([delta], lr=lr)
    try:
        with _frozen(model):
            for _ in range(steps):
                logits = prefix.logits(model)
                ce = nn.functional.cross_entropy(logits, tgt.to(logits.device))
                if ce.item() < stop_loss:
                    break
                loss = ce + weight_decay * delta.norm() ** 2 / d_model
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():  # ROME clamps δ to a multiple of the original output's norm
                    limit = max_norm_factor * holder["norm"]
                    if delta.norm() > limit:
                        delta.mul_(limit / delta.norm())
    finally:
        handle.remove()
    return delta.detach()


def subject_key(model, tokenizer, prompts: Sequence[str], subject: str, layer: int) -> Tensor:
    """k*: the MLP-output-matrix input at the subject's last token, averaged over `prompts`."""
    keys, where = mlp_keys(model, tokenizer, prompts, layer, skip_first=False)
    pos = [subject_position(tokenizer, p, subject) for p in prompts]
    rows = [j for j, (i, t) in enumerate(where) if t == pos[i]]
    return keys[rows].mean(0)


@dataclass
class ReadBack:
    """What ΔW alone says about an edit."""

    rank: int
    effective_rank: float
    key_scores: Tensor          # |projection| (or |cosine|) of every probe key with ΔW's input direction
    top_rows: list[int]         # probe rows, best first
    written: Tensor             # ΔW @ (the best-matching probe key): the vector it writes there


def read_back(dW, probe_keys: Tensor, top: int = 10, cosine: bool = False) -> ReadBack:
    """From ΔW only (a matrix or its Svd): its rank, effective rank, which probe keys its input (right
    singular) direction responds to most, and what it writes for the strongest one (ΔW @ k, sign included).

    cosine=True scores keys by |cos| with the direction instead of |projection|: a projection favours
    keys with large norms, which any direction, even a random one, picks up."""
    d = svd(dW)                                    # one SVD for the rank, the spectrum and the direction
    if probe_keys.ndim != 2 or probe_keys.shape[1] != d.shape[1]:
        raise ValueError(f"probe_keys must be [n, {d.shape[1]}], got {tuple(probe_keys.shape)}")
    keys = probe_keys.float().cpu()
    v = right_vectors(d, 1)[:, 0]
    scores = (keys @ v).abs()
    if cosine:
        scores = scores / keys.norm(dim=1).clamp_min(1e-12)
    order = scores.argsort(descending=True)[:top].tolist()
    written = d.U @ (d.S * (d.Vh @ keys[order[0]]))
    return ReadBack(numerical_rank(d), effective_rank(d), scores, order, written)


def random_rank_one(shape: tuple[int, int], norm: float, generator: torch.Generator | None = None) -> Svd:
    """A rank-one matrix norm * u v^T with Haar-random unit u, v, as its Svd (dense: `U * S @ Vh`):
    the random control for a rank-one edit of equal norm."""
    out, inp = shape
    if not norm > 0:
        raise ValueError(f"norm must be > 0, got {norm!r}")
    u, v = random_orthonormal(out, 1, generator), random_orthonormal(inp, 1, generator)
    return Svd(u, torch.tensor([float(norm)]), v.T)


@contextmanager
def adding_to_output(model, name: str, vector: Tensor, positions: Tensor) -> Iterator[None]:
    """While inside, add `vector` [d_out] to module `name`'s output at `positions` (one index per batch row)."""
    module = get_module(model, name)
    positions = torch.as_tensor(positions).long()

    def hook(mod, args, out):
        if out.shape[0] != positions.shape[0]:
            raise ValueError(f"{positions.shape[0]} positions for a batch of {out.shape[0]}")
        out = out.clone()
        rows = torch.arange(out.shape[0])
        out[rows, positions] = out[rows, positions] + vector.to(out.dtype).to(out.device)
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def unique_keys(keys: Tensor, labels) -> tuple[Tensor, np.ndarray]:
    """Drop bitwise-identical key rows (a causal model gives the same key to the same prefix), keeping the
    first; a kept row is positive if any of its copies was. Returns (keys, labels)."""
    labels = np.asarray(labels, dtype=bool)
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    inverse = inverse.cpu().numpy()
    lab = np.zeros(len(uniq), dtype=bool)
    np.logical_or.at(lab, inverse, labels)
    return uniq, lab
