"""helpers.probes: ridge maps, logistic and ridge-classifier probes, k-means (known answers)."""
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from helpers import probes


def test_fit_affine_recovers_a_planted_map():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 16, generator=gen)
    W = torch.randn(16, 8, generator=gen)
    b = torch.randn(8, generator=gen)
    W_hat, b_hat = probes.fit_affine(X, X @ W + b + 0.01 * torch.randn(2000, 8, generator=gen), alpha=1e-6)
    assert torch.allclose(W_hat, W, atol=2e-3) and torch.allclose(b_hat, b, atol=2e-3)


def test_fit_affine_cv_picks_the_penalty_on_validation():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(400, 8, generator=gen)
    val = torch.arange(400) % 4 == 0
    Y = torch.cat([X @ torch.randn(8, 8, generator=gen), torch.randn(400, 8, generator=gen)], dim=1)
    W, b, chosen = probes.fit_affine_cv(X, Y, val, alphas=(1e-6, 1e-2, 10.0, 1e4), n_blocks=2)
    assert chosen[0] < 1e-1 and chosen[1] >= 10.0            # exact map: no shrinkage; pure noise: shrink
    assert W.shape == (8, 16) and b.shape == (16,)
    assert torch.allclose(W[:, :8], probes.fit_affine(X, Y[:, :8], alpha=chosen[0])[0], atol=1e-4)
    W_id, _, _ = probes.fit_affine_cv(X, X, val)                   # the identity is recovered (the logit lens)
    assert torch.allclose(W_id, torch.eye(8), atol=1e-3)


def test_kmeans_by_silhouette_and_probe():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]])
    x = np.concatenate([c + rng.normal(size=(30, 2)) for c in centres])
    y = np.repeat([0, 1, 2], 30)
    result = probes.kmeans_by_silhouette(x, range(2, 6))
    assert result["k"] == 3
    assert adjusted_rand_score(y, result["labels"]) == pytest.approx(1.0)
    assert adjusted_rand_score(y, probes.kmeans_labels(x, 3)) == pytest.approx(1.0)
    assert probes.probe_accuracy(x, y) == pytest.approx(1.0)
    assert probes.probe_accuracy(rng.normal(size=(90, 2)), y) < 0.6  # no signal: near chance (1/3)


def test_logistic_probe_chooses_c_on_validation_and_generalises():
    rng = np.random.default_rng(0)
    w = rng.normal(size=20)
    x = rng.normal(size=(600, 20))
    y = (x @ w + 0.5 * rng.normal(size=600) > 0).astype(int)
    fit = probes.logistic_probe(x[:300], y[:300], x[300:400], y[300:400])
    assert fit.C_ in probes.LOGISTIC_CS and set(fit.val_scores_) == set(probes.LOGISTIC_CS)
    assert fit.score(x[400:], y[400:]) > 0.85                      # a planted linear rule is learned
    shuffled = probes.logistic_probe(x[:300], rng.permutation(y[:300]), x[300:400], rng.permutation(y[300:400]))
    assert shuffled.score(x[400:], y[400:]) < 0.65                 # shuffled labels: near chance
    with pytest.raises(ValueError):
        probes.logistic_probe(x[:10], np.zeros(10), x[10:20], y[10:20])


def test_mean_difference():
    acts = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    assert torch.equal(probes.mean_difference(acts, [1, 1, 0], 1, 0), torch.tensor([2.0, -2.0]))
    with pytest.raises(ValueError):
        probes.mean_difference(acts, [1, 1, 1], 1, 0)
