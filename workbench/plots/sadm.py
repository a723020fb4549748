"""Figures for SADM (notebook 05, reproduction section): relation heat maps, 2-D samples, losses, measures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from workbench import metrics

__all__ = ["loss_curves_figure", "measures_figure", "points_figure", "relation_heatmaps_figure", "spread_figure"]


def relation_heatmaps_figure(
    matrices: Mapping[str, np.ndarray | torch.Tensor], *, axes: Sequence[plt.Axes] | None = None, title: str = ""
) -> Figure:
    """One heat map per batch of its (B, B) relation matrix, on a shared colour scale.

    Args:
        matrices: name -> relation matrix (e.g. real, plain, SADM batches), each (B, B).
        axes: one Axes per matrix (default: a new row of panels).
        title: the figure's title.
    """
    if not matrices:
        raise ValueError("matrices must not be empty")
    values = {name: np.asarray(torch.as_tensor(m).float()) for name, m in matrices.items()}
    for name, m in values.items():
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"matrices[{name!r}] must be square (B, B), got shape {m.shape}")
    if axes is None:
        fig, axes = plt.subplots(1, len(values), figsize=(3.2 * len(values), 3.2), squeeze=False)
        axes = axes[0]
    if len(axes) != len(values):
        raise ValueError(f"axes must have one Axes per matrix ({len(values)}), got {len(axes)}")
    fig = axes[0].figure
    off = [m[~np.eye(len(m), dtype=bool)] for m in values.values()]
    low, high = min(float(o.min()) for o in off), max(float(o.max()) for o in off)
    image = None
    for ax, (name, m) in zip(axes, values.items(), strict=True):
        shown = m.copy()
        np.fill_diagonal(shown, np.nan)  # i = j carries no structure
        image = ax.imshow(shown, vmin=low, vmax=high, cmap="viridis", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="cosine affinity")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def points_figure(
    points: Mapping[str, np.ndarray], *, reference: str = "real", axes: Sequence[plt.Axes] | None = None
) -> Figure:
    """Scatter plots of 2-D point sets, one panel each; the ``reference`` set is drawn in grey under the others."""
    if not points:
        raise ValueError("points must not be empty")
    sets = {name: np.asarray(p) for name, p in points.items()}
    for name, p in sets.items():
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"points[{name!r}] must be (N, 2), got shape {p.shape}")
    if axes is None:
        fig, axes = plt.subplots(1, len(sets), figsize=(3.0 * len(sets), 3.0), squeeze=False, sharex=True, sharey=True)
        axes = axes[0]
    if len(axes) != len(sets):
        raise ValueError(f"axes must have one Axes per point set ({len(sets)}), got {len(axes)}")
    fig = axes[0].figure
    for index, (ax, (name, p)) in enumerate(zip(axes, sets.items(), strict=True)):
        if reference in sets and name != reference:
            ax.scatter(*sets[reference].T, s=2, color="0.8", label=reference)
        ax.scatter(*p.T, s=2, color="0.4" if name == reference else f"C{index}", label=name)
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
    fig.tight_layout()
    return fig


def loss_curves_figure(
    history: Sequence[Mapping[str, float]], *, ax: plt.Axes | None = None, smooth: int = 25
) -> Figure:
    """Training curves from a run's logs: the denoising MSE and, if present, the structure term and the
    distance the critic sees (right axis). Values are smoothed by a trailing mean over ``smooth`` steps."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.0, 3.0))
    fig = ax.figure
    if not history:
        ax.set_title("no steps yet")
        return fig
    steps = np.array([h["step"] for h in history])

    def curve(key: str) -> np.ndarray:
        # Trailing running mean (the window shrinks at the start), so the ends are not distorted.
        values = np.array([h.get(key, np.nan) for h in history], dtype=np.float64)
        sums = np.concatenate([[0.0], np.cumsum(values)])
        stop = np.arange(1, len(values) + 1)
        start = np.maximum(0, stop - max(1, smooth))
        return (sums[stop] - sums[start]) / (stop - start)

    ax.plot(steps, curve("mse"), color="C0", label="denoising MSE")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE", color="C0")
    if "critic.distance" in history[-1]:
        right = ax.twinx()
        right.plot(steps, curve("critic.distance"), color="C3", label="critic's distance D")
        right.plot(steps, curve("structure"), color="C1", label="structure term λ·D")
        right.set_ylabel("D, λ·D")
        right.legend(loc="upper right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig


def measures_figure(
    results: Mapping[str, Mapping[str, Sequence[float]]], measure: str, *, ax: plt.Axes | None = None
) -> Figure:
    """One measure per arm: each seed's value as a dot and the mean with its 95 % interval as a bar.

    Args:
        results: arm -> measure -> one value per seed (as returned by the experiment's comparisons).
        measure: which measure to draw.
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.4 * len(results) + 1.5, 3.0))
    fig = ax.figure
    for index, (arm, figures) in enumerate(results.items()):
        if measure not in figures:
            raise ValueError(f"measure {measure!r} is not in results[{arm!r}] (has {sorted(figures)})")
        values = np.asarray(figures[measure], dtype=np.float64)
        mean, half = metrics.mean_interval(values)
        ax.bar(index, mean, yerr=half, color=f"C{index}", alpha=0.5, capsize=4)
        ax.scatter(np.full(len(values), index), values, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(results)), list(results), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(measure)
    fig.tight_layout()
    return fig


def spread_figure(
    spreads: Mapping[str, Mapping[str, Sequence[float]]], *, axes: Sequence[plt.Axes] | None = None
) -> Figure:
    """Per model, the one-step predictions' spread ratio and error against t (two panels).

    Args:
        spreads: model name -> ``{"t", "spread ratio", "mse"}`` lists (from
            :func:`workbench.sadm.toy2d.prediction_spread`).
    """
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.0))
    if len(axes) != 2:
        raise ValueError(f"axes must be two Axes, got {len(axes)}")
    fig = axes[0].figure
    for index, (name, figures) in enumerate(spreads.items()):
        missing = {"t", "spread ratio", "mse"} - set(figures)
        if missing:
            raise ValueError(f"spreads[{name!r}] lacks {sorted(missing)}")
        axes[0].plot(figures["t"], figures["spread ratio"], "o-", color=f"C{index}", label=name)
        axes[1].plot(figures["t"], figures["mse"], "o-", color=f"C{index}", label=name)
    axes[0].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[0].set_ylabel("spread of x̂₀ / spread of x₀")
    axes[1].set_ylabel("MSE of x̂₀")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("t")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
