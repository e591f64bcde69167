"""Removing normalization layers (notebook 12): freeze each RMSNorm's per-token scale to a constant.

Heimersheim 2024, "You can remove GPT2's LayerNorm by fine-tuning" (arXiv 2409.13710, `ApolloResearch/gpt2_noLN`),
replaces every LayerNorm's per-token std by a constant (its average over the data), layer by layer, fine-tuning
between removals: MLP-input norms first, then attention-input norms, then the final norm, and last the special
treatment of the first position (BOS/EOT, whose norm is far from the average). Baroni et al. 2025
(`submarat/removing-layer-norm`) scale it to GPT-2 XL and recompute the average while a norm is still live.

Here the model is a Hugging Face llama/gemma3 (RMSNorm, no centring). Each norm module is wrapped by a
`FrozenNorm`: live, it is the original module; frozen, it computes gamma * x * scale, i.e. the per-token 1/rms replaced by the constant `scale` (1 / the average rms over non-BOS tokens), and
at position 0 by `bos_scale` while `bos_special` is on. Rows must start with BOS at position 0 and be
right-padded (never left-padded) for that position rule to hold.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from helpers.finetune import only_layers_from

EXPLODED = 1e3   # ours: a calibration token whose input rms exceeds this many times the median has exploded
ROLES = ("mlp_in", "attn_in", "other", "final")   # the paper's removal order: MLP inputs, attention inputs, final
ROLE_LABELS = {"mlp_in": "MLP input", "attn_in": "attention input", "other": "other (post/qk norms)", "final": "final"}


# ---------------------------------------------------------------------------------------------
# the wrapper
class FrozenNorm(nn.Module):
    """A norm module that can run live (the original) or with its per-token scale frozen to a constant."""

    def __init__(self, norm: nn.Module, name: str, role: str, layer: int):
        super().__init__()
        self.norm, self.name, self.role, self.layer = norm, name, role, layer
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        device = getattr(getattr(norm, "weight", None), "device", None)   # the wrapper is made after .to(device)
        self.register_buffer("scale", torch.tensor(float("nan"), device=device))      # 1 / mean rms over non-BOS tokens
        self.register_buffer("bos_scale", torch.tensor(float("nan"), device=device))  # 1 / rms at position 0
        self.frozen = False
        self.bos_special = True
        self.recording: list[Tensor] | None = None   # per-token rms [rows, positions] while calibrating
        self.seq_len: dict[str, int] = {}              # shared with the decoder's pre-hook (see install)

    def rms(self, x: Tensor) -> Tensor:
        """Root mean square over the last dimension (with the module's eps), shape [..., 1], float32."""
        return x.float().pow(2).mean(-1, keepdim=True).add(self.eps).sqrt()

    def forward(self, x: Tensor) -> Tensor:
        pos_dim = self._position_dim(x)
        if self.recording is not None:
            r = self.rms(x).detach().squeeze(-1)
            if x.dim() == 4:                                    # q/k norms: mean over heads
                r = r.mean(3 - pos_dim)
            self.recording.append(r)
        if not self.frozen:
            return self.norm(x)
        if not torch.isfinite(self.scale):
            raise RuntimeError(f"{self.name}: frozen before calibration (call normalization.calibrate first)")
        s = self.scale.expand(x.shape[pos_dim]).clone()
        if self.bos_special:
            s[0] = self.bos_scale
        shape = [1] * x.dim()
        shape[pos_dim] = -1
        s = s.view(shape)
        return x * (self.gain() * s).to(x.dtype)   # gamma * x * c: linear in x, no square that could overflow

    def gain(self) -> Tensor:
        """The norm's elementwise gain gamma, whatever its convention (llama: weight; gemma: 1 + weight), read off
        the module itself: norm(1) = gamma / sqrt(1 + eps). Differentiable in the module's weight."""
        ones = torch.ones(self.norm.weight.shape, device=self.norm.weight.device, dtype=torch.float32)
        return self.norm(ones) * math.sqrt(1.0 + self.eps)

    def _position_dim(self, x: Tensor) -> int:
        """1 for [batch, pos, d]; for per-head q/k norms [batch, heads, pos, d] (gemma3) or [batch, pos, heads, d]
        (qwen3), the dimension whose size is the sequence length the decoder was called with."""
        if x.dim() != 4:
            return 1
        T = self.seq_len.get("T")
        return 1 if (T is not None and x.shape[1] == T and x.shape[2] != T) else 2

    def extra_repr(self) -> str:
        return f"{self.name}, role={self.role}, frozen={self.frozen}, bos_special={self.bos_special}"


@dataclass
class Site:
    name: str     # module path, e.g. "model.layers.3.post_attention_layernorm"
    role: str     # one of ROLES
    layer: int    # decoder layer (n_layers for the final norm)


def _is_norm(module: nn.Module) -> bool:
    return "RMSNorm" in type(module).__name__ or isinstance(module, FrozenNorm)


def _device(model) -> torch.device:
    """Where the model's weights are (token tensors built on the CPU are moved there before a forward pass)."""
    return next(model.parameters()).device


def _batches(model, rows: Rows, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(tokens, mask) of `rows`, `batch_size` rows at a time, moved to the model's device."""
    dev = _device(model)
    for i in range(0, len(rows), batch_size):
        yield rows.tokens[i:i + batch_size].to(dev), rows.mask[i:i + batch_size].to(dev)


def _decoder(model) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
        raise TypeError("expected a Hugging Face causal LM with .model.layers and .model.norm (llama, gemma3, "
                        f"mistral, qwen2...); got {type(model).__name__}. Use helpers.load_hf, not load_model.")
    return inner


def norm_sites(model) -> list[Site]:
    """Every RMSNorm of the model, in the paper's removal order (MLP inputs by layer, attention inputs, other
    norms such as gemma3's post-norms and q/k norms, the final norm)."""
    inner = _decoder(model)
    if not _is_norm(inner.norm):
        raise TypeError(f"{type(model).__name__}'s final norm is a {type(inner.norm).__name__}: these helpers freeze "
                        "RMSNorm only (a LayerNorm also centres and adds a bias, which a frozen scale does not model)")
    sites: list[Site] = []
    for i, layer in enumerate(inner.layers):
        gemma_style = hasattr(layer, "pre_feedforward_layernorm")
        mlp_in = "pre_feedforward_layernorm" if gemma_style else "post_attention_layernorm"
        for sub, module in layer.named_modules():
            if not sub or not _is_norm(module) or sub.endswith(".norm"):
                continue
            role = "mlp_in" if sub == mlp_in else "attn_in" if sub == "input_layernorm" else "other"
            sites.append(Site(f"model.layers.{i}.{sub}", role, i))
    if not sites:
        raise TypeError(f"{type(model).__name__} has no RMSNorm modules to freeze")
    sites.append(Site("model.norm", "final", len(inner.layers)))
    order = {r: k for k, r in enumerate(ROLES)}
    return sorted(sites, key=lambda s: (order[s.role], s.layer, s.name))


def install(model) -> list[FrozenNorm]:
    """Wrap every norm of `model` in a live FrozenNorm (in place, idempotent); returns them in removal order.
    Live wrappers change nothing: the model computes exactly what it did."""
    wrappers = []
    inner = _decoder(model)
    seq_len = getattr(inner, "_frozen_norm_seq_len", None)
    if seq_len is None:
        seq_len = inner._frozen_norm_seq_len = {}

        def remember(_m, args, kwargs):
            x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
            if x is None and args:
                x = args[0]
            if x is not None:
                seq_len["T"] = x.shape[1]
        inner.register_forward_pre_hook(remember, with_kwargs=True)
    for site in norm_sites(model):
        parent_name, _, child = site.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        current = getattr(parent, child)
        if not isinstance(current, FrozenNorm):
            current = FrozenNorm(current, site.name, site.role, site.layer)
            setattr(parent, child, current)
        current.seq_len = seq_len
        wrappers.append(current)
    return wrappers


def norms(model) -> list[FrozenNorm]:
    """The installed FrozenNorm wrappers, in removal order (installs them if needed)."""
    return install(model)


def select(model, which: str | Sequence[str] = "all") -> list[FrozenNorm]:
    """Norms by role ('mlp_in', 'attn_in', 'other', 'final', 'all') or by exact module names."""
    ws = norms(model)
    if isinstance(which, str):
        if which == "all":
            return ws
        if which not in ROLES:
            raise ValueError(f"unknown norm group {which!r}; use one of {ROLES + ('all',)} or a list of names")
        return [w for w in ws if w.role == which]
    by_name = {w.name: w for w in ws}
    unknown = [n for n in which if n not in by_name]
    if unknown:
        raise ValueError(f"no norm named {unknown[0]!r}; names look like {ws[0].name!r}")
    return [by_name[n] for n in which]


# ---------------------------------------------------------------------------------------------
# data: rows that start with BOS, right-padded
@dataclass
class Rows:
    tokens: Tensor   # [n, T] int64, BOS at column 0, right-padded with pad_id
    mask: Tensor     # [n, T] bool, real tokens
    group: list[str]  # the unit a split keeps on one side (one per row)

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, idx: Sequence[int] | np.ndarray) -> "Rows":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return Rows(self.tokens[idx], self.mask[idx], [self.group[i] for i in idx.tolist()])


def make_rows(tokenizer, texts: Sequence[str], groups: Sequence[str], max_len: int, min_len: int = 8) -> Rows:
    """BOS + the first max_len-1 tokens of each text, right-padded; texts with fewer than min_len tokens are
    dropped (with their groups)."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token: the frozen-norm position rule needs one at position 0")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    seqs, kept = [], []
    for text, g in zip(texts, groups):
        ids = tokenizer(text, add_special_tokens=False).input_ids[: max_len - 1]
        if len(ids) >= min_len:
            seqs.append([bos] + ids)
            kept.append(str(g))
    if not seqs:
        raise ValueError(f"no text has {min_len} tokens")
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), True
    return Rows(tokens, mask, kept)


def _check_rows(model, rows: Rows) -> None:
    n_ctx = getattr(model.config, "max_position_embeddings", None)
    if n_ctx is not None and rows.tokens.shape[1] > n_ctx:
        raise ValueError(f"rows of {rows.tokens.shape[1]} tokens exceed the model's context of {n_ctx}")
    if not bool(rows.mask[:, 0].all()):
        raise ValueError("every row must start with a real token (BOS) at position 0: right padding only")


# ---------------------------------------------------------------------------------------------
# calibration and freezing
@torch.no_grad()
def calibrate(model, rows: Rows, which: str | Sequence[str] = "all", batch_size: int = 16) -> dict[str, dict]:
    """Set each selected norm's `scale` to 1 / its mean rms over real non-BOS tokens of `rows`, and `bos_scale`
    to 1 / its mean rms at position 0, running the model in its current state (norms already frozen stay
    frozen). Rows whose input to a norm overflowed or exploded (a token above EXPLODED x the median rms: a token
    of unusual scale through frozen norms) are left out of its averages and counted, since one such token makes
    the mean meaningless; half of the rows or more left out raises. Returns {name: {mean_rms, bos_rms, cv, p01,
    p99, overflow_rows}} (cv: coefficient of variation of rms over tokens)."""
    _check_rows(model, rows)
    chosen = select(model, which)
    for w in chosen:
        w.recording = []
    try:
        for tok, m in _batches(model, rows, batch_size):
            model(input_ids=tok, attention_mask=m.long())
    finally:
        recs = {w.name: torch.cat(w.recording).cpu() for w in chosen}
        for w in chosen:
            w.recording = None
    stats = {}
    body_all = rows.mask.clone()
    body_all[:, 0] = False
    for w in chosen:
        r = recs[w.name]
        finite = torch.where(rows.mask, torch.isfinite(r), True).all(1)   # rows whose input did not overflow ...
        if finite.any():                                                   # ... nor explode (EXPLODED x the median)
            limit = EXPLODED * float(r[finite][body_all[finite]].median())
            finite &= torch.where(body_all, r <= limit, True).all(1)        # NaN and inf compare False
        if finite.sum() * 2 <= len(finite):
            raise FloatingPointError(f"{w.name}: its input overflows or explodes on {int((~finite).sum())} of "
                                     f"{len(finite)} calibration rows (the model is already unstable); freeze fewer "
                                     "norms at once or fine-tune longer between removals")
        vals, bos = r[finite][body_all[finite]], r[finite][:, 0]
        mean_r = float(vals.mean())
        w.scale.fill_(1.0 / mean_r)
        w.bos_scale.fill_(1.0 / float(bos.mean()))
        stats[w.name] = {"role": w.role, "layer": w.layer, "mean_rms": mean_r, "bos_rms": float(bos.mean()),
                         "cv": float(vals.std(correction=0) / mean_r), "p01": float(vals.quantile(0.01)),
                         "p99": float(vals.quantile(0.99)), "overflow_rows": int((~finite).sum())}
    return stats


def set_frozen(model, frozen: str | Sequence[str] = (), bos_special: bool = True) -> list[str]:
    """Freeze exactly the norms named (or the group) and leave the others live; returns the frozen names."""
    chosen = {w.name for w in select(model, frozen)} if (isinstance(frozen, str) or frozen) else set()
    for w in norms(model):
        w.frozen = w.name in chosen
        w.bos_special = bos_special
    return sorted(chosen)


@contextmanager
def frozen(model, which: str | Sequence[str] = "all", bos_special: bool = True,
           scales: dict[str, float] | None = None) -> Iterator[None]:
    """Temporarily freeze `which` (optionally with other constants, e.g. the random-constant control), then
    restore every norm's previous state and scale."""
    ws = norms(model)
    saved = [(w.frozen, w.bos_special, w.scale.clone(), w.bos_scale.clone()) for w in ws]
    try:
        names = {w.name for w in select(model, which)} if (isinstance(which, str) or which) else set()
        for w in ws:
            if w.name in names:
                w.frozen, w.bos_special = True, bos_special
                if scales is not None and w.name in scales:
                    value = float(scales[w.name])
                    if not math.isfinite(value) or value <= 0:
                        raise ValueError(f"scale for {w.name} must be finite and > 0, got {value}")
                    w.scale.fill_(value)
        yield
    finally:
        for w, (f, b, s, bs) in zip(ws, saved):
            w.frozen, w.bos_special = f, b
            w.scale.copy_(s)
            w.bos_scale.copy_(bs)


def random_scales(stats: dict[str, dict], seed: int = 0) -> dict[str, float]:
    """The random-constant control: for each norm, 1 / an rms drawn log-uniformly between the 1st and 99th
    percentile of that norm's observed per-token rms (a plausible value, not the average)."""
    rng = np.random.default_rng(seed)
    return {name: float(1.0 / math.exp(rng.uniform(math.log(s["p01"]), math.log(s["p99"]))))
            for name, s in stats.items()}


# ---------------------------------------------------------------------------------------------
# losses
def _ce(model, logits: Tensor, tok: Tensor, m: Tensor) -> Tensor:
    """Per-token next-token loss [n, T-1]: NaN on padding, +inf where the logits overflowed (not finite)."""
    logits = logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits.nan_to_num(0.0).transpose(1, 2), tok[:, 1:], reduction="none")
    bad = ~torch.isfinite(logits).all(-1) | ~torch.isfinite(ce)
    ce = ce.masked_fill(bad, float("inf"))
    return ce.masked_fill(~m[:, 1:], float("nan"))


@torch.no_grad()
def token_losses(model, rows: Rows, batch_size: int = 16) -> Tensor:
    """Next-token cross-entropy (nats) at each position [n, T-1]; NaN where the target is padding, +inf where
    the model's logits overflowed (see `scored`)."""
    _check_rows(model, rows)
    out = []
    for tok, m in _batches(model, rows, batch_size):
        out.append(_ce(model, model(input_ids=tok, attention_mask=m.long()).logits, tok, m).cpu())
    return torch.cat(out)


def scored(losses: Tensor, vocab_size: int) -> Tensor:
    """Every token's loss capped at a uniform guess, ln(vocab) nats (overflowed tokens, +inf, included), so a
    broken model cannot score worse than guessing; NaN (padding) stays NaN."""
    return losses.clamp(max=math.log(vocab_size))


def overflow_share(losses: Tensor) -> float:
    """Share of real target tokens whose logits overflowed."""
    real = ~torch.isnan(losses)
    return float(torch.isinf(losses).sum() / real.sum())


def row_means(losses: Tensor, vocab_size: int | None = None) -> np.ndarray:
    """Mean loss of each row over its real targets (the unit of the bootstrap); with vocab_size, each token's
    loss is capped at ln(vocab) (see `scored`)."""
    if vocab_size is not None:
        losses = scored(losses, vocab_size)
    return torch.nanmean(losses, dim=1).cpu().numpy()


@torch.no_grad()
def _run_from(model, hidden: Tensor, m: Tensor, start: int) -> tuple[Tensor, list[Tensor]]:
    """Logits and the inputs of layers start..n (the last: the final norm's input) from the residual `hidden`
    entering layer `start`."""
    inner = _decoder(model)
    n = len(inner.layers)
    caught: list[Tensor] = [hidden]
    hooks = []

    def keep(_m, args, kwargs):
        caught.append((args[0] if args else kwargs["hidden_states"]).detach())
    targets = list(inner.layers)[start + 1:] + ([inner.norm] if start < n else [])
    for t in targets:
        hooks.append(t.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        with only_layers_from(model, start):
            logits = model(inputs_embeds=hidden, attention_mask=m.long(), use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    assert len(caught) == n + 1 - start
    return logits, caught


def _first_layer(model, names: Sequence[str]) -> int:
    by_name = {w.name: w for w in norms(model)}
    return min(by_name[nm].layer for nm in names) if names else len(_decoder(model).layers)


@torch.no_grad()
def sweep(model, rows: Rows, configs: Sequence[Sequence[str]], bos_special: bool = True,
          scales: dict[str, float] | None = None, cumulative: bool = False, batch_size: int = 16,
          progress: bool = False, options: Sequence[dict] | None = None) -> list[Tensor]:
    """Per-token losses (as `token_losses`) with each configuration of `configs` frozen (each a list of norm
    names; the rest stay as they are). Each run starts at the first layer the configuration changes, from the
    cached residual stream of the model as it is (cumulative=False) or of the previous configuration
    (cumulative=True: each configuration must contain the previous one). `options`, one dict per configuration,
    overrides bos_special / scales for that configuration."""
    from tqdm.auto import tqdm

    _check_rows(model, rows)
    configs = [list(c) for c in configs]
    if options is not None and len(options) != len(configs):
        raise ValueError("options needs one dict per configuration")
    opts = [{"bos_special": bos_special, "scales": scales} | dict(o) for o in (options or [{}] * len(configs))]
    for c in configs:
        select(model, c)   # unknown names fail here
    if cumulative and any(not set(a) <= set(b) for a, b in zip(configs, configs[1:])):
        raise ValueError("cumulative=True needs each configuration to contain the previous one")
    out: list[list[Tensor]] = [[] for _ in configs]
    bar = tqdm(total=math.ceil(len(rows) / batch_size) * len(configs), disable=not progress, desc="norm configurations")
    for tok, m in _batches(model, rows, batch_size):
        embed = _decoder(model).embed_tokens(tok)
        _, ref = _run_from(model, embed, m, 0)            # inputs of every layer in the current state
        hiddens, prev = list(ref), []
        for k, names in enumerate(configs):
            changed = [nm for nm in names if nm not in prev] if cumulative else names
            start = _first_layer(model, changed) if changed else len(hiddens) - 1
            base = hiddens if cumulative else ref
            with frozen(model, names, **opts[k]):
                logits, new = _run_from(model, base[start], m, start)
            out[k].append(_ce(model, logits, tok, m).cpu())
            if cumulative:
                hiddens = hiddens[:start] + new
                prev = names
            bar.update()
    bar.close()
    return [torch.cat(o) for o in out]


# ---------------------------------------------------------------------------------------------
# fine-tuning with a removal schedule
def schedule(model, steps_per_stage: int, per_layer: bool = False, gap: int = 1,
             roles: Sequence[str] = ("mlp_in", "attn_in", "other", "final"), from_layer: int = 0,
             bos_off: bool = True) -> list[tuple[int, list[str] | str]]:
    """The paper's removal order as (step, action) pairs: each role group at once (per_layer=False) or one
    layer every `gap` steps (per_layer=True, as gpt2_noLN does with gaps of 20-30 steps), `steps_per_stage`
    steps of fine-tuning after each group, and last 'bos_off' (the first position loses its own constant).
    Only norms in layers >= from_layer (and the final norm) are removed; bos_off=False keeps the first
    position's constant. Groups the model does not have are skipped."""
    if steps_per_stage < 0 or gap < 1:
        raise ValueError("steps_per_stage must be >= 0 and gap >= 1")
    plan: list[tuple[int, list[str] | str]] = []
    step = 0
    for role in roles:
        ws = [w for w in select(model, role) if w.layer >= from_layer]
        if not ws:
            continue
        if per_layer:
            for layer in sorted({w.layer for w in ws}):
                plan.append((step, [w.name for w in ws if w.layer == layer]))
                step += gap
        else:
            plan.append((step, [w.name for w in ws]))
        step += steps_per_stage
    if bos_off:
        plan.append((step, "bos_off"))
    return plan


def total_steps(plan: Sequence[tuple[int, list[str] | str]], steps_after_last: int) -> int:
    """Steps of a fine-tune that ends `steps_after_last` steps after the plan's last action."""
    return plan[-1][0] + steps_after_last if plan else steps_after_last


def removed_names(plan: Sequence[tuple[int, list[str] | str]]) -> list[str]:
    """Every norm a plan freezes, in order."""
    return [nm for _, a in plan if a != "bos_off" for nm in a]


class History(list):
    """Training losses of a fine-tune, one per step, with `skipped` and `calib_overflow`: (step, rows) left out of a
    training step, or of the averages of the norms frozen at that step, because the rows overflowed; and
    `skipped_steps`, the steps not taken because their gradient was not finite (their loss is NaN here)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.skipped: list[tuple[int, int]] = []          # training rows left out
        self.calib_overflow: list[tuple[int, int]] = []   # calibration rows left out of a removal's averages
        self.skipped_steps: list[int] = []                 # steps whose gradient was not finite (loss NaN there)

    @property
    def rows_skipped(self) -> int:
        return sum(n for _, n in self.skipped)


def finetune(model, train: Rows, steps: int, lr: float = 1e-4, batch_size: int = 8, seed: int = 0,
             plan: Sequence[tuple[int, list[str] | str]] = (), calib: Rows | None = None,
             weight_decay: float = 0.0, warmup: int = 0, progress: bool = False, bos_ramp: int = 0) -> History:
    """Full fine-tuning with AdamW on next-token loss over `train` (batches drawn with `seed`). At each step
    of `plan`, the named norms are calibrated on `calib` in the model's current state and frozen (Baroni et al.
    recompute the average while a norm is live); 'bos_off' ends the first position's special constant: at once
    (bos_ramp=0, as both papers do) or, ours, moving it geometrically to the shared constant over `bos_ramp` steps.
    With an empty plan this is the vanilla fine-tune. Returns the training loss of every step (a `History`,
    whose `.skipped` lists (step, rows) left out because their logits overflowed; every row overflowing raises).
    A step whose gradient is not finite is skipped (no update) and counted; more than a quarter of the steps
    (and more than one) skipped raises FloatingPointError. A BOS ramp that could not finish within `steps` raises."""
    from tqdm.auto import tqdm

    if steps < 1 or lr <= 0 or batch_size < 1 or bos_ramp < 0:
        raise ValueError("need steps >= 1, lr > 0, batch_size >= 1, bos_ramp >= 0")
    if plan and calib is None:
        raise ValueError("a removal plan needs calib rows to compute each norm's average")
    _check_rows(model, train)
    actions: dict[int, list] = {}
    for step, action in plan:
        actions.setdefault(int(step), []).append(action)
        if action == "bos_off" and bos_ramp and int(step) < steps < int(step) + bos_ramp:
            raise ValueError(f"the BOS ramp starts at step {step} and needs {bos_ramp} steps, more than the {steps} "
                             "steps of this fine-tune: it would end with BOS between two constants")
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(train), generator=gen) for _ in range(steps * batch_size // len(train) + 1)])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    history, dev, last, ramp = History(), _device(model), "no plan action yet", None
    for step in tqdm(range(steps), disable=not progress, desc="fine-tuning"):
        for action in actions.get(step, []):
            model.eval()
            last = f"step {step}: " + ("bos_off" if action == "bos_off" else f"{len(action)} norms frozen")
            if action == "bos_off" and bos_ramp:
                ramp = (step, {w: (float(w.bos_scale), float(w.scale)) for w in norms(model) if w.frozen})
            elif action == "bos_off":
                for w in norms(model):
                    w.bos_special = False
            else:
                n_over = max(v["overflow_rows"] for v in calibrate(model, calib, action).values())
                if n_over:
                    history.calib_overflow.append((step, n_over))
                for w in select(model, action):
                    w.frozen = True
        if ramp is not None:                      # BOS's constant -> the shared one, geometrically
            t = min(1.0, (step - ramp[0] + 1) / bos_ramp)
            for w, (b, a) in ramp[1].items():
                w.bos_scale.fill_(b ** (1 - t) * a ** t)
            if t >= 1.0:
                for w in norms(model):
                    w.bos_special = False
                ramp = None
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        idx = order[step * batch_size:(step + 1) * batch_size]
        tok, m = train.tokens[idx].to(dev), train.mask[idx].to(dev)
        labels = tok.masked_fill(~m, -100)
        out = model(input_ids=tok, attention_mask=m.long(), labels=labels)
        if not torch.isfinite(out.loss):   # rows whose logits overflowed (anywhere, padding included: an overflow
                                           # there would still poison the gradient) leave this step, counted
            ok = torch.isfinite(out.logits.detach()).flatten(1).all(1)
            if not bool(ok.any()):
                raise FloatingPointError(f"loss became {out.loss.item()} at step {step} in every row of the batch "
                                         f"(last plan action: {last}); lower lr")
            history.skipped.append((step, int((~ok).sum())))
            del out
            out = model(input_ids=tok[ok], attention_mask=m[ok].long(), labels=labels[ok])
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step} (last plan action: {last}); lower lr")
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not torch.isfinite(grad_norm):   # an exploding row: skip the step (as loss scaling does), count it
            opt.zero_grad(set_to_none=True)
            history.skipped_steps.append(step)
            history.append(float("nan"))
            if len(history.skipped_steps) > max(1, steps // 4):
                model.eval()
                raise FloatingPointError(f"the gradient was not finite in {len(history.skipped_steps)} of {step + 1} "
                                         f"steps (last at step {step}, loss {loss.item():.3g}; last plan action: "
                                         f"{last}); the weights are those before those steps. Lower lr, or, if it "
                                         "follows bos_off, move BOS's constant gradually (bos_ramp)")
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(float(loss.detach()))
    model.eval()
    return history


def frozen_state(model) -> dict:
    """Which norms are frozen, whether BOS keeps its constant, and the constants (to copy onto another model)."""
    return {w.name: (w.frozen, w.bos_special, float(w.scale), float(w.bos_scale)) for w in norms(model)}


def load_frozen_state(model, state: dict) -> None:
    for w in norms(model):
        f, b, s, bs = state[w.name]
        w.frozen, w.bos_special = f, b
        w.scale.fill_(s)
        w.bos_scale.fill_(bs)


# ---------------------------------------------------------------------------------------------
# direct logit attribution
def _component_modules(model) -> list[tuple[str, nn.Module]]:
    """(label, module) whose output is what each sublayer adds to the residual stream."""
    mods = []
    for i, layer in enumerate(_decoder(model).layers):
        gemma_style = hasattr(layer, "pre_feedforward_layernorm")
        attn = layer.post_attention_layernorm if gemma_style else layer.self_attn
        mlp = layer.post_feedforward_layernorm if gemma_style else layer.mlp
        mods += [(f"attn {i}", attn), (f"mlp {i}", mlp)]
    return mods


@torch.no_grad()
def residual_components(model, tokens: Tensor, pos: int = -1) -> tuple[list[str], Tensor, Tensor]:
    """Labels, the components [n_comp, d] that sum to the final residual stream at `pos` (embedding, every
    attention and MLP output), and that residual [d]. Runs one forward pass (no padding: tokens [1, T])."""
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError("pass one unpadded prompt, tokens of shape [1, T]")
    inner = _decoder(model)
    captured: dict[str, Tensor] = {}
    hooks = []

    def keep(label):
        def hook(_m, _inp, out):
            captured[label] = (out[0] if isinstance(out, tuple) else out)[0, pos].detach().float()
        return hook

    mods = [("embedding", inner.embed_tokens)] + _component_modules(model)
    for label, m in mods:
        hooks.append(m.register_forward_hook(keep(label)))
    final_in = {}
    def keep_final(_m, inp):
        final_in["x"] = inp[0][0, pos].detach().float()   # returns None: the input is left unchanged
    hooks.append(inner.norm.register_forward_pre_hook(keep_final))
    try:
        model(input_ids=tokens.to(_device(model)))
    finally:
        for h in hooks:
            h.remove()
    labels = [label for label, _ in mods]
    comps = torch.stack([captured[label] for label in labels])
    return labels, comps, final_in["x"]


@torch.no_grad()
def final_logit(model, resid: Tensor, token: int, position: int = 1) -> float:
    """The logit of `token` computed from a final residual vector (final norm in its current state, then the
    unembedding). `position` only matters for the BOS rule (position 0)."""
    norm = _decoder(model).norm
    x = resid.view(1, 1, -1).expand(1, position + 1, -1).contiguous()
    h = norm(x)[0, -1]
    return float(model.lm_head(h)[token])


@torch.no_grad()
def direct_logit_attribution(model, tokens: Tensor, token: int, scale: float | None = None) -> dict:
    """DLA of every component to the logit of `token` at the last position.

    dla_i = W_U (gamma * c_i) * s, where s is `scale` if given (e.g. the dataset-average 1/rms), else the final
    norm's own scale for this prompt (its constant when frozen, 1/rms of the actual residual when live).
    Also returns the direct-path ablation effect logit(r) - logit(r - c_i), which equals dla_i exactly only when
    the final norm is frozen."""
    labels, comps, resid = residual_components(model, tokens)
    norm = _decoder(model).norm
    gamma_x = norm.norm(comps.unsqueeze(0))[0] * norm.rms(comps)   # gamma * c_i (undoes the module's own 1/rms)
    if scale is None:
        scale = float(norm.scale) if norm.frozen else float(1.0 / norm.rms(resid))
    W = model.lm_head.weight[token].float()
    dla = (gamma_x @ W) * scale
    pos = tokens.shape[1] - 1
    logit = final_logit(model, resid, token, pos)
    ablation = torch.tensor([logit - final_logit(model, resid - c, token, pos) for c in comps])
    return {"labels": labels, "dla": dla.cpu(), "ablation": ablation, "logit": logit, "sum_dla": float(dla.sum()),
            "norms": comps.norm(dim=-1).cpu()}


# ---------------------------------------------------------------------------------------------
# weights and probes
def relative_weight_change(before: dict[str, Tensor], after: dict[str, Tensor], skip: Sequence[str] = ()) -> list[dict]:
    """||W_after - W_before|| / ||W_before|| (Frobenius) for every 2-D weight, with its layer and type (names in
    `skip` left out, e.g. a tied lm_head.weight that repeats embed_tokens.weight)."""
    out = []
    for name, w0 in before.items():
        if w0.dim() != 2 or name in skip:
            continue
        parts = name.split(".")
        layer = int(parts[2]) if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() else -1
        kind = parts[-2] if layer >= 0 else parts[-2] if len(parts) > 1 else name
        out.append({"name": name, "layer": layer, "type": kind,
                    "relative change": float((after[name].float() - w0.float()).norm() / w0.float().norm())})
    return out


def update_cosine(before: dict[str, Tensor], a: dict[str, Tensor], b: dict[str, Tensor], name: str) -> float:
    """Cosine between two fine-tunes' updates of one matrix (1: the same direction)."""
    da, db = (a[name].float() - before[name].float()).ravel(), (b[name].float() - before[name].float()).ravel()
    return float(torch.nn.functional.cosine_similarity(da, db, dim=0))


@torch.no_grad()
def scale_deviation(model, rows: Rows, names: Sequence[str], stats: dict[str, dict], batch_size: int = 16) -> Tensor:
    """Mean over the named norms of |log(rms / mean rms)| at every position [n, T]: how far each token's own
    scale is from the constant a frozen norm would give it (model as it is, usually all live)."""
    chosen = select(model, list(names))
    for w in chosen:
        w.recording = []
    try:
        for tok, m in _batches(model, rows, batch_size):
            model(input_ids=tok, attention_mask=m.long())
        dev = [(torch.cat(w.recording).cpu() / stats[w.name]["mean_rms"]).log().abs() for w in chosen]
    finally:
        for w in chosen:
            w.recording = None
    return torch.stack(dev).mean(0)


@torch.no_grad()
def last_token_residual(model, rows: Rows, layer: int, batch_size: int = 32) -> Tensor:
    """The residual stream entering decoder layer `layer` (n_layers: the input of the final norm) at each row's
    last real token [n, d]."""
    inner = _decoder(model)
    n = len(inner.layers)
    if not 0 <= layer <= n:
        raise ValueError(f"layer must be in [0, {n}], got {layer}")
    target = inner.norm if layer == n else inner.layers[layer]
    out = []
    for tok, m in _batches(model, rows, batch_size):
        got = {}
        def keep(_m, args, kwargs):
            got["x"] = (args[0] if args else kwargs["hidden_states"]).detach()   # returns None: input unchanged
        h = target.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            model(input_ids=tok, attention_mask=m.long())
        finally:
            h.remove()
        x = got["x"].float()
        out.append(x[torch.arange(len(x)), m.long().sum(1) - 1].cpu())   # each row's last real token
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# corpus and the notebook's experiment pieces
def document_groups(documents: Sequence[dict], openings: Sequence[str]) -> list[str]:
    """The unit a train/held-out split keeps on one side: the module for a standard-library docstring, the
    shared opening for a model-written text (four texts were written from each opening)."""
    groups = []
    for d in documents:
        if d["source"] == "future_lens_corpus":
            match = [o for o in openings if d["text"].startswith(o)]
            groups.append("opening:" + (match[0] if match else " ".join(d["text"].split()[:4])))
        else:
            groups.append(str(d["source"]))
    return groups


def clone_state(model) -> dict[str, Tensor]:
    """A detached copy of every parameter and buffer (frozen-norm constants included)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore(model, state: dict[str, Tensor], frozen_names: Sequence[str] = (), bos_special: bool = True) -> None:
    """Load `state` and freeze exactly `frozen_names` (the rest live)."""
    model.load_state_dict(state)
    set_frozen(model, list(frozen_names), bos_special=bos_special)


def greedy_continuation(model, tokenizer, prompt: str, n_tokens: int = 12) -> str:
    """Greedy next tokens after BOS + prompt, by full forward passes (no KV cache, so frozen norms see every
    position, BOS at 0)."""
    ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        for _ in range(n_tokens):
            logits = model(input_ids=torch.tensor([ids], device=_device(model))).logits[0, -1]
            ids.append(int(logits.argmax()))
    return tokenizer.decode(ids[-n_tokens:])
