"""Figures of paper 4 (TiF): per-class loss against noise level, the weighting curve, accuracy against cost."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["accuracy_calls_figure", "class_losses_figure", "per_step_figure", "weights_figure"]


def _axes(ax: plt.Axes | None, size=(6.0, 3.6)) -> tuple[Figure, plt.Axes]:
    if ax is None:
        figure, ax = plt.subplots(figsize=size, layout="constrained")
        return figure, ax
    return ax.figure, ax


def class_losses_figure(
    errors: torch.Tensor | np.ndarray,
    timesteps: Sequence[int] | torch.Tensor,
    class_names: Sequence[str],
    *,
    true_class: int | None = None,
    spurious_class: int | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    ax: plt.Axes | None = None,
) -> Figure:
    """Each class's noise-prediction error against t for one image (shared noise), relative to the class mean.

    Args:
        errors: (K, G) errors of one image.
        true_class, spurious_class: indices to mark in the legend (the truth, the class the cue points to).
        weights: (G,) TiF weights, drawn on a second axis.
    """
    errors = np.asarray(errors, dtype=np.float64)
    t = np.asarray(timesteps)
    figure, ax = _axes(ax)
    relative = errors - errors.mean(axis=0, keepdims=True)
    for k, name in enumerate(class_names):
        tags = [tag for tag, index in (("true", true_class), ("spurious cue", spurious_class)) if index == k]
        label = name + (f" ({', '.join(tags)})" if tags else "")
        ax.plot(t, relative[k], marker="o", ms=3, lw=2 if k == true_class else 1, label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("time step t")
    ax.set_ylabel("error - mean over classes (lower wins)")
    if weights is not None:
        twin = ax.twinx()
        twin.fill_between(t, np.asarray(weights, dtype=np.float64), color="grey", alpha=0.15, step="mid")
        twin.set_ylabel("TiF weight w_t")
        twin.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    return figure


def weights_figure(
    curves: dict[str, torch.Tensor | np.ndarray], *, knee: int | None = None, ax: plt.Axes | None = None
) -> Figure:
    """Time-step weights (name -> (T,) weights) against t, each scaled to a maximum of 1."""
    figure, ax = _axes(ax)
    for name, weights in curves.items():
        weights = np.asarray(weights, dtype=np.float64)
        ax.plot(np.arange(len(weights)), weights / max(weights.max(), 1e-300), label=name)
    if knee is not None:
        ax.axvline(knee, color="k", ls=":", lw=1, label=f"knee t = {knee}")
    ax.set_xlabel("time step t")
    ax.set_ylabel("weight (max = 1)")
    ax.legend(fontsize=8)
    return figure


def accuracy_calls_figure(rows: Sequence[dict], *, ax: plt.Axes | None = None) -> Figure:
    """Accuracy against UNet calls per image: nested sub-grids of the full grid (TiF and uniform weights) and
    every truncated or pruned schedule, averaged over every (shots, draw) row."""
    figure, ax = _axes(ax)
    calls = [p["calls"] for p in rows[0]["curve"]]
    for name, style in (("TiF", "-o"), ("uniform t", "--s")):
        accuracy = [100 * np.mean([r["curve"][i][name] for r in rows]) for i in range(len(calls))]
        ax.plot(calls, accuracy, style, label=f"{name}, nested grids")
    markers = iter("*DPXvh^")
    for name in rows[0]["accuracy"]:
        if "pruned" in name or "truncated" in name:
            ax.plot(
                np.mean([r["unet_calls"][name] for r in rows]),
                100 * np.mean([r["accuracy"][name] for r in rows]),
                next(markers, "o"),
                ls="none",
                ms=9,
                label=name,
            )
    ax.set_xscale("log")
    ax.set_xlabel("UNet calls per image")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    return figure


def per_step_figure(rows: Sequence[dict], *, ax: plt.Axes | None = None) -> Figure:
    """What a single time step decides: how often the class with the lowest error at t is the true class,
    and how often it is the class the spurious cue points to (mean over rows)."""
    figure, ax = _axes(ax)
    t = rows[0]["per_step"]["timesteps"]
    for key, label in (("accuracy", "picks the true class"), ("follows_spurious", "picks the spurious cue's class")):
        ax.plot(t, 100 * np.mean([r["per_step"][key] for r in rows], axis=0), marker="o", ms=3, label=label)
    twin = ax.twinx()
    twin.fill_between(t, np.mean([r["per_step"]["tif_weight"] for r in rows], axis=0), color="grey", alpha=0.15)
    twin.set_ylabel("TiF weight w_t")
    twin.set_ylim(0, 1.05)
    ax.set_xlabel("time step t")
    ax.set_ylabel("% of test images")
    ax.legend(fontsize=8)
    return figure
