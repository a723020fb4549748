"""Figures for the optimized time steps (notebook 01, reproduction section)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from workbench.plots import image_grid
from workbench.timesteps.schedule import StepSchedule

__all__ = ["bound_vs_metric_figure", "metric_curves_figure", "sample_rows_figure", "schedules_figure"]

_LABELS = {"ode_error": "ODE error (RMSE to reference)", "fd": "Frechet distance (toy CLIP)", "bound": "bound F"}
# The optimised schedule is the thick red line; baselines keep one colour each in every figure.
_COLOURS = {"uniform_lambda": "C0", "uniform_time": "C2", "time_quadratic": "C4", "karras": "C1", "ays": "C5"}


def _style(name: str, index: int) -> dict:
    if name == "optimized":
        return dict(color="C3", lw=2.5, marker="o", zorder=3)
    return dict(color=_COLOURS.get(name, f"C{6 + index % 4}"), lw=1.2, marker=".", alpha=0.85)


def schedules_figure(
    schedules: Mapping[str, StepSchedule], *, axes: Sequence[plt.Axes] | None = None, title: str | None = None
) -> Figure:
    """Time t and half log-SNR lambda against step index, one line per schedule.

    Discrete schedules are drawn in diffusers timesteps (999 ... 0); the legend gives the bound F where the
    schedule carries it.
    """
    if not schedules:
        raise ValueError("schedules must not be empty")
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    fig = axes[0].figure
    for index, (name, steps) in enumerate(schedules.items()):
        x = np.arange(steps.num_steps + 1)
        discrete = steps.num_train_timesteps is not None
        time_axis = steps.times * steps.num_train_timesteps - 1 if discrete else steps.times
        label = name + (f" (F = {steps.info['bound']:.3g})" if "bound" in steps.info else "")
        axes[0].plot(x, time_axis, label=label, **_style(name, index))
        axes[1].plot(x, steps.lambdas, label=label, **_style(name, index))
    axes[0].set_ylabel("timestep" if discrete else "t")
    axes[1].set_ylabel("half log-SNR  $\\lambda$")
    for ax in axes:
        ax.set_xlabel("step index i (the last point is t_0)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def metric_curves_figure(
    rows: Sequence[Mapping[str, object]], metric: str, *, axes: Sequence[plt.Axes] | None = None, log: bool = True
) -> Figure:
    """``metric`` against N, one panel per solver, one line per schedule (rows of ``ExperimentResult``)."""
    rows, solvers, axes, fig = _solver_panels(rows, metric, axes)
    for ax, (solver, order) in zip(axes, solvers, strict=True):
        mine = [r for r in rows if (r["solver"], r["order"]) == (solver, order)]
        for index, name in enumerate(dict.fromkeys(r["schedule"] for r in mine)):
            points = sorted((r["num_steps"], r[metric]) for r in mine if r["schedule"] == name)
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=name, **_style(name, index))
        ax.set_xticks(sorted({r["num_steps"] for r in mine}))
        ax.set_title(f"{solver}, order {order}")
        ax.set_xlabel("N (model evaluations)")
        ax.set_ylabel(_LABELS.get(metric, metric))
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def bound_vs_metric_figure(
    rows: Sequence[Mapping[str, object]], metric: str = "ode_error", *, axes: Sequence[plt.Axes] | None = None
) -> Figure:
    """Does the bound predict the measurement? ``metric`` against the bound F, one point per (N, schedule),
    one panel per solver, colour by schedule, N written beside each point (log-log)."""
    rows, solvers, axes, fig = _solver_panels(rows, metric, axes)
    for ax, (solver, order) in zip(axes, solvers, strict=True):
        mine = [r for r in rows if (r["solver"], r["order"]) == (solver, order)]
        for index, name in enumerate(dict.fromkeys(r["schedule"] for r in mine)):
            points = [(r["bound"], r[metric], r["num_steps"]) for r in mine if r["schedule"] == name]
            style = _style(name, index)
            ax.scatter([p[0] for p in points], [p[1] for p in points], color=style["color"], label=name, s=25)
            for x, y, n in points:
                ax.annotate(str(n), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{solver}, order {order}")
        ax.set_xlabel("bound F (the optimiser's objective)")
        ax.set_ylabel(_LABELS.get(metric, metric))
        ax.grid(alpha=0.3, which="both")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def sample_rows_figure(images_by_name: Mapping[str, torch.Tensor | np.ndarray], *, title: str | None = None) -> Figure:
    """One row of images in [0, 1] per schedule, labelled on the left; all rows from the same noise."""
    if not images_by_name:
        raise ValueError("images_by_name must not be empty")
    names = list(images_by_name)
    per_row = max(len(v) for v in images_by_name.values())
    fig, axes = plt.subplots(len(names), 1, figsize=(1.0 * per_row + 1.5, 1.1 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        image_grid(images_by_name[name], ncols=per_row, ax=ax)
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title)
    return fig


def _solver_panels(rows, metric, axes):
    """The rows that carry ``metric``, their (solver, order) pairs, and one axis per pair."""
    rows = [r for r in rows if r.get(metric) is not None]
    if not rows:
        raise ValueError(f"no rows carry a value for metric {metric!r}")
    solvers = list(dict.fromkeys((r["solver"], r["order"]) for r in rows))
    if axes is None:
        _, axes = plt.subplots(1, len(solvers), figsize=(5.2 * len(solvers), 3.8), squeeze=False)
        axes = axes[0]
    return rows, solvers, axes, axes[0].figure
