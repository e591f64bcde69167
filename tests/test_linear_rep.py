"""helpers.linear_rep: known answers for the causal inner product, additivity fits and LRE Jacobians."""
import numpy as np
import pytest
import torch

from helpers import interventions as I
from helpers import linear_rep as LR
from tests.conftest import EIFFEL


# ---------------------------------------------------------------------------------------------
# unembedding geometry (no model needed)
def _gamma(n=4000, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g)  # correlated, anisotropic coordinates
    return torch.randn(n, d, generator=g) @ mix + 3.0


def test_causal_inner_product_whitens():
    gamma = _gamma()
    cip = LR.causal_inner_product(gamma)
    g = cip.whiten(gamma)
    cov = torch.cov(g.T, correction=0)
    assert torch.allclose(cov, torch.eye(16), atol=1e-3)
    assert torch.allclose(cip.sqrt @ cip.inv_sqrt, torch.eye(16), atol=1e-3)
    x, y = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(cip.inner(x, y), x @ torch.linalg.inv(cip.cov) @ y, rtol=1e-3)
    assert torch.allclose(cip.to_embedding(x), x @ torch.linalg.inv(cip.cov), rtol=1e-3, atol=1e-4)


def test_causal_inner_product_rejects_bad_shapes():
    with pytest.raises(ValueError, match="vocab > d"):
        LR.causal_inner_product(torch.randn(8, 16))
    with pytest.raises(ValueError, match="singular"):
        LR.causal_inner_product(torch.randn(100, 1) @ torch.randn(1, 4))  # rank 1


def test_loo_projection_is_against_the_other_rows():
    diffs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    loo = LR.loo_projections(diffs)
    # row 0 on mean(rows 1, 2) = (0.5, 1) / |.|; row 2 on mean(rows 0, 1) = (1, 0)
    assert loo[0].item() == pytest.approx(0.5 / np.sqrt(1.25))
    assert loo[2].item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least 2"):
        LR.loo_projections(diffs[:1])


def test_concept_direction_and_pairs():
    vectors = torch.eye(4)
    diffs = LR.pair_differences(vectors, [0, 0], [1, 1])
    assert torch.equal(LR.concept_direction(diffs), torch.tensor([-1.0, 1.0, 0, 0]) / np.sqrt(2))
    with pytest.raises(ValueError, match="as many"):
        LR.pair_differences(vectors, [0], [1, 2])
    with pytest.raises(ValueError, match="zero vector"):
        LR.unit(torch.zeros(3))


def test_cosine_matrix_identity_metric_and_random_metric():
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    c = LR.cosine_matrix(d)
    assert torch.allclose(c.diagonal(), torch.ones(3))
    assert c[0, 2].item() == pytest.approx(0.0)
    assert c[0, 1].item() == pytest.approx(1 / np.sqrt(2))
    m = LR.random_metric(2, seed=0)
    assert torch.allclose(m, m.T) and (torch.linalg.eigvalsh(m) >= -1e-5).all()
    assert torch.allclose(LR.cosine_matrix(d, torch.eye(2)), c)


def test_random_pairs_have_zero_mean_projection():
    gamma = _gamma()
    diffs = LR.random_pair_differences(gamma, 20000, seed=0)
    assert diffs.shape == (20000, 16)
    direction = LR.unit(torch.ones(16))
    assert abs((diffs @ direction).mean().item()) < 0.05 * (diffs @ direction).std().item()


# ---------------------------------------------------------------------------------------------
# residual-stream directions and additivity
def test_mean_difference_and_projection():
    acts = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 2.0], [6.0, 2.0]])
    diff = LR.mean_difference(acts, [0, 0, 1, 1], high=1, low=0)
    assert torch.equal(diff, torch.tensor([4.0, 2.0]))
    assert torch.allclose(LR.projections(acts, torch.tensor([0.0, 5.0])), acts[:, 1])
    with pytest.raises(ValueError, match="no rows"):
        LR.mean_difference(acts, [0, 0, 1, 1], high=2, low=0)


def _combinations(sizes=(4, 4, 4)):
    import itertools

    return np.array(list(itertools.product(*[range(s) for s in sizes])))


def test_factor_design_columns():
    levels = _combinations((3, 2))
    assert LR.factor_design(levels).shape == (6, 1 + 2 + 1)
    assert LR.factor_design(levels, interactions=True).shape == (6, 1 + 2 + 1 + 2)
    with pytest.raises(ValueError, match="integer"):
        LR.factor_design(levels.astype(float))


def test_exactly_additive_data_has_heldout_r2_one():
    levels = _combinations()
    rng = np.random.default_rng(0)
    vecs = [rng.normal(size=(4, 32)) for _ in range(3)]
    Y = 5 + sum(v[levels[:, j]] for j, v in enumerate(vecs))
    assert LR.crossval_r2(levels, Y) == pytest.approx(1.0, abs=1e-4)
    assert LR.crossval_r2(levels, Y, interactions=True) == pytest.approx(1.0, abs=1e-4)
    # one factor alone explains only its share of the variance
    assert LR.crossval_r2(levels, Y, factors=[2]) < 0.6


def test_interaction_model_wins_when_data_interacts():
    levels = _combinations()
    rng = np.random.default_rng(1)
    table = rng.normal(size=(4, 4, 32))  # a pure texture x colour interaction
    Y = table[levels[:, 0], levels[:, 1]] + 0.01 * rng.normal(size=(len(levels), 32))
    assert LR.crossval_r2(levels, Y, interactions=True) > 0.95
    assert LR.crossval_r2(levels, Y) < LR.crossval_r2(levels, Y, interactions=True) - 0.3


# ---------------------------------------------------------------------------------------------
# Jacobians
def test_jacobian_of_a_linear_map_is_the_map():
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(5, 7, generator=g), torch.randn(5, generator=g)
    x = torch.randn(7, generator=g)
    assert torch.allclose(LR.jacobian(lambda v: A @ v + b, x), A, atol=1e-6)
    V = torch.randn(3, 7, generator=g)
    fx, jv = LR.jvp_batch(lambda v: A @ v + b, x, V)
    assert torch.allclose(fx, A @ x + b) and torch.allclose(jv, V @ A.T, atol=1e-5)
    with pytest.raises(ValueError):
        LR.jacobian(lambda v: v, torch.zeros(2, 2))
    with pytest.raises(ValueError):
        LR.jvp_batch(lambda v: v, x, torch.zeros(3, 6))


def test_jacobian_of_a_nonlinear_map():
    x = torch.tensor([0.5, -1.0, 2.0])
    J = LR.jacobian(torch.tanh, x)
    assert torch.allclose(J, torch.diag(1 - torch.tanh(x) ** 2), atol=1e-6)


def test_lre_of_a_linear_map_recovers_it():
    A = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    lre = LR.LinearRelation(layer=0, bias=torch.ones(4), weight=A, beta=2.0)
    h = torch.randn(2, 4)
    assert torch.allclose(lre(h), 2.0 * h @ A.T + 1)
    assert torch.allclose(lre(h, beta=1.0), h @ A.T + 1)
    with pytest.raises(ValueError, match="apply_to"):
        lre()


# ---------------------------------------------------------------------------------------------
# on the real model
def test_subject_position(model):
    tpl = "The {} is located in the city of"
    pos = LR.subject_position(model, tpl, "Eiffel Tower")
    assert model.to_str_tokens(tpl.format("Eiffel Tower"))[pos] == " Tower"
    assert LR.subject_position(model, "The opposite of up is down, and the opposite of {} is", "up") == \
        len(model.to_tokens("The opposite of up is down, and the opposite of up")[0]) - 1
    with pytest.raises(ValueError, match="exactly one"):
        LR.subject_position(model, "no slot", "x")


def test_hidden_to_output_reproduces_the_model(model):
    tpl = "The {} is located in the city of"
    pos = LR.subject_position(model, tpl, "Eiffel Tower")
    fn, h, z = LR.hidden_to_output(model, EIFFEL, 12, pos)
    before = I.logits(model, EIFFEL)
    assert torch.allclose(fn(h), z, atol=1e-4)
    fn(h * 3)  # the forward pass stops early (an exception inside a hook): its hooks must still be removed
    assert torch.equal(I.logits(model, EIFFEL), before)
    assert model.tokenizer.decode([LR.decode_top(model, z[None])[0].item()]) == " Paris"
    with pytest.raises(IndexError):
        LR.hidden_to_output(model, EIFFEL, model.cfg.n_layers, pos)  # h must enter a block


def test_lre_jvp_matches_finite_differences(model):
    tpl = "The {} is located in the city of"
    layer = model.cfg.n_layers - 3  # few layers after it: fast
    pos = LR.subject_position(model, tpl, "Eiffel Tower")
    fn, h, z = LR.hidden_to_output(model, tpl.format("Eiffel Tower"), layer, pos)
    v = torch.randn(1, model.cfg.d_model, generator=torch.Generator().manual_seed(0)) * h.norm() / 24
    with torch.no_grad():
        _, jv = LR.jvp_batch(fn, h, torch.cat([h[None], v]))
        fd = (fn(h + 1e-2 * v[0]) - fn(h - 1e-2 * v[0])) / 2e-2
    assert (fd - jv[1]).norm() / jv[1].norm() < 1e-2
    lre = LR.estimate_lre(model, tpl, ["Eiffel Tower"], layer, apply_to=v)
    assert torch.allclose(lre.bias, z - jv[0], atol=1e-3)        # bias = z - J h
    assert torch.allclose(lre.applied[0], jv[1], atol=1e-3)      # W v = J v
    # with one example and beta = 1 the LRE reproduces that example's output exactly
    lre_h = LR.estimate_lre(model, tpl, ["Eiffel Tower"], layer, apply_to=h[None])
    assert torch.allclose(lre_h(beta=1.0)[0], z, atol=1e-3)


def test_full_jacobian_lre_matches_the_jvp_lre(model):
    tpl = "The {} is located in the city of"
    layer = model.cfg.n_layers - 1  # one block after it: the full Jacobian is cheap
    subjects = ["Colosseum"]
    H, Z = LR.subject_states(model, tpl, subjects, [layer])
    lazy = LR.estimate_lre(model, tpl, subjects, layer, apply_to=H[0])
    full = LR.estimate_lre(model, tpl, subjects, layer, apply_to=H[0], full=True, chunk_size=192)
    assert full.weight.shape == (model.cfg.d_model, model.cfg.d_model)
    assert torch.allclose(full.applied, lazy.applied, atol=1e-3, rtol=1e-3)
    assert torch.allclose(full.bias, lazy.bias, atol=1e-3, rtol=1e-3)
    assert torch.allclose(full(H[0]), lazy(), atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="apply_to"):
        LR.estimate_lre(model, tpl, subjects, layer)


def test_known_facts_and_graded_prompts(model):
    known = LR.known_facts(model, "The capital of {} is", [("France", "Paris"), ("France", "Berlin")])
    assert known == [("France", "Paris")]
    g = LR.graded_prompts({"c": {"levels": [["a"], ["b", "c"]], "templates": ["x {}.", "y {}."]}})
    assert list(g["prompt"]) == ["x a.", "x b.", "x c.", "y a.", "y b.", "y c."]
    assert list(g["level"]) == [0, 1, 1, 0, 1, 1] and list(g["template"]) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="exactly one"):
        LR.graded_prompts({"c": {"levels": [["a"]], "templates": ["no slot"]}})


def test_disjoint_bases_share_no_base_token():
    a, b = [1, 2, 3, 4, 5], [3, 4, 5, 6]
    keep_a, keep_b = LR.disjoint_bases(a, b, seed=0)
    kept_a, kept_b = {a[i] for i in keep_a}, {b[i] for i in keep_b}
    assert not kept_a & kept_b
    assert {1, 2} <= kept_a and 6 in kept_b and len(kept_a) + len(kept_b) == 6  # each shared token kept once
    assert LR.disjoint_bases([1, 2], [3], seed=0) == ([0, 1], [0])


def test_crossval_r2_per_fold_averages_to_the_mean():
    levels = _combinations()
    Y = np.random.default_rng(0).normal(size=(len(levels), 3))
    folds = LR.crossval_r2(levels, Y, per_fold=True)
    assert len(folds) == 5 and np.mean(folds) == pytest.approx(LR.crossval_r2(levels, Y))


def test_faithfulness_counts_matching_rows():
    assert LR.faithfulness([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    assert LR.faithfulness(torch.tensor([7]), torch.tensor([7])) == 1.0
    with pytest.raises(ValueError, match="same length"):
        LR.faithfulness([1, 2], [1])
    with pytest.raises(ValueError):
        LR.faithfulness([], [])


def test_choose_beta_picks_the_beta_whose_output_is_the_target(model):
    z = I.residual_stream(model, [EIFFEL, "The capital of Germany is"], layers=[model.cfg.n_layers], pos=-1)[0]
    # beta * (z_1 - z_0) + z_0: beta = 0 gives the first prompt's output, beta = 1 the second's
    lre = LR.LinearRelation(layer=0, bias=z[0], applied=(z[1] - z[0])[None])
    top = I.unembed(model, z).argmax(-1)
    assert top[0] != top[1]
    assert LR.choose_beta(model, lre, top[1:], [0.0, 1.0], slice(0, 1)) == 1.0
    assert LR.choose_beta(model, lre, top[:1], [0.0, 1.0], slice(0, 1)) == 0.0
    with pytest.raises(ValueError, match="empty"):
        LR.choose_beta(model, lre, top[:1], [], slice(0, 1))


def test_batched_lre_equals_one_subject_at_a_time(model):
    tpl, layer = "The {} is located in the city of", model.cfg.n_layers - 3
    subjects = ["Colosseum", "Eiffel Tower", "Sydney Opera House", "Louvre"]  # lengths 1, 2, 3, 1 token(s)
    H, _ = LR.subject_states(model, tpl, subjects, [layer])
    both = LR.estimate_lre(model, tpl, subjects, layer, apply_to=H[0])
    alone = [LR.estimate_lre(model, tpl, [s], layer, apply_to=H[0]) for s in subjects]
    assert torch.allclose(both.applied, torch.stack([a.applied for a in alone]).mean(0), atol=1e-3, rtol=1e-3)
    assert torch.allclose(both.bias, torch.stack([a.bias for a in alone]).mean(0), atol=1e-3, rtol=1e-3)
    assert torch.allclose(both.h_train, H[0], atol=1e-4)           # the subject positions skip the padding
    # prompts of different lengths in one left-padded batch give the same outputs as each prompt alone
    pos = [LR.subject_position(model, tpl, s) for s in subjects]
    _, H_pad, Z_pad = LR.hidden_to_output_batch(model, [tpl.format(s) for s in subjects], layer, pos)
    assert torch.allclose(H_pad, H[0], atol=1e-3) and torch.allclose(Z_pad, torch.stack([a.z_train[0] for a in alone]), atol=1e-3)


def test_lre_layer_sweep_on_the_real_model(model):
    tpl, mid = "The capital of {} is", model.cfg.n_layers * 2 // 5
    train, val, test = ["France", "Germany", "Japan"], ["Italy"], ["Spain", "Russia"]
    rows = LR.lre_layer_sweep(model, tpl, train, test, [mid], betas=[1.0, 2.0], val=val)
    (row,) = rows
    assert row["layer"] == mid and row["beta"] in (1.0, 2.0) and row["n_test"] == 2 and row["n_val"] == 1
    assert row["lre"] == row["lre_hits"] / 2
    # at a middle layer the LRE of a known relation maps its subjects to the model's answers; identity never does
    assert row["lre_train"] == 1.0 and row["lre_val"] == 1.0 and row["lre_hits"] >= 1 and row["identity"] == 0.0
    with pytest.raises(ValueError, match="at least one"):
        LR.lre_layer_sweep(model, tpl, train, [], [mid])


# ---------------------------------------------------------------------------------------------
# causality (Hernandez et al. sec. 4): the low-rank inverse edit
def test_low_rank_pinv_edit_of_a_linear_map_reaches_the_target_exactly():
    g = torch.Generator().manual_seed(5)
    d, k = 12, 4
    W = torch.randn(d, k, generator=g, dtype=torch.float64) @ torch.randn(k, d, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    f = lambda h: h @ W.T + b                                     # a rank-k affine "relation"
    h, h_target = torch.randn(2, d, generator=g, dtype=torch.float64)
    delta = (f(h_target) - f(h)) @ LR.low_rank_pinv(W, k).T       # o' - o lies in W's range: the edit is exact
    assert torch.allclose(f(h + delta), f(h_target), atol=1e-9)
    full = torch.randn(d, d, generator=g, dtype=torch.float64)    # full rank: rank d is the inverse
    assert torch.allclose(LR.low_rank_pinv(full, d), torch.linalg.inv(full), atol=1e-8)
    # random directions of the same norm do not reach it
    rand = LR.same_norm_random(delta[None], 20, seed=1)[:, 0]
    assert torch.allclose(rand.norm(dim=-1), delta.norm().expand(20))
    miss = (f(h + rand) - f(h_target)).norm(dim=-1)
    assert (miss > 0.1 * (f(h_target) - f(h)).norm()).all()
    # a lower rank keeps only the top singular directions: it no longer reaches the target
    assert not torch.allclose(f(h + (f(h_target) - f(h)) @ LR.low_rank_pinv(W, 1).T), f(h_target), atol=1e-3)
    with pytest.raises(ValueError, match="rank"):
        LR.low_rank_pinv(W, d + 1)


def test_edit_targets_pick_a_row_with_another_answer():
    assert LR.edit_targets([1, 1, 2, 3]) == [2, 2, 3, 0]
    assert LR.edit_targets([7, 7]) == [None, None]
    assert LR.edit_targets([1, 2, 1], candidates=[1]) == [1, None, 1]


def test_edit_with_zero_delta_is_the_model_and_causality_counts(model):
    tpl, layer = "The capital of {} is", model.cfg.n_layers // 5
    subjects = ["France", "Japan"]
    _, z = LR.subject_states(model, tpl, subjects, [layer])
    own = LR.decode_top(model, z)
    assert torch.equal(LR.edited_top(model, tpl, subjects, layer, torch.zeros(2, model.cfg.d_model)), own)
    W = torch.eye(model.cfg.d_model)                               # any weight: only the bookkeeping is tested
    out = LR.lre_causality(model, tpl, W, layer, subjects, subjects[::-1], rank=8, n_random=3, seed=0)
    assert out["n"] == 2 and out["random_n"] == 6 and 0 <= out["hits"] <= 2 and 0 <= out["random_hits"] <= 6
    assert out["hit"].shape == (2,) and out["edit_norm"] > 0
    with pytest.raises(ValueError, match="one target per source"):
        LR.lre_causality(model, tpl, W, layer, subjects, subjects[:1], rank=8)
