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


@torch.no_grad()
def xavier_per_instance_(W: Tensor) -> Tensor:
    """Xavier-normal init of each instance's [out, in] matrix in an [instance, out, in] tensor, in place:
    std = sqrt(2 / (out + in)), as for a single model. (`nn.init.xavier_normal_` on the 3-D tensor would
    count the instances in the fan and shrink the init as more instances are trained together.)"""
    if W.ndim != 3:
        raise ValueError(f"expected an [instance, out, in] tensor, got shape {tuple(W.shape)}")
    return W.normal_(0.0, (2.0 / (W.shape[1] + W.shape[2])) ** 0.5)


def _check_nonlinearity(nonlinearity: str) -> str:
    if nonlinearity not in ("relu", "linear"):
        raise ValueError(f"nonlinearity must be 'relu' or 'linear', got {nonlinearity!r}")
    return nonlinearity


class ToyModel(nn.Module):
    """x' = act(Wᵀ W x + b) for `n_instances` independent models (Elhage et al. 2022).

    W: [instance, hidden, feature]; b: [instance, feature]; act: "relu" or "linear".
    """

    def __init__(self, n_instances: int, n_features: int, n_hidden: int, nonlinearity: str = "relu") -> None:
        super().__init__()
        self.nonlinearity = _check_nonlinearity(nonlinearity)
        self.W = nn.Parameter(torch.empty(n_instances, n_hidden, n_features))
        xavier_per_instance_(self.W)
        self.b = nn.Parameter(torch.zeros(n_instances, n_features))

    def hidden(self, x: Tensor) -> Tensor:
        return torch.einsum("ihf,bif->bih", self.W, x)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.einsum("ihf,bih->bif", self.W, self.hidden(x)) + self.b
        return torch.relu(out) if self.nonlinearity == "relu" else out

    def forward_instances(self, x: Tensor) -> Tensor:
        """x' for instance-first inputs x: [instance, batch, feature] (the fast path; same maths as `forward`)."""
        h = torch.bmm(x, self.W.transpose(1, 2))                    # [instance, batch, hidden]
        out = torch.baddbmm(self.b[:, None, :], h, self.W)          # [instance, batch, feature]
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


# ---------------------------------------------------------------------------------------------------------
# Instance-first fast path (added for notebook 01). Everything below works on [instance, batch, feature]
# tensors, which turn the per-instance matrix products into one `bmm` and are several times faster on CPU
# than the [batch, instance, feature] layout above. The functions above keep their behaviour; only the init of
# ToyModel is now xavier per instance (it used to shrink with the number of instances trained together).
# ---------------------------------------------------------------------------------------------------------

def importance_decay(n_features: int, decay: float | Tensor) -> Tensor:
    """Feature importances decay**i, i = 0..n-1: [n_features], or [len(decay), n_features] for a 1-D decay."""
    if n_features <= 0:
        raise ValueError(f"n_features must be positive, got {n_features}")
    decay = torch.as_tensor(decay, dtype=torch.float32)
    if decay.ndim > 1 or (decay <= 0).any():
        raise ValueError("decay must be a positive float or a 1-D tensor of positive floats")
    powers = torch.arange(n_features, dtype=torch.float32)
    return decay[..., None] ** powers


def _per_instance(value: Tensor | float, n_instances: int, name: str) -> Tensor:
    """Broadcast a float / [instance] / [instance, feature] tensor to [instance, 1, 1 or feature]."""
    value = torch.as_tensor(value, dtype=torch.float32)
    if value.ndim == 0:
        value = value.expand(n_instances)
    if value.shape[0] != n_instances or value.ndim > 2:
        raise ValueError(f"{name} must be a float, [{n_instances}] or [{n_instances}, feature]; got {tuple(value.shape)}")
    return value[:, None, None] if value.ndim == 1 else value[:, None, :]


def sparse_batch(n_instances: int, batch: int, n_features: int, density: Tensor | float,
                 generator: torch.Generator | None = None, signed: bool = False,
                 device: torch.device | str | None = None) -> Tensor:
    """[instance, batch, feature] sparse inputs, the same distribution as `sparse_features` but instance-first
    and from one uniform draw: a feature is on when u < p, and then u / p is uniform in [0, 1]
    (2u/p - 1 in [-1, 1] when `signed`). `density`: a float, [instance] or [instance, feature] tensor in (0, 1].
    `device`: where to make the batch (the generator must live there too)."""
    p = _per_instance(density, n_instances, "density")
    if (p <= 0).any() or (p > 1).any():
        raise ValueError("density must lie in (0, 1]")
    u = torch.rand((n_instances, batch, n_features), generator=generator, device=device)
    p = p.to(u.device)
    on = u < p
    values = u / p
    if signed:
        values = 2 * values - 1
    return torch.where(on, values, torch.zeros((), device=u.device))


class ComputeModel(nn.Module):
    """A toy that must compute, not only store (Elhage et al. 2022, "computation in superposition"):
    h = act(W₁ x), y = act(W₂ h + b), for `n_instances` independent models, trained on target |x|.

    W1: [instance, hidden, feature]; W2: [instance, feature, hidden]; b: [instance, feature];
    nonlinearity "relu" (the real model) or "linear" (the baseline: no ReLU anywhere).
    Inputs are instance-first, [instance, batch, feature].
    """

    def __init__(self, n_instances: int, n_features: int, n_hidden: int, nonlinearity: str = "relu") -> None:
        super().__init__()
        self.nonlinearity = _check_nonlinearity(nonlinearity)
        self.W1 = nn.Parameter(torch.empty(n_instances, n_hidden, n_features))
        self.W2 = nn.Parameter(torch.empty(n_instances, n_features, n_hidden))
        xavier_per_instance_(self.W1)
        xavier_per_instance_(self.W2)
        self.b = nn.Parameter(torch.zeros(n_instances, n_features))

    def _act(self, x: Tensor) -> Tensor:
        return torch.relu(x) if self.nonlinearity == "relu" else x

    def hidden(self, x: Tensor) -> Tensor:
        return self._act(torch.bmm(x, self.W1.transpose(1, 2)))          # [instance, batch, hidden]

    def forward_instances(self, x: Tensor) -> Tensor:
        return self._act(torch.baddbmm(self.b[:, None, :], self.hidden(x), self.W2.transpose(1, 2)))

    forward = forward_instances


def _check_fast_model(model: nn.Module) -> tuple[int, int, torch.device]:
    if not hasattr(model, "forward_instances"):
        raise TypeError(f"model must be a ToyModel or ComputeModel, got {type(model).__name__}")
    W = model.W if hasattr(model, "W") else model.W1
    return W.shape[0], W.shape[2], W.device


def instance_loss(model: nn.Module, x: Tensor, importance: Tensor | None = None,
                  target: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Importance-weighted squared error of `model.forward_instances(x)` against target(x) (default x), averaged
    over batch and features: [instance]. importance: None, [feature], [instance] or [instance, feature]
    (a 1-D tensor whose length is the number of features is read as per-feature)."""
    y = x if target is None else target(x)
    err = (model.forward_instances(x) - y) ** 2
    if importance is not None:
        imp = torch.as_tensor(importance, dtype=torch.float32)
        if imp.ndim == 1 and imp.shape[0] == x.shape[2]:          # a 1-D tensor of length n_features is per feature
            imp = imp.expand(x.shape[0], -1)
        err = err * _per_instance(imp, x.shape[0], "importance").to(err.device)
    return err.mean(dim=(1, 2))


def fit(model: nn.Module, density: Tensor | float, importance: Tensor | None = None, *,
        target: Callable[[Tensor], Tensor] | None = None, signed: bool = False, steps: int = 5_000,
        batch_size: int = 1024, lr: float = 1e-3, weight_decay: float = 0.0, schedule: str | None = None,
        seed: int = 0, log_every: int = 100, progress: bool = True, desc: str = "training") -> np.ndarray:
    """Train every instance of a ToyModel / ComputeModel at once on fresh sparse batches (instance-first, fast).

    density: float, [instance] or [instance, feature]; importance: as in `instance_loss`; target: what the
    output should be (None: reconstruct x; `torch.abs` for the |x| task); signed: inputs in [-1, 1].
    AdamW, constant lr or schedule="cosine". Returns the per-instance loss history [n_logs, instance].
    """
    n_instances, n_features, device = _check_fast_model(model)
    if steps <= 0 or batch_size <= 0:
        raise ValueError("steps and batch_size must be positive")
    if schedule not in (None, "cosine"):
        raise ValueError(f"schedule must be None or 'cosine', got {schedule!r}")
    gen = torch.Generator(device=device).manual_seed(seed)

    def make_batch(size: int) -> Tensor:
        return sparse_batch(n_instances, size, n_features, density, generator=gen, signed=signed, device=device)

    return train(model, make_batch, lambda m, x: instance_loss(m, x, importance, target), steps=steps,
                 batch_size=batch_size, lr=lr, weight_decay=weight_decay, log_every=log_every, progress=progress,
                 desc=desc, schedule=schedule)


@torch.no_grad()
def evaluate(model: nn.Module, density: Tensor | float, importance: Tensor | None = None, *,
             target: Callable[[Tensor], Tensor] | None = None, signed: bool = False, n_samples: int = 20_000,
             chunk: int = 5_000, seed: int = 12345) -> np.ndarray:
    """Per-instance loss on `n_samples` held-out inputs (a fixed seed, different from training): [instance]."""
    n_instances, n_features, device = _check_fast_model(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    total, done = torch.zeros(n_instances), 0
    while done < n_samples:
        b = min(chunk, n_samples - done)
        x = sparse_batch(n_instances, b, n_features, density, generator=gen, signed=signed, device=device)
        total += instance_loss(model, x, importance, target).cpu() * b
        done += b
    return (total / n_samples).numpy()


def best_of_seeds(loss: np.ndarray | Tensor, n_seeds: int) -> np.ndarray:
    """Index of the lowest-loss instance in each consecutive group of `n_seeds` instances (instances laid out
    setting-major, seed-minor): [n_instances // n_seeds]."""
    loss = np.asarray(loss.detach().cpu() if isinstance(loss, Tensor) else loss, dtype=float)
    if loss.ndim != 1 or n_seeds <= 0 or loss.shape[0] % n_seeds:
        raise ValueError(f"loss must be 1-D with a length divisible by n_seeds={n_seeds}; got shape {loss.shape}")
    groups = loss.reshape(-1, n_seeds)
    return np.arange(groups.shape[0]) * n_seeds + groups.argmin(axis=1)


def tail_change(history: np.ndarray, frac: float = 0.1) -> np.ndarray:
    """Convergence of a `fit` loss history [n_logs, instance]: (mean loss over the last `frac` of the logs) /
    (mean over the `frac` before them) - 1, per instance. Near 0: flat at the end; clearly < 0: still falling.
    (Under a cosine schedule the lr goes to 0, so a flat end is necessary, not sufficient, for convergence.)"""
    h = np.asarray(history, dtype=float)
    if h.ndim != 2 or not 0 < frac <= 0.5:
        raise ValueError("history must be [n_logs, instance] and frac in (0, 0.5]")
    k = max(1, int(round(frac * h.shape[0])))
    if 2 * k > h.shape[0]:
        raise ValueError(f"need at least {2 * k} logged steps, got {h.shape[0]}")
    return h[-k:].mean(0) / np.maximum(h[-2 * k:-k].mean(0), 1e-30) - 1
