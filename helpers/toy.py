"""Small toy models and one training loop, with many instances trained at once as one batched tensor.

Instances share nothing but the optimiser call: each has its own weights along a leading `instance`
dimension, and the loss is summed over instances, so training 40 models costs about as much as one.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


def sparse_features(batch: int, n_instances: int, n_features: int, density: Tensor | float,
                    generator: torch.Generator | None = None, signed: bool = False) -> Tensor:
    """[batch, instance, feature] inputs: each feature is nonzero with probability `density` (a float or a
    [instance] / [instance, feature] tensor), its value uniform in [0, 1] (or [-1, 1] when `signed`)."""
    shape = (batch, n_instances, n_features)
    values = torch.rand(shape, generator=generator)
    if signed:
        values = 2 * values - 1
    density = torch.as_tensor(density, dtype=torch.float32)
    if density.ndim == 1:
        density = density[:, None]
    mask = torch.rand(shape, generator=generator) < density
    return values * mask


class ToyModel(nn.Module):
    """x' = act(Wᵀ W x + b) for `n_instances` independent models (Elhage et al. 2022).

    W: [instance, hidden, feature]; b: [instance, feature]; act: "relu" or "linear".
    """

    def __init__(self, n_instances: int, n_features: int, n_hidden: int, nonlinearity: str = "relu") -> None:
        super().__init__()
        if nonlinearity not in ("relu", "linear"):
            raise ValueError(f"nonlinearity must be 'relu' or 'linear', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        self.W = nn.Parameter(torch.empty(n_instances, n_hidden, n_features))
        nn.init.xavier_normal_(self.W)
        self.b = nn.Parameter(torch.zeros(n_instances, n_features))

    def hidden(self, x: Tensor) -> Tensor:
        return torch.einsum("ihf,bif->bih", self.W, x)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.einsum("ihf,bih->bif", self.W, self.hidden(x)) + self.b
        return torch.relu(out) if self.nonlinearity == "relu" else out


def weighted_mse(pred: Tensor, target: Tensor, importance: Tensor | None = None) -> Tensor:
    """Importance-weighted squared error, averaged over batch and features: one loss per instance."""
    err = (pred - target) ** 2  # [batch, instance, feature]
    if importance is not None:
        err = err * importance
    return err.mean(dim=(0, 2))


def train(model: nn.Module, make_batch: Callable[[int], Any], loss_fn: Callable[[nn.Module, Any], Tensor],
          steps: int = 10_000, batch_size: int = 1024, lr: float = 1e-3, weight_decay: float = 0.0,
          log_every: int = 100, progress: bool = True, desc: str = "training",
          schedule: str | None = None) -> np.ndarray:
    """AdamW on `loss_fn(model, make_batch(batch_size))`, a [instance] (or scalar) loss summed for the step.

    schedule: None (constant lr) or "cosine". Returns the per-instance loss history, [n_logs, instance].
    """
    if steps <= 0 or batch_size <= 0:
        raise ValueError("steps and batch_size must be positive")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cosine" else None
    history = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=2.0, leave=False)
    for step in bar:
        loss = loss_fn(model, make_batch(batch_size))
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        if sched is not None:
            sched.step()
        if step % log_every == 0 or step == steps - 1:
            history.append(loss.detach().reshape(-1).cpu().numpy())
            bar.set_postfix(loss=f"{loss.detach().mean().item():.4g}")
    return np.stack(history)
