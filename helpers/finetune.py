"""Fine-tuning any Hugging Face decoder: address its weight matrices by (layer, type), cache the frozen bottom
of the model, train LoRA adapters (through peft) or the full matrices, and keep the weight difference ΔW.

    batch = finetune.make_batch(tok, prompts, targets, others=true_objects)
    prefix = finetune.Prefix(hf, batch, start_layer=min(LAYERS))      # run the frozen bottom once
    run = finetune.train_lora(hf, prefix, rank=4, layers=LAYERS, types=["self_attn.q_proj"], steps=30)

Works on the raw model of `helpers.load_hf()` (llama, qwen, mistral, gemma, gpt2, gpt-neox ...); weights are
always [out, in] matrices (GPT-2's Conv1D weights are transposed on the way in and out). The geometry of the
ΔW it returns is in `helpers.geometry`; rank-one edits are in `helpers.editing`.
References: Hu et al. 2021 (LoRA); peft (huggingface/peft).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from helpers.geometry import Svd, factored_svd, svd

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
def only_layers_from(model, start: int) -> Iterator[None]:
    """Run only decoder blocks start.. (feed the residual entering `start` as inputs_embeds). A per-layer
    `config.layer_types` (gemma3's sliding/full attention pattern) is sliced with the blocks."""
    owner, attr = _layers_owner(model)
    full = getattr(owner, attr)
    types = getattr(model.config, "layer_types", None)
    setattr(owner, attr, nn.ModuleList(list(full)[start:]))
    if types is not None:
        model.config.layer_types = list(types)[start:]
    try:
        yield
    finally:
        setattr(owner, attr, full)
        if types is not None:
            model.config.layer_types = types


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
        with only_layers_from(model, self.start_layer):
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
        raise TypeError("prefix must be a helpers.finetune.Prefix (build it from a Batch)")
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
                optimizer: str = "adam", stop_loss: float | None = None) -> list[float]:
    """Up to `steps` Adam (or plain SGD) steps on `params` (made trainable) against `prefix`'s loss, stopping
    before a step once the loss is at or below `stop_loss`; the loss before every step taken, then the final loss."""
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if stop_loss is not None and not (isinstance(stop_loss, (int, float)) and stop_loss > 0):
        raise ValueError(f"stop_loss must be a number > 0 or None, got {stop_loss!r}")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = prefix.loss(model)
        if stop_loss is not None and loss.item() <= stop_loss:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(prefix.loss(model).item())
    return losses


def train_lora(model, prefix: Prefix, rank: int, layers: Sequence[int], types: Sequence[str], steps: int = 30,
               lr: float = 1e-3, alpha: float = 16.0, seed: int = 0, use_rslora: bool = False,
               stop_loss: float | None = None) -> Update:
    """Fine-tune LoRA adapters (peft) of rank `rank` on the given matrices with Adam on `prefix`'s
    next-token loss, for `steps` steps or until the loss reaches `stop_loss` (training to matched loss); return
    ΔW = (alpha / rank) B A per matrix (alpha / √rank with `use_rslora`, Kalajdzievski 2023) and the factors.
    The model is left as it was."""
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
            losses = _adam_steps(model, prefix, [p for n, p in model.named_parameters() if "lora_" in n], steps, lr,
                                 stop_loss=stop_loss)
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
               lr: float = 1e-4, seed: int = 0, optimizer: str = "adam", stop_loss: float | None = None) -> Update:
    """Fine-tune the full matrices (Adam, or plain SGD with optimizer="sgd") on `prefix`'s loss, for `steps`
    steps or until the loss reaches `stop_loss`; return ΔW = W_after - W_before per matrix. The model's weights
    are restored afterwards."""
    layers, types = _check_train_args(model, prefix, layers, types, steps, lr)
    names = [module_name(model, l, t) for l in layers for t in types]
    before = {n: get_module(model, n).weight.detach().clone() for n in names}
    with _frozen(model):
        torch.manual_seed(seed)
        try:
            losses = _adam_steps(model, prefix, [get_module(model, n).weight for n in names], steps, lr, optimizer,
                                 stop_loss)
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
