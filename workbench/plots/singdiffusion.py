"""Figures for SingDiffusion (notebook 06, reproduction section)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from workbench.plots import image_grid

__all__ = ["brightness_histograms_figure", "mean_vs_oracle_figure", "method_rows_figure"]

_COLOURS = {
    "real": "0.6",
    "base": "C0",
    "singdiffusion": "C3",
    "oracle": "C2",
    "trailing": "C1",
    "signal leak": "C4",
    "offset noise": "C5",
}


def brightness_histograms_figure(
    comparison, *, methods: Sequence[str] | None = None, axes: Sequence[plt.Axes] | None = None
) -> Figure:
    """Background brightness histograms, one panel per prompt group, one outline per method (real: grey fill).

    Args:
        comparison: a :class:`~workbench.singdiffusion.experiment.Comparison`.
        methods: which methods to draw (default: all sampled).
    """
    methods = list(methods or dict.fromkeys(m for m, _ in comparison.images))
    groups = comparison.groups
    if axes is None:
        fig, axes = plt.subplots(1, len(groups), figsize=(3.0 * len(groups), 3.0), sharey=True)
    axes = np.atleast_1d(axes)
    if len(axes) != len(groups):
        raise ValueError(f"axes must have one Axes per group ({len(groups)}), got {len(axes)}")
    fig = axes[0].figure
    bins = np.linspace(0, 1, 26)
    for ax, group in zip(axes, groups, strict=True):
        real = comparison.real_brightness(group.name)
        ax.hist(real, bins=bins, color=_COLOURS["real"], alpha=0.5, label="real", density=True)
        for method in methods:
            values = comparison.brightness(method, group.name)
            ax.hist(values, bins=bins, histtype="step", lw=1.6, color=_COLOURS.get(method), label=method, density=True)
        if group.target is not None:
            ax.axvline(group.target, color="k", ls="--", lw=1)
        ax.set_title(f"{group.name} background" if group.target is not None else "no background asked")
        ax.set_xlabel("background brightness")
    axes[0].set_ylabel("density")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def mean_vs_oracle_figure(closeness: Mapping, *, axes: Sequence[plt.Axes] | None = None) -> Figure:
    """The module's x_bar above the exact per-prompt mean (left), and their mean brightness (right).

    Args:
        closeness: the dict :func:`~workbench.singdiffusion.experiment.module_vs_oracle` returns.
    """
    module, oracle, rows = np.asarray(closeness["module"]), np.asarray(closeness["oracle"]), closeness["rows"]
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.2), gridspec_kw={"width_ratios": [3, 1]})
    fig = axes[0].figure
    n = len(module)
    titles = [p.replace(" background", "").replace(" on a ", "/") for p in closeness["prompts"]] + [""] * n
    image_grid(np.concatenate([module, oracle]), ncols=n, titles=titles, ax=axes[0])
    fig.suptitle("top: the module's x_bar (mean over noises); bottom: the toy world's E[x0 | prompt]", fontsize=9)
    ours = [r["module brightness"] for r in rows]
    exact = [r["oracle brightness"] for r in rows]
    axes[1].plot([0, 1], [0, 1], color="0.7", lw=1)
    axes[1].scatter(exact, ours, color="C3")
    axes[1].set_xlabel("oracle mean brightness")
    axes[1].set_ylabel("module mean brightness")
    axes[1].set_xlim(0, 1)
    axes[1].set_ylim(0, 1)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    return fig


def method_rows_figure(
    images: Mapping[str, np.ndarray], *, title: str | None = None, ax: plt.Axes | None = None
) -> Figure:
    """One row of images per method (same noise in every column), the method named at the row's left."""
    if not images:
        raise ValueError("images must not be empty")
    names = list(images)
    ncols = len(next(iter(images.values())))
    if any(len(v) != ncols for v in images.values()):
        raise ValueError("every method must have the same number of images")
    stacked = np.concatenate([np.asarray(images[name]) for name in names])
    if ax is None:
        fig, ax = plt.subplots(figsize=(min(14, 1.2 * ncols + 1.5), 1.25 * len(names) + 0.4))
    fig = image_grid(stacked, ncols=ncols, ax=ax, title=title)
    size = stacked.shape[-1]
    for row, name in enumerate(names):
        ax.text(-2, row * (size + 1) + size / 2, name, ha="right", va="center", fontsize=8)
    return fig
