"""Loading: the offline default works, caching is exact, and bad input fails fast and clearly."""
import time

import pytest
import torch

import helpers
from helpers import interventions as I
from helpers import models
from tests.conftest import EIFFEL


def test_offline_model_knows_paris(model):
    logits = I.logits(model, EIFFEL)
    assert model.tokenizer.decode([logits[0].argmax().item()]) == " Paris"


def test_describe_matches_smollm2(model):
    info = helpers.describe(model)
    assert (info.n_layers, info.d_model, info.n_heads, info.d_vocab) == (30, 576, 9, 49152)
    assert info.dtype == "float32"


def test_cached_load_gives_identical_logits(model):
    again = helpers.load_model(verbose=False)
    assert torch.equal(I.logits(model, EIFFEL), I.logits(again, EIFFEL))


def test_cached_load_is_fast(model):
    t0 = time.perf_counter()
    helpers.load_model(verbose=False)
    assert time.perf_counter() - t0 < 10  # ~1.5 s warm; generous for a loaded CI machine


def test_local_folder_and_gguf_path_load_the_same_model(model):
    gguf = models.offline_gguf_path()
    folder = models.dequantized_folder(gguf, verbose=False)
    from_folder = helpers.load_model(str(folder), verbose=False)
    from_gguf = helpers.load_model(str(gguf), verbose=False)
    ref = I.logits(model, EIFFEL)
    assert torch.allclose(I.logits(from_folder, EIFFEL), ref, atol=1e-4)
    assert torch.equal(I.logits(from_gguf, EIFFEL), ref)


def test_random_weights_model_differs_and_is_seeded(model):
    a = helpers.load_model(random_weights=True, seed=1, verbose=False)
    b = helpers.load_model(random_weights=True, seed=1, verbose=False)
    la, lb = I.logits(a, EIFFEL), I.logits(b, EIFFEL)
    assert torch.equal(la, lb)
    assert not torch.allclose(la, I.logits(model, EIFFEL))
    assert a.workbook_name.endswith("(random weights)")


def test_unknown_model_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(helpers.ModelNotAvailableError) as err:
        helpers.load_model("no-such-org/no-such-model")
    assert time.perf_counter() - t0 < 5
    message = str(err.value)
    assert helpers.DEFAULT_MODEL in message and "no-such-org/no-such-model" in message


def test_unreachable_hub_sets_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(models, "_HUB_REACHABLE", None)
    t0 = time.perf_counter()
    assert models.hub_reachable(timeout=1.0) is False
    assert time.perf_counter() - t0 < 5
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("bad, error", [(123, TypeError), ("", ValueError), ("/no/such/file.gguf", FileNotFoundError),
                                        ("./no/such/folder", FileNotFoundError)])
def test_bad_names_raise(bad, error):
    with pytest.raises(error):
        helpers.load_model(bad)


@pytest.mark.parametrize("kwargs, error", [(dict(device=3), TypeError), (dict(device="tpu9"), ValueError),
                                           (dict(dtype="float99"), ValueError), (dict(random_weights="yes"), TypeError)])
def test_bad_arguments_raise(kwargs, error):
    with pytest.raises(error):
        helpers.load_model(**kwargs)


def test_missing_architectures_filled_from_model_type():
    from transformers import LlamaConfig

    config = LlamaConfig()
    config.architectures = None
    models._fill_architectures(config)
    assert config.architectures == ["LlamaForCausalLM"]


def test_list_models_shows_offline_default():
    table = helpers.list_models(check_hub=False)
    row = table[table.name == helpers.DEFAULT_MODEL]
    assert len(row) == 1 and bool(row.available.iloc[0])


def test_prompt_longer_than_the_context_raises_at_once(model):
    n_ctx = model.cfg.n_ctx
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=f"context of {n_ctx}"):
        I.logits(model, "word " * (n_ctx + 800))           # ~9,000 tokens for the 8,192-token default
    with pytest.raises(ValueError, match=f"context of {n_ctx}"):
        I.residual_stream(model, ["short", "word " * (n_ctx + 800)], layers=[1])
    with pytest.raises(ValueError, match=f"context of {n_ctx}"):
        I.to_tokens(model, torch.ones(1, n_ctx + 1, dtype=torch.long))
    assert time.perf_counter() - t0 < 5
    assert I.to_tokens(model, "word " * 100).shape[1] > 100     # an ordinary prompt is not truncated or refused


def test_load_reads_the_tokenizer_once_and_it_prepends_bos(model, monkeypatch):
    """load_model asks load_hf for the tokenizer the bridge uses (BOS added), so TransformerLens does not read
    the tokenizer files a second time; the bridge's tokenizer still prepends BOS."""
    from transformers import AutoTokenizer

    calls = []
    original = AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: calls.append(k) or original(cls, *a, **k)))
    fresh = helpers.load_model(verbose=False)
    assert len(calls) == 1 and calls[0].get("add_bos_token") is True
    assert fresh.tokenizer("Paris")["input_ids"][0] == fresh.tokenizer.bos_token_id
    assert torch.equal(fresh.to_tokens("The Eiffel Tower"), model.to_tokens("The Eiffel Tower"))


def test_save_tiny_model_loads_as_a_small_llama(tmp_path):
    folder = models.save_tiny_model(tmp_path / "tiny", n_layers=2, d_model=96, n_heads=6)
    small = helpers.load_model(str(folder), device="cpu")
    info = models.describe(small)
    assert (info.n_layers, info.d_model, info.n_heads, info.n_kv_heads, info.d_vocab) == (2, 96, 6, 2, 49152)
    logits = small(small.to_tokens(EIFFEL))
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="architecture"):
        models.save_tiny_model(tmp_path / "x", architecture="mamba")
    with pytest.raises(ValueError, match="multiple"):
        models.save_tiny_model(tmp_path / "y", d_model=100, n_heads=8)
