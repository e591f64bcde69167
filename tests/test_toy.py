import numpy as np
import pytest
import torch

from helpers import toy


def test_sparse_features_density_and_range():
    x = toy.sparse_features(20_000, 2, 5, torch.tensor([1.0, 0.1]), generator=torch.Generator().manual_seed(0))
    density = (x != 0).float().mean(dim=(0, 2))
    assert torch.allclose(density, torch.tensor([1.0, 0.1]), atol=0.01)
    assert x.min() >= 0 and x.max() <= 1


def test_linear_toy_with_enough_dimensions_learns_identity():
    torch.manual_seed(0)
    model = toy.ToyModel(n_instances=3, n_features=4, n_hidden=4, nonlinearity="linear")
    history = toy.train(model, lambda b: toy.sparse_features(b, 3, 4, 1.0),
                        lambda m, x: toy.weighted_mse(m(x), x), steps=1500, batch_size=256, lr=1e-2, progress=False)
    assert history.shape[1] == 3
    assert history[-1].max() < 1e-3 < history[0].min()
    gram = torch.einsum("ihf,ihg->ifg", model.W.detach(), model.W.detach())
    assert torch.allclose(gram, torch.eye(4).expand(3, 4, 4), atol=0.05)


def test_instances_train_independently():
    torch.manual_seed(0)
    both = toy.ToyModel(2, 5, 2)
    single = toy.ToyModel(1, 5, 2)
    with torch.no_grad():
        single.W.copy_(both.W[:1])
    data = toy.sparse_features(256, 2, 5, 0.3, generator=torch.Generator().manual_seed(1))
    for m, x in ((both, data), (single, data[:, :1])):
        toy.train(m, lambda b, x=x: x, lambda mm, xx: toy.weighted_mse(mm(xx), xx), steps=50, batch_size=256,
                  progress=False)
    assert torch.allclose(both.W[:1], single.W, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError):
        toy.ToyModel(1, 2, 1, nonlinearity="gelu")
    with pytest.raises(ValueError):
        toy.train(toy.ToyModel(1, 2, 1), lambda b: None, lambda m, x: None, steps=0)


def test_tail_change_flat_and_falling():
    flat = np.ones((50, 2))
    falling = np.linspace(2.0, 1.0, 50)[:, None] * np.ones((1, 2))
    assert np.allclose(toy.tail_change(flat), 0.0)
    assert (toy.tail_change(falling) < -0.05).all()
    with pytest.raises(ValueError):
        toy.tail_change(np.ones((1, 2)))


def test_fit_history_has_one_row_per_log_and_falls():
    torch.manual_seed(0)
    model = toy.ToyModel(2, 5, 2)
    hist = toy.fit(model, 0.3, None, steps=300, batch_size=256, lr=1e-2, log_every=50, progress=False)
    assert hist.shape == (7, 2)                       # steps 0, 50, ..., 250 and the last one
    assert (hist[-1] < hist[0]).all()
