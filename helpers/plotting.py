"""One house style, reproducible PNGs, and the few plots every notebook needs."""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from helpers.paths import figures_folder

PALETTE = "colorblind"


def use_style() -> None:
    """The workbook's matplotlib/seaborn style: white grid, colour-blind palette, readable sizes."""
    import seaborn as sns  # lazily: seaborn pulls in scipy.stats (~1 s), which `import helpers` need not pay

    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    plt.rcParams.update({
        "figure.dpi": 90, "savefig.dpi": 130, "savefig.bbox": "tight",
        "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8, "legend.frameon": False,
        "figure.autolayout": False, "svg.hashsalt": "workbook",
    })


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (papermill, nbval, JupyterLab), where a figure can be shown inline."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def savefig(fig: plt.Figure, name: str, caption: str | None = None, folder: Path | None = None,
            show: bool = True) -> Path:
    """Save `fig` as <folder>/<name>.png with a one-line caption under it and no timestamp in its metadata
    (an unchanged figure stays byte-identical in git), and, inside a notebook, show that same PNG inline and
    close the figure (so a following `plt.show()` draws nothing twice, whatever the matplotlib backend).

    The folder is runs/figures unless $WORKBOOK_FIGURES says otherwise (`make notebooks` writes figures/).
    Returns the path."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"figure name must be a plain file stem like '00_logit_lens', got {name!r}")
    if caption:
        fig.text(0.5, -0.02, caption, ha="center", va="top", fontsize=9, style="italic", wrap=True)
    folder = Path(folder or figures_folder())
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    png = buffer.getvalue()
    path = folder / f"{name}.png"
    if not path.exists() or path.read_bytes() != png:
        path.write_bytes(png)
    if show and _in_kernel():
        from IPython.display import Image, display

        display(Image(data=png, format="png"))
        plt.close(fig)
    return path


def heatmap(data, x_labels: Sequence | None = None, y_labels: Sequence | None = None, *, ax=None,
            title: str = "", xlabel: str = "", ylabel: str = "", cmap: str = "viridis", center: float | None = None,
            cbar_label: str = "", annot: bool = False, fmt: str = ".2f", vmin=None, vmax=None):
    """A labelled heatmap (rows = y, columns = x), e.g. layers x positions or layers x heads."""
    data = np.asarray(data, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(min(12, 1.5 + 0.35 * data.shape[1]), min(9, 1.2 + 0.3 * data.shape[0])))
    if center is not None and cmap == "viridis":
        cmap = "RdBu_r"
    import seaborn as sns

    sns.heatmap(data, ax=ax, cmap=cmap, center=center, annot=annot, fmt=fmt, vmin=vmin, vmax=vmax,
                xticklabels=list(x_labels) if x_labels is not None else "auto",
                yticklabels=list(y_labels) if y_labels is not None else "auto",
                cbar_kws={"label": cbar_label} if cbar_label else None)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return ax


def line_over_layers(values: Mapping[str, Sequence[float]] | Sequence[float], *, ax=None, title: str = "",
                     ylabel: str = "", xlabel: str = "layer", band: Mapping[str, tuple] | None = None,
                     logy: bool = False, markers: bool = True):
    """One line per series against layer index; `band` maps a series to (low, high) arrays to shade."""
    if not isinstance(values, Mapping):
        values = {"": values}
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.6))
    for label, ys in values.items():
        ys = np.asarray(ys, dtype=float)
        ax.plot(np.arange(len(ys)), ys, marker="o" if markers else None, ms=3, label=label or None)
        if band and label in band:
            low, high = band[label]
            ax.fill_between(np.arange(len(ys)), low, high, alpha=0.2)
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if any(values.keys()):
        ax.legend()
    return ax


def feature_geometry_2d(W, importance: Sequence[float] | None = None, *, ax=None, title: str = "",
                        cmap: str = "viridis", lim: float | None = None):
    """Draw the columns of a [2, n_features] matrix as arrows from the origin, coloured by importance."""
    W = np.asarray(W, dtype=float)
    if W.ndim != 2 or W.shape[0] != 2:
        raise ValueError(f"W must be [2, n_features], got shape {W.shape}")
    n = W.shape[1]
    importance = np.ones(n) if importance is None else np.asarray(importance, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    colours = plt.get_cmap(cmap)((importance - importance.min()) / (np.ptp(importance) + 1e-12))
    for i in range(n):
        ax.plot([0, W[0, i]], [0, W[1, i]], color=colours[i], lw=1.5)
        ax.scatter(W[0, i], W[1, i], color=colours[i], s=18, zorder=3)
    lim = lim or max(1.2, 1.1 * float(np.abs(W).max()))
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title, xticks=[], yticks=[])
    ax.axhline(0, color="0.85", lw=0.6, zorder=0)
    ax.axvline(0, color="0.85", lw=0.6, zorder=0)
    return ax
