"""The bridge's fast paths (helpers.fast_bridge) change speed, never results: fused attention agrees with
TransformerLens's step-by-step attention to float32 rounding, single-pass norms agree bit for bit, and any
hook on a pattern, a score or a norm's scale sends that call back to TransformerLens's own path."""
import pytest
import torch

import helpers
from helpers import fast_bridge as F
from helpers import interventions as I
from helpers import models
from tests.conftest import EIFFEL

PROMPTS = [EIFFEL, "Hi", "One two three four five six seven eight nine ten eleven twelve"]


def close(fast: torch.Tensor, slow: torch.Tensor) -> bool:
    """Within float32 rounding of the logits' scale: |Δ| <= 1e-5 x max |logit| (issue 24's bar)."""
    return bool((fast - slow).abs().max() <= 1e-5 * slow.abs().max())


def both(model, run):
    """`run()` with the fast paths, then with TransformerLens's own paths (and the fast paths back)."""
    fast = run()
    F.uninstall(model)
    try:
        slow = run()
    finally:
        F.install(model)
    return fast, slow


@pytest.fixture
def fused_calls(monkeypatch) -> list[bool]:
    """Every attention layer's decision, call by call: True when it took the fused path."""
    decisions: list[bool] = []
    real = F._fused_now
    monkeypatch.setattr(F, "_fused_now", lambda a, kw, h: decisions.append(real(a, kw, h)) or decisions[-1])
    return decisions


def test_every_layer_gets_the_fast_paths(model):
    assert F.installed(model) == {"attention": model.cfg.n_layers, "norm": 2 * model.cfg.n_layers + 1, "unembed": 1}
    assert all(F.why_not(a) is None for a in F._attention_layers(model))


@torch.no_grad()
def test_fused_attention_matches_step_by_step(model):
    tokens = torch.randint(100, 40000, (3, 40), generator=torch.Generator().manual_seed(0))
    fast, slow = both(model, lambda: model(tokens))
    assert close(fast, slow) and not torch.equal(fast, slow)  # SDPA really ran, and agrees


@torch.no_grad()
def test_left_padding_cache_steering_and_patching_agree(model):
    tokens = I.to_tokens(model, PROMPTS)
    mask = I.attention_mask(model, tokens)
    assert not mask.all()  # the batch is really padded
    fast, slow = both(model, lambda: model(tokens, attention_mask=mask))
    assert torch.isfinite(fast).all() and close(fast[mask.bool()], slow[mask.bool()])
    vec = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    assert close(*both(model, lambda: I.add_vector(model, PROMPTS, vec, 5, scale=4.0)))
    name = I.resid_name(model, 12)
    fast, slow = both(model, lambda: I.run_with_cache(model, PROMPTS, [name])[1][name])
    assert close(fast, slow)


def test_single_pass_norms_and_the_lean_unembedding_are_bit_identical(model):
    tokens = torch.randint(100, 40000, (2, 24), generator=torch.Generator().manual_seed(2))
    head = model.unembed.original_component
    assert head.bias is not None and not head.bias.any()  # what the lean path skips: a bias of zeros
    attn = {a: a.__dict__.pop("forward") for a in F._attention_layers(model)}  # the rest fast, attention not
    try:
        with torch.no_grad():
            fast, slow = both(model, lambda: model(tokens))
    finally:
        for a, fwd in attn.items():
            a.__dict__["forward"] = fwd
    assert torch.equal(fast, slow)


def test_hooks_on_patterns_scores_and_scales_take_the_slow_path(model, fused_calls):
    taken = fused_calls
    tokens = torch.randint(100, 40000, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(tokens)
        assert taken == [True] * model.cfg.n_layers
        taken.clear()
        pattern = "blocks.3.attn.hook_pattern"
        _, cache = model.run_with_cache(tokens, names_filter=[pattern])
        assert taken.count(False) == 1 and not taken[3]
        rows = cache[pattern].sum(-1)
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)  # a real softmax pattern was cached
        # an edit of the scores must still act: blinding every head of layer 3 to all but BOS changes the output
        def bos_only(scores, hook):
            scores[..., 1:] = -torch.inf
            return scores

        edited = model.run_with_hooks(tokens, fwd_hooks=[("blocks.3.attn.hook_attn_scores", bos_only)])
        F.uninstall(model)
        try:
            reference = model.run_with_hooks(tokens, fwd_hooks=[("blocks.3.attn.hook_attn_scores", bos_only)])
        finally:
            F.install(model)
        assert close(edited, reference) and not close(edited, model(tokens))
    seen = []
    with model.hooks(fwd_hooks=[("blocks.2.ln1.hook_scale", lambda x, hook: seen.append(x.shape))]):
        with torch.no_grad():
            model(tokens)
    assert seen == [torch.Size([2, 16, 1])]  # the norm's own hook point still fires when hooked
    head = model.unembed.original_component
    with torch.no_grad():
        head.bias[7] = 1.0  # a bias that is not all zeros is added again
        try:
            shifted = model(tokens)
        finally:
            head.bias[7] = 0.0
        plain = model(tokens)
    assert torch.allclose(shifted[..., 7] - plain[..., 7], torch.ones(()), atol=1e-4)


def test_gradients_with_left_padding_are_finite_and_agree(model):
    tokens = I.to_tokens(model, PROMPTS)
    weight = model.blocks[3].attn.q.original_component.weight

    def grads():
        logits = model(tokens, attention_mask=I.attention_mask(model, tokens))
        logits[:, -1].logsumexp(-1).sum().backward()
        out = [p.grad.clone() for p in model.parameters() if p.grad is not None] + [weight.grad.clone()]
        model.zero_grad(set_to_none=True)
        return out

    fast, slow = both(model, grads)
    assert fast and all(torch.isfinite(g).all() for g in fast)
    assert (fast[-1] - slow[-1]).abs().max() <= 1e-3 * slow[-1].abs().max()  # a query weight deep in the stack


def test_forward_mode_jacobians_take_the_slow_path(model, fused_calls):
    """torch.func.jvp has no rule for SDPA on CPU: inside a transform every layer takes the step-by-step path."""
    from helpers import linear_rep as LR

    tokens = torch.randint(100, 40000, (1, 8), generator=torch.Generator().manual_seed(5))
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.6.hook_resid_pre"])
    x = cache["blocks.6.hook_resid_pre"][0, -1].detach()

    def fn(h):  # from layer 6's residual at the last position to the next-token logits
        def put(resid, hook):
            resid = resid.clone()
            resid[:, -1] = h
            return resid

        return model.run_with_hooks(tokens, fwd_hooks=[("blocks.6.hook_resid_pre", put)])[0, -1, :5]

    tangents = torch.randn(2, model.cfg.d_model, generator=torch.Generator().manual_seed(6))
    fused_calls.clear()
    _, jv = LR.jvp_batch(fn, x, tangents)
    taken = list(fused_calls)
    assert True in taken and taken[-model.cfg.n_layers:] == [False] * model.cfg.n_layers  # fn(x) fused, jvp not
    eps = 1e-2
    finite = torch.stack([(fn(x + eps * t) - fn(x - eps * t)) / (2 * eps) for t in tangents]).detach()
    assert torch.isfinite(jv).all() and torch.allclose(jv, finite, rtol=0.05, atol=0.05)


@torch.no_grad()
def test_generation_with_a_kv_cache_is_unchanged(model):
    fast, slow = both(model, lambda: model.generate(EIFFEL, max_new_tokens=6, do_sample=False, verbose=False))
    assert fast == slow


def test_sliding_window_and_qk_norms_of_a_tiny_gemma3(tmp_path):
    """Gemma-3's layout (per-head Q/K norms, sliding-window layers, one key/value head): a random tiny copy with
    a 6-token window, so a 20-token input really slides; fused == step by step == the Hugging Face model."""
    folder = models.save_tiny_model(tmp_path / "gemma", architecture="gemma3", n_layers=4, d_model=128, n_heads=4)
    small = helpers.load_model(str(folder), device="cpu", verbose=False)
    assert F.installed(small)["attention"] == 4
    scaling = small.blocks[0].attn.original_component.scaling
    assert scaling != (128 // 4) ** -0.5  # query_pre_attn_scalar is not head_dim: a wrong scale would show
    hf, _ = models.load_hf(str(folder), device="cpu")
    tokens = torch.randint(100, 40000, (3, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fast, slow = both(small, lambda: small(tokens))
        reference = hf(tokens).logits
        hf.config.sliding_window = 64  # the window really matters at 20 tokens
        unwindowed = hf(tokens).logits
    assert close(fast, slow) and not torch.equal(fast, slow)  # the fused path really ran, and agrees
    assert close(slow, reference) and not close(unwindowed, reference)


def test_a_mask_edited_in_place_is_checked_again(model):
    """The plain-causal answer is cached per mask object for one forward; an in-place edit must invalidate it."""
    attn = model.blocks[0].attn
    mask = torch.zeros(1, 1, 6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    assert F._plain_causal(attn, mask, 6, 6)
    mask[..., 5, 2] = torch.finfo(torch.float32).min  # attention knockout: query 5 may no longer see key 2
    assert not F._plain_causal(attn, mask, 6, 6)


def test_hooks_on_the_attention_module_global_hooks_and_half_precision_take_the_slow_path(model, tmp_path,
                                                                                             fused_calls):
    tokens = torch.randint(100, 40000, (1, 8), generator=torch.Generator().manual_seed(7))
    seen = []
    handle = model.blocks[4].attn.register_forward_hook(lambda m, args, out: seen.append(out[1]))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        handle.remove()
    assert seen and seen[0] is not None and seen[0].shape[-2:] == (8, 8)  # the pattern, as TransformerLens returns
    calls = fused_calls
    calls.clear()
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda *a: None)
    try:
        with torch.no_grad():
            model(tokens)
        assert calls and not any(calls)
        calls.clear()
        folder = models.save_tiny_model(tmp_path / "tiny", n_layers=2, d_model=96, n_heads=6)
        half = helpers.load_model(str(folder), device="cpu", dtype=torch.bfloat16, verbose=False)
        handle.remove()
        with torch.no_grad():
            half(tokens)
        assert len(calls) == 2 and not any(calls)  # bf16: TransformerLens rounds patterns, SDPA would not
    finally:
        handle.remove()


def test_load_model_fast_flag(model, monkeypatch):
    with pytest.raises(TypeError, match="fast must be a bool"):
        helpers.load_model(fast="yes")
    plain = helpers.load_model(fast=False, verbose=False)
    assert F.installed(plain) == {"attention": 0, "norm": 0, "unembed": 0}
    monkeypatch.setenv("WORKBOOK_FAST", "0")  # what a rerun of a notebook the old way sets
    assert F.installed(helpers.load_model(verbose=False)) == {"attention": 0, "norm": 0, "unembed": 0}
