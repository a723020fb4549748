"""Figures for Balancing Act (notebook 03, reproduction section): distributions, ADP accuracy, batch size."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from workbench.plots import image_grid

__all__ = [
    "adp_accuracy_figure",
    "batch_size_figure",
    "distribution_bars_figure",
    "guided_batch_figure",
    "sample_rows_figure",
]

# One colour per series in every figure: the data, unguided, guided, the target.
_SERIES_COLOURS = {"training data": "C7", "unguided": "C0", "guided": "C3", "target": "k"}


def distribution_bars_figure(
    distributions: Mapping[str, Sequence[float]],
    class_names: Sequence[str],
    *,
    ax: plt.Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Grouped bars: one group per class, one bar per series (e.g. training data, unguided, guided, target)."""
    if not distributions:
        raise ValueError("distributions must not be empty")
    for name, values in distributions.items():
        if len(values) != len(class_names):
            raise ValueError(f"distributions[{name!r}] has {len(values)} entries for {len(class_names)} classes")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 + 1.1 * len(class_names) * max(1, len(distributions) / 2), 3.2))
    fig = ax.figure
    width = 0.8 / len(distributions)
    x = np.arange(len(class_names))
    for i, (name, values) in enumerate(distributions.items()):
        style = dict(color=_SERIES_COLOURS.get(name, f"C{i + 1}"))
        if name == "target":
            style.update(fill=False, edgecolor="k", hatch="//", linewidth=1.2)
        ax.bar(x + (i - (len(distributions) - 1) / 2) * width, values, width, label=name, **style)
    ax.set_xticks(x, list(class_names))
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return fig


def adp_accuracy_figure(
    accuracy: Mapping[str, Mapping[str, Sequence[float]]],
    timesteps: Sequence[int],
    *,
    ax: plt.Axes | None = None,
    chance: float | None = 0.5,
) -> Figure:
    """Held-out accuracy of each step's ADP head against step index (sampling order, t falling).

    Args:
        accuracy: attribute -> {"pseudo" | "true_real" | "true_generated": per-step accuracies}.
        timesteps: the heads' timesteps (for the top axis labels).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.6))
    fig = ax.figure
    styles = {"pseudo": "-", "true_real": "--", "true_generated": ":"}
    labels = {
        "pseudo": "vs toyclip pseudo-labels",
        "true_real": "vs truth (inverted real)",
        "true_generated": "vs truth (generated)",
    }
    for i, (attribute, curves) in enumerate(accuracy.items()):
        for key, values in curves.items():
            ax.plot(
                range(len(values)),
                values,
                styles.get(key, "-"),
                color=f"C{i}",
                marker=".",
                label=f"{attribute}, {labels.get(key, key)}",
            )
    if chance is not None:
        ax.axhline(chance, color="0.6", lw=0.8)
    ax.set_xlabel("step index (t = " + ", ".join(str(t) for t in timesteps[:: max(1, len(timesteps) // 5)]) + ", ...)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0.4, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def batch_size_figure(sweep: Mapping, *, axes: Sequence[plt.Axes] | None = None) -> Figure:
    """The batch-size sweep (``workbench.debias.experiment.batch_size_sweep``) in two panels.

    Left: the pooled share of the target's first class over all images against batch size, with its
    sampling error (binomial, over all images) and the target; flat means the scale needs no re-tuning.
    Right: the mean per-batch discrepancy, with what batches of that size drawn from the target itself
    would show (the floor set by sampling alone).
    """
    curves = sweep["curves"]
    if not curves:
        raise ValueError("sweep['curves'] must not be empty")
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    left, right = axes
    fig = left.figure
    scale, reference = sweep["scale"] * sweep.get("weight", 1.0), sweep["reference_batch_size"]
    names = {
        "unguided": "unguided",
        "batch": f"normalised by batch size, scale {scale:g}",
        "none": f"unnormalised (official), scale {scale * reference:g} (equal at {reference})",
    }
    ticks = sorted({int(s) for points in curves.values() for s in points})
    colours = {"unguided": "C0", "batch": "C3", "none": "C1"}
    for name, points in curves.items():
        sizes = sorted(points, key=int)
        share = np.array([points[s]["share"][0] for s in sizes])
        error = np.array([points[s]["share_se"] for s in sizes])
        batch_fd = np.array([points[s]["batch_fd"] for s in sizes])
        batch_std = np.array([points[s]["batch_fd_std"] for s in sizes])
        x = [int(s) for s in sizes]
        style = dict(marker="o", capsize=3, color=colours.get(name), label=names.get(name, name))
        left.errorbar(x, share, yerr=error, **style)
        right.errorbar(x, batch_fd, yerr=batch_std, **style)
    left.axhline(sweep["target"][0], color="k", ls="--", lw=1, label="target")
    floor = sweep["iid_batch_fd"]
    right.plot(
        sorted(int(s) for s in floor),
        [floor[s] for s in sorted(floor, key=int)],
        "k--",
        lw=1,
        label="batches drawn from the target",
    )
    left.set_ylabel(f"share of {sweep['class_names'][0]}, all {sweep['num_images']} images")
    left.set_ylim(0, 1)
    right.set_ylabel("fairness discrepancy per batch")
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sample_rows_figure(rows: Mapping[str, np.ndarray | torch.Tensor], *, ncols: int = 16) -> Figure:
    """One row of samples per method (the first ``ncols`` of each)."""
    if not rows:
        raise ValueError("rows must not be empty")
    fig, axes = plt.subplots(len(rows), 1, figsize=(min(14, 0.55 * ncols + 1), 0.85 * len(rows) + 0.3), squeeze=False)
    for ax, (name, images) in zip(axes[:, 0], rows.items(), strict=True):
        image_grid(images[:ncols], ncols=ncols, ax=ax)
        ax.set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def guided_batch_figure(
    images: np.ndarray | torch.Tensor,
    distributions: Mapping[str, Sequence[float]],
    class_names: Sequence[str],
    *,
    title: str | None = None,
) -> Figure:
    """A guided batch: its attribute distribution next to the target (left) and its images (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1, 1.6]})
    distribution_bars_figure(distributions, class_names, ax=left, title="read by the evaluation CNN")
    image_grid(images, ax=right, ncols=int(np.ceil(np.sqrt(len(images)) * 1.5)))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
