"""Lenses and probes: planted linear maps are recovered, identity translators are the logit lens, transplants
of the final state reproduce the output, n-gram baselines count right."""
import pytest
import torch

from helpers import interventions as I
from helpers import lenses as L
from tests.conftest import EIFFEL


def test_identity_prior_shrinks_to_the_identity():
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.randn(500, 6, generator=gen), torch.randn(500, 6, generator=gen)
    W, _ = L.fit_affine(X, Y, alpha=1e8, prior="identity")
    assert torch.allclose(W, torch.eye(6), atol=1e-4)
    with pytest.raises(ValueError, match="d_in == d_out"):
        L.fit_affine(X, Y[:, :3], prior="identity")


def _states(model, text=EIFFEL):
    tokens = I.to_tokens(model, text).cpu()
    return L.cache_states(model, tokens, torch.ones_like(tokens, dtype=torch.bool))


def test_identity_tuned_lens_is_the_logit_lens(model):
    states = _states(model)
    lens = L.TunedLens.identity(model.cfg.n_layers, model.cfg.d_model)
    logit_lens = I.logit_lens(model, EIFFEL)[:, 0]                                  # last position
    for layer in (0, 10, model.cfg.n_layers):
        ours = L.decode(model, lens.translate(states.resid[layer, -1:], layer)).log_softmax(-1)[0]
        assert torch.allclose(ours, logit_lens[layer], atol=1e-4)


def test_cached_states_skip_bos_and_match_the_output(model):
    states = _states(model)
    assert states.resid.shape[:2] == (model.cfg.n_layers + 1, len(model.to_str_tokens(EIFFEL)) - 1)
    assert states.pos.min() == 1                                                     # BOS left out
    assert torch.equal(L.top1(model, states.resid[-1]), states.top1)
    final = L.decode(model, states.resid[-1])
    assert L.kl_to_final(model, states.resid[-1], final).abs().max() < 1e-5


def test_future_pairs_and_sequence_split():
    seq = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    pos = torch.tensor([1, 2, 3, 4, 1, 2, 3])
    states = L.States(torch.zeros(2, 7, 3), torch.zeros(7, dtype=torch.long), torch.arange(7), seq, pos)
    src, tgt = L.future_pairs(states, 1)
    assert src.tolist() == [0, 1, 2, 4, 5] and tgt.tolist() == [1, 2, 3, 5, 6]
    src, tgt = L.future_pairs(states, 0, max_ahead=2)
    assert src.tolist() == tgt.tolist() == [0, 1, 4]
    train, test = L.split_by_sequence(states, 0.5, seed=0)
    assert (train ^ test).all() and len(states.seq[test].unique()) == 1


def test_accuracy_gap_known_values():
    gap, se = L.accuracy_gap(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 0, 0, 0]))
    assert gap == pytest.approx(0.5) and se == pytest.approx(0.2887, abs=1e-3)
    with pytest.raises(ValueError):
        L.accuracy_gap(torch.ones(3), torch.ones(4))


def test_lookup_table_and_chained_prediction():
    table = L.lookup_table(torch.tensor([1, 2, 1, 1, 5, 2]), torch.tensor([2, 1, 2, 3, 6, 1]))
    assert table == {1: 2, 2: 1, 5: 6}
    assert L.ngram_predict(table, torch.tensor([1, 9]), fallback=0).tolist() == [2, 0]
    assert L.ngram_predict(table, torch.tensor([1, 5]), fallback=0, steps=2).tolist() == [1, 0]
    assert L.ngram_predict(table, torch.tensor([1, 5]), fallback=0, steps=0).tolist() == [1, 5]


def test_transplanting_the_final_state_reproduces_the_output(model):
    states = _states(model)
    prefix = L.init_soft_prompt(model, " Next:", n_prefix=3)
    logits = L.soft_prompt_logits(model, prefix, states.resid[-1, -3:], model.cfg.n_layers)
    assert torch.allclose(logits, L.decode(model, states.resid[-1, -3:]), atol=1e-3)


def test_soft_prompt_with_real_embeddings_is_the_plain_forward(model):
    ids = I.to_tokens(model, EIFFEL)[0].cpu()                       # [BOS, t1 .. tn]
    emb = model.embed(ids[None].to(model.cfg.device))[0].detach().float().cpu()
    prefix, source, given = emb[1:-2], emb[-2:-1].repeat(2, 1), ids[-1:].repeat(2, 1)
    logits = L.soft_prompt_logits(model, prefix, source, 0, given=given)      # transplant at the embedding
    plain = I.logits(model, EIFFEL)[0].float()
    assert torch.allclose(logits[0], plain, atol=2e-3) and torch.allclose(logits[1], plain, atol=2e-3)


def test_soft_prompt_gets_gradients_and_learns(model):
    states = _states(model)
    src, tgt = states.resid[8], states.resid[-1]
    before = [p.requires_grad for p in model.parameters()]
    prefix, losses = L.train_soft_prompt(model, src, tgt, layer=8, n_prefix=2, steps=6, lr=0.05, batch_size=8)
    assert prefix.shape == (2, model.cfg.d_model) and losses[-1] < losses[0]
    assert [p.requires_grad for p in model.parameters()] == before               # the model's flags are restored


def test_opening_groups_and_group_split():
    texts = ["Once upon a time x", "Once upon a time y", "The cat sat", "Once upon z", "The cat ran"]
    groups = L.opening_groups(texts, ["Once upon", "Once upon a time", "The cat"])
    assert groups.tolist() == [1, 1, 2, 0, 2]                            # the longest matching opening
    with pytest.raises(ValueError):
        L.opening_groups(["Nothing"], ["Once"])
    seq = torch.tensor([0, 0, 1, 2, 3, 4, 4])
    states = L.States(torch.zeros(2, 7, 3), torch.zeros(7, dtype=torch.long), torch.arange(7), seq, seq + 1)
    for seed in range(5):
        train, test = L.split_by_group(states, groups, 0.34, seed=seed)
        assert (train ^ test).all()
        assert not set(groups[seq[train]].tolist()) & set(groups[seq[test]].tolist())   # no opening on both sides


def test_accuracy_gap_clustered_is_wider_for_copies():
    a, b = torch.tensor([1, 0, 1, 1, 0, 1]), torch.tensor([0, 0, 0, 1, 0, 0])
    _, se = L.accuracy_gap(a, b)
    _, se_c = L.accuracy_gap(a.repeat(2), b.repeat(2), clusters=list(range(6)) * 2)
    _, se_naive = L.accuracy_gap(a.repeat(2), b.repeat(2))
    assert se_c > se_naive and se_c == pytest.approx(se, rel=0.25)


def test_train_kl_lowers_the_kl(model):
    states = _states(model)
    lens = L.TunedLens.identity(model.cfg.n_layers, model.cfg.d_model)
    losses = lens.train_kl(model, states.resid, steps=8, lr=1e-3, batch_size=4, seed=0, layers=[6, 12])
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert torch.equal(lens.W[0], torch.eye(model.cfg.d_model))             # layers not listed stay untouched


def test_generate_texts_is_seeded_and_continues_the_opening(model):
    openings = ["The recipe calls for", "My favourite book is"]
    a = L.generate_texts(model, openings, n_new_tokens=5, seed=3)
    assert a == L.generate_texts(model, openings, n_new_tokens=5, seed=3)
    assert all(t.startswith(o) and len(t) > len(o) for t, o in zip(a, openings))
