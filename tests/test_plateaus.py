"""helpers.plateaus: perturbation batches, curve statistics, interpolation, clustering (known answers)."""
import math

import numpy as np
import pytest
import torch

from helpers import interventions as I
from helpers import geometry
from helpers import plateaus as P
from tests.conftest import EIFFEL

OTHER = "She opened the door and saw a"


def test_zero_step_gives_kl_exactly_zero_and_the_unperturbed_output(model):
    d = model.cfg.d_model
    dirs = P.isotropic_directions(3, d, torch.Generator().manual_seed(0))
    curve = P.perturbation_curve(model, EIFFEL, 5, dirs, [0.0, 10.0, 50.0])
    assert curve["kl"].shape == (3, 3) and curve["l2"].shape == (3, 3)
    assert torch.all(curve["kl"][:, 0] == 0) and torch.all(curve["l2"][:, 0] == 0)
    assert torch.all(curve["kl"][:, 2] > 0)
    # writing the prompt's own activation back changes nothing
    own = P.activations_at(model, [EIFFEL], 5)
    logits, _ = P.run_with_activation(model, EIFFEL, 5, own)
    assert torch.allclose(logits[0], I.logits(model, EIFFEL)[0], atol=1e-3)


def test_batched_perturbation_equals_one_at_a_time_forwards(model):
    d = model.cfg.d_model
    base = P.activations_at(model, [EIFFEL], 8)[0]
    acts = base + 30 * P.isotropic_directions(4, d, torch.Generator().manual_seed(1))
    batched, final_b = P.run_with_activation(model, EIFFEL, 8, acts, batch_size=3, method="kv")
    full, final_f = P.run_with_activation(model, EIFFEL, 8, acts, method="full")
    assert torch.allclose(batched, full, atol=1e-3) and torch.allclose(final_b, final_f, atol=1e-2)
    for i in (0, 3):  # one prompt, one activation, one ordinary forward with a hook
        one = I.patch(model, EIFFEL, {I.resid_name(model, 8): _with_last(model, EIFFEL, 8, acts[i])}, pos=-1)
        assert torch.allclose(one[0], batched[i], atol=1e-3)


def test_rows_at_different_layers_share_one_batch(model):
    d = model.cfg.d_model
    g = torch.Generator().manual_seed(2)
    dirs = P.isotropic_directions(2, d, g)
    steps = torch.tensor([[0.0, 20.0, 60.0], [0.0, 40.0, 80.0]])
    mixed = P.perturbation_curve(model, EIFFEL, [3, 12], dirs, steps)
    for k, layer in enumerate((3, 12)):
        alone = P.perturbation_curve(model, EIFFEL, layer, dirs[k:k + 1], steps[k])
        assert torch.allclose(mixed["kl"][k], alone["kl"][0], atol=1e-4)
    path = P.interpolate(model, "The capital of France is", "The capital of France has", [1, 6], [0.0, 0.3, 1.0])
    one = P.interpolate(model, "The capital of France is", "The capital of France has", 6, [0.0, 0.3, 1.0])
    assert path["logits"].shape[:2] == (2, 3) and torch.allclose(path["logits"][1], one["logits"], atol=1e-3)
    acts, logits = P.last_token_run(model, [EIFFEL, "I love"], [0, 7])
    assert acts.shape == (2, 2, d)
    assert torch.allclose(logits, I.logits(model, [EIFFEL, "I love"]), atol=1e-3)
    assert torch.allclose(acts[1], P.activations_at(model, [EIFFEL, "I love"], 7), atol=1e-4)
    with pytest.raises(ValueError, match="one layer per row"):
        P.run_with_activation(model, EIFFEL, [3, 4, 5], dirs)


def _with_last(model, prompt, layer, vector):
    _, cache = I.run_with_cache(model, prompt, I.resid_name(model, layer))
    act = cache[I.resid_name(model, layer)].clone()
    act[0, -1] = vector
    return act


def test_perturbing_a_middle_position_and_bad_inputs(model):
    d = model.cfg.d_model
    base = P.activations_at(model, [EIFFEL], 3, pos=2)[0]
    logits, _ = P.run_with_activation(model, EIFFEL, 3, base[None], pos=2)  # full path
    assert torch.allclose(logits[0], I.logits(model, EIFFEL)[0], atol=1e-3)
    with pytest.raises(ValueError, match="BOS"):
        P.run_with_activation(model, EIFFEL, 3, base[None], pos=0)
    with pytest.raises(ValueError, match="last"):
        P.run_with_activation(model, EIFFEL, 3, base[None], pos=2, method="kv")
    with pytest.raises(ValueError, match="d_model"):
        P.run_with_activation(model, EIFFEL, 3, torch.zeros(2, d + 1))
    with pytest.raises(IndexError):
        P.run_with_activation(model, EIFFEL, model.cfg.n_layers + 5, base[None])
    with pytest.raises(ValueError, match="starting at 0"):
        P.perturbation_curve(model, EIFFEL, 3, base[None], [1.0, 2.0])
    with pytest.raises(ValueError, match="zero"):
        P.unit(torch.zeros(2, d))


def test_blowup_step_on_a_synthetic_step_curve():
    steps = np.linspace(0, 1, 11)
    step_curve = np.where(steps < 0.55, 0.0, 2.0)  # flat, then jumps between 0.5 and 0.6
    assert P.blowup_step(steps, step_curve, 1.0) == pytest.approx(0.55)
    assert math.isnan(P.blowup_step(steps, 0.1 * steps, 1.0))
    stack = np.stack([step_curve, steps])  # a stack of curves gives one answer each
    np.testing.assert_allclose(P.blowup_step(steps, stack, 0.5), [0.525, 0.5])
    assert P.max_slope(steps, step_curve) == pytest.approx(20.0)
    assert P.sharpness(steps, 3 * steps) == pytest.approx(1.0)
    assert P.sharpness(steps, step_curve) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        P.blowup_step(steps[::-1], step_curve, 1.0)
    fine = np.linspace(0, 1, 201)
    assert P.onset_exponent(fine, fine ** 2, 0.25) == pytest.approx(2.0, abs=0.01)  # quadratic: 2
    assert P.onset_exponent(fine, fine ** 6, 0.25) == pytest.approx(6.0, abs=0.05)  # plateau then jump: more


def test_relative_position_width_and_jumps():
    alphas = np.linspace(0, 1, 41)
    line = torch.as_tensor(alphas)[:, None] * torch.tensor([[3.0, 4.0]])
    u = P.relative_position(line).numpy()
    np.testing.assert_allclose(u, alphas, atol=1e-6)
    assert P.transition_width(alphas, u) == pytest.approx(0.8, abs=1e-6)
    assert P.count_jumps(alphas, u) == 0
    step = (alphas > 0.5).astype(float)
    assert P.transition_width(alphas, step) < 0.05 and P.count_jumps(alphas, step) == 1
    two = np.where(alphas < 0.3, 0, np.where(alphas < 0.7, 0.5, 1.0))
    assert P.count_jumps(alphas, two) == 2


def test_interpolation_endpoints_are_the_two_prompts(model):
    a, b = "The capital of France is", "The capital of France has"
    path = P.interpolate(model, a, b, 2, [0.0, 0.5, 1.0])
    ref = I.logits(model, [a, b])
    assert torch.allclose(path["logits"][0], ref[0], atol=1e-3)
    assert torch.allclose(path["logits"][-1], ref[1], atol=1e-3)
    with pytest.raises(ValueError, match="except the last"):
        P.interpolate(model, EIFFEL, OTHER, 2, [0.0, 1.0])


def test_gaussian_samples_and_directions():
    g = torch.Generator().manual_seed(0)
    cov = torch.diag(torch.tensor([4.0, 1.0, 0.25]))
    mean = torch.tensor([1.0, -2.0, 0.0])
    x = P.gaussian_samples(mean, cov, 20000, g)
    assert torch.allclose(x.mean(0), mean, atol=0.05)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.1)
    m, c = P.fit_gaussian(x, shrinkage=False)
    assert torch.allclose(c, torch.cov(x.T), atol=1e-3)
    dirs = P.covariance_directions(cov, 500, g)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(500), atol=1e-5)
    assert dirs[:, 0].abs().mean() > dirs[:, 2].abs().mean()  # shaped like the covariance
    iso = P.isotropic_directions(4, 3, g)
    assert torch.allclose(iso.norm(dim=-1), torch.ones(4))
    samples = torch.cat([torch.randn(50, 3, generator=g), 100 * torch.ones(2, 3)])
    assert P.drop_outliers(samples).shape[0] == 50


def test_activations_at_skips_bos_and_padding(model):
    acts = P.activations_at(model, [EIFFEL, "I love"], 4, pos=None)
    n_real = len(model.to_str_tokens(EIFFEL)) - 1 + len(model.to_str_tokens("I love")) - 1
    assert acts.shape == (n_real, model.cfg.d_model)
    last = P.activations_at(model, [EIFFEL, "I love"], 4)
    assert torch.allclose(acts[len(model.to_str_tokens(EIFFEL)) - 2], last[0], atol=1e-4)


def test_activations_at_stops_early_with_the_same_values(model):
    prompts = [EIFFEL, "I love"]
    acts = P.activations_at(model, prompts, [2, 5], pos=None)  # runs blocks 0-4 only
    full = I.residual_stream(model, prompts, layers=[2, 5], pos=None)  # [layers, batch, pos, d], whole model
    mask = I.attention_mask(model, I.to_tokens(model, prompts)).bool()
    first = mask.float().argmax(1)
    ref = torch.cat([full[:, b, first[b] + 1:] for b in range(2)], dim=1)
    assert acts.shape == ref.shape and torch.allclose(acts, ref, atol=1e-4)
    assert torch.allclose(P.activations_at(model, prompts, model.cfg.n_layers, pos=None)[-1],
                          I.residual_stream(model, prompts, layers=[model.cfg.n_layers])[0, 1], atol=1e-3)


def test_shrinkage_effective_rank_and_mixture_directions():
    from sklearn.covariance import LedoitWolf

    g = torch.Generator().manual_seed(0)
    few = torch.randn(20, 50, generator=g)  # isotropic and few samples: shrink a lot
    many = torch.randn(5000, 5, generator=g) * torch.tensor([10.0, 1, 1, 1, 1])  # anisotropic, many samples
    assert P.ledoit_wolf_shrinkage(few) > 0.5 and P.ledoit_wolf_shrinkage(many) < 0.05
    assert P.ledoit_wolf_shrinkage(many) == pytest.approx(LedoitWolf().fit(many.double().numpy()).shrinkage_, abs=1e-9)
    iso = geometry.covariance_ranks(torch.eye(6))
    assert iso["participation ratio"] == pytest.approx(6) and iso["entropy rank"] == pytest.approx(6)
    v = torch.tensor([1.0, 2.0, 0.0])
    one = geometry.covariance_ranks(torch.outer(v, v))
    assert one["participation ratio"] == pytest.approx(1) and one["entropy rank"] == pytest.approx(1)
    points = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 2, 0]])
    dirs = P.mixture_directions(points, 200, g)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(200))
    assert torch.all(dirs[:, 2] == 0)  # differences of the points only: never leaves their span
    diffs = {tuple(np.round(d, 4)) for d in dirs.numpy().tolist()}
    assert len(diffs) == 6  # every ordered pair i != j turns up, never i == j (a zero vector)
    with pytest.raises(ValueError):
        P.mixture_directions(points[:1], 3)


def test_interpolating_every_position_between_two_prompts(model):
    a, b = "Anna is from France, so she speaks", "Anna is from Spain, so she speaks"
    assert I.to_tokens(model, a).shape == I.to_tokens(model, b).shape
    path = P.interpolate_prompts(model, a, b, 1, [0.0, 0.5, 1.0], batch_size=2)
    ref = I.logits(model, [a, b])
    assert path["logits"].shape[0] == 3 and path["final"].shape == (3, model.cfg.d_model)
    assert torch.allclose(path["logits"][0], ref[0], atol=1e-3) and torch.allclose(path["logits"][-1], ref[1], atol=1e-3)
    assert not torch.allclose(path["logits"][1], ref[0], atol=1e-2)
    c = "Anna is from Japan, so she speaks"
    both = P.interpolate_prompts(model, [a, c], [b, b], 1, [0.0, 0.5, 1.0], batch_size=4)  # two pairs, one batch run
    assert both["final"].shape == (2, 3, model.cfg.d_model)
    assert torch.allclose(both["logits"][0], path["logits"], atol=1e-3)
    assert torch.allclose(both["logits"][1, 0], I.logits(model, c)[0], atol=1e-3)
    with pytest.raises(ValueError, match="same number of tokens"):
        P.interpolate_prompts(model, EIFFEL, "I love", 1, [0.0, 1.0])


def test_output_features_keeps_the_union_of_top_tokens():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
    feats, ids = P.output_features(logits, top_k=1)
    assert ids == [0, 1] and feats.shape == (2, 2)
