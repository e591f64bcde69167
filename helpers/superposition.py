"""Measures of superposition for toy models (Elhage et al. 2022, "Toy Models of Superposition").

Every function takes W as [hidden, feature] (one model) or [instance, hidden, feature] (many) and works on
torch tensors or numpy arrays; results come back as numpy arrays with the instance dimension first.

    norms = feature_norms(W)                  # ||W_i||: ~1 represented, ~0 left out
    D = feature_dimensionality(W)             # D_i = ||W_i||^2 / sum_j (Ŵ_i·W_j)^2
    d_star = dimensions_per_feature(W)        # D* = m / ||W||_F^2
    split = loss_split(model, x, importance)  # capacity (features dropped) vs interference
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Per-feature dimensionalities of the uniform polytopes the paper finds (Elhage et al. 2022, fig. "feature
# dimensionality"): a dedicated dimension, tetrahedron, triangle, digon (antipodal pair), pentagon,
# square antiprism.
POLYTOPE_FRACTIONS: dict[str, float] = {
    "dedicated (1)": 1.0, "tetrahedron (3/4)": 3 / 4, "triangle (2/3)": 2 / 3, "digon (1/2)": 1 / 2,
    "pentagon (2/5)": 2 / 5, "square antiprism (3/8)": 3 / 8,
}
PHASES = ("not represented", "dedicated dimension", "superposition")


def _as_W(W: Any) -> tuple[Tensor, bool]:
    """W as a float64 [instance, hidden, feature] tensor, and whether the input had no instance dim."""
    if isinstance(W, np.ndarray):
        W = torch.from_numpy(W)
    if not isinstance(W, Tensor):
        raise TypeError(f"W must be a torch.Tensor or numpy array, got {type(W).__name__}")
    if W.ndim not in (2, 3):
        raise ValueError(f"W must be [hidden, feature] or [instance, hidden, feature], got shape {tuple(W.shape)}")
    single = W.ndim == 2
    W = W.detach().to(torch.float64).cpu()
    return (W[None] if single else W), single


def _out(x: Tensor, single: bool) -> np.ndarray:
    x = x.numpy()
    return x[0] if single else x


def feature_norms(W: Any) -> np.ndarray:
    """||W_i||, the length of each feature's direction: [.., feature]."""
    W, single = _as_W(W)
    return _out(W.norm(dim=1), single)


def frobenius_sq(W: Any) -> np.ndarray:
    """||W||_F^2, roughly "how many features the model stores" (5 for a linear model with m=5): [..]."""
    W, single = _as_W(W)
    return _out((W ** 2).sum(dim=(1, 2)), single)


def _unit(W: Tensor, eps: float = 1e-8) -> Tensor:
    return W / W.norm(dim=1, keepdim=True).clamp_min(eps)


def overlaps(W: Any) -> np.ndarray:
    """(Ŵ_i · W_j): how much of feature j lies along feature i's direction: [.., feature i, feature j]."""
    W, single = _as_W(W)
    return _out(torch.einsum("ihf,ihg->ifg", _unit(W), W), single)


def superposition_score(W: Any) -> np.ndarray:
    """Σ_{j≠i} (Ŵ_i·W_j)²: how much other features share feature i's direction (the paper's bar colour);
    0 for a feature with a dedicated orthogonal dimension: [.., feature]."""
    W, single = _as_W(W)
    ov = torch.einsum("ihf,ihg->ifg", _unit(W), W) ** 2
    return _out(ov.sum(-1) - torch.diagonal(ov, dim1=1, dim2=2), single)


def feature_dimensionality(W: Any, eps: float = 1e-8) -> np.ndarray:
    """D_i = ||W_i||² / Σ_j (Ŵ_i·W_j)²: the fraction of a dimension feature i gets (1: its own dimension,
    1/2: an antipodal pair, 2/5: a pentagon ...). Features with ||W_i|| ~ 0 get D_i ~ 0: [.., feature]."""
    W, single = _as_W(W)
    ov = torch.einsum("ihf,ihg->ifg", _unit(W, eps), W) ** 2
    norm_sq = (W ** 2).sum(dim=1)
    return _out(norm_sq / ov.sum(-1).clamp_min(eps), single)


def dimensions_per_feature(W: Any) -> np.ndarray:
    """D* = m / ||W||_F²: hidden dimensions per stored feature (1: no superposition; 1/2: two per dim): [..]."""
    W, single = _as_W(W)
    return _out(W.shape[1] / (W ** 2).sum(dim=(1, 2)).clamp_min(1e-12), single)


def represented(W: Any, threshold: float = 0.5) -> np.ndarray:
    """Boolean [.., feature]: ||W_i|| > threshold (a learned feature has norm ~1, a dropped one ~0)."""
    if not 0 < threshold:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    return feature_norms(W) > threshold


def angle_gaps(W: Any, threshold: float = 0.5) -> list[np.ndarray]:
    """For 2-D models ([.., 2, feature]): the sorted angular gaps in degrees between consecutive represented
    features going round the circle (they sum to 360; a regular pentagon gives five gaps of 72). One array
    per instance (a list even for a single W); empty when fewer than 2 features are represented."""
    W, single = _as_W(W)
    if W.shape[1] != 2:
        raise ValueError(f"angle_gaps needs a 2-D hidden space, got hidden size {W.shape[1]}")
    gaps = []
    for w in W:
        keep = w.norm(dim=0) > threshold
        ang = np.sort(np.degrees(torch.atan2(w[1, keep], w[0, keep]).numpy()) % 360)
        gaps.append(np.sort(np.diff(np.concatenate([ang, ang[:1] + 360]))) if len(ang) >= 2 else np.array([]))
    return gaps


def antipodal_pairs(W: Any, threshold: float = 0.5, cos_max: float = -0.95) -> np.ndarray:
    """How many pairs of represented features point in opposite directions (cosine < cos_max): [..]."""
    W, single = _as_W(W)
    keep = W.norm(dim=1) > threshold                                     # [instance, feature]
    U = _unit(W)
    cos = torch.einsum("ihf,ihg->ifg", U, U)
    mask = keep[:, :, None] & keep[:, None, :] & (cos < cos_max)
    return _out(torch.triu(mask, diagonal=1).sum(dim=(1, 2)), single)


def classify_phase(W: Any, threshold: float = 0.5) -> np.ndarray:
    """Phase of the *second* ("extra") feature in an n=2, m=1 model (Elhage et al. 2022, phase diagram):
    0 not represented (only feature 1 has the dimension, or neither), 1 dedicated dimension (only feature 2),
    2 superposition (both, pointing opposite ways). Both represented on the same side counts as 2 as well
    (it never happens after training; an untrained W can do it). [..] ints."""
    W, single = _as_W(W)
    if W.shape[1:] != (1, 2):
        raise ValueError(f"classify_phase needs n=2 features and m=1 hidden dim, got W of shape {tuple(W.shape[1:])}")
    on = W.abs()[:, 0, :] > threshold
    phase = torch.zeros(W.shape[0], dtype=torch.long)
    phase[on[:, 1] & ~on[:, 0]] = 1
    phase[on[:, 1] & on[:, 0]] = 2
    return _out(phase, single)


@torch.no_grad()
def loss_split(model: torch.nn.Module, x: Tensor, importance: Tensor | None = None) -> dict[str, np.ndarray]:
    """Split a ToyModel's loss on inputs x ([instance, batch, feature]) into two exact parts, per instance:

    - "capacity": the loss each feature would have if it were the only input (x'_i = act(||W_i||² x_i + b_i)):
      the price of features left out or shrunk;
    - "interference": everything else, the extra loss from other active features that share its dimensions.
    Also "total" (= capacity + interference) and "zero_model", the loss of outputting the best constant
    per feature (what a model with no hidden dimensions could do), for normalising. Values: [instance].
    """
    if not hasattr(model, "W") or not hasattr(model, "forward_instances"):
        raise TypeError("loss_split needs a helpers.toy.ToyModel")
    if x.ndim != 3 or x.shape[0] != model.W.shape[0] or x.shape[2] != model.W.shape[2]:
        raise ValueError(f"x must be [instance={model.W.shape[0]}, batch, feature={model.W.shape[2]}], "
                         f"got {tuple(x.shape)}")
    imp = torch.ones(x.shape[2]) if importance is None else torch.as_tensor(importance, dtype=torch.float32)
    imp = imp.to(x.device).expand(x.shape[0], x.shape[2])[:, None, :]
    W, b = model.W.detach(), model.b.detach()
    alone = (W ** 2).sum(dim=1)[:, None, :] * x + b[:, None, :]
    if model.nonlinearity == "relu":
        alone = torch.relu(alone)
    total = (((model.forward_instances(x) - x) ** 2) * imp).mean(dim=(1, 2))
    capacity = (((alone - x) ** 2) * imp).mean(dim=(1, 2))
    zero = ((x - x.mean(dim=1, keepdim=True)) ** 2 * imp).mean(dim=(1, 2))
    return {k: v.cpu().numpy() for k, v in
            {"total": total, "capacity": capacity, "interference": total - capacity, "zero_model": zero}.items()}


def cluster_test(values: Any, centres: Sequence[float] = tuple(POLYTOPE_FRACTIONS.values()),
                 width: float = 0.01, background: float = 0.05, exclude: Sequence[float] = ()) -> dict[str, np.ndarray]:
    """Is there a cluster of `values` at each centre? Compares the count within ±width of c with the count
    expected there from the local background: the density in the flanks width < |v - c| <= background,
    leaving out of the flanks the ±width windows of the other centres (3/8 and 2/5 are only 0.025 apart) and
    of the `exclude` values (centres not tested here, e.g. the real fractions when testing a placebo).

    Returns arrays over centres: "count" (values within ±width), "expected" (from the flanks; an empty flank
    counts as half a value), "enrichment" (count / expected: >> 1 a peak, ~1 flat, 0 a gap; nan when nothing
    is near c) and "p_value" (one-sided Poisson probability of at least `count` given `expected`)."""
    from scipy.stats import poisson

    v = np.asarray(values, dtype=float).ravel()
    centres = np.asarray(list(centres), dtype=float)
    if not 0 < width < background:
        raise ValueError(f"need 0 < width < background, got width={width}, background={background}")
    count, expected = [], []
    for k, c in enumerate(centres):
        others = np.concatenate([np.delete(centres, k), np.asarray(list(exclude), dtype=float)])

        def in_flank(x: np.ndarray) -> np.ndarray:
            d = np.abs(x - c)
            near_other = (np.abs(x[:, None] - others[None]) <= width).any(-1) if len(others) else np.zeros(len(x), bool)
            return (d > width) & (d <= background) & ~near_other

        grid = np.linspace(c - background, c + background, 4001)
        flank_len = in_flank(grid).mean() * 2 * background
        count.append(int((np.abs(v - c) <= width).sum()))
        n_flank = int(in_flank(v).sum())
        expected.append(max(n_flank, 0.5) / flank_len * 2 * width if flank_len > 0 else np.nan)
    count_a, expected_a = np.array(count), np.array(expected)
    empty = np.array([cnt == 0 and (np.abs(v - c) <= background).sum() == 0 for cnt, c in zip(count, centres)])
    enrichment = np.where(empty, np.nan, count_a / expected_a)
    p_value = np.where(empty, np.nan, poisson.sf(count_a - 1, expected_a))
    return {"count": count_a, "expected": expected_a, "enrichment": enrichment, "p_value": p_value}


def cluster_enrichment(values: Any, centres: Sequence[float] = tuple(POLYTOPE_FRACTIONS.values()),
                       width: float = 0.01, background: float = 0.05) -> np.ndarray:
    """`cluster_test(...)["enrichment"]`: count near each centre / count expected from the local background."""
    return cluster_test(values, centres, width, background)["enrichment"]


def participation_ratio(W: Any, dim: int = -1) -> np.ndarray:
    """(Σ w²)² / Σ w⁴ along `dim`: the effective number of nonzero entries (1 for a one-hot vector, k for k
    equal entries). Applied to a neuron's input weights, "how many features this neuron reads"."""
    W = torch.as_tensor(W if not isinstance(W, np.ndarray) else torch.from_numpy(W)).detach().double()
    sq = W ** 2
    return ((sq.sum(dim) ** 2) / (sq ** 2).sum(dim).clamp_min(1e-30)).cpu().numpy()


def _quadrature_points(n_grid: int) -> tuple[Tensor, Tensor]:
    """Points (x1, x2) and probability weights (for density p) of the n=2 sparse-input distribution, as
    functions of p: returns pts [P, 2] and a [P, 3] matrix of the exponents (n_on, n_off) pattern id."""
    u = (torch.arange(n_grid, dtype=torch.float64) + 0.5) / n_grid            # midpoint rule on [0, 1]
    z = torch.zeros(1, dtype=torch.float64)
    pts = [torch.stack([z, z], 1),                                              # both off
           torch.stack([u, torch.zeros_like(u)], 1), torch.stack([torch.zeros_like(u), u], 1),
           torch.cartesian_prod(u, u)]                                          # one on / both on
    n_on = torch.cat([torch.zeros(1), torch.ones(2 * n_grid), 2 * torch.ones(n_grid ** 2)]).double()
    mass = torch.cat([torch.ones(1), torch.full((2 * n_grid,), 1.0 / n_grid),
                      torch.full((n_grid ** 2,), 1.0 / n_grid ** 2)]).double()
    return torch.cat(pts), torch.stack([n_on, mass], 1)


def phase_diagram_theory(ratios: Sequence[float], densities: Sequence[float], steps: int = 400,
                         n_grid: int = 40, lr: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """The n=2, m=1 phase diagram from exact expected losses instead of sampled training data.

    For each (importance ratio r of feature 2, density p) the loss E[(x1' - x1)^2] + r E[(x2' - x2)^2] is
    computed by quadrature over the input distribution (no sampling noise) and minimised from three starts:
    feature 1 only, feature 2 only, and the antipodal pair W = (1, -1). The phase is that of the lowest
    minimum (`classify_phase`). Returns (phase [ratio, density] ints, best loss [ratio, density])."""
    r = torch.as_tensor(np.asarray(ratios, dtype=float))
    p = torch.as_tensor(np.asarray(densities, dtype=float))
    if (r <= 0).any() or (p <= 0).any() or (p > 1).any():
        raise ValueError("ratios must be > 0 and densities in (0, 1]")
    pts, pattern = _quadrature_points(n_grid)
    R, Pd = torch.meshgrid(r, p, indexing="ij")
    R, Pd = R.reshape(-1), Pd.reshape(-1)                                       # [cell]
    weight = Pd[:, None] ** pattern[:, 0] * (1 - Pd[:, None]) ** (2 - pattern[:, 0]) * pattern[:, 1]
    starts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    W = starts.repeat(len(R), 1).clone().requires_grad_(True)                  # [cell*3, 2]
    b = torch.zeros_like(W, requires_grad=True)
    imp = torch.stack([torch.ones_like(R), R], 1).repeat_interleave(3, 0)      # [cell*3, 2]
    wts = weight.repeat_interleave(3, 0)                                        # [cell*3, P]

    def losses() -> Tensor:
        h = pts @ W.T                                                           # [P, cell*3]
        out = torch.relu(h[:, :, None] * W[None] + b[None])                     # [P, cell*3, 2]
        err = ((out - pts[:, None, :]) ** 2 * imp[None]).sum(-1)                # [P, cell*3]
        return (err * wts.T).sum(0)

    opt = torch.optim.Adam([W, b], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        losses().sum().backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        final = losses().reshape(-1, 3)
        best = final.argmin(1)
        Wbest = W.detach().reshape(-1, 3, 2)[torch.arange(len(best)), best]
    phase = classify_phase(Wbest[:, None, :])
    shape = (len(r), len(p))
    return phase.reshape(shape), final.min(1).values.numpy().reshape(shape)


# --- plots and the explorer -------------------------------------------------------------------------------

def plot_gram_and_norms(W: Any, ax_gram, ax_bars, title: str = "", max_norm: float = 1.3) -> None:
    """The paper's two views of one model: WᵀW as a heatmap (−1 blue … +1 red), and ||W_i|| as bars coloured by
    how much feature i shares its direction with others (`superposition_score`: dark = its own dimension,
    yellow = in superposition)."""
    import matplotlib.pyplot as plt

    W, single = _as_W(W)
    if not single and W.shape[0] != 1:
        raise ValueError("plot_gram_and_norms draws one model: pass W as [hidden, feature]")
    W = W[0]
    gram = (W.T @ W).numpy()
    ax_gram.imshow(gram, cmap="RdBu_r", vmin=-1, vmax=1)
    ax_gram.set(xticks=[], yticks=[], title=title)
    norms, sup = feature_norms(W), np.clip(superposition_score(W), 0, 1)
    n = len(norms)
    ax_bars.barh(np.arange(n), norms, color=plt.get_cmap("viridis")(sup), height=0.8)
    ax_bars.set(xlim=(0, max_norm), ylim=(n - 0.5, -0.5), yticks=[], xlabel="‖W_i‖")
    ax_bars.grid(axis="y", visible=False)


def geometry_explorer(W: Any, densities: Sequence[float], decays: Sequence[float], losses: Any = None):
    """An ipywidgets explorer of precomputed 2-D toy models: sliders for sparsity and importance decay show
    the learned feature directions (arrows coloured by importance). W: [n_decay, n_density, 2, n_features].
    Nothing is trained on a slider move, so it responds at once; it renders its default state headless."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from helpers.plotting import feature_geometry_2d

    W = np.asarray(W.detach().cpu() if isinstance(W, Tensor) else W, dtype=float)
    if W.ndim != 4 or W.shape[2] != 2 or W.shape[:2] != (len(decays), len(densities)):
        raise ValueError(f"W must be [n_decay={len(decays)}, n_density={len(densities)}, 2, feature], got {W.shape}")
    n = W.shape[-1]
    sparsity = widgets.SelectionSlider(options=[(f"{1 - p:.3g}", i) for i, p in enumerate(densities)],
                                       value=len(densities) // 2, description="sparsity S",
                                       continuous_update=True, layout=widgets.Layout(width="420px"))
    decay = widgets.SelectionSlider(options=[(f"{d:g}", j) for j, d in enumerate(decays)], value=0,
                                    description="importance decay", style={"description_width": "initial"},
                                    continuous_update=True, layout=widgets.Layout(width="420px"))

    def draw(i: int, j: int) -> None:
        w = W[j, i]
        fig, ax = plt.subplots(figsize=(3.6, 3.6))
        feature_geometry_2d(w, importance=decays[j] ** np.arange(n), ax=ax, lim=1.5)
        kept = int((np.linalg.norm(w, axis=0) > 0.5).sum())
        extra = "" if losses is None else f", loss {np.asarray(losses)[j, i]:.2g}"
        ax.set_title(f"S = {1 - densities[i]:.3g}, decay {decays[j]:g}: {kept}/{n} features{extra}")
        plt.show()

    out = widgets.interactive_output(draw, {"i": sparsity, "j": decay})
    return widgets.VBox([sparsity, decay, out])


# --- polytopes checked directly, placebo fractions, plateaus (issue 14) -----------------------------------

# (features, rank) of each uniform polytope: D_i = rank / features for every feature in it.
POLYTOPES: dict[str, tuple[int, int]] = {
    "dedicated (1)": (1, 1), "tetrahedron (3/4)": (4, 3), "triangle (2/3)": (3, 2), "digon (1/2)": (2, 1),
    "pentagon (2/5)": (5, 2), "square antiprism (3/8)": (8, 3),
}
# Fractions no uniform polytope gives, between the real ones: a D_i "cluster" there means the test is fooled.
PLACEBO_FRACTIONS: dict[str, float] = {"placebo 0.33": 0.33, "placebo 0.36": 0.36, "placebo 0.42": 0.42,
                                       "placebo 0.45": 0.45}


def component_shapes(W: Any, threshold: float = 0.5, cos_threshold: float = 0.2,
                     rank_tol: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Group the represented features (||W_i|| > threshold) of each model into connected components of the
    graph |cos(W_i, W_j)| > cos_threshold, and give each feature its component's size and rank (singular
    values above rank_tol × the largest). A digon is (2, 1), a triangle (3, 2), a pentagon (5, 2), a
    tetrahedron (4, 3) (`POLYTOPES`). Returns (size, rank), int arrays [.., feature], 0 for features left out."""
    W, single = _as_W(W)
    sizes, ranks = np.zeros(W.shape[::2], int), np.zeros(W.shape[::2], int)
    for k, w in enumerate(W):
        idx = np.nonzero((w.norm(dim=0) > threshold).numpy())[0]
        U = _unit(w[:, idx]).numpy()
        adj = np.abs(U.T @ U) > cos_threshold
        label = -np.ones(len(idx), int)
        for start in range(len(idx)):
            if label[start] >= 0:
                continue
            label[start], stack = start, [start]
            while stack:
                for q in np.nonzero(adj[stack.pop()] & (label < 0))[0]:
                    label[q] = start
                    stack.append(q)
        for c in np.unique(label):
            members = idx[label == c]
            s = np.linalg.svd(w[:, members].numpy(), compute_uv=False)
            sizes[k, members], ranks[k, members] = len(members), int((s > rank_tol * s[0]).sum())
    return (sizes[0], ranks[0]) if single else (sizes, ranks)


def window_counts(values: Any, centres: Sequence[float], width: float = 0.01, mask: Any = None) -> np.ndarray:
    """How many values of each row (a setting) lie within ±width of each centre: [centre, row]. values:
    [row, item]; mask: the same shape, True for items to count (e.g. represented features)."""
    v = np.asarray(values, dtype=float)
    keep = np.ones(v.shape, bool) if mask is None else np.asarray(mask, bool)
    return np.stack([((np.abs(v - c) <= width) & keep).sum(1) for c in centres])


def cluster_test_leave_one_out(values: Any, mask: Any, centres: Sequence[float], width: float = 0.01,
                               background: float = 0.05, exclude: Sequence[float] = ()) -> dict[str, np.ndarray]:
    """`cluster_test` on the values pooled over rows, once with every row and once without the row that puts
    the most values in each centre's window (a "cluster" made by one setting fails the second). Returns
    the pooled test's arrays plus "p_value_loo", "top_row" and "rows_contributing", over centres.
    `exclude`: as in `cluster_test`."""
    v, keep = np.asarray(values, dtype=float), np.asarray(mask, bool)
    centres = list(centres)
    out = cluster_test(v[keep], centres, width, background, exclude)
    counts = window_counts(v, centres, width, keep)
    top = counts.argmax(1)
    p_loo = [cluster_test(np.delete(v, t, 0)[np.delete(keep, t, 0)], centres, width, background, exclude)["p_value"][k]
             for k, t in enumerate(top)]
    return {**out, "p_value_loo": np.array(p_loo), "top_row": top, "rows_contributing": (counts > 0).sum(1)}


def smooth_band_count(log_x: Any, y: Any, level: float, half_width: float, floor: float) -> tuple[float, np.ndarray]:
    """How many grid points a smoothly falling curve would put within ±half_width of `level`: fit
    y = floor + (1 - floor) / (1 + exp((log_x - c) / w)) (a logistic step in log x, no plateau) by least
    squares and count the grid points whose fitted value lies in the band. Returns (count, fitted curve)."""
    from scipy.optimize import curve_fit

    lx, yy = np.asarray(log_x, dtype=float), np.asarray(y, dtype=float)

    def f(t: np.ndarray, c: float, w: float) -> np.ndarray:
        return floor + (1 - floor) / (1 + np.exp((t - c) / w))

    (c, w), _ = curve_fit(f, lx, yy, p0=(np.median(lx), 0.5), bounds=([lx.min(), 1e-3], [lx.max(), 10.0]))
    fit = f(lx, c, w)
    return float((np.abs(fit - level) <= half_width).sum()), fit
