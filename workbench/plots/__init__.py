"""Shared figures. Every function takes data (and an optional ``ax``) and returns the ``Figure``.

Paper-specific figures live in submodules (``workbench.plots.timesteps``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["image_grid", "to_hwc"]


def to_hwc(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, C, H, W) or (N, H, W, C) images in [0, 1] to a float (N, H, W, C) numpy array."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"images must be 3-D or 4-D, got shape {images.shape}")
    if images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    if images.shape[-1] == 1:
        images = images.repeat(3, axis=-1)
    return np.clip(images, 0.0, 1.0)


def image_grid(
    images: np.ndarray | torch.Tensor,
    *,
    ncols: int | None = None,
    titles: Sequence[str] | None = None,
    ax: plt.Axes | None = None,
    title: str | None = None,
    padding: int = 1,
) -> Figure:
    """Tile images in [0, 1] into one picture (white gaps), optionally with a caption per tile."""
    hwc = to_hwc(images)
    n, h, w, _ = hwc.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    canvas = np.ones((nrows * (h + padding) - padding, ncols * (w + padding) - padding, 3), dtype=np.float32)
    for i, image in enumerate(hwc):
        r, c = divmod(i, ncols)
        canvas[r * (h + padding) : r * (h + padding) + h, c * (w + padding) : c * (w + padding) + w] = image
    if ax is None:
        scale = 1.3 if titles else 1.0
        fig, ax = plt.subplots(figsize=(min(14, 1.1 * ncols * scale), min(14, 1.1 * nrows * scale)))
    fig = ax.figure
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    if titles is not None:
        for i, text in enumerate(titles[:n]):
            r, c = divmod(i, ncols)
            ax.text(c * (w + padding) + w / 2, r * (h + padding) - 0.5, text, ha="center", va="bottom", fontsize=6)
    return fig
