"""SADM's experiments: fine-tunes of the zoo's unconditional model, the 2-D comparison, the measures.

- :func:`finetune_toy_uncond` fine-tunes the shipped ``toy-uncond`` (a ``DDPMPipeline`` trained on the
  zoo's biased world) plainly or with the structure game, at the same seed and budget, and ships the
  result as a pipeline folder (``data/toy-uncond-plain-ft``, ``data/toy-uncond-sadm``).
- :func:`batch_structure_distance` measures how far generated batches' pairwise relations are from real
  ones, in the *frozen* toy-CLIP feature space (never the trained critic's, which would grade its own game).
- :func:`compare_points` runs the 2-D tier over seeds, at equal denoiser steps and at equal wall-clock.
- :func:`reproduce` is the ``sadm`` section of ``python -m workbench reproduce``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import DDPMPipeline
from scipy import stats

from workbench import checkpoint, metrics, zoo
from workbench.sadm import SADMConfig, relation_matrix, train_sadm
from workbench.sadm.toy2d import PointWorld, point_metrics, sample_points, train_points
from workbench.training import DiffusionTrainConfig, config_record

__all__ = [
    "FINETUNES",
    "IMAGE_SADM",
    "POINT_SADM",
    "available_pipelines",
    "batch_structure_distance",
    "compare_finetunes",
    "compare_images",
    "compare_points",
    "cost_ratio",
    "finetune_toy_uncond",
    "load_finetune",
    "paired_difference",
    "reproduce",
    "results_table",
    "sample_images",
    "step_cost",
    "structure_matrices",
    "train_pipeline_unet",
]

logger = logging.getLogger(__name__)

Variant = Literal["plain", "sadm"]
FINETUNES: dict[str, str] = {"plain": "toy-uncond-plain-ft", "sadm": "toy-uncond-sadm"}
HELD_OUT_SEED = 123_456  # never drawn in training (training streams start from small seeds)

# The game's settings for the image tier (our choices; see the package docstring). Batch-centred relations:
# with plain cosine the toy world's shared backgrounds let the critic align all its features, and the
# distance it reports fell below 1e-3 on most steps of a fine-tune (the game switched itself off).
IMAGE_SADM = SADMConfig(
    structure_weight=0.05,
    weight_warmup_steps=50,
    max_timestep=700,
    critic_width=32,
    critic_learning_rate=5e-4,
    relation="centred_cosine",
)
# The 2-D tier: points at t > 300 on DDPM's linear schedule are mostly noise (abar_300 = 0.39), so a
# narrower window there.
POINT_SADM = SADMConfig(structure_weight=0.1, weight_warmup_steps=100, max_timestep=300, critic_width=64)


def _finetune_config(steps: int, seed: int) -> DiffusionTrainConfig:
    # As the zoo's other fine-tune (toy-t2i-offset): a lower learning rate and a short EMA.
    return DiffusionTrainConfig(
        steps=steps,
        batch_size=64,
        learning_rate=1e-4,
        warmup_steps=min(50, steps),
        ema_decay=0.99,
        prompt_dropout=0.0,
        caption_dropout=0.0,
        checkpoint_every=min(100, steps),
        seed=seed,
    )


def finetune_toy_uncond(
    variant: Variant,
    *,
    steps: int = 300,
    seed: int = 0,
    out_dir: str | Path | None = None,
    state_dir: str | Path | None = None,
    sadm: SADMConfig = IMAGE_SADM,
) -> Path:
    """Fine-tune the shipped ``toy-uncond`` plainly or with SADM; save a ``DDPMPipeline`` folder (fp16).

    Both variants share the seed, the data stream, the noise and the budget; only the structure term and
    the critic differ. The run resumes from ``state_dir/state.safetensors`` when it exists.

    Args:
        variant: ``"plain"`` or ``"sadm"``.
        steps: denoiser steps (batch 64).
        seed: data, noise and critic seed.
        out_dir: where to save (default ``data/toy-uncond-plain-ft`` or ``data/toy-uncond-sadm``).
        state_dir: training state (default ``runs/NAME``).
        sadm: the game's settings (``variant="sadm"`` only).

    Returns:
        the saved folder; its ``training.json`` has the command, configs and seconds per step.
    """
    if variant not in FINETUNES:
        raise ValueError(f"variant must be one of {list(FINETUNES)}, got {variant!r}")
    name = FINETUNES[variant]
    out = Path(out_dir) if out_dir is not None else zoo.DATA_DIR / name
    state = Path(state_dir) if state_dir is not None else zoo.RUNS_DIR / name
    tuned, seconds, _ = _finetune(sadm if variant == "sadm" else None, steps, seed, state / "state.safetensors", name)
    config = _finetune_config(steps, seed)
    out.mkdir(parents=True, exist_ok=True)
    tuned.save_config(out)
    tuned.scheduler.save_pretrained(out / "scheduler")
    checkpoint.save_model(tuned.unet, out / "unet")
    record = {
        "command": _finetune_command(variant, steps, seed, out_dir, sadm),
        "base": "toy-uncond (data/toy-uncond)",
        "config": config_record(config),
        "sadm": asdict(sadm) if variant == "sadm" else None,
        "segments": checkpoint.read_segments(state / "state.safetensors"),
        "seconds_this_run": round(seconds, 1),
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def _finetune(
    sadm: SADMConfig | None, steps: int, seed: int, state_path: Path, description: str
) -> tuple[DDPMPipeline, float, float]:
    """Fine-tune the shipped toy-uncond (resuming ``state_path``): (pipeline with the EMA UNet, seconds of
    this run, median seconds per step of this run; NaN when it resumed a finished state)."""
    pipe = zoo.load("toy-uncond")
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(step: int, logs: Mapping[str, float]) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    start = time.perf_counter()
    unet, _ = train_sadm(
        pipe.unet,
        zoo.noise_scheduler(),
        zoo.BIASED_WORLD,
        config=_finetune_config(steps, seed),
        state_path=state_path,
        sadm=sadm,
        critic_seed=seed,
        callback=tick,
        description=description,
    )
    seconds = time.perf_counter() - start
    # The first steps carry start-up costs (allocation, the first checkpoint); the median ignores them.
    per_step = float(np.median(times[2:])) if len(times) > 2 else float("nan")
    return DDPMPipeline(unet=unet, scheduler=pipe.scheduler), seconds, per_step


def compare_finetunes(
    *,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 300,
    num_samples: int = 256,
    num_inference_steps: int = 20,
    structure_batch: int = 32,
    cost_steps: int = 10,
    state_dir: str | Path | None = None,
    sadm: SADMConfig = IMAGE_SADM,
) -> dict[str, dict[str, list[float]]]:
    """The image tier over *training* seeds: fine-tunes of toy-uncond, plain and SADM at equal steps, and
    plain at SADM's wall-clock, each measured on its own samples.

    The equal-time budget is set once, before any seed, from :func:`step_cost` (``cost_steps`` steps of each,
    back to back): ``steps`` x SADM's / plain's seconds per step. One short measurement for all seeds, rather
    than each seed's two long runs, so that another job slowing one run on a shared machine does not move a
    seed's budget. For each seed: a plain and a SADM fine-tune of ``steps`` (same data, noise and start),
    then plain for the equal-time budget. Every fine-tune draws ``num_samples`` images with sampling seed =
    training seed, measured against a held-out real set of that seed (toy-CLIP Frechet distance,
    batch-structure distance in frozen toy-CLIP space). Training states go to ``state_dir`` (a temporary
    folder by default) and are resumed when present.

    Returns:
        arm -> measure -> one value per seed; arms ``"plain"``, ``"sadm"``, ``"plain, equal time"``; measures
        ``"Frechet distance"``, ``"structure distance"``, ``"steps"``, ``"seconds per step"`` (median of the
        run's steps after the first two; NaN for a run resumed from a finished state in ``state_dir``), and for
        the equal-time arm ``"cost ratio"`` (the budget's ratio).

    Raises:
        ValueError: ``steps`` < 3 or ``cost_steps`` < 1.
    """
    if steps < 3:
        raise ValueError(f"steps must be >= 3 (the cost per step skips two warm-up steps), got {steps}")
    if cost_steps < 1:
        raise ValueError(f"cost_steps must be >= 1, got {cost_steps}")
    clip = zoo.load("toyclip")
    cost = step_cost(steps=cost_steps)
    ratio = cost["sadm"] / cost["plain"]
    equal_time_steps = max(steps, round(steps * ratio))
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="sadm-finetunes-") as folder:
        root = Path(state_dir) if state_dir is not None else Path(folder)
        for seed in seeds:
            real = zoo.BIASED_WORLD.sample(num_samples, HELD_OUT_SEED + seed).images
            real_features = metrics.clip_features(clip, real)

            def run(
                arm: str, game: SADMConfig | None, arm_steps: int, seed=seed, real=real, real_features=real_features
            ) -> dict[str, float]:
                path = root / f"{arm.replace(', ', '-').replace(' ', '-')}-seed{seed}-steps{arm_steps}.safetensors"
                pipe, _, per_step = _finetune(game, arm_steps, seed, path, f"{arm} seed {seed}")
                images = sample_images(pipe, num_samples, num_inference_steps=num_inference_steps, seed=seed)
                return {
                    "Frechet distance": metrics.frechet_distance(metrics.clip_features(clip, images), real_features),
                    "structure distance": batch_structure_distance(clip, images, real, batch_size=structure_batch),
                    "steps": arm_steps,
                    "seconds per step": per_step,
                }

            arms = {
                "plain": run("plain", None, steps),
                "sadm": run("sadm", sadm, steps),
                "plain, equal time": run("plain, equal time", None, equal_time_steps) | {"cost ratio": ratio},
            }
            for arm, figures in arms.items():
                for key, value in figures.items():
                    results.setdefault(arm, {}).setdefault(key, []).append(float(value))
    return results


def train_pipeline_unet(
    pipe,
    world,
    *,
    config: DiffusionTrainConfig,
    state_path: str | Path,
    sadm: SADMConfig | None = IMAGE_SADM,
    critic_seed: int = 0,
    description: str = "sadm pipeline",
):
    """Fine-tune a Stable Diffusion or SDXL pipeline's UNet on ``world`` (in place) with SADM, in latent space.

    The same :func:`~workbench.sadm.train_sadm` as for the toy models; only the boundary changes: images go
    through the pipeline's VAE (the posterior mean, times ``scaling_factor``), captions through its
    ``encode_prompt``, and an SDXL UNet gets its added conditioning (pooled text, size/crop time ids) through
    ``model_kwargs``. The critic reads latents, and x̂_0 is not clamped (latents are unbounded).

    Args:
        pipe: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (real or from
            :mod:`workbench.testing`).
        world: the training data (a :class:`~workbench.toyworld.ToyWorld` at the VAE's image size).
        config: the loop's settings; SDXL needs ``prompt_dropout=0`` (its pooled text is computed from the
            batch's captions, which the loop's prompt dropout does not see).
        state_path: training-state file (resumed when it exists).
        sadm: the game's settings (None: plain fine-tuning).
        critic_seed, description: as for :func:`~workbench.sadm.train_sadm`.

    Returns:
        (EMA UNet, critic or None).
    """
    from diffusers import DDPMScheduler

    from workbench.toyworld import to_model_space

    is_xl = getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"
    if is_xl and config.prompt_dropout != 0:
        raise ValueError(f"config.prompt_dropout must be 0 for an SDXL pipeline, got {config.prompt_dropout}")
    vae = pipe.vae.eval().requires_grad_(False)

    def encode_images(images: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(to_model_space(images)).to(vae.dtype)
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor

    def encode_prompts(captions: list[str]) -> torch.Tensor:
        return pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]

    model_kwargs = None
    if is_xl:
        size = world.image_size

        @torch.no_grad()
        def model_kwargs(batch) -> dict:
            pooled = pipe.encode_prompt(list(batch.captions), device="cpu", do_classifier_free_guidance=False)[2]
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=pooled.dtype).repeat(len(pooled), 1)
            return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    return train_sadm(
        pipe.unet,
        DDPMScheduler.from_config(pipe.scheduler.config),
        world,
        config=config,
        state_path=state_path,
        sadm=None if sadm is None else replace(sadm, clip_prediction=None),
        critic_seed=critic_seed,
        encode_images=encode_images,
        encode_prompts=encode_prompts,
        model_kwargs=model_kwargs,
        description=description,
    )


def _finetune_command(variant: str, steps: int, seed: int, out_dir, sadm: SADMConfig) -> str:
    command = f"python -m workbench sadm finetune {variant} --steps {steps} --seed {seed}"
    if out_dir is not None:
        command += f" --out {out_dir}"
    if variant == "sadm" and sadm.structure_weight != IMAGE_SADM.structure_weight:
        command += f" --weight {sadm.structure_weight}"
    if variant == "sadm" and sadm.relation != IMAGE_SADM.relation:
        command += f" --relation {sadm.relation}"
    if variant == "sadm" and sadm.max_timestep != IMAGE_SADM.max_timestep:
        command += f" --max-timestep {sadm.max_timestep}"
    return command


def load_finetune(variant: Variant, *, path: str | Path | None = None) -> DDPMPipeline:
    """A shipped fine-tune (``"plain"`` or ``"sadm"``) as a ``DDPMPipeline`` (float32)."""
    if variant not in FINETUNES:
        raise ValueError(f"variant must be one of {list(FINETUNES)}, got {variant!r}")
    folder = Path(path) if path is not None else zoo.DATA_DIR / FINETUNES[variant]
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{FINETUNES[variant]} not found at {folder}; train it with `python -m workbench sadm finetune {variant}`"
        )
    return DDPMPipeline.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)


def available_pipelines() -> dict[str, DDPMPipeline]:
    """The shipped base model and whichever fine-tunes are shipped (a missing one is logged, not invented)."""
    pipes = {"toy-uncond (base)": zoo.load("toy-uncond")}
    for variant, name in FINETUNES.items():
        try:
            pipes[name] = load_finetune(variant)
        except FileNotFoundError as error:
            logger.warning("%s", error)
    return pipes


def paired_difference(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], measure: str) -> str:
    """``measure``: "a - b = mean ± half-width" over paired seeds, and whether the interval excludes 0."""
    values_a, values_b = np.asarray(a[measure], dtype=np.float64), np.asarray(b[measure], dtype=np.float64)
    if values_a.shape != values_b.shape:
        raise ValueError(
            f"{measure}: the arms must have one value per seed each, got {values_a.size} and {values_b.size}"
        )
    mean, half = metrics.mean_interval(values_a - values_b)
    if half == 0 and values_a.size < 2:
        reading = "one seed: no interval"
    elif mean - half > 0:
        reading = "higher"
    elif mean + half < 0:
        reading = "lower"
    else:
        reading = "no clear difference"
    return f"{measure} {mean:+.4g} ± {half:.2g} ({reading})"


def _format(values: Sequence[float]) -> str:
    mean, half = metrics.mean_interval(values)
    return f"{mean:.4g} ± {half:.2g}"


@torch.no_grad()
def batch_structure_distance(clip, generated: np.ndarray, real: np.ndarray, *, batch_size: int = 32) -> float:
    """How far generated batches' pairwise relations are from real ones, in frozen toy-CLIP space.

    Both sets are cut into batches of ``batch_size``; each batch's off-diagonal cosine affinities
    (:func:`~workbench.sadm.relation_matrix` of toy-CLIP image embeddings) are pooled per set, and the
    result is the 1-D Wasserstein distance between the two pools. Unpaired: it compares the distribution of
    relations, not sample by sample. 0 when both sets relate alike.
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (structure is pairwise), got {batch_size}")

    def pooled(images: np.ndarray) -> np.ndarray:
        if len(images) < batch_size:
            raise ValueError(f"need at least batch_size={batch_size} images, got {len(images)}")
        features = metrics.clip_features(clip, images)
        values = []
        for start in range(0, len(features) - batch_size + 1, batch_size):
            relations = relation_matrix(features[start : start + batch_size])
            values.append(relations[~torch.eye(batch_size, dtype=torch.bool)].numpy())
        return np.concatenate(values)

    return float(stats.wasserstein_distance(pooled(generated), pooled(real)))


def compare_points(
    *,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 3000,
    kind: str = "ring",
    sadm: SADMConfig = POINT_SADM,
    num_samples: int = 2000,
    batch_size: int = 256,
    posterior_mean_arm: bool = False,
) -> dict[str, dict[str, list[float]]]:
    """The 2-D tier over ``seeds``: plain and SADM at equal steps, and plain at SADM's wall-clock.

    Each seed gives every arm the same initial weights, data stream and noise. The equal-time arm trains
    plainly for ``steps`` x (SADM's seconds / plain's seconds of that seed), at least ``steps``.

    Args:
        seeds, steps, kind, sadm, num_samples, batch_size: the runs' settings.
        posterior_mean_arm: also run the game with the exact posterior mean E[x_0 | x_t] as its real side
            (the ring only; :func:`~workbench.sadm.toy2d.ring_posterior_mean`), the test of why the term hurts.

    Returns:
        arm -> measure -> one value per seed; arms ``"plain"``, ``"sadm"``, ``"plain, equal time"`` and
        (optionally) ``"sadm, posterior-mean reference"``; measures from
        :func:`~workbench.sadm.toy2d.point_metrics` plus ``"seconds"``, ``"steps"``, ``"seconds per step"`` and,
        for the game's arms, ``"critic distance"`` (the structure distance the critic reports over the last
        tenth of training, in its own feature space: how much gap it still finds).
    """
    if posterior_mean_arm and kind != "ring":
        raise ValueError(f"posterior_mean_arm needs kind='ring' (a known law), got kind={kind!r}")
    world = PointWorld(kind)
    real = world.sample(num_samples, HELD_OUT_SEED).images
    results: dict[str, dict[str, list[float]]] = {}

    def add(arm: str, run) -> None:
        generated = sample_points(run.denoiser, num_samples, seed=HELD_OUT_SEED + 1)
        figures = point_metrics(generated, real, world) | {
            "seconds": run.seconds,
            "steps": run.steps,
            "seconds per step": run.seconds / run.steps,
        }
        seen = [
            logs["critic.distance"] for logs in run.history[-max(1, run.steps // 10) :] if "critic.distance" in logs
        ]
        if seen:  # what the critic still finds at the end of training (its own feature space)
            figures["critic distance"] = float(np.mean(seen))
        for key, value in figures.items():
            results.setdefault(arm, {}).setdefault(key, []).append(float(value))

    for seed in seeds:
        plain = train_points(world, sadm=None, steps=steps, seed=seed, batch_size=batch_size)
        game = train_points(world, sadm=sadm, steps=steps, seed=seed, batch_size=batch_size)
        add("plain", plain)
        add("sadm", game)
        equal_time = max(steps, round(steps * game.seconds / plain.seconds))
        add("plain, equal time", train_points(world, sadm=None, steps=equal_time, seed=seed, batch_size=batch_size))
        if posterior_mean_arm:
            oracle = train_points(
                world, sadm=sadm, steps=steps, seed=seed, batch_size=batch_size, reference="posterior mean"
            )
            add("sadm, posterior-mean reference", oracle)
    return results


def sample_images(pipe: DDPMPipeline, n: int, *, num_inference_steps: int = 20, seed: int = 0) -> np.ndarray:
    """``n`` images (n, 3, H, W) in [0, 1] from an unconditional pipeline (DPM-Solver++ as shipped)."""
    from workbench.zoo_report import sample_unconditional

    return sample_unconditional(pipe, n, num_inference_steps=num_inference_steps, seed=seed)


@torch.no_grad()
def structure_matrices(clip, batches: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each batch's (B, B) relation matrix in frozen toy-CLIP space, rows ordered by toy-CLIP's zero-shot
    (shape, colour) so that the blocks of alike images show in a heat map."""
    from workbench.toyclip import zero_shot_classify

    matrices = {}
    for name, images in batches.items():
        shape = zero_shot_classify(clip, images, "shape").numpy()
        colour = zero_shot_classify(clip, images, "colour").numpy()
        order = np.lexsort((colour, shape))
        features = metrics.clip_features(clip, images[order])
        matrices[name] = relation_matrix(features).numpy()
    return matrices


def results_table(results: Mapping[str, Mapping[str, Sequence[float]]]) -> str:
    """A markdown table: one row per arm, one column per measure, ``mean ± 95 % half-width`` (n seeds)."""
    measures = list(dict.fromkeys(key for figures in results.values() for key in figures))
    lines = ["| arm | " + " | ".join(measures) + " |", "|---|" + "---|" * len(measures)]
    for arm, figures in results.items():
        cells = [_format(figures[key]) if key in figures else "" for key in measures]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    seeds = max(len(values) for figures in results.values() for values in figures.values())
    return "\n".join(lines) + f"\n\n({seeds} seed(s); mean ± half-width of the 95 % t-interval)"


def compare_images(
    pipes: Mapping[str, DDPMPipeline],
    *,
    num_samples: int = 500,
    num_inference_steps: int = 20,
    seeds: Sequence[int] = (0, 1, 2),
    structure_batch: int = 32,
) -> dict[str, dict[str, list[float]]]:
    """Toy-CLIP Frechet distance and batch-structure distance of each pipeline's samples, per sampling seed.

    Each seed draws fresh noise and a fresh held-out real set (of the zoo's biased world).

    Returns:
        pipeline name -> measure -> one value per seed.
    """
    clip = zoo.load("toyclip")
    results: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        real = zoo.BIASED_WORLD.sample(num_samples, HELD_OUT_SEED + seed).images
        real_features = metrics.clip_features(clip, real)
        for name, pipe in pipes.items():
            images = sample_images(pipe, num_samples, num_inference_steps=num_inference_steps, seed=seed)
            figures = {
                "Frechet distance": metrics.frechet_distance(metrics.clip_features(clip, images), real_features),
                "structure distance": batch_structure_distance(clip, images, real, batch_size=structure_batch),
            }
            for key, value in figures.items():
                results.setdefault(name, {}).setdefault(key, []).append(float(value))
    return results


def step_cost(*, steps: int = 6, seed: int = 0) -> dict[str, float]:
    """Median seconds per training step of the toy-uncond UNet, plain and with SADM (batch 64, same data).

    Each variant runs ``steps + 2`` steps (the first two are warm-up and not counted), one after the other;
    on a shared machine, compare the two within one call only.
    """
    figures = {}
    for variant, sadm in (("plain", None), ("sadm", IMAGE_SADM)):
        times: list[float] = []
        last = [time.perf_counter()]

        def tick(step: int, logs: Mapping[str, float], times=times, last=last) -> None:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        with tempfile.TemporaryDirectory() as folder:
            train_sadm(
                zoo.build_toy_uncond_unet(seed=seed),
                zoo.noise_scheduler(),
                zoo.BIASED_WORLD,
                config=replace(_finetune_config(steps + 2, seed), checkpoint_every=10_000),
                state_path=Path(folder) / "state.safetensors",
                sadm=sadm,
                callback=tick,
                description=f"cost {variant}",
            )
        figures[variant] = float(np.median(times[2:]))
    return figures


def cost_ratio(results: Mapping[str, Mapping[str, Sequence[float]]], arm: str = "sadm", other: str = "plain") -> str:
    """``arm``'s seconds per step over ``other``'s, per seed, as "mean x ± 95 % half-width"."""
    per_step = "seconds per step"
    ratios = np.asarray(results[arm][per_step], dtype=np.float64) / np.asarray(results[other][per_step], np.float64)
    mean, half = metrics.mean_interval(ratios)
    return f"{mean:.2f}x ± {half:.2f}"


# The reproduction's budgets (full mode), chosen so that the section runs in about 25 minutes on one core:
# the image tier's nine fine-tunes (3 seeds x plain, SADM, plain at equal time) are the bulk.
REPRO_POINT_STEPS, REPRO_IMAGE_STEPS, REPRO_IMAGE_SAMPLES = 3000, 150, 192


def reproduce(*, quick: bool, out_dir: Path):
    """The ``sadm`` section of the reproduction report.

    2-D ring (3 seeds; quick 2): plain, SADM, plain at SADM's wall-clock, and SADM with the exact posterior
    mean as the real side. Image tier (3 training seeds; quick 2): fine-tunes of toy-uncond, plain, SADM and
    plain at equal wall-clock (:func:`compare_finetunes`). Per-seed figures go to ``out_dir/results.json``.
    """
    from workbench.plots.sadm import points_figure, spread_figure
    from workbench.reproduce import ReproSection
    from workbench.sadm.toy2d import RingPosteriorDenoiser, prediction_spread

    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = (0, 1) if quick else (0, 1, 2)
    point_steps = 300 if quick else REPRO_POINT_STEPS
    image_steps = 4 if quick else REPRO_IMAGE_STEPS
    image_samples = 32 if quick else REPRO_IMAGE_SAMPLES
    points = compare_points(seeds=seeds, steps=point_steps, num_samples=500 if quick else 2000, posterior_mean_arm=True)
    images = compare_finetunes(
        seeds=seeds,
        steps=image_steps,
        num_samples=image_samples,
        num_inference_steps=10 if quick else 20,
        structure_batch=16 if quick else 32,
    )
    (out_dir / "results.json").write_text(json.dumps({"2-D ring": points, "image": images}, indent=1) + "\n")
    rows = [
        {"tier": tier, "arm": arm, "measure": key, "value": _format(values)}
        for tier, results in (("2-D ring", points), ("image", images))
        for arm, figures in results.items()
        for key, values in figures.items()
        if key not in ("seconds", "steps") or (tier == "image" and key == "steps")
    ]

    # Figures: seed 0's samples of each 2-D arm, and the spread of their one-step predictions x̂_0.
    world = PointWorld("ring")
    runs = {
        "plain": train_points(world, sadm=None, steps=point_steps, seed=0),
        "sadm": train_points(world, sadm=POINT_SADM, steps=point_steps, seed=0),
        "sadm, posterior-mean ref.": train_points(
            world, sadm=POINT_SADM, steps=point_steps, seed=0, reference="posterior mean"
        ),
    }
    samples = {"real": world.sample(1000, HELD_OUT_SEED).images}
    samples |= {name: sample_points(run.denoiser, 1000, seed=1) for name, run in runs.items()}
    paths = [out_dir / "points.png", out_dir / "spread.png"]
    points_figure(samples).savefig(paths[0], dpi=110, bbox_inches="tight")
    spreads = {name: prediction_spread(run.denoiser, world) for name, run in runs.items()}
    spreads["exact posterior mean"] = prediction_spread(RingPosteriorDenoiser(), world)
    spread_figure(spreads).savefig(paths[1], dpi=110, bbox_inches="tight")

    oracle = "sadm, posterior-mean reference"
    point_measures = ("energy distance", "precision", "modes covered")
    comparisons = [
        (
            "2-D, SADM - plain at equal steps",
            points,
            "sadm",
            "plain",
            point_measures,
        ),
        ("2-D, SADM - plain at equal time", points, "sadm", "plain, equal time", ("energy distance", "precision")),
        (
            "2-D, SADM with the posterior mean as real side - plain",
            points,
            oracle,
            "plain",
            point_measures,
        ),
        ("2-D, SADM with the posterior mean as real side - SADM", points, oracle, "sadm", point_measures),
        ("images, SADM - plain at equal steps", images, "sadm", "plain", ("Frechet distance", "structure distance")),
        (
            "images, SADM - plain at equal time",
            images,
            "sadm",
            "plain, equal time",
            ("Frechet distance", "structure distance"),
        ),
    ]
    lines = [
        f"{label}: " + "; ".join(paired_difference(results[a], results[b], m) for m in measures)
        for label, results, a, b, measures in comparisons
    ]
    budget_ratio = images["plain, equal time"]["cost ratio"][0]
    cost = (
        f"Cost per step, SADM / plain: 2-D {cost_ratio(points)}, images {cost_ratio(images)} over the runs and "
        f"{budget_ratio:.2f}x in the back-to-back measurement that set the image tier's equal-time budget"
    )
    verdict = (
        "Paired differences by seed (mean ± 95 % interval; a seed gives every arm the same start, data and noise): "
        + ". ".join(lines)
        + f". {cost}. Lower distances and higher precision / modes are better."
    )
    notes = (
        ("Quick mode: a smoke test with few steps and samples; its numbers are noisy. " if quick else "")
        + f"Budgets: 2-D {point_steps} denoiser steps (batch 256) per run; images: fine-tunes of toy-uncond for "
        f"{image_steps} steps (batch 64) per arm and training seed, {image_samples} samples each (sampling seed = "
        "training seed). Equal time: plain training for SADM's seconds; on the image tier the ratio is measured "
        "once, back to back, before the seeds (step_cost), on the 2-D tier per seed. "
        f"2-D game: {asdict(replace(POINT_SADM, clip_prediction=None))}. Image game: {asdict(IMAGE_SADM)}. "
        "The paper reports ImageNet FID 1.58 (256x256) and 2.11 (512x512) with DiT-scale models; nothing here "
        "is comparable in scale. Figures: seed 0's 2-D samples, and the spread of one-step predictions x̂_0 "
        "(mean pairwise distance / the data's) against t, with the exact posterior mean's as the yardstick."
    )
    return ReproSection(
        title="SADM: structure-guided adversarial training (paper 5)",
        claim="adding the adversarial batch-structure term to the denoising loss improves sample quality "
        "(ImageNet FID 1.58 at 256x256, 2.11 at 512x512).",
        rows=rows,
        verdict=verdict,
        figures=paths,
        notes=notes,
    )
