import math

import numpy as np
import pytest
import torch

from helpers import geometry, pause


# ---------------------------------------------------------------------------------------------
# fillers and prompts
def test_zero_fillers_give_the_original_prompt():
    q, cue = [5, 6, 7], [8, 9]
    assert pause.insert_fillers(q, cue, []) == q + cue
    assert pause.insert_fillers(q, cue, [1, 1]) == [5, 6, 7, 1, 1, 8, 9]


def test_filler_ids(model):
    tok = model.tokenizer
    assert pause.filler_ids(tok, "dots", 0) == []
    dots = pause.filler_ids(tok, "dots", 5)
    assert len(dots) == 5 and len(set(dots)) == 1 and tok.decode(dots[:1]).strip() == "."
    assert tok.decode(pause.filler_ids(tok, "newlines", 3)) == "\n\n\n"
    assert pause.filler_ids(tok, "special", 2, special_id=7) == [7, 7]
    meaningful = pause.filler_ids(tok, "meaningful", 40)
    assert len(meaningful) == 40 and len(set(meaningful)) > 10       # real, varied words
    neutral = pause.filler_ids(tok, "neutral", 20)                     # task-neutral words, repeated
    assert len(neutral) == 20 and tok.decode(neutral).startswith(pause.NEUTRAL_PAD)
    with pytest.raises(ValueError):
        pause.filler_ids(tok, "commas", 2)
    with pytest.raises(ValueError):
        pause.filler_ids(tok, "dots", -1)
    with pytest.raises(ValueError):
        pause.filler_ids(tok, "special", 2)


def test_unused_special_token(model):
    tok = model.tokenizer
    sid = pause.unused_special_token(tok, model.W_E)
    assert sid not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert sid in tok.all_special_ids or sid in tok.added_tokens_decoder


def test_build_batch_positions(model):
    tok = model.tokenizer
    tasks = pause.load_tasks()
    fam = pause.subsample(tasks["facts"], 4, seed=0)
    fill = pause.filler_ids(tok, "dots", 3)
    b = pause.build_batch(tok, fam, fill)
    assert b.tokens.shape[0] == 4 and b.answer_pos == b.tokens.shape[1] - 1
    assert (b.tokens[:, b.pause] == fill[0]).all()
    cue = tok.encode(fam["cue"], add_special_tokens=False)
    assert (b.tokens[:, b.cue] == torch.tensor(cue)).all()
    for row, item in enumerate(fam["items"]):
        assert tok.decode(b.tokens[row, b.question[row]]).strip() == item["question"]
        assert b.answer_ids[row] == tok.encode(item["answer"], add_special_tokens=False)[0]
    # with no fillers, a row is exactly BOS + the tokenized prompt
    b0 = pause.build_batch(tok, fam, [])
    row = b0.tokens[0, int(b0.n_pad[0]):].tolist()
    assert row == [tok.bos_token_id] + tok.encode(fam["prefix"] + fam["items"][0]["question"] + fam["cue"],
                                                  add_special_tokens=False)


def test_tasks_file_is_consistent(model):
    tasks = pause.load_tasks()
    assert set(tasks) == {"arithmetic", "facts", "lists"}
    for fam in tasks.values():
        assert len(fam["items"]) >= 30
    # arithmetic answers are right, and every answer is one token
    for item in tasks["arithmetic"]["items"]:
        a, op, b = item["question"].split()
        assert int(item["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    for fam in tasks.values():
        for item in fam["items"]:
            assert len(model.tokenizer.encode(item["answer"], add_special_tokens=False)) == 1
    for item in tasks["lists"]["items"]:                     # the asked item's price is in the list
        listing, asked = item["question"][len("Prices: "):].split(". The ")
        prices = dict(entry.split() for entry in listing.split(", "))
        assert prices[asked] == item["answer"]


def test_cached_scoring_equals_full_prompt_logits(model):
    import helpers
    from helpers import interventions as I

    hf, tok = helpers.load_hf()
    fam = pause.subsample(pause.load_tasks()["lists"], 3, seed=1)
    runs = {"dots": pause.filler_ids(tok, "dots", 4), "meaningful": pause.filler_ids(tok, "meaningful", 4)}
    scores = pause.score_pauses(hf, tok, fam, runs, ks=[0, 1, 4], batch_size=2)   # two chunks, left padding
    for (kind, k), s in scores.items():
        b = pause.build_batch(tok, fam, runs[kind][:k])
        with pause.torch_threads(1):                  # small forwards: one thread is fastest on a busy CPU
            logp = I.logits(model, b.tokens).log_softmax(-1)
        ref = logp.gather(1, b.answer_ids[:, None])[:, 0].numpy()
        assert np.allclose(s["logprob"], ref, atol=1e-3), (kind, k)
        assert (s["correct"] == (logp.argmax(-1) == b.answer_ids).numpy()).all()
    with pytest.raises(ValueError):
        pause.score_pauses(hf, tok, fam, runs, ks=[0, 8])
    # Goyal et al.'s placement: prefix + question + cue + k fillers, the answer read at the last one
    runs["neutral"] = pause.filler_ids(tok, "neutral", 4)
    end = pause.score_pauses(hf, tok, fam, runs, ks=[0, 1, 4], batch_size=2, placement="end")
    cue = tok.encode(fam["cue"], add_special_tokens=False)
    for (kind, k), s in end.items():
        for row, item in enumerate(fam["items"]):
            ids = ([tok.bos_token_id] + tok.encode(fam["prefix"] + item["question"], add_special_tokens=False)
                   + cue + runs[kind][:k])
            with pause.torch_threads(1):
                logp = I.logits(model, torch.tensor([ids])).log_softmax(-1)[0]
            answer = pause.answer_token(tok, item["answer"])
            assert abs(s["logprob"][row] - logp[answer].item()) < 1e-3, (kind, k, row)
            assert s["correct"][row] == (logp.argmax().item() == answer)
    with pytest.raises(ValueError):
        pause.score_pauses(hf, tok, fam, runs, ks=[0], placement="middle")


# ---------------------------------------------------------------------------------------------
# statistics
def test_wilson_interval_known_values():
    low, high = pause.wilson_interval(5, 10)
    assert math.isclose(low, 0.2366, abs_tol=1e-3) and math.isclose(high, 0.7634, abs_tol=1e-3)
    low, high = pause.wilson_interval(0, 10)
    assert low == 0 and math.isclose(high, 0.2775, abs_tol=1e-3)
    assert pause.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        pause.wilson_interval(11, 10)


def test_bootstrap_and_paired_difference():
    assert pause.bootstrap_ci([2.0] * 7) == (2.0, 2.0, 2.0)
    mean, low, high = pause.paired_difference([1, 2, 3, 4], [1, 2, 3, 4])
    assert mean == low == high == 0
    mean, low, high = pause.bootstrap_ci(np.arange(100.0))
    assert mean == 49.5 and low < 49.5 < high
    with pytest.raises(ValueError):
        pause.paired_difference([1, 2], [1, 2, 3])


# ---------------------------------------------------------------------------------------------
# analysis measures
def test_rank_measures_on_known_matrices():
    g = torch.Generator().manual_seed(0)
    rank1 = torch.randn(12, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 30, generator=g, dtype=torch.float64)
    assert math.isclose(geometry.effective_rank(rank1), 1.0, abs_tol=1e-6)
    assert geometry.numerical_rank(rank1) == 1
    assert math.isclose(geometry.effective_rank(torch.eye(5)), 5.0, abs_tol=1e-9)
    rank3 = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 40, generator=g, dtype=torch.float64)
    assert geometry.numerical_rank(rank3) == 3 and geometry.effective_rank(rank3) <= 3 + 1e-9
    assert geometry.effective_rank(torch.zeros(4, 4)) == 0.0 and geometry.numerical_rank(torch.zeros(4, 4)) == 0
    stack = torch.stack([rank1, rank3[:12, :30]])
    assert list(geometry.numerical_rank(stack, rtol=1e-2)) == [1, 3]


def test_rank_gain_of_copies_is_zero():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 16, generator=g)
    copies = base[-1:].expand(4, 16)                 # four pauses that copy the last position
    fresh = torch.randn(4, 16, generator=g)          # four new directions
    gain_copies = pause.rank_gain(torch.cat([base, copies]), 6, [0, 2, 4], measure=geometry.numerical_rank)
    gain_fresh = pause.rank_gain(torch.cat([base, fresh]), 6, [0, 2, 4], measure=geometry.numerical_rank)
    assert list(gain_copies) == [0, 0, 0] and list(gain_fresh) == [0, 2, 4]
    with pytest.raises(ValueError):
        pause.rank_gain(base, 6, [1])


def test_consecutive_cosine_and_attention_mass():
    x = torch.randn(2, 5, 8)
    x[:, 3] = 2 * x[:, 2]
    cos = pause.consecutive_cosine(x, [2, 3])
    assert torch.allclose(cos, torch.ones(2, 1), atol=1e-6)
    pattern = torch.full((2, 3, 4, 4), 0.25)         # uniform attention over 4 keys
    assert torch.allclose(pause.attention_mass(pattern, 3, [1, 2]), torch.full((2,), 0.5))
    with pytest.raises(ValueError):
        pause.attention_mass(pattern[0], 3, [1])


def test_lens_at_the_last_layer_is_the_model_output(model):
    from helpers import interventions as I

    prompts = ["The capital of France is", "One, two, three, four,"]
    tokens = I.to_tokens(model, prompts)
    resid = I.residual_stream(model, tokens, layers=[model.cfg.n_layers], pos=None)
    answers = torch.tensor([I.token_id(model, " Paris"), I.token_id(model, " five")])
    logp, rank = pause.lens_answer_logprob(model, resid, answers)
    ref = I.logits(model, tokens, pos=None).log_softmax(-1)
    target = ref.gather(-1, answers[:, None, None].expand(-1, ref.shape[1], 1))[..., 0]
    assert torch.allclose(logp[0], target, atol=1e-3)
    assert rank[0, 0, -1] == 1                        # " Paris" is the top token after the prompt
    pool = torch.tensor([I.token_id(model, w) for w in [" London", " Paris", " five", " Rome"]])
    _, rank_pool = pause.lens_answer_logprob(model, resid, answers, candidates=pool)
    assert rank_pool[0, 0, -1] == 1 and (rank_pool <= 4).all() and (rank_pool <= rank).all()


# ---------------------------------------------------------------------------------------------
# the synthetic 3SUM task and the tiny transformer
def test_three_sum_labels_hand_checked():
    x = torch.tensor([[[1, 2, 3], [4, 5, 6], [5, 3, 1]],       # sums to (10, 10, 10) = 0 mod 10
                      [[1, 2, 3], [4, 5, 6], [5, 3, 2]],       # near miss: (10, 10, 11)
                      [[1, 2, 3], [9, 8, 7], [0, 0, 0]]])      # x0 + x1 = 0, but position 2 is a blank
    real = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    lab = pause.three_sum_labels(x, real, mod=10)
    assert lab["label"].tolist() == [1, 0, 0]
    assert lab["pair"][0].tolist() == [1, 1, 1] and lab["pair"][1].tolist() == [0, 0, 0]
    assert lab["complement"][0, 0].tolist() == [5, 3, 1]       # -(x0 + x1) mod 10
    assert lab["pair_real"][2].tolist() == [True, False, False]
    assert pause.pair_index(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def test_three_sum_batch_is_balanced_and_blanked():
    g = torch.Generator().manual_seed(0)
    x, real = pause.three_sum_batch(4000, 4, 6, dim=3, mod=10, generator=g)
    n = real.sum(1)
    assert n.min() == 4 and n.max() == 6
    assert (x[~real] == 0).all()
    assert (real[:, :-1] | ~real[:, 1:]).all()                 # real positions come first
    label = pause.three_sum_labels(x, real)["label"].float().mean()
    assert 0.45 < label < 0.6
    with pytest.raises(ValueError):
        pause.three_sum_batch(4, 2, 5)


def test_encoding_and_causality():
    cfg = pause.ThreeSumConfig(n_min=3, n_max=4, d_model=16, n_heads=2, n_layers=2)
    x, real = pause.three_sum_batch(5, 3, 4, generator=torch.Generator().manual_seed(0))
    feats = pause.encode_three_sum(x, real, cfg.mod, cfg.n_fillers("filler"))
    assert feats.shape == (5, 4 + 6 + 1, 3 * 10 + 4)
    assert (feats[:, 4:10, 32] == 1).all() and (feats[:, -1, 33] == 1).all()
    assert torch.equal(feats[:, :4, 30], real.float())
    model = pause.make_three_sum_model(cfg, "filler")
    out = model(feats)
    changed = feats.clone()
    changed[:, 3, :30] = 0
    out2 = model(changed)
    assert torch.allclose(out[:, :3], out2[:, :3], atol=1e-6)  # earlier positions never see later ones
    assert not torch.allclose(out[:, 3:], out2[:, 3:])
    with pytest.raises(ValueError):
        cfg.n_fillers("pauses")


def test_short_training_reduces_the_loss():
    cfg = pause.ThreeSumConfig(n_min=3, n_max=3, d_model=16, n_heads=2, n_layers=2, steps=60, batch_size=64)
    model, losses = pause.train_three_sum(cfg, "filler + supervision", seed=0)
    assert losses.shape == (60,) and losses[-10:].mean() < losses[:10].mean()
    acc = pause.three_sum_accuracy(model, cfg, "filler + supervision", 3, n_eval=200)
    assert 0 <= acc["low"] <= acc["accuracy"] <= acc["high"] <= 1
    with pytest.raises(ValueError):
        pause.three_sum_accuracy(model, cfg, "filler + supervision", 5)


def test_toy_patching_identities():
    cfg = pause.ThreeSumConfig(n_min=3, n_max=3, d_model=16, n_heads=2, n_layers=2)
    model = pause.make_three_sum_model(cfg, "filler")
    g = torch.Generator().manual_seed(0)
    a = pause.encode_three_sum(*pause.three_sum_batch(6, 3, 3, generator=g), cfg.mod, 3)
    b = pause.encode_three_sum(*pause.three_sum_batch(6, 3, 3, generator=g), cfg.mod, 3)
    out_a, hid_a, _ = model(a, return_hidden=True)
    _, hid_b, _ = model(b, return_hidden=True)
    fillers = [3, 4, 5]
    # patching a run with its own streams changes nothing
    assert torch.allclose(model(a, patch=(fillers, hid_a)), out_a, atol=1e-6)
    # patching the fillers from b: earlier positions untouched, patched positions hold b's streams
    out, hid, _ = model(a, return_hidden=True, patch=(fillers, hid_b))
    assert torch.allclose(out[:, :3], out_a[:, :3], atol=1e-6)
    for h, hb in zip(hid, hid_b):
        assert torch.equal(h[:, fillers], hb[:, fillers])
    # patching every position gives b's run exactly
    out_all = model(a, patch=(list(range(a.shape[1])), hid_b))
    assert torch.allclose(out_all, model(b), atol=1e-5)
    with pytest.raises(ValueError):
        model(a, patch=(fillers, hid_b[:-1]))
    res = pause.three_sum_filler_patch(model, cfg, "filler", 3, n_eval=100)
    assert 0 <= res["follows_low"] <= res["follows_source"] <= res["follows_high"] <= 1 and 0 <= res["clean_accuracy"] <= 1
    with pytest.raises(ValueError):
        pause.three_sum_filler_patch(model, cfg, "no filler", 3)


def test_supervised_conditions_share_targets():
    cfg = pause.ThreeSumConfig(n_min=3, n_max=4, d_model=16, n_heads=2, n_layers=2)
    assert cfg.pair_block == 2 + cfg.dim * cfg.mod
    assert cfg.d_out("filler + supervision") == 2 + cfg.pair_block
    assert cfg.d_out("no filler + supervision") == 2 + 6 * cfg.pair_block
    assert cfg.n_fillers("no filler + supervision") == 0 and cfg.n_fillers("filler") == 6
    x, real = pause.three_sum_batch(8, 3, 4, generator=torch.Generator().manual_seed(0))
    for condition in pause.SUPERVISED:
        model = pause.make_three_sum_model(cfg, condition, seed=0)
        with_aux, _ = pause.three_sum_loss(model, x, real, cfg, condition)
        answer_only, correct = pause.three_sum_loss(model, x, real, cfg, condition, supervise=False)
        assert with_aux > answer_only > 0 and correct.shape == (8,)
    # seeding a model leaves the caller's random stream alone
    torch.manual_seed(5)
    a = torch.rand(1)
    torch.manual_seed(5)
    pause.make_three_sum_model(cfg, "filler", seed=1)
    assert torch.equal(torch.rand(1), a)


def test_cot_mix_follows_pfau_layout():
    cfg = pause.ThreeSumConfig(n_min=3, n_max=4, dim=2, mod=5, d_model=16, n_heads=2, n_layers=2,
                               square_fillers=True)
    c = "filler + CoT mix"
    assert cfg.n_fillers(c) == 16 and cfg.n_fillers("filler") == 16 and cfg.n_fillers("no filler") == 0
    assert cfg.d_in(c) == cfg.d_in("filler") + 1 + cfg.pair_block
    x, real = pause.three_sum_batch(8, 3, 4, dim=2, mod=5, generator=torch.Generator().manual_seed(0))
    lab = pause.three_sum_labels(x, real, 5)
    target = pause.pair_targets(lab, cfg)
    assert target.shape == (8, 6, cfg.pair_block)
    assert torch.equal(target[..., :2].argmax(-1) * lab["pair_real"], lab["pair"])
    assert (target[~lab["pair_real"]] == 0).all()                   # pairs with a blank member: no target
    rows = torch.tensor([True, False] * 4)
    content = torch.cat([torch.zeros_like(target[:, :1]), target[:, :-1]], 1)
    feats = pause.encode_three_sum(x, real, 5, 16, cot=(rows, content))
    base = 2 * 5 + 4
    assert feats.shape == (8, 4 + 16 + 1, cfg.d_in(c))
    assert (feats[rows, 4:10, base] == 1).all() and (feats[rows, 4:10, base - 2] == 0).all()   # CoT, not filler
    assert (feats[rows, 10:20, base - 2] == 1).all()                 # the slots after the CoT stay fillers
    assert (feats[~rows, 4:20, base:] == 0).all() and (feats[~rows, 4:20, base - 2] == 1).all()
    assert torch.equal(feats[rows, 5:10, base + 1:], target[rows, :5])   # slot p holds pair p-1 (teacher forcing)
    plain = pause.three_sum_inputs(x, real, cfg, c)
    assert torch.equal(plain, pause.encode_three_sum(x, real, 5, 16, cot=(torch.zeros(8, dtype=torch.bool), content)))
    model = pause.make_three_sum_model(cfg, c, seed=0)
    g = torch.Generator().manual_seed(1)
    with_cot, _ = pause.three_sum_loss(model, x, real, cfg, c, generator=g)
    answer_only, correct = pause.three_sum_loss(model, x, real, cfg, c, supervise=False)
    assert with_cot > answer_only > 0 and correct.shape == (8,)
    for same in (False, True):
        res = pause.three_sum_filler_patch(model, cfg, c, 3, n_eval=50, same_label=same)
        assert 0 <= res["follows_low"] <= res["follows_source"] <= res["follows_high"] <= 1


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with pause.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pause.torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        with pause.torch_threads(0):
            pass
    assert torch.get_num_threads() == before
