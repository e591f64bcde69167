"""helpers.normalization on tiny random llama and gemma3 models: identities with known answers."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import normalization as N


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3(seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
                           sliding_window=16, bos_token_id=1)
    return Gemma3ForCausalLM(cfg).eval()


def rows(n: int = 6, T: int = 10, seed: int = 0, ragged: bool = True) -> N.Rows:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, 64, (n, T), generator=g)
    tokens[:, 0] = 1
    mask = torch.ones(n, T, dtype=torch.bool)
    if ragged:
        for i in range(n):
            mask[i, T - i % 3:] = False
    tokens[~mask] = 0
    return N.Rows(tokens, mask, [f"doc{i // 2}" for i in range(n)])


class FakeTokenizer:
    bos_token_id, pad_token_id = 1, 0

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [2 + (ord(c) % 60) for c in text]})()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_live_wrappers_change_nothing_and_install_is_idempotent(make):
    model, r = make(), rows()
    with torch.no_grad():
        ref = model(input_ids=r.tokens, attention_mask=r.mask.long()).logits
    first = N.install(model)
    second = N.install(model)
    assert [w.name for w in first] == [w.name for w in second]
    assert all(a is b for a, b in zip(first, second))
    with torch.no_grad():
        out = model(input_ids=r.tokens, attention_mask=r.mask.long()).logits
    assert torch.equal(out, ref)


def test_sites_follow_the_papers_order():
    roles = [s.role for s in N.norm_sites(tiny_llama())]
    assert roles == ["mlp_in", "mlp_in", "attn_in", "attn_in", "final"]
    g = N.norm_sites(tiny_gemma3())
    assert [s.role for s in g][:4] == ["mlp_in", "mlp_in", "attn_in", "attn_in"] and g[-1].role == "final"
    others = {s.name.split(".")[-1] for s in g if s.role == "other"}
    assert {"post_attention_layernorm", "post_feedforward_layernorm", "q_norm", "k_norm"} <= others


def test_calibrated_constant_is_the_mean_rms_of_non_bos_tokens():
    model, r = tiny_llama(), rows()
    N.install(model)
    seen = []
    h = model.model.norm.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    stats = N.calibrate(model, r)
    h.remove()
    x = torch.cat(seen)
    rms = x.pow(2).mean(-1).add(model.model.norm.eps).sqrt()
    body = r.mask.clone()
    body[:, 0] = False
    assert stats["model.norm"]["mean_rms"] == pytest.approx(float(rms[body].mean()), rel=1e-5)
    assert float(model.model.norm.scale) == pytest.approx(1 / float(rms[body].mean()), rel=1e-5)
    assert float(model.model.norm.bos_scale) == pytest.approx(1 / float(rms[:, 0].mean()), rel=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_freezing_to_the_tokens_own_scale_reproduces_the_model(make):
    """On one row of BOS + one token, the calibrated constants are that token's own rms (and BOS's): frozen = live.
    (gemma3's per-head q/k norms get one constant for all heads, so they are left live here.)"""
    model = make()
    one = N.Rows(torch.tensor([[1, 7]]), torch.ones(1, 2, dtype=torch.bool), ["a"])
    N.install(model)
    N.calibrate(model, one)
    with torch.no_grad():
        live = model(input_ids=one.tokens).logits
        names = [w.name for w in N.norms(model) if not w.name.endswith(("q_norm", "k_norm"))]
        with N.frozen(model, names):
            froz = model(input_ids=one.tokens).logits
    assert torch.allclose(froz, live, atol=1e-4)


def test_frozen_context_restores_state_and_rejects_bad_scales():
    model, r = tiny_llama(), rows()
    N.install(model)
    N.calibrate(model, r)
    before = float(model.model.norm.scale)
    with N.frozen(model, "final", scales={"model.norm": 3.0}):
        assert model.model.norm.frozen and float(model.model.norm.scale) == 3.0
    assert not model.model.norm.frozen and float(model.model.norm.scale) == before
    with pytest.raises(ValueError, match="finite"):
        with N.frozen(model, "final", scales={"model.norm": float("nan")}):
            pass
    assert not model.model.norm.frozen


def test_frozen_norm_is_linear_in_its_input():
    model, r = tiny_llama(), rows()
    N.install(model)
    N.calibrate(model, r)
    norm = model.model.norm
    norm.frozen, norm.bos_special = True, False
    x, y = torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    assert torch.allclose(norm(x + y), norm(x) + norm(y), atol=1e-5)
    assert torch.allclose(norm(3 * x), 3 * norm(x), atol=1e-5)


def test_errors_are_clear():
    model, r = tiny_llama(), rows()
    N.install(model)
    with pytest.raises(ValueError, match="unknown norm group"):
        N.select(model, "ln_2")
    with pytest.raises(ValueError, match="no norm named"):
        N.select(model, ["model.layers.9.input_layernorm"])
    N.set_frozen(model, "final")
    with pytest.raises(RuntimeError, match="before calibration"):
        model(input_ids=r.tokens)
    N.set_frozen(model, ())
    left = N.Rows(r.tokens.flip(1), r.mask.flip(1), r.group)
    with pytest.raises(ValueError, match="right padding"):
        N.token_losses(model, left)
    with pytest.raises(TypeError, match="load_hf"):
        N.norm_sites(torch.nn.Linear(2, 2))
    other = tiny_llama()
    other.model.norm = torch.nn.LayerNorm(32)
    with pytest.raises(TypeError, match="RMSNorm only"):
        N.norm_sites(other)
    with pytest.raises(ValueError, match="layer must be"):
        N.last_token_residual(model, r, 5)
    long = N.Rows(torch.ones(1, 40, dtype=torch.long), torch.ones(1, 40, dtype=torch.bool), ["a"])
    with pytest.raises(ValueError, match="context"):
        N.token_losses(model, long)


def test_make_rows_starts_with_bos_and_drops_short_texts():
    r = N.make_rows(FakeTokenizer(), ["hello world", "hi", "abcdefghijkl"], ["a", "b", "c"], max_len=6, min_len=4)
    assert r.group == ["a", "c"] and r.tokens.shape == (2, 6)
    assert bool((r.tokens[:, 0] == 1).all()) and bool(r.mask.all())
    with pytest.raises(ValueError, match="no text"):
        N.make_rows(FakeTokenizer(), ["a"], ["a"], max_len=6, min_len=4)


def test_dla_sums_exactly_when_the_final_norm_is_frozen_and_not_when_live():
    model, r = tiny_llama(), rows()
    N.install(model)
    N.calibrate(model, r)
    prompt = r.tokens[:1, :8]
    live = N.direct_logit_attribution(model, prompt, token=5)
    assert live["sum_dla"] == pytest.approx(live["logit"], abs=1e-4)        # the cached scale: exact by construction
    assert float((live["ablation"] - live["dla"]).abs().max()) > 1e-3       # but ablation != DLA
    N.set_frozen(model, "final", bos_special=False)
    fro = N.direct_logit_attribution(model, prompt, token=5)
    assert fro["sum_dla"] == pytest.approx(fro["logit"], abs=1e-4)
    assert torch.allclose(fro["ablation"], fro["dla"], atol=1e-4)
    assert len(fro["labels"]) == 1 + 2 * 2


def test_random_scales_lie_in_the_observed_range():
    model, r = tiny_llama(), rows()
    N.install(model)
    stats = N.calibrate(model, r)
    rs = N.random_scales(stats, seed=1)
    for name, s in stats.items():
        assert 1 / s["p99"] - 1e-9 <= rs[name] <= 1 / s["p01"] + 1e-9
    assert rs == N.random_scales(stats, seed=1)


def test_schedule_and_finetune_remove_every_norm_and_bos_last():
    model, r = tiny_llama(), rows(n=8)
    N.install(model)
    plan = N.schedule(model, steps_per_stage=1, per_layer=True)
    assert plan[-1][1] == "bos_off" and [a for _, a in plan[:2]] == [["model.layers.0.post_attention_layernorm"],
                                                                      ["model.layers.1.post_attention_layernorm"]]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hist = N.finetune(model, r, steps=N.total_steps(plan, 1), lr=1e-3, batch_size=4, plan=plan, calib=r)
    assert all(torch.isfinite(torch.tensor(hist)))
    assert all(w.frozen and not w.bos_special for w in N.norms(model))
    change = N.relative_weight_change(before, model.state_dict())
    assert change and all(c["relative change"] > 0 for c in change)
    assert all(c["relative change"] == 0 for c in N.relative_weight_change(before, before))
    with pytest.raises(ValueError, match="calib"):
        N.finetune(model, r, steps=2, plan=plan)


def test_last_token_residual_picks_each_rows_last_real_token():
    model, r = tiny_llama(), rows()
    N.install(model)
    x = N.last_token_residual(model, r, 2)
    last = int(r.mask[1].sum()) - 1
    one = N.Rows(r.tokens[1:2, :last + 1], r.mask[1:2, :last + 1], ["a"])
    assert torch.allclose(x[1], N.last_token_residual(model, one, 2)[0], atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_cached_sweep_equals_full_forward_passes(make):
    model, r = make(), rows()
    N.install(model)
    N.calibrate(model, r)
    names = [w.name for w in N.norms(model)]
    configs = [names[:k] for k in range(1, len(names) + 1)]
    single = N.sweep(model, r, [[nm] for nm in names], batch_size=4)
    cum = N.sweep(model, r, configs, cumulative=True, batch_size=4)
    for nm, got in zip(names, single):
        with N.frozen(model, [nm]):
            assert torch.allclose(got, N.token_losses(model, r), atol=1e-4, equal_nan=True)
    for c, got in zip(configs, cum):
        with N.frozen(model, c):
            assert torch.allclose(got, N.token_losses(model, r), atol=1e-4, equal_nan=True)
    with pytest.raises(ValueError, match="contain the previous"):
        N.sweep(model, r, [names[:2], names[:1]], cumulative=True)


def test_overflowed_tokens_are_scored_as_a_uniform_guess():
    losses = torch.tensor([[1.0, float("inf"), float("nan")]])
    assert N.overflow_share(losses) == 0.5
    assert N.row_means(losses, vocab_size=64)[0] == pytest.approx((1 + torch.log(torch.tensor(64.0)).item()) / 2)


def test_sweep_options_override_bos_and_scales_per_configuration():
    model, r = tiny_llama(), rows()
    N.install(model)
    N.calibrate(model, r)
    a, b = N.sweep(model, r, [["model.norm"], ["model.norm"]],
                   options=[{"scales": {"model.norm": 2.0}}, {"bos_special": False}])
    with N.frozen(model, "final", scales={"model.norm": 2.0}):
        assert torch.allclose(a, N.token_losses(model, r), atol=1e-4, equal_nan=True)
    with N.frozen(model, "final", bos_special=False):
        assert torch.allclose(b, N.token_losses(model, r), atol=1e-4, equal_nan=True)
    with pytest.raises(ValueError, match="one dict per"):
        N.sweep(model, r, [["model.norm"]], options=[{}, {}])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_frozen_output_is_gain_times_input_times_constant(make):
    model = make()
    N.install(model)
    w = N.norms(model)[0]
    with torch.no_grad():
        w.norm.weight.normal_()
        w.scale.fill_(0.5)
        w.bos_scale.fill_(2.0)
        w.frozen = True
        x = torch.randn(2, 3, w.norm.weight.shape[0])
        gamma = w.norm(torch.ones(1, 1, x.shape[-1]))[0, 0] * (1 + w.eps) ** 0.5
        assert torch.allclose(w(x)[:, 1:], x[:, 1:] * gamma * 0.5, atol=1e-5)
        assert torch.allclose(w(x)[:, 0], x[:, 0] * gamma * 2.0, atol=1e-5)
        assert torch.isfinite(w(torch.full((1, 2, x.shape[-1]), 1e25))).all()   # no square to overflow


def test_scale_deviation_is_zero_for_a_token_at_the_mean_and_cosine_of_identical_updates_is_one():
    model = tiny_llama()
    one = N.Rows(torch.tensor([[1, 7]]), torch.ones(1, 2, dtype=torch.bool), ["a"])
    N.install(model)
    st = N.calibrate(model, one)
    dev = N.scale_deviation(model, one, ["model.norm"], st)
    assert dev.shape == (1, 2) and float(dev[0, 1]) == pytest.approx(0.0, abs=1e-5)
    before = {"w": torch.zeros(2, 2)}
    after = {"w": torch.ones(2, 2)}
    assert N.update_cosine(before, after, after, "w") == pytest.approx(1.0)
    assert N.relative_weight_change({"w": torch.ones(2, 2)}, {"w": torch.ones(2, 2)}, skip=["w"]) == []


def _overflow_rows(n: int = 8, bad: tuple[int, ...] = (0, 1)) -> N.Rows:
    """Rows where only those in `bad` hold token 63, whose embedding is made huge by `_huge_token`."""
    r = rows(n=n, ragged=False)
    r.tokens[r.tokens == 63] = 5
    for i in bad:
        r.tokens[i, 3] = 63
    return r


def _huge_token(model) -> None:
    with torch.no_grad():
        model.model.embed_tokens.weight[63] = 1e30


def test_finetune_leaves_out_rows_whose_logits_overflow_and_counts_them():
    model = tiny_llama()
    N.install(model)
    N.calibrate(model, rows(n=8))
    N.set_frozen(model, "all")
    _huge_token(model)
    hist = N.finetune(model, _overflow_rows(), steps=2, lr=1e-3, batch_size=8)
    assert hist.skipped == [(0, 2), (1, 2)] and hist.rows_skipped == 4
    assert all(torch.isfinite(torch.tensor(list(hist))))
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad and p.shape[0] != 64)
    with pytest.raises(FloatingPointError, match="every row"):
        N.finetune(model, _overflow_rows(n=4, bad=(0, 1, 2, 3)), steps=1, lr=1e-3, batch_size=4)


def test_calibrate_leaves_out_overflowing_rows_until_half_of_them_overflow():
    model = tiny_llama()
    N.install(model)
    clean = N.calibrate(model, _overflow_rows(bad=()))
    N.set_frozen(model, ["model.layers.0.post_attention_layernorm"])
    _huge_token(model)
    stats = N.calibrate(model, _overflow_rows(bad=(0, 1)), ["model.layers.1.input_layernorm"])
    s = stats["model.layers.1.input_layernorm"]
    assert s["overflow_rows"] == 2 and 0 < s["mean_rms"] < float("inf")
    assert clean["model.layers.1.input_layernorm"]["overflow_rows"] == 0
    with pytest.raises(FloatingPointError, match="4 of 8 calibration rows"):
        N.calibrate(model, _overflow_rows(bad=(0, 1, 2, 3)), ["model.layers.1.input_layernorm"])


def test_finetune_skips_a_step_with_a_non_finite_gradient_and_stops_when_they_recur():
    model, r = tiny_llama(), rows(n=8)
    N.install(model)
    calls = []
    hook = model.model.layers[1].mlp.down_proj.weight.register_hook(
        lambda g: g * float("nan") if not calls.append(1) and len(calls) == 1 else g)
    hist = N.finetune(model, r, steps=4, lr=1e-3, batch_size=4)
    assert hist.skipped_steps == [0] and math.isnan(hist[0]) and all(math.isfinite(x) for x in hist[1:])
    hook.remove()
    model = tiny_llama()
    N.install(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.model.layers[1].mlp.down_proj.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(FloatingPointError, match="not finite in 2 of 2 steps"):
        N.finetune(model, r, steps=2, lr=1e-3, batch_size=4)
    assert all(torch.allclose(v, model.state_dict()[k], rtol=0, atol=0, equal_nan=True) for k, v in before.items())


def test_bos_ramp_moves_the_first_position_constant_geometrically_to_the_shared_one():
    def run(steps: int, seen: list | None = None):
        model, r = tiny_llama(), rows(n=8)
        N.install(model)
        plan = N.schedule(model, steps_per_stage=1)
        w = N.norms(model)[0]
        if seen is not None:   # BOS's constant at every training forward pass
            w.register_forward_hook(lambda mod, i, o: seen.append(float(mod.bos_scale)) if model.training else None)
        N.finetune(model, r, steps=plan[-1][0] + steps, lr=1e-4, batch_size=4, plan=plan, calib=r, bos_ramp=4)
        return model, w, plan[-1][0]
    _, w0, _ = run(0)                   # every norm frozen, the ramp not started
    b, a = float(w0.bos_scale), float(w0.scale)
    seen: list[float] = []
    m4, w4, start = run(4, seen)        # halfway (step start + 1): the geometric mean; done: the shared constant
    assert seen[start + 1] == pytest.approx((a * b) ** 0.5, rel=1e-5) and abs(a - b) > 1e-3 * a
    assert all(not x.bos_special for x in N.norms(m4))
    assert float(w4.bos_scale) == pytest.approx(a, rel=1e-5)
    with pytest.raises(ValueError, match="bos_ramp"):
        N.finetune(m4, rows(), steps=1, bos_ramp=-1)
    with pytest.raises(ValueError, match="BOS ramp starts at step"):
        run(2)


def test_calibrate_leaves_out_rows_whose_input_explodes_so_one_token_cannot_set_the_average():
    model = tiny_llama()
    N.install(model)
    clean = N.calibrate(model, _overflow_rows(bad=()))["model.layers.0.input_layernorm"]
    with torch.no_grad():
        model.model.embed_tokens.weight[63] = 1e4 * N.EXPLODED   # finite, but far above every other token
    s = N.calibrate(model, _overflow_rows(bad=(0, 1)))["model.layers.0.input_layernorm"]
    assert s["overflow_rows"] == 2 and s["mean_rms"] == pytest.approx(clean["mean_rms"], rel=0.5)
