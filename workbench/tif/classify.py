"""Classification by denoising error: time-step weights, the shared-noise rule and adaptive class pruning.

Layers: pure math on tensors (:func:`tif_weights`, :func:`class_distance`, :func:`timestep_grid`,
:func:`select_classes`), then the UNet calls (:func:`noise_prediction_errors`, :func:`classify`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import SchedulerMixin
from tqdm.auto import tqdm

from workbench.adapters import adapter_names, use_adapter

__all__ = [
    "ClassCondition",
    "ClassificationResult",
    "ClassifyConfig",
    "class_distance",
    "classify",
    "grid_indices",
    "noise_prediction_errors",
    "select_classes",
    "simulate_pruning",
    "tif_weights",
    "timestep_grid",
    "timestep_weights",
    "weight_knee",
]

Weighting = Literal["tif", "uniform", "large", "small"]


def tif_weights(alphas_cumprod: torch.Tensor, distance: float, *, num_terms: int = 500) -> torch.Tensor:
    """TiF's time-step weights: how much of the confusion at noise level t is at the class distance d.

    Two images at distance ``d`` become confusable under the noise of step t with probability
    ``P(d, t) = erfc(sqrt(abar_t) d / (2 sqrt(2) sqrt(1 - abar_t)))``, and
    ``w_t = P(d, t) / (P(d, t) + sum_{j=0}^{num_terms-1} P(d + 1 + j, t))``: near 1 while the noise is
    small against d, near ``1 / (num_terms + 1)`` once everything is confusable. Computed in log space
    (``erfc(x) = erfcx(x) exp(-x^2)``), since every ``P`` underflows at small t. The official code builds
    ``abar_t`` from DDPM's linear betas (1e-4 to 0.02) whatever the model; here it is the model's own
    scheduler's.

    Args:
        alphas_cumprod: (T,) the scheduler's cumulative alphas (``abar_t``), never rebuilt by hand.
        distance: d > 0, in the units of the model space (see :func:`class_distance`).
        num_terms: how many larger distances compete (500 in the official code).

    Returns:
        float64 (T,) weights in (0, 1].
    """
    if not (isinstance(distance, int | float) and math.isfinite(distance) and distance > 0):
        raise ValueError(f"distance must be a finite number > 0, got {distance!r}")
    if not isinstance(num_terms, int) or num_terms < 1:
        raise ValueError(f"num_terms must be a positive integer, got {num_terms!r}")
    abar = alphas_cumprod.double().clamp(1e-12, 1 - 1e-12)
    scale = abar.sqrt() / (2 * math.sqrt(2) * (1 - abar).sqrt())  # (T,)
    distances = torch.cat([torch.tensor([float(distance)]), distance + 1 + torch.arange(num_terms)]).double()
    x = scale[:, None] * distances[None, :]  # (T, num_terms + 1)
    log_p = torch.log(torch.special.erfcx(x)) - x**2
    return torch.exp(log_p[:, 0] - torch.logsumexp(log_p, dim=1))


def timestep_weights(
    kind: Weighting,
    scheduler: SchedulerMixin,
    *,
    distance: float | None = None,
) -> torch.Tensor:
    """Weights over all training steps for one rule.

    ``"tif"``: :func:`tif_weights` (needs ``distance``); ``"uniform"``: Diffusion Classifier's; ``"large"``:
    only the upper half of the steps (t >= T/2); ``"small"``: only the lower half.
    """
    num_train_timesteps = scheduler.config.num_train_timesteps
    t = torch.arange(num_train_timesteps)
    if kind == "tif":
        if distance is None:
            raise ValueError("distance is required for kind='tif' (see class_distance)")
        return tif_weights(scheduler.alphas_cumprod, distance)
    if kind == "uniform":
        return torch.ones(num_train_timesteps, dtype=torch.float64)
    if kind == "large":
        return (t >= num_train_timesteps // 2).double()
    if kind == "small":
        return (t < num_train_timesteps // 2).double()
    raise ValueError(f"kind must be 'tif', 'uniform', 'large' or 'small', got {kind!r}")


def weight_knee(weights: torch.Tensor) -> int:
    """The first time step whose weight falls below half of the largest weight."""
    below = torch.nonzero(weights < 0.5 * weights.max()).flatten()
    return int(below[0]) if len(below) else len(weights)


def class_distance(latents: torch.Tensor, labels: torch.Tensor, *, quantile: float = 0.001) -> float:
    """The fine-grained distance d between classes, estimated from the few shots (the official recipe).

    For every spatial position, the squared difference (summed over channels) between every pair of
    images of *different* classes; its ``quantile`` over the pairs (the 0.1th percentile in the official
    code) keeps the closest pairs; summed over positions, square-rooted.

    Args:
        latents: (N, C, H, W) the shots in model space.
        labels: (N,) class indices; at least two classes.
    """
    labels = torch.as_tensor(labels)
    if latents.ndim != 4 or labels.shape != (len(latents),):
        raise ValueError(
            f"latents must be (N, C, H, W) with labels (N,), got {tuple(latents.shape)}, {tuple(labels.shape)}"
        )
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    first, second = torch.triu_indices(len(labels), len(labels), offset=1)
    different = labels[first] != labels[second]
    if not different.any():
        raise ValueError("labels: class_distance needs shots of at least two classes")
    first, second = first[different], second[different]
    squared = (latents[first].float() - latents[second].float()).pow(2).sum(dim=1).flatten(1)  # (pairs, H*W)
    return float(torch.quantile(squared, quantile, dim=0).sum().sqrt())


def timestep_grid(num_train_timesteps: int, num_timesteps: int) -> torch.Tensor:
    """Diffusion Classifier's evenly spaced grid: ``num_timesteps`` steps, half a spacing from 0."""
    if not isinstance(num_timesteps, int) or not 1 <= num_timesteps <= num_train_timesteps:
        raise ValueError(f"num_timesteps must be an integer in [1, {num_train_timesteps}], got {num_timesteps!r}")
    spacing = num_train_timesteps // num_timesteps
    return torch.arange(spacing // 2, num_train_timesteps, spacing)[:num_timesteps]


@dataclass(frozen=True)
class ClassifyConfig:
    """The evaluation schedule: nested grids and the classes kept after each stage (Diffusion Classifier).

    Stage s evaluates the grid of ``timesteps_per_stage[s]`` steps (nested: each size divides the last) on
    the classes still in the running, then keeps the ``keep_per_stage[s]`` best. One stage keeping one
    class is the unpruned rule. ``max_timestep`` (ours) spans the grids over [0, max_timestep) instead of
    every training step: the steps TiF's weights ignore need not be evaluated at all. A grid of n steps over
    [0, m) is the part below m of the grid of n * T / m steps over [0, T), so truncated runs can be replayed
    on errors measured on the full grid.
    """

    timesteps_per_stage: tuple[int, ...] = (20,)  # official FGVC: (20, 50, 100, 500)
    keep_per_stage: tuple[int, ...] = (1,)  # official FGVC: (20, 10, 5, 1)
    batch_size: int = 64  # UNet inputs per forward
    max_timestep: int | None = None  # None: the grid spans all training steps (official)

    def __post_init__(self) -> None:
        sizes, keep = tuple(self.timesteps_per_stage), tuple(self.keep_per_stage)
        if not sizes or len(sizes) != len(keep):
            raise ValueError(f"timesteps_per_stage {sizes} and keep_per_stage {keep} must be non-empty, same length")
        if any(not isinstance(s, int) or s < 1 for s in sizes) or list(sizes) != sorted(set(sizes)):
            raise ValueError(f"timesteps_per_stage must be increasing positive integers, got {sizes}")
        if any(sizes[-1] % s for s in sizes):
            raise ValueError(f"timesteps_per_stage: each size must divide the last ({sizes[-1]}), got {sizes}")
        if any(not isinstance(k, int) or k < 1 for k in keep) or list(keep) != sorted(keep, reverse=True):
            raise ValueError(f"keep_per_stage must be non-increasing positive integers, got {keep}")
        if keep[-1] != 1:
            raise ValueError(f"keep_per_stage must end with 1, got {keep}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_timestep is not None and (not isinstance(self.max_timestep, int) or self.max_timestep < sizes[-1]):
            raise ValueError(
                f"max_timestep must be None or an integer >= the largest grid ({sizes[-1]}), got {self.max_timestep!r}"
            )

    def stage_slots(self, num_train_timesteps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The full grid (G,) and, per stage, the indices into it of the steps that stage adds."""
        upper = num_train_timesteps
        if self.max_timestep is not None:
            if self.max_timestep > num_train_timesteps:
                raise ValueError(
                    f"max_timestep must be <= num_train_timesteps={num_train_timesteps}, got {self.max_timestep}"
                )
            upper = self.max_timestep
        grid = timestep_grid(upper, self.timesteps_per_stage[-1])
        seen = torch.zeros(len(grid), dtype=torch.bool)
        stages = []
        for size in self.timesteps_per_stage:
            stride = len(grid) // size
            slots = torch.arange(stride // 2, len(grid), stride)[:size]
            stages.append(slots[~seen[slots]])
            seen[slots] = True
        return grid, stages


@dataclass(frozen=True)
class ClassCondition:
    """How the UNet is conditioned for one class: its text states and its adapter (None: the base model)."""

    name: str
    prompt_embeds: torch.Tensor  # (1, L, D)
    adapter_name: str | None = None


@dataclass
class ClassificationResult:
    """Per test image: the prediction, the scores, the per-step errors, and what it cost.

    Attributes:
        predictions: int64 (N,) index of the class with the lowest weighted error.
        scores: (N, K) weighted mean error over the steps each class was evaluated on (inf: pruned
            before the last stage).
        errors: (N, K, G) mean squared noise-prediction error per grid step (NaN where not evaluated).
        timesteps: (G,) the grid.
        unet_calls: int64 (N,) UNet evaluations (one per image, step and class).
        seconds: (N,) wall time per image.
        class_names: the K classes.
    """

    predictions: torch.Tensor
    scores: torch.Tensor
    errors: torch.Tensor
    timesteps: torch.Tensor
    unet_calls: torch.Tensor
    seconds: torch.Tensor
    class_names: tuple[str, ...]


def _validate_images(unet: torch.nn.Module, latents: torch.Tensor) -> None:
    expected = unet.config.in_channels
    if latents.ndim != 4 or latents.shape[1] != expected:
        raise ValueError(f"images must be (N, {expected}, H, W) in model space, got shape {tuple(latents.shape)}")


@torch.no_grad()
def noise_prediction_errors(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    condition: ClassCondition,
    *,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """``|| eps - eps_theta,c(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2`` (mean over pixels) per step.

    All steps of one class go through the UNet together (in chunks of ``batch_size``).

    Args:
        latents: (C, H, W) one image in model space.
        timesteps: (n,) int steps in [0, num_train_timesteps).
        noise: (n, C, H, W) one noise per step (the same for every class: the paired comparison).
        condition: the class's text states and adapter.
        added_cond_kwargs: SDXL's extra conditioning, batch 1 (repeated here).

    Returns:
        float32 (n,) errors.
    """
    num_train_timesteps = scheduler.config.num_train_timesteps
    timesteps = torch.as_tensor(timesteps, dtype=torch.long)
    if len(timesteps) and (timesteps.min() < 0 or timesteps.max() >= num_train_timesteps):
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}), got {timesteps.tolist()}")
    if noise.shape != (len(timesteps), *latents.shape):
        raise ValueError(f"noise must have shape {(len(timesteps), *latents.shape)}, got {tuple(noise.shape)}")
    if condition.adapter_name is not None and condition.adapter_name not in adapter_names(unet):
        raise ValueError(
            f"adapter_name {condition.adapter_name!r} of class {condition.name!r} is not attached to the unet; "
            f"attached: {adapter_names(unet)}"
        )
    if adapter_names(unet) or condition.adapter_name is not None:
        use_adapter(unet, condition.adapter_name)
    device, dtype = unet.device, unet.dtype
    errors = []
    for start in range(0, len(timesteps), batch_size):
        t = timesteps[start : start + batch_size].to(device)
        eps = noise[start : start + batch_size].to(device, torch.float32)
        clean = latents[None].to(device, torch.float32).expand_as(eps)
        noisy = scheduler.add_noise(clean, eps, t)
        states = condition.prompt_embeds.to(device, dtype).expand(len(t), -1, -1)
        extra = {}
        if added_cond_kwargs is not None:
            extra["added_cond_kwargs"] = {
                k: v.to(device, dtype).expand(len(t), *v.shape[1:]) for k, v in added_cond_kwargs.items()
            }
        prediction = unet(noisy.to(dtype), t, encoder_hidden_states=states, **extra).sample.float()
        errors.append((prediction - eps).pow(2).flatten(1).mean(dim=1).cpu())
    return torch.cat(errors) if errors else torch.zeros(0)


def select_classes(
    errors: torch.Tensor, weights_at_grid: torch.Tensor, remaining: Sequence[int], keep: int
) -> tuple[list[int], torch.Tensor]:
    """Keep the ``keep`` classes of ``remaining`` with the lowest weighted mean error.

    Args:
        errors: (K, G) errors with NaN where not evaluated.
        weights_at_grid: (G,) the weight of each grid step.

    Returns:
        The kept class indices (best first) and the (K,) scores (inf for classes not in ``remaining``).
    """
    scores = torch.full((errors.shape[0],), math.inf, dtype=torch.float64)
    for k in remaining:
        evaluated = ~torch.isnan(errors[k])
        scores[k] = (errors[k, evaluated].double() * weights_at_grid[evaluated].double()).mean()
    order = sorted(remaining, key=lambda k: (float(scores[k]), k))
    return order[:keep], scores


def grid_indices(grid: torch.Tensor, sub_grid: torch.Tensor) -> torch.Tensor:
    """Positions in ``grid`` of every step of ``sub_grid`` (each must be on ``grid``)."""
    position = {int(t): i for i, t in enumerate(grid)}
    missing = [int(t) for t in sub_grid if int(t) not in position]
    if missing:
        raise ValueError(f"sub_grid: steps {missing} are not on the grid {grid.tolist()}")
    return torch.tensor([position[int(t)] for t in sub_grid], dtype=torch.long)


def simulate_pruning(
    errors: torch.Tensor, weights_at_grid: torch.Tensor, config: ClassifyConfig, num_train_timesteps: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay :func:`classify`'s pruning on errors measured at the full grid (shared noise makes them equal).

    Args:
        errors: (N, K, G) errors at the grid of ``config`` (NaN allowed only where pruning never looks);
            :func:`grid_indices` picks them out of errors measured on a larger grid.

    Returns:
        predictions (N,) and UNet calls (N,) the pruned run would have made.
    """
    _, stages = config.stage_slots(num_train_timesteps)
    predictions, calls = [], []
    for image_errors in errors:
        remaining = list(range(image_errors.shape[0]))
        seen = torch.full_like(image_errors, math.nan)
        count = 0
        for slots, keep in zip(stages, config.keep_per_stage, strict=True):
            for k in remaining:
                seen[k, slots] = image_errors[k, slots]
            count += len(remaining) * len(slots)
            remaining, _ = select_classes(seen, weights_at_grid, remaining, min(keep, len(remaining)))
        predictions.append(remaining[0])
        calls.append(count)
    return torch.tensor(predictions), torch.tensor(calls)


def classify(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    conditions: Sequence[ClassCondition],
    weights: torch.Tensor,
    *,
    config: ClassifyConfig = ClassifyConfig(),
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> ClassificationResult:
    """Classify images by the class whose conditioning denoises them best (TiF and Diffusion Classifier).

    For each image one noise per grid step is drawn and shared by every class; each class's errors over
    the steps of a stage come from one batched UNet pass; after each stage only the ``keep`` best classes
    (by the weighted mean error so far) stay in the running.

    Args:
        latents: (N, C, H, W) images in model space (pixels in [-1, 1] for the toy, VAE latents for SD).
        conditions: one per class (TiF: shared prompt, one adapter each; Diffusion Classifier: class
            prompts, no adapter).
        weights: (num_train_timesteps,) weight per step (:func:`timestep_weights`).
        config: grid, pruning and batch size.
        generator: seeds the noise (ignored if ``noise`` is given).
        noise: (N, G, C, H, W) noise to use instead of drawing it.
        added_cond_kwargs: SDXL's extra conditioning (batch 1), passed to every call.
    """
    num_train_timesteps = scheduler.config.num_train_timesteps
    _validate_images(unet, latents)
    if not conditions:
        raise ValueError("conditions must name at least one class")
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError(f"conditions: class names must be distinct, got {names}")
    if weights.shape != (num_train_timesteps,):
        raise ValueError(f"weights must have shape ({num_train_timesteps},), got {tuple(weights.shape)}")
    grid, stages = config.stage_slots(num_train_timesteps)
    shape = (len(latents), len(grid), *latents.shape[1:])
    if noise is None:
        noise = torch.randn(shape, generator=generator)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    weights_at_grid = weights[grid]
    num_classes = len(conditions)
    errors = torch.full((len(latents), num_classes, len(grid)), math.nan)
    scores = torch.zeros(len(latents), num_classes, dtype=torch.float64)
    predictions, calls, seconds = [], [], []
    for i in tqdm(range(len(latents)), desc="classify", disable=not progress, leave=False):
        start, count = time.perf_counter(), 0
        remaining = list(range(num_classes))
        for slots, keep in zip(stages, config.keep_per_stage, strict=True):
            for k in remaining:
                errors[i, k, slots] = noise_prediction_errors(
                    unet,
                    scheduler,
                    latents[i],
                    grid[slots],
                    noise[i, slots],
                    conditions[k],
                    added_cond_kwargs=added_cond_kwargs,
                    batch_size=config.batch_size,
                )
                count += len(slots)
            remaining, scores[i] = select_classes(errors[i], weights_at_grid, remaining, min(keep, len(remaining)))
        predictions.append(remaining[0])
        calls.append(count)
        seconds.append(time.perf_counter() - start)
    return ClassificationResult(
        predictions=torch.tensor(predictions),
        scores=scores,
        errors=errors,
        timesteps=grid,
        unet_calls=torch.tensor(calls),
        seconds=torch.tensor(seconds),
        class_names=tuple(names),
    )
