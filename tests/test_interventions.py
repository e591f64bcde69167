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
    n_pre, n_post = len(model._forward_pre_hooks), len(model._forward_hooks)
    with I.steering(model, torch.ones(model.cfg.d_model) * 3, 8):
        inside = I.logits(model, EIFFEL)
    assert not torch.allclose(inside, ref)
    assert torch.equal(I.logits(model, EIFFEL), ref)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == (n_pre, n_post)


def test_position_mask_counts_inside_each_left_padded_prompt():
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])
    after_bos = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(I.position_mask(mask, I.AFTER_BOS), after_bos)
    assert torch.equal(I.position_mask(mask, slice(1, None)), after_bos)
    assert torch.equal(I.position_mask(mask, None), mask.bool())
    assert torch.equal(I.position_mask(mask, -1), torch.zeros_like(after_bos).index_fill_(1, torch.tensor([4]), True))
    assert torch.equal(I.position_mask(mask, 0), torch.tensor([[1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 1]]).bool())
    with pytest.raises(IndexError):
        I.position_mask(mask, 1)        # the last prompt is BOS only
    with pytest.raises(ValueError, match="position name"):
        I.position_mask(mask, "after_BOS")


@pytest.mark.parametrize("pos", [I.AFTER_BOS, slice(1, None), -1, None])
def test_steering_a_padded_batch_equals_steering_each_prompt_alone(model, pos):
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1)) * 8
    assert len({len(model.to_str_tokens(p)) for p in PROMPTS}) > 1   # the batch really is padded
    batch = I.add_vector(model, PROMPTS, v, 9, pos=pos)
    for i, prompt in enumerate(PROMPTS):
        assert torch.allclose(batch[i], I.add_vector(model, prompt, v, 9, pos=pos)[0], atol=1e-3)


def test_residual_stream_positions_count_inside_each_prompt(model):
    batch = I.residual_stream(model, PROMPTS, layers=[4], pos=[1, -1])
    assert batch.shape == (1, len(PROMPTS), 2, model.cfg.d_model)
    for i, prompt in enumerate(PROMPTS):
        assert torch.allclose(batch[0, i], I.residual_stream(model, prompt, layers=[4], pos=[1, -1])[0, 0], atol=1e-3)


def _steered_generation(model, prompt, v, layer, n_new, **kwargs):
    with I.steering(model, v, layer):
        out = model.generate(prompt, max_new_tokens=n_new, do_sample=False, verbose=False, stop_at_eos=False,
                             output_logits=True, **kwargs)
    return out.sequences, torch.stack(out.logits, 1)   # [1, P + n], [1, n, vocab]


def test_steered_generation_steers_every_new_token(model):
    """With the key/value cache each step's residual stream holds only the new token: it must be steered too.
    Step k's logits then equal a full forward pass of the same tokens with the same steering, and differ from
    a run where only the prompt was steered (what an unsteered new token gives)."""
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2)) * 8
    prompt, n_new = "My day at work was", 6
    n_prompt = I.to_tokens(model, prompt).shape[1]
    seq, steps = _steered_generation(model, prompt, v, 9, n_new)
    full = I.add_vector(model, seq, v, 9, return_pos=None)[:, n_prompt - 1:-1]      # no cache, all after BOS
    assert torch.allclose(steps, full, atol=1e-3)
    prompt_only = I.add_vector(model, seq, v, 9, pos=slice(1, n_prompt), return_pos=None)[:, n_prompt - 1:-1]
    assert torch.allclose(steps[:, 0], prompt_only[:, 0], atol=1e-3)               # step 0 reads the prompt only
    assert (steps[:, 1:] - prompt_only[:, 1:]).abs().amax(-1).min() > 0.1          # later steps are steered
    seq_nocache, _ = _steered_generation(model, prompt, v, 9, n_new, use_past_kv_cache=False)
    assert torch.equal(seq_nocache, seq)
    with torch.no_grad():
        plain = model.generate(prompt, max_new_tokens=n_new, do_sample=False, verbose=False, stop_at_eos=False,
                               return_type="tokens")
    assert not torch.equal(plain[:, n_prompt + 1:], seq[:, n_prompt + 1:])        # differs beyond the first token


def test_steered_batched_generation_equals_each_prompt_alone(model):
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3)) * 8
    with I.steering(model, v, 9):
        batch = model.generate(PROMPTS, max_new_tokens=4, do_sample=False, verbose=False, stop_at_eos=False)
        alone = [model.generate(p, max_new_tokens=4, do_sample=False, verbose=False, stop_at_eos=False) for p in PROMPTS]
    assert batch == alone


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_steering_vector_raises_at_once(model, bad):
    v = torch.zeros(model.cfg.d_model)
    v[7] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        I.add_vector(model, EIFFEL, v, 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        with I.steering(model, v, 3):
            pass
    with pytest.raises(ValueError, match="finite"):
        I.add_vector(model, EIFFEL, torch.ones(model.cfg.d_model), 3, scale=bad)


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


def test_run_until_stops_at_the_named_hook_with_the_same_values(model):
    tokens = I.to_tokens(model, [EIFFEL, "Hello"])
    mid, above = I.resid_name(model, 3), I.resid_name(model, 4)
    seen = {}
    keep = lambda name: (lambda act, hook=None: seen.__setitem__(name, act.detach().clone()))
    I.run_until(model, tokens, mid, [(mid, keep(mid)), (above, keep(above))],
                attention_mask=I.attention_mask(model, tokens))
    assert above not in seen                                   # nothing above the stop ran
    _, cache = I.run_with_cache(model, [EIFFEL, "Hello"], [mid])
    assert torch.equal(seen[mid], cache[mid])
    with pytest.raises(KeyError):
        I.run_until(model, tokens, "blocks.999.hook_resid_pre")


def test_module_input_stops_at_the_module():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    ran = []
    net[2].register_forward_hook(lambda *a: ran.append(1))
    wrapper = lambda x: net(x)
    x = torch.randn(5, 3)
    (got,) = I.module_input(lambda **kw: wrapper(kw["x"]), net[2], x=x)
    assert torch.allclose(got, net[1](net[0](x))) and not ran
