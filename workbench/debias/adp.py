"""The Attribute Distribution Predictor (ADP): one small head per sampling step, h -> attribute probabilities.

Balancing Act (Parihar et al., CVPR 2024, arXiv 2402.18206) trains, for every step index of a
fixed sampling schedule, a classifier from h (the ``mid_block`` output at that step) to the attribute; the
official code's heads are linear on the flattened h. The batch's distribution is the mean of the
per-sample softmax outputs, which is what distribution guidance steers.

The training data here are h collected along the sampler's own trajectories: generated samples (labelled
by their final image) and real images run backwards by deterministic DDIM inversion (Song et al., ICLR
2021, eq. 12 solved for x_t given x_{t-1}), as the official pipeline does. Heads remember which UNet
(:func:`unet_fingerprint`), scheduler class and timesteps they were trained for and refuse any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from tqdm.auto import tqdm, trange

from workbench.debias.hspace import record_hspace
from workbench.sampling import denoise, initial_noise, set_timesteps

__all__ = [
    "HEADS",
    "ADPTrainConfig",
    "AttributeDistributionPredictor",
    "check_compatible",
    "collect_generated",
    "collect_inverted",
    "per_step_accuracy",
    "train_adp",
    "train_prompt_adp",
    "unet_fingerprint",
]

logger = logging.getLogger(__name__)

HEADS = ("linear", "mean", "pooled", "mlp")


class _MeanMaxPool(torch.nn.Module):
    """(B, C, H, W) -> (B, 2C): the spatial mean and maximum of every channel."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)


class AttributeDistributionPredictor(ModelMixin, ConfigMixin):
    """Per-step heads from h (B, C, H, W) to logits over ``values`` (B, K); saves as safetensors + config.json.

    Args:
        attribute: the attribute's name (e.g. "shape").
        values: its K >= 2 class names, in logit order.
        h_shape: (C, H, W) of the h the heads read.
        timesteps: the sampler's timesteps, one head each, in sampling order.
        head: "linear" on the flattened h (the official code, made for aligned faces); "mean" (linear on
            each channel's spatial mean) and "pooled" (on its mean and maximum), position-free heads for
            objects that move; or "mlp" (one hidden layer on the flattened h, the paper's wording).
        hidden_size: width of the MLP's hidden layer.
        unet_fingerprint, scheduler_class, num_inference_steps: what the heads were trained for.
    """

    @register_to_config
    def __init__(
        self,
        attribute: str = "shape",
        values: Sequence[str] = ("circle", "square"),
        h_shape: Sequence[int] = (64, 8, 8),
        timesteps: Sequence[int] = (999,),
        head: str = "linear",
        hidden_size: int = 64,
        unet_fingerprint: str = "",
        scheduler_class: str = "",
        num_inference_steps: int = 1,
    ):
        super().__init__()
        if len(values) < 2 or len(set(values)) != len(values):
            raise ValueError(f"values must be two or more distinct class names, got {list(values)}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if len(timesteps) < 1 or len(set(timesteps)) != len(timesteps):
            raise ValueError(f"timesteps must be distinct integers, got {list(timesteps)}")
        features = math.prod(h_shape)
        classes = len(values)

        def make_head() -> torch.nn.Module:
            if head == "linear":
                return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(features, classes))
            if head == "mean":
                return torch.nn.Sequential(
                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(h_shape[0], classes)
                )
            if head == "pooled":
                return torch.nn.Sequential(_MeanMaxPool(), torch.nn.Linear(2 * h_shape[0], classes))
            return torch.nn.Sequential(
                torch.nn.Flatten(),
                torch.nn.Linear(features, hidden_size),
                torch.nn.SiLU(),
                torch.nn.Linear(hidden_size, classes),
            )

        self.heads = torch.nn.ModuleList(make_head() for _ in timesteps)
        self._index = {int(t): i for i, t in enumerate(timesteps)}

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(self.config.values)

    def step_index(self, timestep: int) -> int:
        """The head for ``timestep``; a timestep the heads were not trained for is a ValueError."""
        if int(timestep) not in self._index:
            cfg = self.config
            raise ValueError(
                f"timestep {timestep}: the {cfg.attribute!r} ADP was trained for {cfg.scheduler_class} with "
                f"num_inference_steps={cfg.num_inference_steps}, timesteps {list(cfg.timesteps)}; sample with "
                "that scheduler and step count, or train heads for this schedule"
            )
        return self._index[int(timestep)]

    def forward(self, h: torch.Tensor, timestep: int) -> torch.Tensor:
        """Logits (B, K) of h (B, C, H, W) at ``timestep``."""
        if tuple(h.shape[1:]) != tuple(self.config.h_shape):
            raise ValueError(f"h must be (B, {', '.join(map(str, self.config.h_shape))}), got {tuple(h.shape)}")
        head = self.heads[self.step_index(timestep)]
        return head(h.to(head[-1].weight.dtype))


def unet_fingerprint(unet: torch.nn.Module) -> str:
    """A short hash of the UNet's config and weights (the first 256 values of every tensor, in fp16).

    Cheap even for Stable Diffusion's UNet, and exact across fp32/fp16 copies of the same fp16 checkpoint.
    """
    digest = hashlib.sha256()
    config = {k: v for k, v in dict(getattr(unet, "config", {})).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in unet.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().flatten()[:256].to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_compatible(
    adps: Sequence[AttributeDistributionPredictor],
    unet: torch.nn.Module,
    scheduler: SchedulerMixin | None = None,
    *,
    num_inference_steps: int | None = None,
) -> None:
    """Raise a ValueError naming the mismatch when ``adps`` were trained for another UNet or schedule."""
    fingerprint = unet_fingerprint(unet)
    for adp in adps:
        cfg = adp.config
        if cfg.unet_fingerprint != fingerprint:
            raise ValueError(
                f"adps: the {cfg.attribute!r} heads were trained for UNet {cfg.unet_fingerprint}, this unet is "
                f"{fingerprint}; train heads for it (python -m workbench debias train-adp)"
            )
        if scheduler is not None and type(scheduler).__name__ != cfg.scheduler_class:
            raise ValueError(
                f"scheduler: the {cfg.attribute!r} heads were trained for {cfg.scheduler_class}, "
                f"got {type(scheduler).__name__}"
            )
        if num_inference_steps is not None and num_inference_steps != cfg.num_inference_steps:
            raise ValueError(
                f"num_inference_steps: the {cfg.attribute!r} heads were trained for {cfg.num_inference_steps} "
                f"steps, got {num_inference_steps}"
            )


@torch.no_grad()
def collect_generated(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    num_images: int,
    *,
    num_inference_steps: int,
    generator: torch.Generator,
    batch_size: int = 128,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Sample an unconditional pixel UNet and keep h at every step.

    Returns:
        h: float16 (N, S, C, H, W), one row per step in sampling order; images: (N, 3, H, W) in [0, 1];
        the S timesteps.
    """
    size, channels = unet.config.sample_size, unet.config.in_channels
    hs, images, timesteps = [], [], []
    for start in tqdm(range(0, num_images, batch_size), desc="h along samples", disable=not progress):
        noise = initial_noise((min(batch_size, num_images - start), channels, size, size), generator)
        with record_hspace(unet) as record:
            x = denoise(unet, scheduler, noise, num_inference_steps=num_inference_steps, progress=False)
        hs.append(record.stacked(dtype=torch.float16))
        images.append(((x + 1) / 2).clamp(0, 1))
        timesteps = record.timesteps
    return torch.cat(hs), torch.cat(images), timesteps


@torch.no_grad()
def collect_inverted(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    images: torch.Tensor | np.ndarray,
    *,
    num_inference_steps: int,
    batch_size: int = 128,
    progress: bool = True,
) -> tuple[torch.Tensor, list[int]]:
    """DDIM-invert images (N, 3, H, W) in [0, 1] through the sampler's own timesteps and keep h at each.

    The inversion visits exactly the timesteps ``scheduler`` samples at with ``num_inference_steps`` (so each
    head sees h at its own t): from x_0, the UNet at t = 0 gives the first noise estimate, then each
    deterministic DDIM step ``x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps`` moves up to the next timestep,
    where the UNet is called again (and h recorded).

    Returns:
        h: float16 (N, S, C, H, W) in sampling order (descending t); the S timesteps.
    """
    timesteps = [int(t) for t in set_timesteps(scheduler, num_inference_steps=num_inference_steps)]
    ascending = sorted(timesteps)
    alphas = scheduler.alphas_cumprod.double()
    images = torch.as_tensor(images, dtype=torch.float32)
    hs = []
    for chunk in tqdm(images.split(batch_size), desc="DDIM inversion", disable=not progress):
        x = (chunk * 2 - 1).double()
        with record_hspace(unet) as record:
            previous = 0
            eps = unet(x.float(), previous).sample.double()
            for t in ascending:
                x0 = (x - (1 - alphas[previous]).sqrt() * eps) / alphas[previous].sqrt()
                x = alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * eps
                eps = unet(x.float(), t).sample.double()
                previous = t
        steps = record.stacked(dtype=torch.float16)[:, 1:]  # drop the call at t = 0
        hs.append(steps.flip(1))  # ascending -> sampling order
    return torch.cat(hs), timesteps


@dataclass(frozen=True)
class ADPTrainConfig:
    """How the per-step heads are trained (the official training script is not released)."""

    head: Literal["linear", "mean", "pooled", "mlp"] = "linear"  # official code: linear heads
    hidden_size: int = 64  # MLP only
    epochs: int = 100
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    validation_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        for name in ("hidden_size", "epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")


def train_adp(
    h: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    *,
    attribute: str,
    values: Sequence[str],
    timesteps: Sequence[int],
    unet_fingerprint: str,
    scheduler_class: str,
    generator: torch.Generator,
    config: ADPTrainConfig | None = None,
    progress: bool = True,
) -> tuple[AttributeDistributionPredictor, np.ndarray]:
    """Train one head per step with cross-entropy on h (N, S, C, H, W) and labels (N,) in [0, K).

    A random ``config.validation_fraction`` of the images (all their steps) is held out.

    Returns:
        the predictor (eval mode) and the held-out indices (for per-step accuracy).
    """
    config = config or ADPTrainConfig()
    labels = torch.as_tensor(labels, dtype=torch.long)
    if h.ndim != 5 or h.shape[1] != len(timesteps):
        raise ValueError(
            f"h must be (N, {len(timesteps)}, C, H, W) for {len(timesteps)} timesteps, got {tuple(h.shape)}"
        )
    if labels.shape != (h.shape[0],) or labels.min() < 0 or labels.max() >= len(values):
        raise ValueError(
            f"labels must be {h.shape[0]} class indices in [0, {len(values)}), got shape {tuple(labels.shape)}"
        )
    adp = AttributeDistributionPredictor(
        attribute=attribute,
        values=list(values),
        h_shape=list(h.shape[2:]),
        timesteps=[int(t) for t in timesteps],
        head=config.head,
        hidden_size=config.hidden_size,
        unet_fingerprint=unet_fingerprint,
        scheduler_class=scheduler_class,
        num_inference_steps=len(timesteps),
    )
    _initialise(adp, generator)
    order = torch.randperm(len(labels), generator=generator)
    held_out = order[: max(1, round(config.validation_fraction * len(labels)))]
    train = order[len(held_out) :]
    optimizer = torch.optim.AdamW(adp.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    adp.train()
    for _ in trange(config.epochs, desc=f"ADP {attribute}", disable=not progress, leave=False):
        for batch in train[torch.randperm(len(train), generator=generator)].split(config.batch_size):
            features, target = h[batch].float(), labels[batch]
            loss = sum(
                torch.nn.functional.cross_entropy(head(features[:, s]), target) for s, head in enumerate(adp.heads)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return adp.eval(), held_out.numpy()


def train_prompt_adp(
    pipe,
    attribute: str,
    prompts: Mapping[str, str],
    *,
    num_images_per_class: int,
    num_inference_steps: int,
    generator: torch.Generator,
    guidance_scale: float = 7.5,
    batch_size: int = 4,
    config: ADPTrainConfig | None = None,
    progress: bool = True,
    **pipe_kwargs,
) -> tuple[AttributeDistributionPredictor, np.ndarray]:
    """Heads for a text-to-image pipeline, labelled by the prompt (the paper's Stable Diffusion recipe:
    images generated from "a photo of a male" / "a photo of a female", h kept along their trajectories).

    Runs ``pipe(prompt, ...)`` unchanged with h recorded; under classifier-free guidance the UNet batch is
    [unconditional; conditional] and the conditional half's h is kept.

    Args:
        prompts: class name -> the prompt that produces it (two or more).
        pipe_kwargs: passed to every pipeline call (e.g. ``height``, ``width``, ``output_type="latent"`` to
            skip Stable Diffusion's VAE decoding).

    Returns:
        the predictor and its held-out indices, as :func:`train_adp`.
    """
    if len(prompts) < 2:
        raise ValueError(f"prompts must map two or more class names to prompts, got {dict(prompts)}")
    if num_images_per_class < 2:
        raise ValueError(f"num_images_per_class must be >= 2, got {num_images_per_class}")
    hs, labels, timesteps = [], [], []
    guided = guidance_scale > 1
    jobs = [(label, start) for label in range(len(prompts)) for start in range(0, num_images_per_class, batch_size)]
    for label, start in tqdm(jobs, desc="h along prompted samples", disable=not progress):
        count = min(batch_size, num_images_per_class - start)
        with record_hspace(pipe.unet) as record:
            pipe(
                list(prompts.values())[label],
                num_images_per_prompt=count,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                **pipe_kwargs,
            )
        h = record.stacked(dtype=torch.float16)
        hs.append(h[count:] if guided else h)
        labels += [label] * count
        timesteps = record.timesteps
    return train_adp(
        torch.cat(hs),
        torch.tensor(labels),
        attribute=attribute,
        values=list(prompts),
        timesteps=timesteps,
        unet_fingerprint=unet_fingerprint(pipe.unet),
        scheduler_class=type(pipe.scheduler).__name__,
        generator=generator,
        config=config,
        progress=progress,
    )


@torch.no_grad()
def _initialise(adp: AttributeDistributionPredictor, generator: torch.Generator) -> None:
    """torch.nn.Linear's default uniform initialisation, drawn from ``generator``."""
    for module in adp.modules():
        if isinstance(module, torch.nn.Linear):
            bound = 1 / math.sqrt(module.in_features)
            module.weight.uniform_(-bound, bound, generator=generator)
            module.bias.uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def per_step_accuracy(
    adp: AttributeDistributionPredictor, h: torch.Tensor, labels: torch.Tensor | np.ndarray
) -> np.ndarray:
    """Accuracy of each step's head on h (N, S, C, H, W) against labels (N,): an (S,) array."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    return np.array(
        [
            float((adp(h[:, s].float(), t).argmax(1) == labels).float().mean())
            for s, t in enumerate(adp.config.timesteps)
        ]
    )
