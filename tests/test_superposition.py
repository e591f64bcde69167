"""Known-answer tests for helpers.superposition (and the instance-first fast path in helpers.toy)."""
import math

import numpy as np
import pytest
import torch

from helpers import superposition as sp
from helpers import toy


def polygon(k: int, radius: float = 1.0) -> torch.Tensor:
    """[2, k]: k unit vectors at the corners of a regular k-gon."""
    angles = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    return radius * torch.stack([angles.cos(), angles.sin()])


def test_identity_has_one_dimension_per_feature():
    W = torch.eye(4)
    assert np.allclose(sp.feature_dimensionality(W), 1.0)
    assert sp.dimensions_per_feature(W) == pytest.approx(1.0)
    assert sp.frobenius_sq(W) == pytest.approx(4.0)
    assert np.allclose(sp.superposition_score(W), 0.0)


@pytest.mark.parametrize("k, expected", [(2, 1 / 2), (3, 2 / 3), (5, 2 / 5)])
def test_polygons_give_the_papers_fractions(k, expected):
    # a digon (antipodal pair) is 1/2, a triangle in 2-D 2/3, a pentagon 2/5: D_i = m / k for a regular k-gon
    D = sp.feature_dimensionality(polygon(k))
    assert np.allclose(D, expected, atol=1e-9)
    assert sp.dimensions_per_feature(polygon(k)) == pytest.approx(2 / k)


def test_tetrahedron_is_three_quarters():
    T = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64).T / math.sqrt(3)
    assert np.allclose(sp.feature_dimensionality(T), 3 / 4)


def test_dimensionality_is_scale_invariant_and_dropped_features_are_zero():
    W = torch.cat([polygon(5, radius=3.0), torch.zeros(2, 1)], dim=1)
    D = sp.feature_dimensionality(W)
    assert np.allclose(D[:5], 2 / 5) and D[5] == pytest.approx(0.0)
    assert sp.represented(W).tolist() == [True] * 5 + [False]


def test_batched_matches_single_and_numpy_input():
    W = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(0))
    batched = sp.feature_dimensionality(W)
    assert batched.shape == (3, 7)
    for i in range(3):
        assert np.allclose(batched[i], sp.feature_dimensionality(W[i].numpy()))
    assert sp.overlaps(W).shape == (3, 7, 7)


def test_angle_gaps_and_antipodal_pairs():
    gaps = sp.angle_gaps(polygon(5))[0]
    assert np.allclose(gaps, 72.0)
    square = polygon(4)
    assert sp.antipodal_pairs(square) == 2
    assert sp.antipodal_pairs(polygon(5)) == 0
    assert len(sp.angle_gaps(torch.zeros(2, 3))[0]) == 0
    with pytest.raises(ValueError):
        sp.angle_gaps(torch.zeros(3, 5))


def test_classify_phase():
    W = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, -1.0]], [[0.1, 0.2]]])
    assert sp.classify_phase(W).tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError):
        sp.classify_phase(torch.zeros(2, 2))


def test_loss_split_known_answers():
    # a perfect, interference-free model (identity W, zero bias) has no loss at all
    model = toy.ToyModel(2, 3, 3)
    with torch.no_grad():
        model.W.copy_(torch.eye(3).expand(2, 3, 3))
        model.W[1, :, 2] = 0                      # instance 1 drops feature 2: pure capacity loss
    x = toy.sparse_batch(2, 4000, 3, 0.5, generator=torch.Generator().manual_seed(0))
    split = sp.loss_split(model, x)
    assert split["total"][0] == pytest.approx(0.0, abs=1e-9)
    assert split["interference"][1] == pytest.approx(0.0, abs=1e-7)
    assert split["capacity"][1] == pytest.approx((x[1, :, 2] ** 2).mean().item() / 3, rel=1e-5)
    # two features on one axis (an antipodal pair) interfere; the parts always sum to the total
    pair = toy.ToyModel(1, 2, 1)
    with torch.no_grad():
        pair.W.copy_(torch.tensor([[[1.0, -1.0]]]))
    xp = toy.sparse_batch(1, 4000, 2, 1.0, generator=torch.Generator().manual_seed(1))
    s = sp.loss_split(pair, xp)
    assert s["capacity"][0] == pytest.approx(0.0, abs=1e-9) and s["interference"][0] > 0.05
    assert s["total"][0] == pytest.approx(s["capacity"][0] + s["interference"][0])
    with pytest.raises(ValueError):
        sp.loss_split(model, x[:, :, :2])


def test_cluster_enrichment_finds_peaks_not_flat():
    rng = np.random.default_rng(0)
    flat = rng.uniform(0.3, 1.0, 5000)
    peaked = np.concatenate([flat, np.full(1000, 0.5), np.full(1000, 0.4)])
    e_flat, e_peak = sp.cluster_enrichment(flat), sp.cluster_enrichment(peaked)
    fractions = list(sp.POLYTOPE_FRACTIONS.values())
    assert np.all(np.abs(e_flat - 1) < 0.35)
    assert e_peak[fractions.index(0.5)] > 3 and e_peak[fractions.index(0.4)] > 3
    assert np.isnan(sp.cluster_enrichment(np.array([0.1]), centres=[0.9])[0])
    with pytest.raises(ValueError):
        sp.cluster_enrichment(flat, width=0.1, background=0.05)


def test_participation_ratio():
    assert sp.participation_ratio(torch.tensor([0.0, 3.0, 0.0])) == pytest.approx(1.0)
    assert sp.participation_ratio(torch.tensor([1.0, -1.0, 1.0, 1.0])) == pytest.approx(4.0)
    assert np.allclose(sp.participation_ratio(torch.eye(3)), 1.0)


def test_phase_theory_dense_corners():
    # dense inputs: the more important feature takes the single dimension (Elhage et al. 2022)
    phase, loss = sp.phase_diagram_theory([0.2, 5.0], [1.0], steps=150, n_grid=16)
    assert phase[:, 0].tolist() == [0, 1]
    assert np.all(loss > 0)


def test_bad_inputs_raise():
    with pytest.raises(TypeError):
        sp.feature_norms([[1.0, 0.0]])
    with pytest.raises(ValueError):
        sp.feature_norms(torch.zeros(5))
    with pytest.raises(ValueError):
        sp.represented(torch.eye(2), threshold=0)


# --- the instance-first fast path in helpers.toy ---------------------------------------------------------

def test_sparse_batch_distribution():
    x = toy.sparse_batch(2, 40_000, 3, torch.tensor([1.0, 0.1]), generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 40_000, 3)
    density = (x != 0).float().mean(dim=(1, 2))
    assert torch.allclose(density, torch.tensor([1.0, 0.1]), atol=0.01)
    on = x[1][x[1] != 0]
    assert on.min() >= 0 and on.max() <= 1 and abs(on.mean().item() - 0.5) < 0.02   # uniform on [0, 1]
    s = toy.sparse_batch(1, 40_000, 2, 1.0, signed=True, generator=torch.Generator().manual_seed(1))
    assert s.min() >= -1 and s.max() <= 1 and abs(s.mean().item()) < 0.02
    with pytest.raises(ValueError):
        toy.sparse_batch(2, 4, 3, 0.0)
    with pytest.raises(ValueError):
        toy.sparse_batch(2, 4, 3, torch.ones(3))


def test_forward_instances_matches_forward():
    model = toy.ToyModel(3, 6, 2)
    torch.nn.init.normal_(model.b)
    x = toy.sparse_features(8, 3, 6, 0.5)
    assert torch.allclose(model(x), model.forward_instances(x.transpose(0, 1)).transpose(0, 1), atol=1e-6)


def test_fit_learns_identity_and_evaluate_agrees():
    torch.manual_seed(0)
    model = toy.ToyModel(2, 3, 3, nonlinearity="linear")
    hist = toy.fit(model, 1.0, steps=800, batch_size=256, lr=1e-2, progress=False)
    assert hist.shape[1] == 2 and hist[-1].max() < 1e-3 < hist[0].min()
    assert toy.evaluate(model, 1.0, n_samples=2000).max() < 1e-3


def test_compute_model_linear_cannot_do_abs():
    # |x| is even, so a linear model's best guess is the constant E|x|: its loss stays at Var|x| = 1/12
    torch.manual_seed(0)
    lin = toy.ComputeModel(1, 2, 4, nonlinearity="linear")
    toy.fit(lin, 1.0, target=torch.abs, signed=True, steps=600, batch_size=512, lr=1e-2, progress=False)
    loss = toy.evaluate(lin, 1.0, target=torch.abs, signed=True, n_samples=20_000)
    assert loss[0] == pytest.approx(1 / 12, rel=0.05)
    relu = toy.ComputeModel(1, 2, 4)
    with torch.no_grad():   # |x| = ReLU(x) + ReLU(-x): an exact solution with 2 neurons per feature
        relu.W1.copy_(torch.tensor([[[1.0, 0], [-1, 0], [0, 1], [0, -1]]]))
        relu.W2.copy_(torch.tensor([[[1.0, 1, 0, 0], [0, 0, 1, 1]]]))
    assert toy.evaluate(relu, 1.0, target=torch.abs, signed=True, n_samples=2000)[0] == pytest.approx(0, abs=1e-12)


def test_importance_and_best_of_seeds():
    assert torch.allclose(toy.importance_decay(3, 0.5), torch.tensor([1.0, 0.5, 0.25]))
    assert toy.importance_decay(2, torch.tensor([1.0, 0.5])).shape == (2, 2)
    assert toy.best_of_seeds(np.array([3.0, 1.0, 2.0, 0.5, 0.7, 0.9]), 3).tolist() == [1, 3]
    with pytest.raises(ValueError):
        toy.best_of_seeds(np.ones(5), 3)
    with pytest.raises(ValueError):
        toy.importance_decay(0, 0.9)


def test_explorer_and_plots_render_headless():
    import ipywidgets as widgets
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    W = np.stack([np.stack([polygon(5).numpy(), polygon(5, 0.5).numpy()])] * 2)   # [decay=2, density=2, 2, 5]
    box = sp.geometry_explorer(W, [1.0, 0.1], [1.0, 0.9], losses=np.ones((2, 2)))
    assert isinstance(box, widgets.VBox) and len(box.children) == 3
    box.children[0].value = 0                      # moving a slider redraws without error
    with pytest.raises(ValueError):
        sp.geometry_explorer(W[:1], [1.0, 0.1], [1.0, 0.9])
    fig, axes = plt.subplots(1, 2)
    sp.plot_gram_and_norms(polygon(5), axes[0], axes[1], title="pentagon")
    assert len(axes[1].patches) == 5
    plt.close("all")


def test_instance_loss_reads_1d_importance_per_feature():
    model = toy.ToyModel(3, 3, 2)
    x = toy.sparse_batch(3, 64, 3, 0.5, generator=torch.Generator().manual_seed(0))
    imp = torch.tensor([1.0, 0.0, 0.0])                       # n_instances == n_features: still per feature
    with torch.no_grad():
        manual = ((model.forward_instances(x) - x) ** 2)[:, :, 0].mean(1) / 3
    assert torch.allclose(toy.instance_loss(model, x, imp), manual, atol=1e-7)


# --- issue 14: polytopes checked directly, placebo fractions, leave-one-setting-out, smooth plateau null ----

def _block_diag(*blocks: torch.Tensor) -> torch.Tensor:
    """Place [hidden_k, feature_k] blocks in orthogonal subspaces: [Σ hidden, Σ feature]."""
    return torch.block_diag(*blocks)


def test_component_shapes_name_the_polytopes():
    digon = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    tetra = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64).T / math.sqrt(3)
    W = torch.cat([_block_diag(digon, polygon(3), polygon(5), tetra, torch.ones(1, 1, dtype=torch.float64)),
                   torch.zeros(9, 1, dtype=torch.float64)], dim=1)          # + one feature left out
    size, rank = sp.component_shapes(W)
    got = list(zip(size.tolist(), rank.tolist()))
    assert got[:2] == [sp.POLYTOPES["digon (1/2)"]] * 2
    assert got[2:5] == [sp.POLYTOPES["triangle (2/3)"]] * 3
    assert got[5:10] == [sp.POLYTOPES["pentagon (2/5)"]] * 5
    assert got[10:14] == [sp.POLYTOPES["tetrahedron (3/4)"]] * 4
    assert got[14] == sp.POLYTOPES["dedicated (1)"] and got[15] == (0, 0)
    # each polytope's (features, rank) gives its fraction
    for name, (k, r) in sp.POLYTOPES.items():
        assert r / k == pytest.approx(sp.POLYTOPE_FRACTIONS[name])
    # batched input: one result row per instance
    s2, r2 = sp.component_shapes(torch.stack([W, W]))
    assert s2.shape == (2, W.shape[1]) and (s2[1] == size).all() and (r2[0] == rank).all()


def test_window_counts_per_row():
    v = np.array([[0.5, 0.505, 0.4], [0.2, 0.5, 0.9]])
    counts = sp.window_counts(v, [0.5, 0.4], width=0.01, mask=np.array([[True, True, True], [True, False, True]]))
    assert counts.tolist() == [[2, 0], [1, 0]]


def test_leave_one_out_rejects_a_cluster_made_by_one_setting():
    rng = np.random.default_rng(0)
    flat = rng.uniform(0.3, 0.7, size=(10, 40))                          # ten settings, no cluster anywhere
    comb = flat.copy()
    comb[3, :30] = 0.45 + rng.uniform(-0.003, 0.003, 30)                  # one setting piles up at 0.45
    mask = np.ones(flat.shape, bool)
    one = sp.cluster_test_leave_one_out(comb, mask, [0.45])
    assert one["p_value"][0] < 1e-3 and one["p_value_loo"][0] > 0.05 and one["top_row"][0] == 3
    spread = flat.copy()
    spread[:, :6] = 0.45 + rng.uniform(-0.003, 0.003, (10, 6))           # every setting contributes
    many = sp.cluster_test_leave_one_out(spread, mask, [0.45])
    assert many["p_value_loo"][0] < 1e-3 and many["rows_contributing"][0] == 10


def test_cluster_test_exclude_keeps_other_peaks_out_of_the_flanks():
    rng = np.random.default_rng(1)
    v = np.concatenate([rng.uniform(0.3, 0.6, 300), np.full(200, 0.40)])   # a real peak at 0.40
    plain = sp.cluster_test(v, [0.42])                                     # the 0.40 peak sits in 0.42's flank
    excl = sp.cluster_test(v, [0.42], exclude=[0.40])
    assert excl["expected"][0] < plain["expected"][0]


def test_smooth_band_count_separates_a_plateau_from_a_smooth_fall():
    lx = np.linspace(0, 4, 41)
    smooth = 0.1 + 0.9 / (1 + np.exp((lx - 2) / 0.6))
    n_smooth, fit = sp.smooth_band_count(lx, smooth, 0.5, 0.04, 0.1)
    assert np.allclose(fit, smooth, atol=1e-3)
    assert n_smooth == (np.abs(smooth - 0.5) <= 0.04).sum()               # a smooth curve meets its own null
    plateau = np.where((lx > 1.2) & (lx < 2.8), 0.5, smooth)               # the same curve, stuck at 1/2
    n_null, _ = sp.smooth_band_count(lx, plateau, 0.5, 0.04, 0.1)
    assert (np.abs(plateau - 0.5) <= 0.04).sum() >= 2 * n_null
