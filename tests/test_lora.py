"""helpers.lora: known answers for spectra, subspaces, intruders and rank-one edits; training leaves the model as it was."""
import numpy as np
import pytest
import torch

from helpers import lora

G = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=G)


# ---------------------------------------------------------------------------------------------
# spectra
def test_effective_rank_known_answers():
    assert lora.effective_rank(torch.outer(randn(7), randn(5))) == pytest.approx(1.0, abs=1e-4)
    assert lora.effective_rank(torch.eye(12)) == pytest.approx(12.0, rel=1e-6)
    assert lora.effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0]))) == pytest.approx(2.0, rel=1e-6)
    assert lora.numerical_rank(randn(8, 3) @ randn(3, 9)) == 3
    assert lora.sv_entropy(torch.eye(10), normalized=True) == pytest.approx(1.0)


def test_svd_objects_stand_in_for_matrices_and_factored_svd_is_exact():
    B, A = randn(30, 3), randn(3, 20)
    m = 2.5 * B @ A
    f, full = lora.factored_svd(2.5 * B, A), lora.svd(m)
    assert torch.allclose(f.S, full.S[:3], rtol=1e-4) and f.shape == (30, 20)
    assert torch.allclose((f.U * f.S) @ f.Vh, m, atol=1e-4)
    assert lora.effective_rank(f) == pytest.approx(lora.effective_rank(m), rel=1e-4)
    assert lora.numerical_rank(f) == 3 == lora.numerical_rank(m)
    assert np.allclose(lora.subspace_similarity(f, m, max_i=3, max_j=3), 1.0, atol=1e-4)  # same row space
    threads = torch.get_num_threads()
    with lora.one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads


def test_spectra_reject_bad_input():
    with pytest.raises(ValueError):
        lora.effective_rank(torch.zeros(4, 4))
    with pytest.raises(ValueError):
        lora.effective_rank(randn(2, 3, 4))
    with pytest.raises(ValueError):
        lora.effective_rank(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


# ---------------------------------------------------------------------------------------------
# subspaces
def test_phi_of_a_subspace_with_itself_is_one():
    a = randn(8, 50)
    phi = lora.subspace_similarity(a, a)
    assert np.allclose(np.diag(phi), 1.0, atol=1e-6)
    assert np.allclose(np.triu(phi), np.triu(np.ones_like(phi)), atol=1e-6)  # U_i inside U_j for i <= j


def test_phi_of_orthogonal_subspaces_is_zero_and_random_is_small():
    eye = torch.eye(40)
    assert np.allclose(lora.subspace_similarity(eye[:5], eye[5:15]), 0.0, atol=1e-10)
    phi = lora.subspace_similarity(randn(4, 2000), randn(4, 2000))
    assert phi[0, 0] < 0.01 and phi[-1, -1] < 0.02  # E[phi(i, j)] = max(i, j) / d for random subspaces


def test_phi_checks_shapes():
    with pytest.raises(ValueError):
        lora.subspace_similarity(randn(3, 10), randn(3, 11))
    with pytest.raises(ValueError):
        lora.subspace_similarity(randn(3, 10), randn(3, 10), side="up")


def test_random_like_keeps_the_spectrum():
    d = randn(30, 3) @ randn(3, 20)
    r = lora.random_like(d, torch.Generator().manual_seed(1))
    assert torch.allclose(lora.singular_values(r)[:3], lora.singular_values(d)[:3], rtol=1e-4)
    assert lora.numerical_rank(r) == 3
    assert lora.subspace_similarity(r, d, max_i=3, max_j=3)[0, 0] < 0.5


# ---------------------------------------------------------------------------------------------
# amplification and intruders
def test_amplification_of_ws_own_directions():
    W = randn(20, 16)
    u, s, vh = torch.linalg.svd(W)
    own = torch.outer(u[:, 0], vh[0])  # ΔW along W's top direction
    amp = lora.amplification(W, own, r=1)
    assert amp["delta"] == pytest.approx(s[0].item(), rel=1e-4)
    assert amp["weight"] == pytest.approx(s[0].item(), rel=1e-4)
    assert amp["factor"] == pytest.approx(1 / s[0].item(), rel=1e-4)
    assert amp["percentile"] == 100.0 and amp["z"] > 3  # W's top direction beats every random draw


def test_random_projection_norms_match_their_expectation():
    # E ||U^T W V||_F^2 = r^2 ||W||_F^2 / (m n) for Haar-random U [m, r], V [n, r]
    W, r = randn(40, 30), 3
    norms = lora.random_projection_norms(W, r, n=3000, generator=torch.Generator().manual_seed(0))
    assert norms.shape == (3000,)
    assert (norms**2).mean() == pytest.approx(r**2 * W.norm().item() ** 2 / (40 * 30), rel=0.1)
    q = lora.random_orthonormal(40, 3, torch.Generator().manual_seed(1), batch=5)
    assert torch.allclose(q.transpose(1, 2) @ q, torch.eye(3).expand(5, 3, 3), atol=1e-5)
    with pytest.raises(ValueError):
        lora.random_projection_norms(W, 31)


def test_intruders_of_w_vs_itself_are_zero_and_a_new_big_direction_is_one():
    W = randn(40, 30)
    assert lora.intruder_dimensions(W, W, k=10) == 0
    # a large update along a direction spread evenly over W's left singular vectors is an intruder
    u, s, _ = torch.linalg.svd(W, full_matrices=False)
    x = u.sum(1) / u.sum(1).norm()
    y = torch.linalg.svd(W, full_matrices=False)[2].sum(0)
    y = y / y.norm()
    assert lora.intruder_dimensions(W, W + 10 * s[0] * torch.outer(x, y), k=10, eps=0.5) == 1
    chance = lora.random_direction_max_cosine(W, n=100, generator=torch.Generator().manual_seed(0))
    assert chance.max() < 0.8 and chance.min() > 1 / np.sqrt(30) - 1e-6


# ---------------------------------------------------------------------------------------------
# a rank-one edit
def test_rank_one_edit_inserts_exactly_its_value():
    W, k, v = randn(12, 30), randn(30), randn(12)
    keys = randn(200, 30)
    C = lora.second_moment(keys, shrink=0.1)
    for cov in (None, C):
        dW = lora.rome_edit(W, k, v, cov)
        assert torch.allclose((W + dW) @ k, v, atol=1e-4)
        assert lora.numerical_rank(dW) == 1
        assert lora.effective_rank(dW) == pytest.approx(1.0, abs=1e-4)
    # a key C^{-1}-orthogonal to k is untouched
    dW = lora.rome_edit(W, k, v, C)
    ck = torch.linalg.solve(C.double(), k.double()).float()
    other = randn(30)
    other = other - (other @ ck) / (ck @ ck) * ck
    assert torch.allclose(dW @ other, torch.zeros(12), atol=1e-4)


def test_read_back_finds_the_key_and_the_value():
    W, v = randn(12, 30), randn(12)
    keys = randn(50, 30)
    dW = lora.rome_edit(W, keys[17], W @ keys[17] + v)
    rb = lora.read_back(dW, keys)
    assert rb.rank == 1 and rb.top_rows[0] == 17
    assert torch.allclose(rb.written, v, atol=1e-4)
    with pytest.raises(ValueError):
        lora.read_back(dW, randn(5, 29))
    # the Svd gives the same answer; cosine scoring ignores a key's norm
    rb2 = lora.read_back(lora.svd(dW), keys, cosine=True)
    assert rb2.top_rows[0] == 17 and torch.allclose(rb2.written, v, atol=1e-4)
    big = keys.clone()
    big[3] *= 1000  # a huge key wins the projection but not the cosine
    assert lora.read_back(dW, big).top_rows[0] in (3, 17) and lora.read_back(dW, big, cosine=True).top_rows[0] == 17


def test_random_rank_one_has_the_norm_and_rank_asked_for():
    r = lora.random_rank_one((12, 30), 2.5, torch.Generator().manual_seed(0))
    dense = (r.U * r.S) @ r.Vh
    assert dense.norm().item() == pytest.approx(2.5, rel=1e-5)
    assert lora.numerical_rank(dense) == 1 and lora.numerical_rank(r) == 1
    with pytest.raises(ValueError):
        lora.random_rank_one((12, 30), 0.0)


def test_rome_edit_checks_shapes():
    with pytest.raises(ValueError):
        lora.rome_edit(randn(4, 5), randn(4), randn(4))
    with pytest.raises(ValueError):
        lora.rome_edit(randn(4, 5), torch.zeros(5), randn(4))


# ---------------------------------------------------------------------------------------------
# the real model
@pytest.fixture(scope="module")
def hf():
    import helpers

    helpers.setup(0)
    with lora.one_thread():  # batches of a few prompts: one thread is as fast, and far faster on shared cores
        yield helpers.load_hf()


def test_structure_of_the_real_model(hf):
    model, _ = hf
    types = lora.module_types(model)
    assert "mlp.down_proj" in types and "self_attn.q_proj" in types
    assert lora.mlp_out_name(model, 3) == "model.layers.3.mlp.down_proj"
    with pytest.raises(IndexError):
        lora.module_name(model, model.config.num_hidden_layers, "mlp.down_proj")
    with pytest.raises(ValueError):
        lora.module_name(model, 0, "mlp.nonexistent")


def test_prefix_shortcut_matches_the_full_model_and_added_restores(hf):
    model, tok = hf
    batch = lora.make_batch(tok, ["The capital of France is", "I like to eat"], [" Paris", " apples"])
    top = model.config.num_hidden_layers - 2
    fast, full = lora.Prefix(model, batch, top), lora.Prefix(model, batch, 0)
    assert fast.shortcut
    with torch.no_grad():
        assert torch.allclose(fast.logits(model), full.logits(model), atol=1e-3)
    name = lora.module_name(model, top, "mlp.down_proj")
    before = lora.get_weight(model, name)
    with lora.added(model, {name: torch.ones_like(before)}, scale=0.5):
        assert torch.allclose(lora.get_weight(model, name), before + 0.5)
    assert torch.equal(lora.get_weight(model, name), before)


def test_lora_and_full_training_leave_the_model_unchanged(hf):
    model, tok = hf
    batch = lora.make_batch(tok, ["The capital of France is"], [" Rome"])
    top = model.config.num_hidden_layers - 1
    prefix = lora.Prefix(model, batch, top)
    state = {k: v.clone() for k, v in model.state_dict().items() if f"layers.{top}." in k}
    run = lora.train_lora(model, prefix, rank=2, layers=[top], types=["mlp.down_proj"], steps=2, lr=1e-2)
    name = lora.module_name(model, top, "mlp.down_proj")
    assert lora.numerical_rank(run.deltas[name], rtol=1e-4) <= 2 and run.deltas[name].norm() > 0
    assert run.losses[-1] < run.losses[0]
    assert torch.allclose(run.deltas[name], 8.0 * run.B[name] @ run.A[name], atol=1e-6)  # alpha/r = 16/2
    assert torch.allclose(run.svd(name).S, lora.singular_values(run.deltas[name])[:2], rtol=1e-3, atol=1e-7)
    full = lora.train_full(model, prefix, layers=[top], types=["mlp.down_proj"], steps=2, lr=1e-4)
    assert full.losses[-1] < full.losses[0]
    assert not any("lora" in n for n, _ in model.named_modules())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    with pytest.raises(ValueError):
        lora.train_lora(model, prefix, rank=0, layers=[top], types=["mlp.down_proj"])
    with pytest.raises(ValueError):
        lora.train_full(model, prefix, layers=[top - 1], types=["mlp.down_proj"])  # below the prefix


def test_top_singular_norm_matches_the_exact_svd():
    m = randn(60, 5) @ randn(5, 40)
    s = torch.linalg.svdvals(m)
    assert lora.top_singular_norm(m, 3) == pytest.approx(s[:3].pow(2).sum().sqrt().item(), rel=1e-4)
