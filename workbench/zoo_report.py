"""Quality figures of the zoo models, measured (``python -m workbench zoo evaluate``).

- toyclip: zero-shot accuracy per attribute on held-out toy images.
- toy-t2i: prompt following (the prompted shape and colour on generated images, with guidance, read by
  the evaluation CNN trained on true labels, ``toy-shape-colour-classifier``, and by toyclip's zero-shot
  classifier) and the toyclip Frechet distance of samples to held-out real images, next to the same
  figures for the untrained (randomly initialised) model and for a second real set (the floor).
- toy-uncond: the same Frechet distances against its biased world, and the attribute frequencies of its
  samples next to the world's bias (what Balancing Act starts from), read by both judges on samples and
  on real images (toyclip's zero-shot reading is biased; the CNN's is not).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench import metrics, zoo
from workbench.attribute_classifier import classify
from workbench.pipelines import as_channels_first
from workbench.plots import image_grid
from workbench.sampling import denoise, initial_noise
from workbench.toyclip import attribute_accuracy, zero_shot_classify
from workbench.toyworld import ATTRIBUTES, ToyWorld, caption

__all__ = ["evaluate", "reproduce", "sample_prompted", "sample_unconditional"]

HELD_OUT_SEED = 123_456  # never used for training (training streams start from seed 0)
# The models this report has figures for; paper modules' zoo models (toy-t2i-sing) are measured in their sections.
EVALUATED_MODELS = ("toyclip", "toy-t2i", "toy-uncond")
PROMPTS = [caption({"colour": c, "shape": s}) for s, c in itertools.product(ATTRIBUTES["shape"], ATTRIBUTES["colour"])]


def _sizes(quick: bool) -> tuple[int, int]:
    """(number of samples, sampler steps)."""
    return (64, 10) if quick else (1000, 20)


def sample_prompted(
    pipe, n: int, *, num_inference_steps: int, guidance_scale: float = 4.0, seed: int = 0, batch_size: int = 250
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` images for the 12 "a {colour} {shape}" prompts in turn.

    Returns:
        images (n, 3, H, W) in [0, 1], prompted shape indices (n,), prompted colour indices (n,).
    """
    combos = list(itertools.product(range(len(ATTRIBUTES["shape"])), range(len(ATTRIBUTES["colour"]))))
    shape_idx = np.array([combos[i % len(combos)][0] for i in range(n)])
    colour_idx = np.array([combos[i % len(combos)][1] for i in range(n)])
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in tqdm(range(0, n, batch_size), desc="toy-t2i samples", leave=False):
        stop = min(n, start + batch_size)
        prompts = [PROMPTS[shape_idx[i] * len(ATTRIBUTES["colour"]) + colour_idx[i]] for i in range(start, stop)]
        out = pipe(
            prompts,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            progress=False,
        )
        images.append(as_channels_first(out.images))
    return np.concatenate(images), shape_idx, colour_idx


@torch.no_grad()
def sample_unconditional(pipe, n: int, *, num_inference_steps: int, seed: int = 0, batch_size: int = 250) -> np.ndarray:
    """``n`` images (n, 3, H, W) in [0, 1] from an unconditional pipeline (``DDPMPipeline`` layout)."""
    generator = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    size = unet.config.sample_size
    chunks = []
    for start in tqdm(range(0, n, batch_size), desc="toy-uncond samples", leave=False):
        count = min(batch_size, n - start)
        noise = initial_noise((count, unet.config.in_channels, size, size), generator)
        x = denoise(unet, pipe.scheduler, noise, num_inference_steps=num_inference_steps, progress=False)
        chunks.append(((x + 1) / 2).clamp(0, 1).numpy())
    return np.concatenate(chunks)


def _frechet(clip, images: np.ndarray, reference: np.ndarray) -> float:
    return metrics.frechet_distance(metrics.clip_features(clip, images), metrics.clip_features(clip, reference))


def evaluate(name: str, *, quick: bool = False) -> dict[str, float]:
    """The quality figures of one zoo model (see the module docstring)."""
    n, steps = _sizes(quick)
    clip = zoo.load("toyclip")
    if name == "toyclip":
        batch = ToyWorld().sample(500 if quick else 2000, HELD_OUT_SEED)
        return {f"zero-shot accuracy: {a}": round(v, 4) for a, v in attribute_accuracy(clip, batch).items()}
    if name == "toy-t2i":
        real = ToyWorld().sample(n, HELD_OUT_SEED).images
        floor = ToyWorld().sample(n, HELD_OUT_SEED + 1).images
        pipe = zoo.load("toy-t2i")
        images, shape_idx, colour_idx = sample_prompted(pipe, n, num_inference_steps=steps)
        untrained = zoo.ToyTextToImagePipeline(zoo.build_toy_t2i_unet(seed=1), pipe.scheduler, clip)
        random_images, *_ = sample_prompted(untrained, n, num_inference_steps=steps)
        shape_acc = float((zero_shot_classify(clip, images, "shape").numpy() == shape_idx).mean())
        colour_acc = float((zero_shot_classify(clip, images, "colour").numpy() == colour_idx).mean())
        read = classify(zoo.load("toy-shape-colour-classifier"), images)
        cnn_shape_acc = float((read["shape"] == shape_idx).mean())
        cnn_colour_acc = float((read["colour"] == colour_idx).mean())
        return {
            "prompted shape accuracy (guidance 4), evaluation CNN": round(cnn_shape_acc, 4),
            "prompted colour accuracy (guidance 4), evaluation CNN": round(cnn_colour_acc, 4),
            "prompted shape accuracy (guidance 4), toyclip zero-shot": round(shape_acc, 4),
            "prompted colour accuracy (guidance 4), toyclip zero-shot": round(colour_acc, 4),
            f"Frechet distance, {n} samples vs real": round(_frechet(clip, images, real), 3),
            "Frechet distance, untrained model vs real": round(_frechet(clip, random_images, real), 3),
            "Frechet distance, real vs real (floor)": round(_frechet(clip, floor, real), 3),
        }
    if name == "toy-uncond":
        real = zoo.BIASED_WORLD.sample(n, HELD_OUT_SEED).images
        floor = zoo.BIASED_WORLD.sample(n, HELD_OUT_SEED + 1).images
        pipe = zoo.load("toy-uncond")
        images = sample_unconditional(pipe, n, num_inference_steps=steps)
        untrained = sample_unconditional(
            zoo.DDPMPipeline(unet=zoo.build_toy_uncond_unet(seed=1), scheduler=pipe.scheduler),
            n,
            num_inference_steps=steps,
        )
        figures = {
            f"Frechet distance, {n} samples vs biased world": round(_frechet(clip, images, real), 3),
            "Frechet distance, untrained model vs biased world": round(_frechet(clip, untrained, real), 3),
            "Frechet distance, real vs real (floor)": round(_frechet(clip, floor, real), 3),
        }
        # Counted by toyclip over the world's own values and by the evaluation CNN; the same counts on real
        # images show each judge's bias.
        judge = zoo.load("toy-shape-colour-classifier")
        for attribute, value in (("shape", "circle"), ("colour", "red")):
            world = zoo.BIASED_WORLD.bias[attribute]
            values = tuple(world)
            first = values.index(value)
            for label, batch in (("samples", images), ("real images", real)):
                share = (zero_shot_classify(clip, batch, attribute, values=values).numpy() == first).mean()
                read = (classify(judge, batch)[attribute] == ATTRIBUTES[attribute].index(value)).mean()
                figures[f"fraction {value} in {label} (world: {world[value]}), toyclip"] = round(float(share), 4)
                figures[f"fraction {value} in {label} (world: {world[value]}), evaluation CNN"] = round(float(read), 4)
        return figures
    raise ValueError(f"name must be one of {list(zoo.ZOO)}, got {name!r}")


def reproduce(*, quick: bool, out_dir: Path):
    """Reproduction-report section for the zoo: the quality figures and a sample grid per model."""
    from workbench.reproduce import ReproSection

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        {"model": name, "figure": key, "value": value}
        for name in EVALUATED_MODELS
        for key, value in evaluate(name, quick=quick).items()
    ]
    pipe = zoo.load("toy-t2i")
    images, *_ = sample_prompted(pipe, 24, num_inference_steps=20)
    figure = image_grid(images, ncols=12, titles=PROMPTS * 2)
    path = out_dir / "toy_t2i_samples.png"
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return ReproSection(
        title="The toy world and the zoo",
        claim="(foundation) the zoo models are good enough to carry the papers' experiments.",
        rows=rows,
        verdict="see the table: trained models against untrained ones and the real-vs-real floor.",
        figures=[path],
    )
