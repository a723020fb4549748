"""Figures for DistriFusion (Li et al., CVPR 2024, arXiv 2402.19481): the idea, images against one
device and their PSNR (Table 1), staleness (Fig. 2), and the benchmark's scaling and per-layer breakdown.

Every function takes data (and, where it draws one panel, an optional ``ax``) and returns the ``Figure``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

if TYPE_CHECKING:
    from workbench.benchmarks.distrifusion_compute import LayerKindRow, ScalingRow
    from workbench.distrifusion.compare import ModeComparison, ModeRow
    from workbench.distrifusion.simulate import StalenessRecord

__all__ = [
    "breakdown_figure",
    "comparison_figure",
    "patch_diagram",
    "psnr_figure",
    "scaling_figure",
    "staleness_figure",
]

_COLOURS = plt.get_cmap("tab10").colors


def patch_diagram(num_patches: int = 4, *, warmup_steps: int = 1, num_steps: int = 4, rows: int = 16) -> Figure:
    """The idea in two panels: (a) the row split with halo rows, (b) what device 0 reads at each step.

    Args:
        num_patches: N devices / row patches.
        warmup_steps: synchronous steps after step 0 (drawn fresh everywhere).
        num_steps: steps drawn in panel (b).
        rows: rows of the drawn canvas (a multiple of ``num_patches``).
    """
    if num_patches < 1 or rows % num_patches:
        raise ValueError(f"num_patches must be >= 1 and divide rows={rows}, got {num_patches}")
    fig, (ax_split, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 2.2]})
    height = rows // num_patches
    for i in range(num_patches):
        colour = _COLOURS[i % 10]
        ax_split.add_patch(Rectangle((0, rows - (i + 1) * height), rows, height, color=colour, alpha=0.55))
        ax_split.text(rows / 2, rows - (i + 0.5) * height, f"device {i}", ha="center", va="center", fontsize=9)
        for j in (i - 1, i + 1):  # halo rows device i borrows from its neighbours
            if 0 <= j < num_patches:
                y = rows - (i + 1) * height - 1 if j > i else rows - i * height
                ax_split.add_patch(Rectangle((0, y), rows, 1, fill=False, hatch="///", edgecolor=colour, lw=0))
    ax_split.set_xlim(0, rows)
    ax_split.set_ylim(0, rows)
    ax_split.set_aspect("equal")
    ax_split.set_xticks([])
    ax_split.set_yticks([])
    ax_split.set_title("(a) row patches; hatched: halo rows a\nconvolution borrows from its neighbour", fontsize=9)

    box, gap = 0.8, 0.6
    for step in range(num_steps):
        x = step * (box + gap)
        synchronous = step <= warmup_steps
        for i in range(num_patches):
            y = (num_patches - 1 - i) * box
            own = i == 0
            fresh = own or synchronous
            ax_time.add_patch(
                Rectangle((x, y), box, box, color=_COLOURS[i % 10], alpha=0.8 if fresh else 0.25, ec="black", lw=0.5)
            )
            ax_time.text(x + box / 2, y + box / 2, "t" if fresh else "t+1", ha="center", va="center", fontsize=8)
        label = "sync" if synchronous else "async\n(displaced)"
        ax_time.text(
            x + box / 2, num_patches * box + 0.1, f"step {step}\n{label}", ha="center", va="bottom", fontsize=8
        )
        if step + 1 < num_steps and step >= warmup_steps:  # this step's gather lands in the next step
            ax_time.add_patch(
                FancyArrowPatch(
                    (x + box, box * (num_patches - 1.5)),
                    (x + box + gap, box * (num_patches - 1.5)),
                    arrowstyle="->",
                    mutation_scale=10,
                    color="gray",
                )
            )
    ax_time.set_xlim(-0.2, num_steps * (box + gap))
    ax_time.set_ylim(-0.3, num_patches * box + 0.9)
    ax_time.set_aspect("equal")
    ax_time.axis("off")
    ax_time.set_title(
        "(b) activations device 0 uses in each layer: its own patch fresh (t), the others from the\n"
        "previous step (t+1, faded) while this step's all-gather runs in the background (arrows)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def _first_image(images: torch.Tensor) -> np.ndarray:
    return images[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def comparison_figure(comparison: ModeComparison, *, max_difference: float | None = None) -> Figure:
    """Top: the single-device image and each mode's; bottom: |difference| to the single-device image.

    Dashed lines mark the patch boundaries; titles give PSNR (dB) and bytes per rank per step.
    """
    labels = list(comparison.images)
    reference = _first_image(comparison.reference)
    differences = {label: np.abs(_first_image(comparison.images[label]) - reference).mean(axis=-1) for label in labels}
    vmax = max_difference or max([d.max() for d in differences.values()] + [1e-6])
    columns = 1 + len(labels)
    fig, axes = plt.subplots(2, columns, figsize=(2.4 * columns, 5.0), squeeze=False)
    axes[0, 0].imshow(reference, interpolation="nearest")
    axes[0, 0].set_title("single device", fontsize=9)
    axes[1, 0].axis("off")
    height = reference.shape[0]
    patches = max(comparison.num_devices, 1)
    image = None
    for column, label in enumerate(labels, start=1):
        value = comparison.psnr.get(label, math.nan)
        text = "exact" if math.isinf(value) else f"{value:.1f} dB"
        megabytes = comparison.bytes_per_step.get(label, 0.0) / 1e6
        axes[0, column].imshow(_first_image(comparison.images[label]), interpolation="nearest")
        axes[0, column].set_title(f"{label}\n{text}, {megabytes:.2f} MB/step", fontsize=9)
        image = axes[1, column].imshow(differences[label], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        axes[1, column].set_title("|difference|", fontsize=9)
        for ax in axes[:, column]:
            for k in range(1, patches):
                ax.axhline(k * height / patches - 0.5, color="white", lw=0.6, ls="--")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        fig.colorbar(image, ax=axes[1, 1:].tolist(), fraction=0.03, pad=0.02)
    fig.suptitle(f"{comparison.num_devices} simulated devices, warm-up {comparison.warmup_steps}", fontsize=10)
    return fig


def staleness_figure(record: StalenessRecord, *, ax: plt.Axes | None = None) -> Figure:
    """Relative change of each exchanging layer's input between consecutive steps, against the step."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    fig = ax.figure
    steps = np.arange(1, record.change.shape[1] + 1)
    for row in record.change:
        ax.plot(steps, row, color="0.8", lw=0.6)
    resolutions = sorted({r for r in record.resolutions if r > 0}, reverse=True)
    for k, resolution in enumerate(resolutions):
        rows = [i for i, r in enumerate(record.resolutions) if r == resolution]
        ax.plot(
            steps,
            record.change[rows].mean(axis=0),
            color=_COLOURS[k % 10],
            lw=2,
            label=f"{resolution}x{resolution} feature maps ({len(rows)} layers)",
        )
    ax.set_yscale("log")
    ax.set_xlabel("step index k (compared with step k-1)")
    ax.set_ylabel(r"$\|A_k - A_{k-1}\| \,/\, \|A_k\|$")
    ax.set_title("How stale is the previous step's activation? (grey: single layers)")
    ax.legend(fontsize=8)
    return fig


def psnr_figure(rows: Sequence[ModeRow], *, ax: plt.Axes | None = None, cap_db: float = 80.0) -> Figure:
    """Grouped bars: PSNR against the single-device image per mode, one group per device count.

    Exact results (infinite or above ``cap_db``) are drawn at ``cap_db`` and labelled.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.8))
    fig = ax.figure
    modes = list(dict.fromkeys(row.mode for row in rows))
    devices = list(dict.fromkeys(row.devices for row in rows))
    width = 0.8 / max(len(devices), 1)
    for k, n in enumerate(devices):
        values = [next((row.psnr_db for row in rows if row.mode == m and row.devices == n), math.nan) for m in modes]
        shown = [min(v, cap_db) for v in values]
        x = np.arange(len(modes)) + (k - (len(devices) - 1) / 2) * width
        ax.bar(x, shown, width, label=f"{n} devices", color=_COLOURS[k % 10])
        for xi, value in zip(x, values, strict=True):
            ax.text(
                xi,
                min(value, cap_db) + 0.5,
                "exact" if value >= cap_db else f"{value:.1f}",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(np.arange(len(modes)), modes, fontsize=8, rotation=20, ha="right")
    ax.set_ylabel("PSNR vs single device (dB)")
    ax.set_ylim(0, cap_db + 8)
    ax.legend(fontsize=8)
    ax.set_title("Patch-parallel image against the single-device one")
    return fig


def scaling_figure(rows: Sequence[ScalingRow], *, ax: plt.Axes | None = None, target: float = 0.9) -> Figure:
    """Modelled "of ideal" (solid) and the bound of the undivided fixed cost (dashed) against canvas size, per N.

    Refused canvases are left out; the dotted line is the ``target`` fraction of the ideal N-fold reduction.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.8))
    fig = ax.figure
    for k, n in enumerate(dict.fromkeys(row.num_devices for row in rows)):
        kept = [row for row in rows if row.num_devices == n and row.refused is None]
        sizes = [row.size for row in kept]
        colour = _COLOURS[k % 10]
        ax.plot(sizes, [100 * row.of_ideal for row in kept], "o-", color=colour, label=f"N = {n}, modelled")
        ax.plot(sizes, [100 * row.bound for row in kept], "--", color=colour, alpha=0.6, label=f"N = {n}, bound")
    ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1)
    sides = sorted({row.size for row in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sides, [str(side) for side in sides])
    ax.minorticks_off()
    ax.set_xlabel("canvas side (pixels)")
    ax.set_ylabel("of the ideal N-fold reduction (%)")
    ax.set_title("One rank's compute against 1/N of the whole")
    ax.legend(fontsize=8)
    return fig


def breakdown_figure(rows: Sequence[LayerKindRow], *, ax: plt.Axes | None = None) -> Figure:
    """One rank's time per kind of layer (:func:`~workbench.benchmarks.distrifusion_compute.rank_breakdown`) next to
    the ideal share, the one-device call's time in those layers / N."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 2.8))
    fig = ax.figure
    y = np.arange(len(rows))
    ax.barh(
        y - 0.2, [row.ideal_ms for row in rows], height=0.4, color="lightgrey", label="ideal share (one device / N)"
    )
    ax.barh(y + 0.2, [row.rank_ms for row in rows], height=0.4, color=_COLOURS[0], label="one rank")
    for k, row in enumerate(rows):
        ax.annotate(
            f"{row.excess_ms:+.1f}",
            (max(row.ideal_ms, row.rank_ms), k),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(y, [row.kind for row in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15 * max(max(row.ideal_ms, row.rank_ms) for row in rows))
    ax.set_xlabel("ms per UNet call (numbers: the rank's excess over the ideal share)")
    ax.set_title("Where one rank's time goes")
    ax.legend(fontsize=8, loc="lower right")
    return fig
