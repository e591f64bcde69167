"""helpers.sae on cases with known answers (no model needed)."""
import pytest
import torch

from helpers import sae as S


def test_fvu_known_values():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 2.0], [7.0, 2.0]])
    assert S.fvu(x, x) == 0.0
    assert S.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    # variance: (9+1+1+9) + 4*1 = 24; predicting half the deviation leaves a quarter of it
    half = x.mean(0) + 0.5 * (x - x.mean(0))
    assert S.fvu(x, half) == pytest.approx(0.25)
    # the uncentred pitfall divides by sum ||x||^2 = 1+9+29+53 = 92 instead of 24
    assert S.fvu_uncentered(x, x.mean(0).expand_as(x)) == pytest.approx(24 / 92)
    # per-dimension: dim 0 reconstructed exactly, dim 1 not at all -> mean of (0, 1) = 0.5; total ratio 4/24
    x_hat = torch.stack([x[:, 0], x[:, 1].mean().expand(4)], 1)
    assert S.fvu_per_dim(x, x_hat) == pytest.approx(0.5)
    assert S.fvu(x, x_hat) == pytest.approx(4 / 24)


def test_fvu_rejects_bad_input():
    with pytest.raises(ValueError):
        S.fvu(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError):
        S.fvu(torch.tensor([[float("nan"), 0.0], [0.0, 0.0]]), torch.zeros(2, 2))


def test_pca_full_rank_is_exact_and_zero_is_mean():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    pca = S.fit_pca(x)
    assert S.fvu(x, S.pca_reconstruct(x, pca, 6)) < 1e-10
    assert S.fvu(x, S.pca_reconstruct(x, pca, 0)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        S.pca_reconstruct(x, pca, 7)


def test_kmeans_assign_plain_and_scaled():
    c = torch.tensor([[1.0, 0.0], [0.0, 10.0]])
    x = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    idx, coef = S.kmeans_assign(x, c)            # nearest: [0,2] is nearer (1,0) than (0,10)
    assert idx.tolist() == [0, 0] and coef.tolist() == [1.0, 1.0]
    idx, coef = S.kmeans_assign(x, c, scaled=True)  # best multiple: [0,2] = 0.2 * (0,10); [3,0] = 3 * (1,0)
    assert idx.tolist() == [1, 0] and coef.tolist() == pytest.approx([0.2, 3.0])
    assert S.fvu(x, S.kmeans_reconstruct(x, c, scaled=True)) == pytest.approx(0.0, abs=1e-12)


def test_fit_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]])
    x = centres.repeat(100, 1) + 0.1 * torch.randn(300, 2, generator=g)
    found = S.fit_kmeans(x, 3, seed=0)
    assert torch.cdist(centres, found).min(1).values.max() < 0.5
    assert S.fvu(x, S.kmeans_reconstruct(x, found)) < 0.01


def test_topk_sae_recovers_known_sparse_features():
    x, feats = S.synthetic_sparse(8000, 32, 24, 3, seed=0)
    sae, curve = S.train_topk(x, width=48, k=3, steps=600, batch_size=512, lr=3e-3, seed=0)
    assert S.max_cosine(sae.W_dec, feats).min() > 0.9          # every true feature has a decoder row
    assert S.fvu(x, sae.reconstruct(x)) < 0.05
    assert curve[-1] < curve[0]
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)
    assert ((sae.encode(x) > 0).sum(1) <= 3).all()


def test_train_topk_rejects_bad_k():
    with pytest.raises(ValueError):
        S.train_topk(torch.randn(10, 4), width=8, k=9)


def test_split_by_document_keeps_documents_whole():
    doc = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5])
    train, test = S.split_by_document(doc, 0.5, seed=1)
    assert (train ^ test).all()
    for d in doc.unique():
        assert len(set(test[doc == d].tolist())) == 1
    with pytest.raises(ValueError):
        S.split_by_document(torch.zeros(5), 0.5)


def test_concentration_and_top_indices():
    assert S.concentration(["a", "a", "b", "a"]) == 0.75
    assert S.chance_concentration(["a"] * 10, 3) == 1.0
    scores = torch.tensor([[0.0, 5.0], [3.0, 1.0], [2.0, 4.0]])
    assert S.top_indices(scores, 2).tolist() == [[1, 2], [0, 2]]


def test_fvu_difference_ci_known_value():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 2.0], [7.0, 2.0]])
    half = x.mean(0) + 0.5 * (x - x.mean(0))
    d, lo, hi = S.fvu_difference_ci(x, half, x, torch.tensor([0, 0, 1, 1]))
    assert d == pytest.approx(0.25) and lo <= d <= hi
