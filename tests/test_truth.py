"""Known-answer tests of helpers.truth (synthetic data; the statement builders on the committed data)."""
import numpy as np
import pytest
import torch

import helpers
from helpers import truth


def test_null_space_fraction_finds_planted_neuron():
    g = torch.Generator().manual_seed(0)
    d, vocab = 16, 200
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    s = torch.linspace(10, 1, d); s[-2:] = 1e-3                    # two directions the unembedding barely reads
    W_U = U @ torch.diag(s) @ torch.linalg.qr(torch.randn(vocab, d, generator=g))[0].T
    W_out = torch.randn(8, d, generator=g)
    W_out[5] = 3 * U[:, -1] + 0.01 * torch.randn(d, generator=g)   # the planted neuron writes into the null space
    frac = truth.null_space_fraction(W_out, W_U, k=2)
    assert int(frac.argmax()) == 5 and frac[5] > 0.99 and frac[:5].max() < 0.6
    with pytest.raises(ValueError):
        truth.null_space_fraction(W_out, W_U, k=d)


def test_entropy_uniform_and_onehot():
    assert float(truth.entropy(torch.zeros(10))) == pytest.approx(np.log(10), rel=1e-5)
    assert float(truth.entropy(torch.tensor([100.0, 0, 0]))) == pytest.approx(0, abs=1e-6)


def test_group_split_keeps_units_apart():
    units = np.repeat(np.arange(20), 3)
    test = truth.group_split(units, 0.3, seed=1)
    assert set(units[test]).isdisjoint(units[~test]) and test.sum() == 18


def test_mass_mean_probe():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 50)
    X = rng.normal(size=(100, 4)); X[:, 0] += 4 * y
    mm = truth.MassMean(X, y)
    assert mm.accuracy(X, y) > 0.95 and float(mm.direction[0]) == pytest.approx(4, abs=0.5)
    with pytest.raises(ValueError):
        truth.MassMean(X, np.zeros(100))


def test_number_words_and_statements_balanced():
    assert truth.number_word(73) == "seventy-three" and truth.number_word(60) == "sixty"
    data = truth.build_statements(helpers.DATA)
    for name, rows in data.items():
        labels = [r["label"] for r in rows]
        assert sum(labels) * 2 == len(labels), name
    neg = {r["statement"]: r["label"] for r in data["neg_cities"]}
    for r in data["cities"][:10]:                        # a negation flips the label
        assert neg[r["statement"].replace(" is in ", " is not in ")] == 1 - r["label"]


def test_questions_have_answers():
    qs = truth.build_questions(helpers.DATA)
    assert len(qs) > 500 and all(q["answer"].strip() and q["prompt"].endswith(q["question"]) for q in qs)


def test_committed_data_match_their_builders():
    import json
    stored = json.loads((helpers.DATA / "truth_statements.json").read_text())["datasets"]
    assert stored == truth.build_statements(helpers.DATA, seed=0)
    stored_q = json.loads((helpers.DATA / "calibration_questions.json").read_text())["questions"]
    assert stored_q == truth.build_questions(helpers.DATA)


def test_probe_sweep_checks_shapes_and_reads_the_layer_it_is_given():
    rng = np.random.default_rng(0)
    n, d = 80, 6
    y = np.array([0, 1] * (n // 2))
    units = np.repeat(np.arange(n // 2), 2).astype(str)
    dataset = np.array(["a"] * n)
    S = torch.tensor(rng.normal(size=(3, n, d)))
    S[0] = 1.0                                               # layer 0: the same state for every row (constant)
    S[2, :, 0] += 4 * torch.tensor(y)                        # layer 2: separable
    with pytest.raises(ValueError):                          # all of S with one layer: the old bug
        truth.probe_sweep(S, dataset, y, units, [2], [0], train_on=["a"])
    table, preds = truth.probe_sweep(S[[2]], dataset, y, units, [2], [0], train_on=["a"], keep_predictions_at=2)
    held = table[table.test == "a"]
    assert (held.accuracy > 0.9).all() and preds.correct.mean() > 0.9 and set(preds.test) == {"a"}
    val = table[table.test == "a (validation)"]
    assert len(val) == 1 and val.accuracy.iloc[0] > 0.9 and val.n.iloc[0] > 0


def test_larger_than_numbers():
    assert truth.larger_than_numbers("Eighty-four is larger than ninety-five.") == (84, 95)
    data = truth.build_statements(helpers.DATA)["larger_than"]
    assert all((lambda a, b: int(a > b) == r["label"])(*truth.larger_than_numbers(r["statement"])) for r in data)
