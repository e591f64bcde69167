"""helpers.geometry, finetune and editing: known answers for spectra, subspaces, intruders and rank-one edits; training leaves the model as it was."""
import numpy as np
import pytest
import torch

from helpers import editing, finetune, geometry, stats

G = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=G)


# ---------------------------------------------------------------------------------------------
# spectra
def test_effective_rank_known_answers():
    assert geometry.effective_rank(torch.outer(randn(7), randn(5))) == pytest.approx(1.0, abs=1e-4)
    assert geometry.effective_rank(torch.eye(12)) == pytest.approx(12.0, rel=1e-6)
    assert geometry.effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0]))) == pytest.approx(2.0, rel=1e-6)
    assert geometry.numerical_rank(randn(8, 3) @ randn(3, 9)) == 3
    assert geometry.sv_entropy(torch.eye(10), normalized=True) == pytest.approx(1.0)


def test_svd_objects_stand_in_for_matrices_and_factored_svd_is_exact():
    B, A = randn(30, 3), randn(3, 20)
    m = 2.5 * B @ A
    f, full = geometry.factored_svd(2.5 * B, A), geometry.svd(m)
    assert torch.allclose(f.S, full.S[:3], rtol=1e-4) and f.shape == (30, 20)
    assert torch.allclose((f.U * f.S) @ f.Vh, m, atol=1e-4)
    assert geometry.effective_rank(f) == pytest.approx(geometry.effective_rank(m), rel=1e-4)
    assert geometry.numerical_rank(f) == 3 == geometry.numerical_rank(m)
    assert np.allclose(geometry.subspace_similarity(f, m, max_i=3, max_j=3), 1.0, atol=1e-4)  # same row space
    threads = torch.get_num_threads()
    with geometry.one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads


def test_spectra_reject_bad_input():
    assert geometry.effective_rank(torch.zeros(4, 4)) == 0.0     # no spectrum: rank 0 (sv_entropy raises)
    with pytest.raises(ValueError):
        geometry.sv_entropy(torch.zeros(4, 4))
    with pytest.raises(ValueError):
        geometry.effective_rank(randn(3))
    with pytest.raises(ValueError):
        geometry.effective_rank(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


# ---------------------------------------------------------------------------------------------
# subspaces
def test_phi_of_a_subspace_with_itself_is_one():
    a = randn(8, 50)
    phi = geometry.subspace_similarity(a, a)
    assert np.allclose(np.diag(phi), 1.0, atol=1e-6)
    assert np.allclose(np.triu(phi), np.triu(np.ones_like(phi)), atol=1e-6)  # U_i inside U_j for i <= j


def test_phi_of_orthogonal_subspaces_is_zero_and_random_is_small():
    eye = torch.eye(40)
    assert np.allclose(geometry.subspace_similarity(eye[:5], eye[5:15]), 0.0, atol=1e-10)
    phi = geometry.subspace_similarity(randn(4, 2000), randn(4, 2000))
    assert phi[0, 0] < 0.01 and phi[-1, -1] < 0.02  # E[phi(i, j)] = max(i, j) / d for random subspaces


def test_phi_checks_shapes():
    with pytest.raises(ValueError):
        geometry.subspace_similarity(randn(3, 10), randn(3, 11))
    with pytest.raises(ValueError):
        geometry.subspace_similarity(randn(3, 10), randn(3, 10), side="up")


def test_random_like_keeps_the_spectrum():
    d = randn(30, 3) @ randn(3, 20)
    r = geometry.random_like(d, torch.Generator().manual_seed(1))
    assert torch.allclose(geometry.singular_values(r)[:3], geometry.singular_values(d)[:3], rtol=1e-4)
    assert geometry.numerical_rank(r) == 3
    assert geometry.subspace_similarity(r, d, max_i=3, max_j=3)[0, 0] < 0.5


# ---------------------------------------------------------------------------------------------
# amplification and intruders
def test_amplification_of_ws_own_directions():
    W = randn(20, 16)
    u, s, vh = torch.linalg.svd(W)
    own = torch.outer(u[:, 0], vh[0])  # ΔW along W's top direction
    amp = geometry.amplification(W, own, r=1)
    assert amp["delta"] == pytest.approx(s[0].item(), rel=1e-4)
    assert amp["weight"] == pytest.approx(s[0].item(), rel=1e-4)
    assert amp["factor"] == pytest.approx(1 / s[0].item(), rel=1e-4)
    assert amp["percentile"] == 100.0 and amp["z"] > 3  # W's top direction beats every random draw


def test_random_projection_norms_match_their_expectation():
    # E ||U^T W V||_F^2 = r^2 ||W||_F^2 / (m n) for Haar-random U [m, r], V [n, r]
    W, r = randn(40, 30), 3
    norms = geometry.random_projection_norms(W, r, n=3000, generator=torch.Generator().manual_seed(0))
    assert norms.shape == (3000,)
    assert (norms**2).mean() == pytest.approx(r**2 * W.norm().item() ** 2 / (40 * 30), rel=0.1)
    q = geometry.random_orthonormal(40, 3, torch.Generator().manual_seed(1), batch=5)
    assert torch.allclose(q.transpose(1, 2) @ q, torch.eye(3).expand(5, 3, 3), atol=1e-5)
    with pytest.raises(ValueError):
        geometry.random_projection_norms(W, 31)


def test_intruders_of_w_vs_itself_are_zero_and_a_new_big_direction_is_one():
    W = randn(40, 30)
    assert geometry.intruder_dimensions(W, W, k=10) == 0
    # a large update along a direction spread evenly over W's left singular vectors is an intruder
    u, s, _ = torch.linalg.svd(W, full_matrices=False)
    x = u.sum(1) / u.sum(1).norm()
    y = torch.linalg.svd(W, full_matrices=False)[2].sum(0)
    y = y / y.norm()
    assert geometry.intruder_dimensions(W, W + 10 * s[0] * torch.outer(x, y), k=10, eps=0.5) == 1
    chance = geometry.random_direction_max_cosine(W, n=400, generator=torch.Generator().manual_seed(0))
    assert chance.min() > 1 / np.sqrt(30) - 1e-6  # a unit vector in a 30-dim span has some |cos| >= 1/sqrt(30)
    # the same statistic computed directly: unit vectors in R^40, max |cos| with W's 30 left singular vectors
    x = torch.randn(40, 4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    direct = (u.double().T @ (x / x.norm(dim=0))).abs().max(0).values.numpy()
    assert np.median(chance) == pytest.approx(np.median(direct), abs=0.03)


# ---------------------------------------------------------------------------------------------
# a rank-one edit
def test_rank_one_edit_inserts_exactly_its_value():
    W, k, v = randn(12, 30), randn(30), randn(12)
    keys = randn(200, 30)
    C = editing.second_moment(keys, shrink=0.1)
    for cov in (None, C):
        dW = editing.rome_edit(W, k, v, cov)
        assert torch.allclose((W + dW) @ k, v, atol=1e-4)
        assert geometry.numerical_rank(dW) == 1
        assert geometry.effective_rank(dW) == pytest.approx(1.0, abs=1e-4)
    # a key C^{-1}-orthogonal to k is untouched
    dW = editing.rome_edit(W, k, v, C)
    ck = torch.linalg.solve(C.double(), k.double()).float()
    other = randn(30)
    other = other - (other @ ck) / (ck @ ck) * ck
    assert torch.allclose(dW @ other, torch.zeros(12), atol=1e-4)


def test_read_back_finds_the_key_and_the_value():
    W, v = randn(12, 30), randn(12)
    keys = randn(50, 30)
    dW = editing.rome_edit(W, keys[17], W @ keys[17] + v)
    rb = editing.read_back(dW, keys)
    assert rb.rank == 1 and rb.top_rows[0] == 17
    assert torch.allclose(rb.written, v, atol=1e-4)
    with pytest.raises(ValueError):
        editing.read_back(dW, randn(5, 29))
    # the Svd gives the same answer; cosine scoring ignores a key's norm
    rb2 = editing.read_back(geometry.svd(dW), keys, cosine=True)
    assert rb2.top_rows[0] == 17 and torch.allclose(rb2.written, v, atol=1e-4)
    big = keys.clone()
    big[3] *= 1000  # a huge key wins the projection but not the cosine
    cos3 = abs(float(geometry.right_vectors(dW, 1)[:, 0] @ keys[3])) / keys[3].norm().item()
    assert cos3 > 0.01  # row 3 is not orthogonal to the direction, so x1000 makes its projection the largest
    assert editing.read_back(dW, big).top_rows[0] == 3 and editing.read_back(dW, big, cosine=True).top_rows[0] == 17


def test_random_rank_one_has_the_norm_and_rank_asked_for():
    r = editing.random_rank_one((12, 30), 2.5, torch.Generator().manual_seed(0))
    dense = (r.U * r.S) @ r.Vh
    assert dense.norm().item() == pytest.approx(2.5, rel=1e-5)
    assert geometry.numerical_rank(dense) == 1 and geometry.numerical_rank(r) == 1
    with pytest.raises(ValueError):
        editing.random_rank_one((12, 30), 0.0)


def test_rome_edit_checks_shapes():
    with pytest.raises(ValueError):
        editing.rome_edit(randn(4, 5), randn(4), randn(4))
    with pytest.raises(ValueError):
        editing.rome_edit(randn(4, 5), torch.zeros(5), randn(4))


def test_adding_to_output_adds_only_at_the_given_positions_and_is_removed():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4))
    x = torch.randn(3, 6, 5)
    base = net(x)
    v = torch.randn(4)
    pos = torch.tensor([0, 2, 5])
    with editing.adding_to_output(net, "0", v, pos):
        out = net(x)
    diff = out - base
    for row, p in enumerate(pos.tolist()):
        assert torch.allclose(diff[row, p], v, atol=1e-6)
        diff[row, p] = 0
    assert diff.abs().max() == 0 and torch.equal(net(x), base)
    with editing.adding_to_output(net, "0", v, torch.tensor([0, 1])), pytest.raises(ValueError):
        net(x)


def test_quantization_noise_is_bounded_by_half_a_step_per_block():
    g = torch.Generator().manual_seed(0)
    W = randn(6, 64)
    noise = geometry.quantization_noise(W, block=32, bits=4, generator=g)
    blocks = W.reshape(6, 2, 32)
    half = ((blocks.amax(-1) - blocks.amin(-1)) / 15 / 2)[..., None]
    assert noise.shape == W.shape and (noise.reshape(6, 2, 32).abs() <= half + 1e-7).all()
    assert noise.abs().mean() > 0.3 * half.mean()  # uniform in ±half: mean |noise| = half / 2
    with pytest.raises(ValueError):
        geometry.quantization_noise(randn(4, 30), block=32)
    # a matrix rounded to 16 levels per block has at most 16 distinct values per block; a float one has 32
    step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
    q = (blocks.amin(-1, keepdim=True) + torch.round((blocks - blocks.amin(-1, keepdim=True)) / step) * step).reshape(6, 64)
    assert geometry.block_levels(q) <= 16 and geometry.block_levels(W) == 32


def test_auroc_known_answers_and_unique_keys():
    assert stats.auroc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    assert stats.auroc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    assert stats.auroc([0.5, 0.5, 0.5], [0, 1, 0]) == 0.5
    assert stats.auroc([0.1, 0.6, 0.4, 0.9], [0, 0, 1, 1]) == 0.75  # 3 of 4 positive-negative pairs ordered
    with pytest.raises(ValueError):
        stats.auroc([0.1, 0.2], [1, 1])
    keys = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [5.0, 6.0]])
    uk, ul = editing.unique_keys(keys, [False, False, True, False])
    assert len(uk) == 3 and ul.sum() == 1 and torch.equal(uk[ul][0], torch.tensor([1.0, 2.0]))


# ---------------------------------------------------------------------------------------------
# the real model
@pytest.fixture(scope="module")
def hf():
    import helpers

    helpers.setup(0)
    with geometry.one_thread():  # batches of a few prompts: one thread is as fast, and far faster on shared cores
        yield helpers.load_hf()


def test_structure_of_the_real_model(hf):
    model, _ = hf
    types = finetune.module_types(model)
    assert "mlp.down_proj" in types and "self_attn.q_proj" in types
    assert finetune.mlp_out_name(model, 3) == "model.layers.3.mlp.down_proj"
    with pytest.raises(IndexError):
        finetune.module_name(model, model.config.num_hidden_layers, "mlp.down_proj")
    with pytest.raises(ValueError):
        finetune.module_name(model, 0, "mlp.nonexistent")


def test_prefix_shortcut_matches_the_full_model_and_added_restores(hf):
    model, tok = hf
    batch = finetune.make_batch(tok, ["The capital of France is", "I like to eat"], [" Paris", " apples"])
    top = model.config.num_hidden_layers - 2
    fast, full = finetune.Prefix(model, batch, top), finetune.Prefix(model, batch, 0)
    assert fast.shortcut
    with torch.no_grad():
        assert torch.allclose(fast.logits(model), full.logits(model), atol=1e-3)
    name = finetune.module_name(model, top, "mlp.down_proj")
    before = finetune.get_weight(model, name)
    with finetune.added(model, {name: torch.ones_like(before)}, scale=0.5):
        assert torch.allclose(finetune.get_weight(model, name), before + 0.5)
    assert torch.equal(finetune.get_weight(model, name), before)


def test_lora_and_full_training_leave_the_model_unchanged(hf):
    model, tok = hf
    batch = finetune.make_batch(tok, ["The capital of France is"], [" Rome"])
    top = model.config.num_hidden_layers - 1
    prefix = finetune.Prefix(model, batch, top)
    state = {k: v.clone() for k, v in model.state_dict().items() if f"layers.{top}." in k}
    run = finetune.train_lora(model, prefix, rank=2, layers=[top], types=["mlp.down_proj"], steps=2, lr=1e-2)
    name = finetune.module_name(model, top, "mlp.down_proj")
    assert geometry.numerical_rank(run.deltas[name], rtol=1e-4) <= 2 and run.deltas[name].norm() > 0
    assert run.losses[-1] < run.losses[0]
    assert torch.allclose(run.deltas[name], 8.0 * run.B[name] @ run.A[name], atol=1e-6)  # alpha/r = 16/2
    s_dense = geometry.singular_values(run.deltas[name])[:2]  # float32 SVD: absolute error ~1e-6 of the largest value
    assert torch.allclose(run.svd(name).S, s_dense, rtol=1e-3, atol=1e-5 * s_dense[0].item())
    full = finetune.train_full(model, prefix, layers=[top], types=["mlp.down_proj"], steps=2, lr=1e-4)
    assert full.losses[-1] < full.losses[0]
    assert not any("lora" in n for n, _ in model.named_modules())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    with pytest.raises(ValueError):
        finetune.train_lora(model, prefix, rank=0, layers=[top], types=["mlp.down_proj"])
    with pytest.raises(ValueError):
        finetune.train_full(model, prefix, layers=[top - 1], types=["mlp.down_proj"])  # below the prefix


def test_top_singular_norm_matches_the_exact_svd():
    m = randn(60, 5) @ randn(5, 40)
    s = torch.linalg.svdvals(m)
    assert geometry.top_singular_norm(m, 3) == pytest.approx(s[:3].pow(2).sum().sqrt().item(), rel=1e-4)


def test_mlp_keys_and_subject_key(hf):
    model, tok = hf
    prompts = ["The Eiffel Tower is tall", "I saw the Eiffel Tower"]
    keys, where = editing.mlp_keys(model, tok, prompts, 2)
    n_tok = [len(tok(p)["input_ids"]) for p in prompts]
    d_mlp = finetune.get_weight(model, finetune.mlp_out_name(model, 2)).shape[1]
    assert keys.shape == (sum(n_tok) - 2, d_mlp) and where[0] == (0, 1) and where[-1] == (1, n_tok[1] - 1)
    k_star = editing.subject_key(model, tok, prompts, "Eiffel Tower", 2)
    rows = [j for j, (i, t) in enumerate(where) if t == editing.subject_position(tok, prompts[i], "Eiffel Tower")]
    assert len(rows) == 2 and torch.allclose(k_star, keys[rows].mean(0), atol=1e-5)
    # a causal model gives the same key to the same prefix: identical openings give identical keys
    same, _ = editing.mlp_keys(model, tok, ["The Eiffel Tower is tall", "The Eiffel Tower was built"], 2)
    assert torch.equal(same[0], same[n_tok[0] - 1])


def test_rank_one_edit_flips_a_fact_on_the_real_model(hf):
    """End to end: ROME's key, optimised value and closed-form rank-one ΔW make the model answer Rome, not Paris."""
    model, tok = hf
    layer, prompt, subject = 4, "The Eiffel Tower is located in the city of", "Eiffel Tower"
    contexts = [prompt, "Here is a fact. " + prompt]
    name = finetune.mlp_out_name(model, layer)
    W = finetune.get_weight(model, name)
    k = editing.subject_key(model, tok, contexts, subject, layer)
    delta = editing.optimize_value(model, tok, contexts, subject, " Rome", layer, steps=15)
    assert delta.norm() > 0
    keys, _ = editing.mlp_keys(model, tok, ["The Louvre is in Paris.", "I like to eat apples.", prompt], layer)
    dW = editing.rome_edit(W, k, W @ k + delta, editing.second_moment(keys, 0.9))
    batch = finetune.make_batch(tok, [prompt], [" Rome"], [" Paris"])
    pre = finetune.Prefix(model, batch, 0)
    with torch.no_grad():
        before = finetune.log_odds(pre.logits(model), batch.target_ids, batch.other_ids).item()
        with finetune.added(model, {name: dW}):
            after = finetune.log_odds(pre.logits(model), batch.target_ids, batch.other_ids).item()
    assert before < 0 < after
    assert geometry.numerical_rank(dW) == 1 and torch.equal(finetune.get_weight(model, name), W)


def test_sgd_and_rslora_options(hf):
    model, tok = hf
    batch = finetune.make_batch(tok, ["The capital of France is"], [" Rome"])
    top = model.config.num_hidden_layers - 1
    prefix = finetune.Prefix(model, batch, top)
    name = finetune.module_name(model, top, "mlp.down_proj")
    run = finetune.train_lora(model, prefix, rank=4, layers=[top], types=["mlp.down_proj"], steps=1, lr=1e-2, use_rslora=True)
    assert torch.allclose(run.deltas[name], 8.0 * run.B[name] @ run.A[name], atol=1e-6)  # alpha/sqrt(r) = 16/2
    sgd = finetune.train_full(model, prefix, layers=[top], types=["mlp.down_proj"], steps=2, lr=0.5, optimizer="sgd")
    assert sgd.losses[-1] < sgd.losses[0]
    with pytest.raises(ValueError):
        finetune.train_full(model, prefix, layers=[top], types=["mlp.down_proj"], steps=1, optimizer="rmsprop")


def test_training_stops_at_the_target_loss(hf):
    model, tok = hf
    batch = finetune.make_batch(tok, ["The capital of France is"], [" Rome"])
    top = model.config.num_hidden_layers - 1
    prefix = finetune.Prefix(model, batch, top)
    free = finetune.train_full(model, prefix, layers=[top], types=["mlp.down_proj"], steps=6, lr=0.01, optimizer="sgd")
    assert free.losses[0] > free.losses[1] > free.losses[2] > free.losses[3]
    target = free.losses[2]                                  # the loss after two steps of the same run
    stopped = finetune.train_full(model, prefix, layers=[top], types=["mlp.down_proj"], steps=6, lr=0.01,
                                  optimizer="sgd", stop_loss=target)
    assert len(stopped.losses) == 3 and stopped.losses[-1] <= target    # two steps (a loss before each), the final loss
    assert stopped.losses[:3] == pytest.approx(free.losses[:3])
    with pytest.raises(ValueError):
        finetune.train_lora(model, prefix, rank=1, layers=[top], types=["mlp.down_proj"], steps=1, stop_loss=-1.0)
