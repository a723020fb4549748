"""The measured effect on the toy world: brightness per prompt, with and without the first-step fix.

For prompt groups asking for black, dark, grey, light and white backgrounds (each cycling over the 12
"a {colour} {shape}" combinations) and for ordinary prompts without a background, :func:`run_comparison`
samples every method from the **same** initial noise x_T and measures, per group:

- the background brightness of each image (median of its one-pixel border, grey levels in [0, 1]; no
  shape reaches the border's middle) against the prompt's target, with its spread;
- the share of images within 0.1 of the target for black and white (the extremes);
- the toy-CLIP Frechet distance to toy-world images of the same prompts (:mod:`workbench.metrics`);
- the prompted shape and colour accuracy, read by the evaluation CNN trained on true labels (the zoo's
  ``toy-shape-colour-classifier``), with toy CLIP's zero-shot shape reading beside it; real images of the
  same prompts give every figure its reference.

Methods (:data:`METHODS`), and whether each needs retraining:

- ``base``: the pipeline as shipped (no);
- ``singdiffusion``: the trained module's first step (the base model: no; the module: once per latent space);
- ``oracle``: the same first step with the toy world's exact E[x_0 | c] (no; exists only on the toy world);
- ``trailing``: ``timestep_spacing="trailing"`` (no);
- ``guidance rescale``: the pipeline's ``guidance_rescale=0.7`` (Lin et al., WACV 2024, Section 3.4), which
  rescales the guided prediction to the conditional one's spread (no);
- ``signal leak``: a training-free initial-latent correction in the spirit of signal-leak bias (Everaert
  et al., WACV 2024): the first step with a per-image mean colour drawn from the data's distribution of
  image means instead of a prompt-conditioned mean (no; needs data statistics);
- ``offset noise``: toy-t2i fine-tuned with offset noise, ``zoo.load("toy-t2i-offset")``, passed as
  ``offset_pipe`` (yes: a fine-tune of the whole denoiser with
  :func:`workbench.training.offset_noise_objective`), sampled from the same noise as the others.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from workbench import metrics
from workbench.attribute_classifier import AttributeClassifier, classify
from workbench.pipelines import as_channels_first
from workbench.singdiffusion import (
    ToyWorldOracle,
    first_step_latents,
    parse_toy_prompt,
    predict_mean,
    singular_latents,
)
from workbench.toyclip import zero_shot_classify
from workbench.toyworld import ATTRIBUTES, BACKGROUND_LEVELS, ToyWorld, caption, to_model_space

if TYPE_CHECKING:
    from workbench.reproduce import ReproSection

__all__ = [
    "METHODS",
    "REAL_IMAGES",
    "Comparison",
    "PromptGroup",
    "accuracy_change",
    "background_brightness",
    "compare_prompt",
    "fit_signal_leak",
    "markdown_table",
    "module_vs_oracle",
    "prompt_groups",
    "reproduce",
    "run_comparison",
    "signal_leak_latents",
    "stable_diffusion_demo",
    "summarise",
    "trailing_changes_start",
]

logger = logging.getLogger(__name__)

METHODS: dict[str, str] = {
    "base": "no",
    "singdiffusion": "module only (base model untouched)",
    "oracle": "no (toy world only)",
    "trailing": "no",
    "guidance rescale": "no",
    "signal leak": "no (data statistics)",
    "offset noise": "yes (fine-tune)",
}
GUIDANCE_RESCALE = 0.7  # the value Lin et al. recommend and the issue names
EXTREME_TOLERANCE = 0.1  # "reaches black/white": within 0.1 of the target brightness
_HELD_OUT_SEED = 424_242  # real images for the Frechet distance: a stream no training run uses


@dataclass(frozen=True)
class PromptGroup:
    """Prompts asked together; ``target`` is the background brightness they ask for (None: any)."""

    name: str
    prompts: tuple[str, ...]
    target: float | None


def prompt_groups() -> list[PromptGroup]:
    """One group per background level and one of ordinary prompts, each over the 12 colour-shape pairs."""
    pairs = list(itertools.product(ATTRIBUTES["colour"], ATTRIBUTES["shape"]))
    groups = [
        PromptGroup(
            background,
            tuple(caption({"colour": c, "shape": s, "background": background}) for c, s in pairs),
            BACKGROUND_LEVELS[background],
        )
        for background in ATTRIBUTES["background"]
    ]
    groups.append(PromptGroup("ordinary", tuple(caption({"colour": c, "shape": s}) for c, s in pairs), None))
    return groups


def background_brightness(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-image background brightness of (N, 3, H, W) images in [0, 1]: the median grey level of the border."""
    x = np.asarray(torch.as_tensor(images, dtype=torch.float32))
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {x.shape}")
    grey = x.mean(axis=1)  # (N, H, W)
    border = np.concatenate([grey[:, 0], grey[:, -1], grey[:, 1:-1, 0], grey[:, 1:-1, -1]], axis=1)
    return np.median(border, axis=1)


# ----------------------------------------------------------------------------------------------------
# Signal-leak style correction (training-free)


def fit_signal_leak(clean: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian fit of the per-image channel means of training data in model space.

    Args:
        clean: (N, C, H, W) images (or latents) in the model's space.

    Returns:
        (mean (C,), covariance (C, C)) of the per-image channel means.
    """
    x = torch.as_tensor(clean, dtype=torch.float64)
    if x.ndim != 4 or len(x) < 2:
        raise ValueError(f"clean must be (N, C, H, W) with N >= 2, got shape {tuple(x.shape)}")
    means = x.mean(dim=(2, 3))  # (N, C)
    return means.mean(0).float(), torch.cov(means.T).reshape(x.shape[1], x.shape[1]).float()


def signal_leak_latents(
    scheduler,
    noise: torch.Tensor,
    leak: tuple[torch.Tensor, torch.Tensor],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The first step with a flat image of a random mean colour drawn from the data's fit (after set_timesteps).

    It gives the sampler the low-frequency signal it expects at t0 (the "signal leak" of training) without
    knowing the prompt, so brightness varies as in the data, whatever the prompt asks.
    """
    mean, covariance = leak
    channels = noise.shape[1]
    draw = randn_tensor((len(noise), channels), generator=generator, dtype=torch.float64)
    chol = torch.linalg.cholesky(covariance.double() + 1e-6 * torch.eye(channels, dtype=torch.float64))
    colour = (mean.double() + draw @ chol.T).float()
    flat = colour[:, :, None, None].expand_as(noise).to(noise.device)
    return first_step_latents(scheduler, flat, noise)


# ----------------------------------------------------------------------------------------------------
# Sampling the methods from the same noise


@contextlib.contextmanager
def _scheduler_swapped(pipe, **config) -> Iterator[None]:
    original = pipe.scheduler
    pipe.scheduler = type(original).from_config(original.config, **config)
    try:
        yield
    finally:
        pipe.scheduler = original


@torch.no_grad()
def sample_method(
    pipe,
    prompts: Sequence[str],
    method: str,
    noise: torch.Tensor,
    *,
    module: UNet2DConditionModel | None = None,
    oracle: ToyWorldOracle | None = None,
    leak: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset_pipe=None,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Images (N, 3, H, W) in [0, 1] of one method for ``prompts`` from initial noise ``noise`` (N, C, H, W)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    prompts = list(prompts)
    kwargs = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, progress=False)
    latents, runner = noise, pipe
    if method in ("singdiffusion", "oracle"):
        source = module if method == "singdiffusion" else oracle
        if source is None:
            raise ValueError(f"method {method!r} needs {'module' if method == 'singdiffusion' else 'oracle'}")
        latents = singular_latents(
            pipe,
            prompts,
            source,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            noise=noise,
        )
    elif method == "signal leak":
        if leak is None:
            raise ValueError("method 'signal leak' needs leak (from fit_signal_leak)")
        pipe.scheduler.set_timesteps(num_inference_steps)
        latents = signal_leak_latents(pipe.scheduler, noise, leak, generator)
    elif method == "offset noise":
        if offset_pipe is None:
            raise ValueError("method 'offset noise' needs offset_pipe (zoo.load('toy-t2i-offset'))")
        runner = offset_pipe
    elif method == "guidance rescale":
        kwargs["guidance_rescale"] = GUIDANCE_RESCALE
    if method == "trailing":
        with _scheduler_swapped(pipe, timestep_spacing="trailing"):
            out = pipe(prompts, latents=latents, **kwargs)
    else:
        out = runner(prompts, latents=latents, **kwargs)
    return as_channels_first(out.images)


@dataclass
class Comparison:
    """What :func:`run_comparison` sampled: images per (method, group), the real images, the prompts."""

    groups: list[PromptGroup]
    images: dict[tuple[str, str], np.ndarray]  # (method, group) -> (N, 3, H, W) in [0, 1]
    real: dict[str, np.ndarray]  # group -> (N, 3, H, W) toy-world images of the same prompts
    prompts: dict[str, list[str]]  # group -> the N prompts in order
    settings: dict = field(default_factory=dict)

    def brightness(self, method: str, group: str) -> np.ndarray:
        """Background brightness (N,) of one method's images for one group."""
        return background_brightness(self.images[(method, group)])

    def real_brightness(self, group: str) -> np.ndarray:
        """Background brightness (N,) of the real images of one group."""
        return background_brightness(self.real[group])


def _real_images(world: ToyWorld, prompts: Sequence[str], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((len(prompts), 3, world.image_size, world.image_size), np.float32)
    for prompt in dict.fromkeys(prompts):
        index = [i for i, p in enumerate(prompts) if p == prompt]
        out[index] = world.sample(len(index), rng, fixed=parse_toy_prompt(prompt)).images
    return out


def run_comparison(
    pipe,
    *,
    module: UNet2DConditionModel | None,
    methods: Sequence[str] = ("base", "singdiffusion", "oracle", "trailing", "signal leak"),
    groups: Sequence[PromptGroup] | None = None,
    num_per_group: int = 200,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    offset_pipe=None,
    oracle: ToyWorldOracle | None = None,
    seed: int = 0,
    batch_size: int = 200,
) -> Comparison:
    """Sample every method for every group from the same noise (see the module docstring)."""
    groups = list(groups or prompt_groups())
    oracle = oracle or ToyWorldOracle()
    world = oracle.world
    leak = None
    if "signal leak" in methods:
        leak = fit_signal_leak(to_model_space(world.sample(2000, _HELD_OUT_SEED + 1).images))
    size = pipe.unet.config.sample_size
    images: dict[tuple[str, str], np.ndarray] = {}
    real, prompts_by_group = {}, {}
    total = len(groups) * len(methods)
    progress = tqdm(total=total * num_per_group, desc="singdiffusion comparison", leave=False)
    for g, group in enumerate(groups):
        prompts = [group.prompts[i % len(group.prompts)] for i in range(num_per_group)]
        prompts_by_group[group.name] = prompts
        real[group.name] = _real_images(world, prompts, _HELD_OUT_SEED + 10 * g)
        noise_generator = torch.Generator().manual_seed(seed * 1000 + g)
        noise = randn_tensor((num_per_group, 3, size, size), generator=noise_generator)
        for method in methods:
            leak_generator = torch.Generator().manual_seed(seed * 1000 + g + 500)
            chunks = []
            for start in range(0, num_per_group, batch_size):
                stop = min(num_per_group, start + batch_size)
                chunks.append(
                    sample_method(
                        pipe,
                        prompts[start:stop],
                        method,
                        noise[start:stop],
                        module=module,
                        oracle=oracle,
                        leak=leak,
                        offset_pipe=offset_pipe,
                        num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale,
                        generator=leak_generator,
                    )
                )
                progress.update(stop - start)
            images[(method, group.name)] = np.concatenate(chunks)
    progress.close()
    settings = dict(
        num_per_group=num_per_group,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        scheduler=type(pipe.scheduler).__name__,
        seed=seed,
        world=world,
    )
    return Comparison(groups, images, real, prompts_by_group, settings)


REAL_IMAGES = "real images"  # the reference row of every group in :func:`summarise`


def summarise(
    comparison: Comparison, toyclip, judge: AttributeClassifier, *, methods: Sequence[str] | None = None
) -> list[dict]:
    """One row per (group, method): background brightness vs target, extremes reached, FD, prompt accuracy.

    Prompt accuracy is read by ``judge``, the evaluation CNN trained on true labels
    (``zoo.load("toy-shape-colour-classifier")``); toyclip's zero-shot shape reading is listed beside it,
    since toyclip's bias depends on the background. Each group opens with a :data:`REAL_IMAGES` row: toy-world
    images of the same prompts, measured the same way (its Frechet distance is the floor: a second real set).
    """
    methods = list(methods or dict.fromkeys(m for m, _ in comparison.images))
    # Ordinary prompts leave the background to the world: their target is its expected level.
    world = comparison.settings.get("world", ToyWorld())
    levels = np.array([BACKGROUND_LEVELS[b] for b in ATTRIBUTES["background"]])
    world_background = float(world.probabilities("background") @ levels)
    if any(list(judge.config.attributes.get(a, ())) != list(ATTRIBUTES[a]) for a in ("shape", "colour")):
        raise ValueError(
            "judge must classify every shape and colour of the toy world (zoo.load('toy-shape-colour-classifier')), "
            f"got attributes {dict(judge.config.attributes)}"
        )
    rows = []
    for g, group in enumerate(comparison.groups):
        prompts = comparison.prompts[group.name]
        attributes = [parse_toy_prompt(p) for p in prompts]
        truth = {a: np.array([ATTRIBUTES[a].index(x[a]) for x in attributes]) for a in ("shape", "colour")}
        real = comparison.real[group.name]
        real_features = metrics.clip_features(toyclip, real)
        second_real = _real_images(world, prompts, _HELD_OUT_SEED + 10 * g + 5)
        target = group.target if group.target is not None else world_background
        for method in [REAL_IMAGES, *methods]:
            images = real if method == REAL_IMAGES else comparison.images[(method, group.name)]
            features = metrics.clip_features(toyclip, second_real if method == REAL_IMAGES else images)
            brightness = background_brightness(images)
            read = classify(judge, images)
            rows.append(
                {
                    "group": group.name,
                    "method": method,
                    "retraining": "" if method == REAL_IMAGES else METHODS[method],
                    "target": round(target, 3),
                    "background mean": round(float(brightness.mean()), 3),
                    "background std": round(float(brightness.std()), 3),
                    "|mean - target|": round(abs(float(brightness.mean()) - target), 3),
                    "within 0.1 of target": round(float((np.abs(brightness - target) <= EXTREME_TOLERANCE).mean()), 3)
                    if group.name in ("black", "white")
                    else "",
                    "Frechet distance": round(metrics.frechet_distance(features, real_features), 2),
                    "shape accuracy": round(float((read["shape"] == truth["shape"]).mean()), 3),
                    "colour accuracy": round(float((read["colour"] == truth["colour"]).mean()), 3),
                    "shape accuracy (toyclip)": round(
                        float((zero_shot_classify(toyclip, images, "shape").numpy() == truth["shape"]).mean()), 3
                    ),
                }
            )
    return rows


def accuracy_change(
    comparison: Comparison,
    judge: AttributeClassifier,
    method: str,
    *,
    attribute: str = "shape",
    reference: str = "base",
) -> tuple[float, float]:
    """Paired change in prompted ``attribute`` accuracy of ``method`` against ``reference`` over all groups.

    Both sampled the same prompts from the same noise, so the change is read image by image: the mean of
    (method right) - (reference right) and the half-width of its 95 % interval.
    """
    if attribute not in ("shape", "colour"):
        raise ValueError(f"attribute must be 'shape' or 'colour', got {attribute!r}")
    differences = []
    for group in comparison.groups:
        truth = np.array(
            [ATTRIBUTES[attribute].index(parse_toy_prompt(p)[attribute]) for p in comparison.prompts[group.name]]
        )
        right = {
            m: classify(judge, comparison.images[(m, group.name)])[attribute] == truth for m in (method, reference)
        }
        differences.append(right[method].astype(float) - right[reference].astype(float))
    return metrics.mean_interval(np.concatenate(differences))


def markdown_table(rows: Sequence[Mapping[str, object]]) -> str:
    """Rows (same keys) as a Markdown table, for notebooks."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The module against the oracle; one prompt for the notebook's panel


@torch.no_grad()
def module_vs_oracle(
    pipe,
    module: UNet2DConditionModel,
    prompts: Sequence[str],
    *,
    oracle: ToyWorldOracle | None = None,
    num_noise: int = 8,
    seed: int = 0,
) -> dict:
    """How close the module's x_bar is to the exact E[x_0 | c], per prompt (no guidance).

    Returns:
        ``{"prompts", "module" (P, 3, H, W) in [0, 1] (x_bar averaged over ``num_noise`` noises),
        "oracle" (P, 3, H, W) in [0, 1], "rows": per prompt the pixel RMSE in [0, 1] units and both mean
        brightnesses}``.
    """
    oracle = oracle or ToyWorldOracle()
    prompts = list(prompts)
    embeds = pipe.encode_prompt(prompts, pipe.unet.device, num_noise, False)[0]
    size = module.config.sample_size
    noise = randn_tensor(
        (len(prompts) * num_noise, module.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed)
    )
    predicted = predict_mean(module, noise, embeds).float().reshape(len(prompts), num_noise, 3, size, size)
    spread = ((predicted.std(dim=1) / 2).mean(dim=(1, 2, 3))).numpy()  # how much x_bar depends on the noise
    predicted = ((predicted.mean(dim=1) + 1) / 2).clamp(0, 1)
    exact = ((oracle.mean_images(prompts) + 1) / 2).clamp(0, 1)
    rmse = torch.sqrt(((predicted - exact) ** 2).mean(dim=(1, 2, 3))).numpy()
    rows = [
        {
            "prompt": p,
            "RMSE to oracle": round(float(rmse[i]), 4),
            "module brightness": round(float(predicted[i].mean()), 3),
            "oracle brightness": round(float(exact[i].mean()), 3),
            "std over noise": round(float(spread[i]), 4),
        }
        for i, p in enumerate(prompts)
    ]
    return {"prompts": prompts, "module": predicted.numpy(), "oracle": exact.numpy(), "rows": rows}


def compare_prompt(
    pipe,
    prompt: str,
    *,
    methods: Sequence[str] = ("base", "singdiffusion"),
    module: UNet2DConditionModel | None = None,
    oracle: ToyWorldOracle | None = None,
    num_images: int = 6,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
    offset_pipe=None,
) -> dict[str, np.ndarray]:
    """Images of one prompt per method, all from the same noise: method -> (num_images, 3, H, W) in [0, 1]."""
    size = pipe.unet.config.sample_size
    noise = randn_tensor((num_images, 3, size, size), generator=torch.Generator().manual_seed(seed))
    leak = None
    if "signal leak" in methods:
        leak = fit_signal_leak(to_model_space(ToyWorld().sample(2000, _HELD_OUT_SEED + 1).images))
    return {
        method: sample_method(
            pipe,
            [prompt] * num_images,
            method,
            noise,
            module=module,
            oracle=oracle or ToyWorldOracle(),
            leak=leak,
            offset_pipe=offset_pipe,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed + 1),
        )
        for method in methods
    }


# ----------------------------------------------------------------------------------------------------
# Reproduction section


def trailing_changes_start(scheduler, num_inference_steps: int) -> bool:
    """Whether ``timestep_spacing="trailing"`` gives ``scheduler`` another first timestep t0 than its own spacing.

    Trailing spacing matters for this problem only through t0 (it starts at T - 1 instead of, e.g., 981).
    """
    trailing = type(scheduler).from_config(scheduler.config, timestep_spacing="trailing")
    own = type(scheduler).from_config(scheduler.config)
    trailing.set_timesteps(num_inference_steps)
    own.set_timesteps(num_inference_steps)
    return bool(trailing.timesteps[0] != own.timesteps[0])


def _sizes(quick: bool) -> dict:
    # 10 DPM-Solver++ steps in both modes: the method changes only the first step, and six methods x six groups
    # x 200 images at 20 steps take over an hour on one CPU core.
    return dict(num_per_group=12 if quick else 200, num_inference_steps=10)


def reproduce(*, quick: bool, out_dir: Path) -> ReproSection:
    """Brightness per background prompt for every method (same noise), FD and prompt accuracy; figures."""
    import matplotlib.pyplot as plt

    from workbench import zoo
    from workbench.plots.singdiffusion import brightness_histograms_figure, mean_vs_oracle_figure
    from workbench.reproduce import ReproSection

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe, module, toyclip = zoo.load("toy-t2i"), zoo.load("toy-t2i-sing"), zoo.load("toyclip")
    judge = zoo.load("toy-shape-colour-classifier")
    offset_pipe = zoo.load("toy-t2i-offset")
    offset_record = json.loads((zoo.DATA_DIR / "toy-t2i-offset" / "training.json").read_text())
    sizes = _sizes(quick)
    methods = ["base", "singdiffusion", "oracle", "guidance rescale", "signal leak", "offset noise"]
    pipe.scheduler.set_timesteps(sizes["num_inference_steps"])
    trailing_note = (
        f"Trailing spacing is not sampled: the shipped {type(pipe.scheduler).__name__} "
        f"({pipe.scheduler.config.timestep_spacing} spacing) already starts at the same t0 = "
        f"{int(pipe.scheduler.timesteps[0])} (later timesteps differ by one), so it cannot change the first step. "
    )
    if trailing_changes_start(pipe.scheduler, sizes["num_inference_steps"]):
        methods.insert(3, "trailing")
        trailing_note = ""
    comparison = run_comparison(pipe, module=module, methods=methods, offset_pipe=offset_pipe, **sizes)
    rows = summarise(comparison, toyclip, judge)
    closeness = module_vs_oracle(pipe, module, [g.prompts[0] for g in comparison.groups], num_noise=4)
    figures = []
    for name, fig in (
        ("brightness_histograms.png", brightness_histograms_figure(comparison)),
        ("module_vs_oracle.png", mean_vs_oracle_figure(closeness)),
    ):
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        figures.append(out_dir / name)

    def row(group: str, method: str) -> dict:
        return next(r for r in rows if r["group"] == group and r["method"] == method)

    def extremes(method: str) -> str:
        black, white = row("black", method), row("white", method)
        return (
            f"{method} {black['background mean']} / {white['background mean']} "
            f"({black['within 0.1 of target']} / {white['within 0.1 of target']})"
        )

    def accuracy(method: str, key: str = "shape accuracy") -> float:
        return float(np.mean([r[key] for r in rows if r["method"] == method]))

    def accuracies(key: str) -> str:
        return ", ".join(f"{m} {accuracy(m, key):.3f}" for m in [REAL_IMAGES, *methods])

    verdict = (
        "Background brightness for black / white prompts (targets 0 / 1), with the share within 0.1 of the "
        f"target in brackets: {'; '.join(extremes(m) for m in methods)}. Prompted shape accuracy over all groups, "
        f"read by the evaluation CNN: {accuracies('shape accuracy')}; colour: {accuracies('colour accuracy')}. "
        f"Toyclip's zero-shot shape reading, for comparison: {accuracies('shape accuracy (toyclip)')}. "
        "Paired change in shape accuracy against the base (same prompts and noise, 95 % interval): "
        + ", ".join(
            "{} {:+.3f} ± {:.3f}".format(m, *accuracy_change(comparison, judge, m)) for m in methods if m != "base"
        )
        + "."
    )
    rmse = ", ".join(f"{r['prompt']!r}: {r['RMSE to oracle']}" for r in closeness["rows"])
    notes = (
        ("Quick mode: a smoke test with few images; its numbers are noisy. " if quick else "")
        + f"{sizes['num_per_group']} images per group (the 12 colour-shape pairs in turn), the pipeline's "
        f"{comparison.settings['scheduler']} with {sizes['num_inference_steps']} steps, guidance 4, the same "
        "noise for every method. Background brightness: median grey level of the one-pixel border. "
        + trailing_note
        + f"Guidance rescale: guidance_rescale={GUIDANCE_RESCALE}; it rescales every step's guided prediction to the "
        "conditional one's spread and leaves the start alone (Lin et al. pair it with a zero-terminal-SNR schedule, "
        "which this base model was not trained with), so compare its rows with the base's. "
        "Offset noise: the shipped toy-t2i-offset, "
        f"toy-t2i fine-tuned {offset_record['config']['steps']} steps with offset {offset_record['offset']} "
        "(retrains the whole denoiser). "
        f"Module x_bar vs the toy world's exact mean (pixel RMSE in [0, 1] units, 4 noises averaged): {rmse}."
    )
    return ReproSection(
        title="SingDiffusion (Zhang et al., CVPR 2024)",
        claim=(
            "a module that predicts E[x_0 | prompt] for the singular first step at t = T fixes the average-"
            "brightness problem (black and white prompts come out grey) without retraining the base model."
        ),
        rows=rows,
        verdict=verdict,
        figures=figures,
        notes=notes,
    )


# ----------------------------------------------------------------------------------------------------
# On Stable Diffusion


def stable_diffusion_demo(
    pipe,
    *,
    module: UNet2DConditionModel | None = None,
    train_steps: int = 60,
    prompts: Sequence[str] = ("black", "white"),
    image_size: int | None = None,
    num_inference_steps: int = 10,
    guidance_scale: float = 4.0,
    seed: int = 0,
    state_dir: str | Path | None = None,
) -> dict:
    """The same first step on a Stable Diffusion pipeline (real or the tiny stand-in), through ``latents=``.

    Without a ``module``, one is built for the pipeline's latent space and text encoder and trained for
    ``train_steps`` on 512 toy-world images of ``image_size`` pixels (encoded by the pipeline's VAE) captioned
    by their background word alone ("black", ..., "white": short enough for any tokenizer); that is a
    demonstration of the code path, not a module for real prompts (one trains on an image-text corpus the
    same way: :class:`~workbench.singdiffusion.CaptionedImages` and
    :func:`~workbench.singdiffusion.train_mean_predictor`).

    Returns:
        ``{"images": {"base": ..., "singdiffusion": ...}`` (N, 3, H, W) in [0, 1], ``"brightness"``: method ->
        per-image mean brightness, ``"prompts"``, ``"module"``}.
    """
    import tempfile

    from workbench.singdiffusion import CaptionedImages, build_mean_predictor, train_mean_predictor
    from workbench.training import DiffusionTrainConfig

    factor = pipe.vae_scale_factor
    image_size = image_size or pipe.unet.config.sample_size * factor
    latent = image_size // factor
    if module is None:
        width = pipe.encode_prompt([""], pipe.unet.device, 1, False)[0].shape[-1]
        module = build_mean_predictor(
            sample_size=latent, in_channels=pipe.unet.config.in_channels, cross_attention_dim=width, seed=seed
        )
        config = DiffusionTrainConfig(
            steps=train_steps,
            batch_size=16,
            learning_rate=1e-3,
            warmup_steps=10,
            caption_dropout=0.0,
            checkpoint_every=10**6,
            seed=seed,
        )
        batch = ToyWorld(image_size=image_size).sample(512, seed)
        data = CaptionedImages(batch.images, batch.values("background"))
        with tempfile.TemporaryDirectory() as folder:
            state = Path(state_dir or folder) / "state.safetensors"
            module = train_mean_predictor(module, pipe, data, config=config, state_path=state)
    prompts = list(prompts)
    generator = torch.Generator().manual_seed(seed)
    noise = randn_tensor((len(prompts), pipe.unet.config.in_channels, latent, latent), generator=generator)
    run = dict(
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=image_size, width=image_size
    )
    latents = singular_latents(pipe, prompts, module, noise=noise, **run)
    images = {
        "base": pipe(prompts, latents=noise.to(pipe.unet.dtype), output_type="pt", **run).images,
        "singdiffusion": pipe(prompts, latents=latents, output_type="pt", **run).images,
    }
    images = {k: v.float().cpu().numpy() for k, v in images.items()}
    brightness = {k: v.mean(axis=(1, 2, 3)) for k, v in images.items()}
    return {"images": images, "brightness": brightness, "prompts": prompts, "module": module}
