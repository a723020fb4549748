"""Figures of the toy world and the zoo models (notebook 00)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from workbench.pipelines import as_channels_first
from workbench.plots import image_grid
from workbench.toyworld import ATTRIBUTES, ToyWorld

__all__ = ["attribute_grid", "biased_world_figure", "prompt_samples_figure"]


def attribute_grid(attribute: str, *, per_value: int = 8, seed: int = 0, world: ToyWorld | None = None) -> Figure:
    """One row per value of ``attribute`` (the other attributes random), labelled on the left."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {sorted(ATTRIBUTES)}, got {attribute!r}")
    world = world or ToyWorld()
    values = ATTRIBUTES[attribute]
    rows = [world.sample(per_value, seed + i, fixed={attribute: v}).images for i, v in enumerate(values)]
    fig, axes = plt.subplots(len(values), 1, figsize=(1.0 * per_value, 1.05 * len(values)))
    for ax, value, images in zip(np.atleast_1d(axes), values, rows, strict=True):
        image_grid(images, ncols=per_value, ax=ax)
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(value, rotation=0, ha="right", va="center")
    fig.suptitle(f"{attribute}")
    return fig


def biased_world_figure(
    attribute: str, weights: Mapping[str, float], *, n: int = 48, seed: int = 0, counts_n: int = 2000
) -> Figure:
    """Samples of a world biased on ``attribute`` (``weights`` are normalised) and the value histogram."""
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"weights must have a positive sum, got {dict(weights)}")
    world = ToyWorld(bias={attribute: {k: v / total for k, v in weights.items()}})
    fig, (grid_ax, bar_ax) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    image_grid(world.sample(n, seed).images, ncols=12, ax=grid_ax)
    labels = world.sample(counts_n, seed + 1).labels[attribute]
    values = ATTRIBUTES[attribute]
    observed = np.bincount(labels, minlength=len(values)) / counts_n
    x = np.arange(len(values))
    bar_ax.bar(x - 0.2, world.probabilities(attribute), width=0.4, label="set")
    bar_ax.bar(x + 0.2, observed, width=0.4, label=f"drawn ({counts_n})")
    bar_ax.set_xticks(x, values, rotation=30)
    bar_ax.set_ylabel("frequency")
    bar_ax.legend()
    fig.tight_layout()
    return fig


def prompt_samples_figure(
    pipe,
    prompts: Sequence[str],
    *,
    guidance_scale: float,
    num_images: int = 8,
    num_inference_steps: int = 20,
    seed: int = 0,
) -> Figure:
    """``num_images`` samples per prompt from a text-to-image pipeline, one row per prompt."""
    fig, axes = plt.subplots(len(prompts), 1, figsize=(1.1 * num_images, 1.3 * len(prompts)), squeeze=False)
    for ax, prompt in zip(axes[:, 0], prompts, strict=True):
        out = pipe(
            prompt,
            num_images_per_prompt=num_images,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed),
            progress=False,
        )
        image_grid(
            as_channels_first(out.images), ncols=num_images, ax=ax, title=f'"{prompt}", guidance {guidance_scale:g}'
        )
    fig.tight_layout()
    return fig
