"""Hooks: interventions that should change nothing change nothing, and known answers come out."""
import pytest
import torch

from helpers import interventions as I
from tests.conftest import EIFFEL

PROMPTS = [EIFFEL, "I love", "The capital of Italy is"]


def test_patching_a_run_with_itself_changes_nothing(model):
    names = [I.resid_name(model, 5), I.hook_name(model, "z", 3), I.hook_name(model, "mlp_out", 10)]
    ref, cache = I.run_with_cache(model, EIFFEL, names)
    assert torch.equal(I.patch(model, EIFFEL, cache, return_pos=None), ref)


def test_patching_the_final_residual_transplants_the_output(model):
    other = "The Colosseum is located in the city of"
    assert model.to_tokens(other).shape == model.to_tokens(EIFFEL).shape
    name = I.resid_name(model, model.cfg.n_layers)
    source_logits, cache = I.run_with_cache(model, other, name)
    patched = I.patch(model, EIFFEL, cache, pos=-1)
    assert torch.allclose(patched, source_logits[:, -1], atol=1e-4)
    assert model.tokenizer.decode([patched[0].argmax().item()]) == " Rome"


def test_zero_steering_vector_changes_nothing(model):
    ref = I.logits(model, PROMPTS)
    for layer in (0, 12, model.cfg.n_layers):
        assert torch.equal(I.add_vector(model, PROMPTS, torch.zeros(model.cfg.d_model), layer), ref)


def test_steering_vector_changes_output_and_scales(model):
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 5
    ref = I.logits(model, EIFFEL)
    small = I.kl_divergence(ref, I.add_vector(model, EIFFEL, v, 10, scale=1.0)).item()
    large = I.kl_divergence(ref, I.add_vector(model, EIFFEL, v, 10, scale=10.0)).item()
    assert 0 < small < large


def test_steering_context_manager_removes_its_hook(model):
    ref = I.logits(model, EIFFEL)
    with I.steering(model, torch.ones(model.cfg.d_model) * 3, 8):
        inside = I.logits(model, EIFFEL)
    assert not torch.allclose(inside, ref)
    assert torch.equal(I.logits(model, EIFFEL), ref)


def test_logit_lens_last_layer_is_the_output(model):
    lens = I.logit_lens(model, EIFFEL)
    assert lens.shape == (model.cfg.n_layers + 1, 1, model.cfg.d_vocab)
    assert torch.allclose(lens[-1], I.logits(model, EIFFEL).log_softmax(-1), atol=1e-4)


def test_left_padded_batch_matches_single_prompts(model):
    batch = I.logits(model, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        assert torch.allclose(batch[i], I.logits(model, prompt)[0], atol=1e-3)


def test_residual_stream_shapes(model):
    acts = I.residual_stream(model, PROMPTS, layers=[0, 5, 30])
    assert acts.shape == (3, len(PROMPTS), model.cfg.d_model)
    all_pos = I.residual_stream(model, EIFFEL, layers=[2], pos=None)
    assert all_pos.shape == (1, 1, len(model.to_str_tokens(EIFFEL)), model.cfg.d_model)


def test_bad_layer_raises_with_valid_range(model):
    with pytest.raises(IndexError, match=r"0\.\.30"):
        I.resid_name(model, 31)
    with pytest.raises(IndexError, match=r"0\.\.29"):
        I.hook_name(model, "z", 30)
    with pytest.raises(TypeError):
        I.resid_name(model, 2.0)
    with pytest.raises(ValueError, match="unknown hook kind"):
        I.hook_name(model, "resid_middle", 3)


def test_bad_vector_and_hook_names_raise(model):
    with pytest.raises(ValueError, match="d_model"):
        I.add_vector(model, EIFFEL, torch.zeros(10), 3)
    with pytest.raises(KeyError):
        I.run_with_cache(model, EIFFEL, ["blocks.3.hook_nonsense"])


def test_token_id(model):
    assert model.tokenizer.decode([I.token_id(model, " Paris")]) == " Paris"
    with pytest.raises(ValueError, match="tokens"):
        I.token_id(model, " Eiffel")


def test_kl_divergence_known_values():
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.9, 0.1]]))
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.9)) + 0.5 * torch.log(torch.tensor(0.5 / 0.1))
    assert torch.allclose(I.kl_divergence(p, q), expected.reshape(1), atol=1e-6)
    assert I.kl_divergence(p, p).item() == 0.0


def test_top_k_changes(model):
    before = I.logits(model, EIFFEL)[0]
    after = before.clone()
    after[I.token_id(model, " Rome")] += 10
    table = I.top_k_changes(model, before, after, k=3)
    assert table.iloc[0].token == " Rome" and table.iloc[0].change == "up"
