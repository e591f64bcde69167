"""The geometry of weight updates: LoRA (via peft) and full fine-tuning of chosen matrices, the weight
difference ΔW they leave behind, and a ROME-style rank-one edit that can be read back from ΔW alone.

Works on the raw Hugging Face model of `helpers.load_hf()`; weights are always handled as [out, in]
matrices (GPT-2's Conv1D weights are transposed on the way in and out).

    batch = lora.make_batch(tok, prompts, new_objects, others=true_objects)
    prefix = lora.Prefix(hf, batch, start_layer=min(LAYERS))          # run the frozen bottom once
    run = lora.train_lora(hf, prefix, rank=4, layers=LAYERS, types=["self_attn.q_proj"], steps=30)
    lora.effective_rank(run.deltas[name]); lora.subspace_similarity(a, b); lora.intruder_dimensions(W, W + dW)
    edit = lora.rome_edit(W, key, value, C)                            # (W + edit) @ key == value
    lora.quantization_noise(W); lora.auroc(scores, labels)             # 4-bit rounding noise; read-back over many tokens

References: Hu et al. 2021 (LoRA, §7), Roy & Vetterli 2007 (effective rank), Shuttleworth et al. 2024
(intruder dimensions, arXiv 2410.21228), Meng et al. 2022 (ROME).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from helpers.env import torch_threads
from helpers.stats import auroc  # noqa: F401  (re-exported: lora.auroc)

# ---------------------------------------------------------------------------------------------
# where the matrices are (any HF decoder: llama, qwen, mistral, gpt2, gpt-neox ...)


def _n_layers(model) -> int:
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    if not n:
        raise ValueError("the model config has no num_hidden_layers / n_layer")
    return int(n)


def _layers_owner(model) -> tuple[nn.Module, str]:
    """The module holding the ModuleList of decoder blocks, and that list's attribute name."""
    n = _n_layers(model)
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n and "lora" not in attr:
                return module, attr
    raise ValueError(f"cannot find a ModuleList of {n} decoder blocks in {type(model).__name__}")


def decoder_layers(model) -> nn.ModuleList:
    """The model's ModuleList of decoder blocks."""
    owner, attr = _layers_owner(model)
    return getattr(owner, attr)


def _is_matrix_module(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def module_types(model) -> list[str]:
    """Names (relative to a block) of the block's weight matrices, e.g. 'self_attn.q_proj', 'mlp.down_proj'."""
    block = decoder_layers(model)[0]
    names = []
    for name, module in block.named_modules():
        if _is_matrix_module(module) and "lora_" not in name and "base_layer" not in name:
            names.append(name)
    if not names:
        raise ValueError("no Linear / Conv1D weight matrices found in the first decoder block")
    return names


def check_layers(model, layers: Sequence[int]) -> list[int]:
    n = _n_layers(model)
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layers must be ints, got {layer!r}")
        if not 0 <= layer < n:
            raise IndexError(f"layer {layer} is out of range: the model has layers 0..{n - 1}")
        out.append(int(layer))
    return out


def check_types(model, types: Sequence[str]) -> list[str]:
    known = module_types(model)
    for t in types:
        if t not in known:
            raise ValueError(f"unknown module type {t!r}; this model has {known}")
    return list(types)


def module_name(model, layer: int, mtype: str) -> str:
    """Full name (as in model.named_modules()) of matrix `mtype` in block `layer`."""
    check_layers(model, [layer])
    check_types(model, [mtype])
    owner, attr = _layers_owner(model)
    for name, module in model.named_modules():
        if module is owner:
            prefix = f"{name}.{attr}" if name else attr
            return f"{prefix}.{layer}.{mtype}"
    raise RuntimeError("unreachable")  # pragma: no cover


def get_module(model, name: str) -> nn.Module:
    module = model.get_submodule(name)
    base = getattr(module, "base_layer", None)  # a peft-wrapped layer
    return base if base is not None else module


def get_weight(model, name: str) -> Tensor:
    """A copy of the module's weight as an [out, in] float32 matrix."""
    module = get_module(model, name)
    w = module.weight.detach()
    w = w.T if type(module).__name__ == "Conv1D" else w
    return w.float().clone()


def _add_to_weight(model, name: str, delta: Tensor) -> None:
    module = get_module(model, name)
    d = delta.T if type(module).__name__ == "Conv1D" else delta
    with torch.no_grad():
        module.weight += d.to(module.weight.dtype).to(module.weight.device)


def base_weights(model, layers: Sequence[int], types: Sequence[str]) -> dict[str, Tensor]:
    """{full module name: [out, in] weight} for every (layer, type) pair."""
    return {module_name(model, l, t): get_weight(model, module_name(model, l, t))
            for l in check_layers(model, layers) for t in check_types(model, types)}


def split_name(name: str) -> tuple[int, str]:
    """'model.layers.12.mlp.down_proj' -> (12, 'mlp.down_proj')."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return int(p), ".".join(parts[i + 1:])
    raise ValueError(f"no layer index in {name!r}")


@contextmanager
def added(model, deltas: dict[str, Tensor], scale: float = 1.0) -> Iterator[None]:
    """Temporarily W <- W + scale * ΔW for every named matrix; the original weights come back exactly."""
    saved = {name: get_module(model, name).weight.detach().clone() for name in deltas}
    try:
        for name, d in deltas.items():
            _add_to_weight(model, name, scale * d)
        yield
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                get_module(model, name).weight.copy_(w)


# ---------------------------------------------------------------------------------------------
# data: prompts whose next token is a target


@dataclass
class Batch:
    """Left-padded prompts and one target token per prompt (`other_ids`: e.g. the true object)."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    target_ids: Tensor
    other_ids: Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def single_token_id(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens, not one")
    return ids[0]


def make_batch(tokenizer, prompts: Sequence[str], targets: Sequence[str],
               others: Sequence[str] | None = None, device: str | torch.device = "cpu") -> Batch:
    """Tokenize `prompts` (left-padded) with single-token `targets` (and `others`) for the next position."""
    if isinstance(prompts, str) or not prompts:
        raise TypeError("prompts must be a non-empty list of str")
    if len(targets) != len(prompts) or (others is not None and len(others) != len(prompts)):
        raise ValueError("prompts, targets (and others) must have the same length")
    side = tokenizer.padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    mask = enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    tgt = torch.tensor([single_token_id(tokenizer, t) for t in targets])
    oth = None if others is None else torch.tensor([single_token_id(tokenizer, t) for t in others])
    return Batch(enc["input_ids"].to(device), mask.to(device), pos.to(device), tgt.to(device),
                 None if oth is None else oth.to(device))


# ---------------------------------------------------------------------------------------------
# running only the top of the model (everything below the first trained layer is frozen)


@contextmanager
def _only_layers_from(model, start: int) -> Iterator[None]:
    owner, attr = _layers_owner(model)
    full = getattr(owner, attr)
    setattr(owner, attr, nn.ModuleList(list(full)[start:]))
    try:
        yield
    finally:
        setattr(owner, attr, full)


def _last_logits(model, **kwargs) -> Tensor:
    try:
        out = model(**kwargs, logits_to_keep=1, use_cache=False)
    except TypeError:  # an older model class without logits_to_keep
        out = model(**kwargs, use_cache=False)
    return out.logits[:, -1]


class Prefix:
    """A batch with the hidden states entering block `start_layer` cached, so forward passes (and
    backward passes) only run blocks start_layer..end. Valid while nothing below `start_layer` changes.

    The shortcut feeds the cached states as `inputs_embeds`; it is checked against the full forward pass
    once, and where a model treats `inputs_embeds` differently (GPT-2 adds positions, Gemma rescales)
    it falls back to the full forward pass (`self.shortcut` is then False).
    """

    def __init__(self, model, batch: Batch, start_layer: int = 0, check: bool = True) -> None:
        self.batch = batch
        self.start_layer = check_layers(model, [start_layer])[0]
        self.shortcut = self.start_layer > 0
        if self.shortcut:
            with torch.no_grad():
                out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, output_hidden_states=True, use_cache=False)
                self.hidden = out.hidden_states[self.start_layer].detach()
                if check:
                    full = out.logits[:, -1]
                    fast = self.logits(model)
                    self.shortcut = bool(torch.allclose(full, fast, atol=1e-3, rtol=1e-3))

    def logits(self, model) -> Tensor:
        """Last-position logits [batch, vocab] of the model as it is now (gradients flow when enabled)."""
        b = self.batch
        if not self.shortcut:
            return _last_logits(model, input_ids=b.input_ids, attention_mask=b.attention_mask,
                                position_ids=b.position_ids)
        with _only_layers_from(model, self.start_layer):
            return _last_logits(model, inputs_embeds=self.hidden, attention_mask=b.attention_mask,
                                position_ids=b.position_ids)

    def loss(self, model) -> Tensor:
        return nn.functional.cross_entropy(self.logits(model), self.batch.target_ids)


def log_odds(logits: Tensor, a_ids: Tensor, b_ids: Tensor) -> Tensor:
    """log p(a) - log p(b) per row."""
    lp = logits.float().log_softmax(-1)
    rows = torch.arange(lp.shape[0], device=lp.device)
    return lp[rows, a_ids] - lp[rows, b_ids]


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class Update:
    """What one fine-tuning run left behind: ΔW per matrix ([out, in]), and for LoRA the A, B factors."""

    kind: str                      # "lora" or "full"
    rank: int | None
    seed: int
    deltas: dict[str, Tensor]
    A: dict[str, Tensor] = field(default_factory=dict)
    B: dict[str, Tensor] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    _svds: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def label(self) -> str:
        return "full FT" if self.kind == "full" else f"LoRA r={self.rank}"

    def svd(self, name: str) -> Svd:
        """Thin SVD of ΔW for matrix `name`, computed once; for LoRA exactly from the factors
        (ΔW = (alpha / r) B A), which costs O((out + in) r^2) instead of a full SVD."""
        if name not in self.deltas:
            raise KeyError(f"{name!r} was not trained in this run; trained: {list(self.deltas)}")
        if name not in self._svds:
            d = self.deltas[name]
            out = None
            if name in self.A and name in self.B:
                ba = self.B[name] @ self.A[name]
                nn2 = float((ba * ba).sum())
                if nn2 > 0:
                    scale = float((d * ba).sum()) / nn2
                    if float((d - scale * ba).norm()) <= 1e-4 * max(float(d.norm()), 1e-30):
                        out = factored_svd(scale * self.B[name], self.A[name])
            self._svds[name] = out if out is not None else svd(d)
        return self._svds[name]


def _check_train_args(model, prefix: Prefix, layers, types, steps, lr) -> tuple[list[int], list[str]]:
    if not isinstance(prefix, Prefix):
        raise TypeError("prefix must be a helpers.lora.Prefix (build it from a Batch)")
    layers, types = check_layers(model, layers), check_types(model, types)
    if not layers or not types:
        raise ValueError("give at least one layer and one module type")
    if min(layers) < prefix.start_layer:
        raise ValueError(f"the prefix caches states entering layer {prefix.start_layer}, but layer {min(layers)} "
                         "is trained: build the Prefix with start_layer <= the lowest trained layer")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    return layers, types


@contextmanager
def _frozen(model) -> Iterator[None]:
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])


def _adam_steps(model, prefix: Prefix, params: list[Tensor], steps: int, lr: float,
                optimizer: str = "adam") -> list[float]:
    """`steps` Adam (or plain SGD) steps on `params` (made trainable) against `prefix`'s loss; the loss before
    every step, then the final loss."""
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = prefix.loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(prefix.loss(model).item())
    return losses


def train_lora(model, prefix: Prefix, rank: int, layers: Sequence[int], types: Sequence[str], steps: int = 30,
               lr: float = 1e-3, alpha: float = 16.0, seed: int = 0, use_rslora: bool = False) -> Update:
    """Fine-tune LoRA adapters (peft) of rank `rank` on the given matrices with Adam on `prefix`'s
    next-token loss; return ΔW = (alpha / rank) B A per matrix (alpha / √rank with `use_rslora`, Kalajdzievski
    2023) and the factors. The model is left as it was."""
    from peft import LoraConfig, inject_adapter_in_model

    layers, types = _check_train_args(model, prefix, layers, types, steps, lr)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    names = [module_name(model, l, t) for l in layers for t in types]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=names, bias="none", use_rslora=use_rslora)
    with _frozen(model):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name="default")
        try:
            losses = _adam_steps(model, prefix, [p for n, p in model.named_parameters() if "lora_" in n], steps, lr)
            with torch.no_grad():
                deltas, A, B = {}, {}, {}
                for name in names:
                    layer = model.get_submodule(name)
                    d = layer.get_delta_weight("default").detach().float()
                    deltas[name] = d.T.clone() if type(layer.base_layer).__name__ == "Conv1D" else d.clone()
                    A[name] = layer.lora_A["default"].weight.detach().float().clone()
                    B[name] = layer.lora_B["default"].weight.detach().float().clone()
        finally:
            _remove_lora(model, names)
    return Update("lora", rank, seed, deltas, A, B, losses)


def _remove_lora(model, names: Sequence[str]) -> None:
    """Put the original modules back in place of peft's LoRA wrappers (no merging)."""
    for name in names:
        module = model.get_submodule(name)
        base = getattr(module, "base_layer", None)
        if base is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(model):
            delattr(model, attr)


def train_full(model, prefix: Prefix, layers: Sequence[int], types: Sequence[str], steps: int = 30,
               lr: float = 1e-4, seed: int = 0, optimizer: str = "adam") -> Update:
    """Fine-tune the full matrices (Adam, or plain SGD with optimizer="sgd") on `prefix`'s loss; return
    ΔW = W_after - W_before per matrix. The model's weights are restored afterwards."""
    layers, types = _check_train_args(model, prefix, layers, types, steps, lr)
    names = [module_name(model, l, t) for l in layers for t in types]
    before = {n: get_module(model, n).weight.detach().clone() for n in names}
    with _frozen(model):
        torch.manual_seed(seed)
        try:
            losses = _adam_steps(model, prefix, [get_module(model, n).weight for n in names], steps, lr, optimizer)
            deltas = {}
            for n in names:
                d = (get_module(model, n).weight.detach() - before[n]).float()
                deltas[n] = d.T.clone() if type(get_module(model, n)).__name__ == "Conv1D" else d.clone()
        finally:
            with torch.no_grad():
                for n in names:
                    get_module(model, n).weight.copy_(before[n])
                    get_module(model, n).weight.grad = None
    return Update("full", None, seed, deltas, losses=losses)


def weight_gradients(model, prefix: Prefix, layers: Sequence[int], types: Sequence[str]) -> dict[str, Tensor]:
    """dLoss/dW ([out, in]) for every named matrix, from one backward pass."""
    layers, types = check_layers(model, layers), check_types(model, types)
    if min(layers) < prefix.start_layer:
        raise ValueError("the prefix starts above the lowest layer asked for")
    names = [module_name(model, l, t) for l in layers for t in types]
    with _frozen(model):
        for n in names:
            get_module(model, n).weight.requires_grad_(True)
        loss = prefix.loss(model)
        params = [get_module(model, n).weight for n in names]
        grads = torch.autograd.grad(loss, params)
    out = {}
    for n, g in zip(names, grads):
        out[n] = (g.T if type(get_module(model, n)).__name__ == "Conv1D" else g).float()
    return out


# ---------------------------------------------------------------------------------------------
# spectra


def _matrix(m) -> Tensor:
    t = torch.as_tensor(m).detach().float()
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("the matrix has NaN or inf entries")
    return t.cpu()


def one_thread() -> AbstractContextManager[None]:
    """Run dense decompositions (SVD, QR, solve) on one thread. Matrices of a few hundred rows gain
    nothing from LAPACK threads, and a threaded call becomes 10-100x slower when the cores are shared
    with other processes (OpenMP threads wait on each other)."""
    return torch_threads(1)


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
    """Singular values, largest first (float32 LAPACK unless double=True); an Svd gives its S."""
    if isinstance(m, Svd):
        return m.S
    t = _matrix(m)
    with one_thread():
        return torch.linalg.svdvals(t.double() if double else t).float()


def sv_entropy(m, normalized: bool = False, rtol: float = 1e-6) -> float:
    """Shannon entropy (nats) of the singular values normalised to sum 1 (values below rtol x the largest
    count as zero); with normalized=True divided by log(min(shape)) so that 1 means a flat spectrum.
    The zero matrix raises. `m`: a matrix or its Svd."""
    s = singular_values(m).double()
    if s[0] <= 0:
        raise ValueError("the zero matrix has no singular-value distribution")
    s = s[s > rtol * s[0]]
    p = s / s.sum()
    h = float(-(p * p.log()).sum())
    if normalized:
        n = min(_shape(m))
        return h / np.log(n) if n > 1 else 0.0
    return h


def effective_rank(m) -> float:
    """exp(entropy of the normalised singular values) (Roy & Vetterli 2007): 1 for rank one, n for the identity."""
    return float(np.exp(sv_entropy(m)))


def top_singular_norm(m, r: int) -> float:
    """sqrt(sum of the top-r squared singular values): the largest <G, X> over rank-r X with ||X||_F = 1
    (randomised SVD, exact when rank(m) <= r + 6)."""
    t = _matrix(m)
    if not 1 <= r <= min(t.shape):
        raise ValueError(f"r must be within 1..{min(t.shape)}")
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        with one_thread():
            _, s, _ = torch.svd_lowrank(t, q=min(r + 6, min(t.shape)), niter=3)
    finally:
        torch.random.set_rng_state(gen_state)
    return float(s[:r].pow(2).sum().sqrt())


def numerical_rank(m, rtol: float = 1e-5) -> int:
    """Number of singular values above rtol * the largest."""
    s = singular_values(m)
    return int((s > rtol * s[0]).sum()) if s[0] > 0 else 0


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
    return float((U.T @ W @ V).norm())


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
# a ROME-style rank-one edit (Meng et al. 2022) and reading it back


def mlp_out_name(model, layer: int) -> str:
    """Full name of block `layer`'s MLP output matrix: the one mapping d_mlp -> d_model."""
    d_model = model.config.hidden_size
    layer = check_layers(model, [layer])[0]
    cands = []
    for mtype in module_types(model):
        w = get_module(model, module_name(model, layer, mtype)).weight
        shape = tuple(w.shape[::-1]) if type(get_module(model, module_name(model, layer, mtype))).__name__ == "Conv1D" else tuple(w.shape)
        if shape[0] == d_model and shape[1] > d_model:
            cands.append(mtype)
    if len(cands) != 1:
        raise ValueError(f"cannot tell the MLP output matrix of layer {layer}: candidates {cands}")
    return module_name(model, layer, cands[0])


class _Stop(Exception):
    pass


@torch.no_grad()
def mlp_keys(model, tokenizer, prompts: Sequence[str], layer: int, skip_first: bool = True) -> tuple[Tensor, list[tuple[int, int]]]:
    """Inputs of the MLP output matrix ("keys", [n_tokens, d_mlp]) at every token of every prompt, and
    (prompt index, position) of each row. The forward pass stops at that layer."""
    module = get_module(model, mlp_out_name(model, layer))
    conv = type(module).__name__ == "Conv1D"
    keys, where = [], []
    for i, p in enumerate(prompts):
        ids = tokenizer(p, return_tensors="pt")["input_ids"].to(module.weight.device)
        grabbed = {}

        def hook(mod, args):
            grabbed["k"] = args[0].detach()
            raise _Stop

        handle = module.register_forward_pre_hook(hook)
        try:
            model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        k = grabbed["k"][0].float().cpu()
        start = 1 if skip_first and k.shape[0] > 1 else 0
        keys.append(k[start:])
        where += [(i, t) for t in range(start, k.shape[0])]
    del conv
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
    return ((1 - shrink) * C + shrink * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)).float()


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
        holder.setdefault("norm", out[rows, subj].detach().norm(dim=-1).mean())
        out = out.clone()
        out[rows, subj] = out[rows, subj] + delta.to(out.dtype)
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


def default_types(model) -> list[str]:
    """The query, value (Hu et al. 2021 adapt these) and MLP-output matrices of a block, found by name;
    a fused query-key-value matrix stands for both. Falls back to every matrix type."""
    types = module_types(model)
    found = []
    for keys in (("q_proj", "query", ".q", "c_attn", "query_key_value", "qkv"), ("v_proj", "value", ".v")):
        hit = next((t for t in types if any(t.endswith(k) for k in keys)), None)
        if hit and hit not in found:
            found.append(hit)
    try:
        out = split_name(mlp_out_name(model, 0))[1]
        if out not in found:
            found.append(out)
    except ValueError:
        pass
    return found if found else types


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


def unique_keys(keys: Tensor, labels) -> tuple[Tensor, np.ndarray]:
    """Drop bitwise-identical key rows (a causal model gives the same key to the same prefix), keeping the
    first; a kept row is positive if any of its copies was. Returns (keys, labels)."""
    labels = np.asarray(labels, dtype=bool)
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    inverse = inverse.numpy()
    lab = np.zeros(len(uniq), dtype=bool)
    np.logical_or.at(lab, inverse, labels)
    return uniq, lab
