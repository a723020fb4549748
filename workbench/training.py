"""The zoo's diffusion training loop: epsilon prediction on fresh toy-world batches.

One loop trains both zoo diffusion models (text-conditioned and unconditional). Later papers extend it
rather than copy it: ``extra_losses`` maps a name to a callable that sees the step's tensors
(:class:`DiffusionStep`) and returns a scalar added to the denoising loss, which is how SADM adds its
adversarial structure term. Runs resume from a safetensors training state; the weights that ship are
an exponential moving average (EMA) of the trained ones.

Loss (DDPM, Ho et al. 2020, eq. 14): ``|| eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t, c) ||^2``
with ``t`` uniform over the 1000 training steps and, for the text model, ``c`` replaced by the empty
prompt 10 % of the time so classifier-free guidance works at sampling time.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin
from tqdm.auto import trange

from workbench import checkpoint
from workbench.toyworld import ToyBatch, ToyWorld, to_model_space

__all__ = ["EMA", "DiffusionStep", "DiffusionTrainConfig", "train_diffusion", "warmup_cosine"]


@dataclass(frozen=True)
class DiffusionTrainConfig:
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1  # classifier-free guidance needs an unconditional model too
    caption_dropout: float = 0.3  # per attribute word: teaches partial prompts ("a red circle")
    checkpoint_every: int = 250
    seed: int = 0
    bf16_autocast: bool = True  # 1.4-1.8x on the CPU machines (ENVIRONMENT.md section 3)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("prompt_dropout", "caption_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


@dataclass
class DiffusionStep:
    """What an extra loss term sees at one training step (tensors in model space, [-1, 1])."""

    step: int
    unet: torch.nn.Module
    clean: torch.Tensor  # x_0, (B, C, H, W)
    noise: torch.Tensor  # eps
    noisy: torch.Tensor  # x_t
    timesteps: torch.Tensor  # (B,) int64
    model_output: torch.Tensor  # eps_theta(x_t, t, c), float32
    encoder_hidden_states: torch.Tensor | None
    batch: ToyBatch


LossTerm = Callable[[DiffusionStep], torch.Tensor]


class EMA:
    """Exponential moving average of a model's weights (with the usual warm-up of the decay)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - decay)


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.1) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train_diffusion(
    unet: torch.nn.Module,
    noise_scheduler: SchedulerMixin,
    world: ToyWorld,
    *,
    config: DiffusionTrainConfig,
    state_path: str | Path,
    encode_prompts: Callable[[list[str]], torch.Tensor] | None = None,
    extra_losses: Mapping[str, LossTerm] | None = None,
    description: str = "train",
) -> torch.nn.Module:
    """Train ``unet`` in place; return its EMA copy (the weights to ship).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (with ``encode_prompts``) or ``UNet2DModel``.
        noise_scheduler: gives the training schedule (``alphas_cumprod``, ``add_noise``).
        world: the toy world the batches come from.
        config: hyper-parameters (the seed included).
        state_path: safetensors file for periodic training state; an existing one is resumed.
        encode_prompts: captions -> encoder hidden states (B, L, D); None for an unconditional model.
        extra_losses: name -> term added to the loss (e.g. SADM's structure discriminator).
        description: progress-bar label.
    """
    extra_losses = dict(extra_losses or {})
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.steps))
    rng = np.random.default_rng(config.seed)
    noise_generator = torch.Generator().manual_seed(config.seed)
    ema = EMA(unet, config.ema_decay)
    start = checkpoint.load_training_state(state_path, unet, optimizer, schedule, rng, extra_modules={"ema": ema.model})
    segments = checkpoint.continue_segments(state_path, start, {"steps": config.steps})
    for group, base_lr in zip(optimizer.param_groups, schedule.base_lrs, strict=True):
        group["lr"] = base_lr * schedule.lr_lambdas[0](start)  # the current schedule's, not the file's
    ema.updates = start
    # The noise stream is re-seeded per step so a resumed run draws the same noise as an unbroken one.
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    unet.train()
    progress = trange(start, config.steps, initial=start, total=config.steps, desc=description)
    for step in progress:
        batch = world.sample(config.batch_size, rng, caption_dropout=config.caption_dropout)
        clean = torch.from_numpy(to_model_space(batch.images))
        noise_generator.manual_seed(config.seed * 1_000_003 + step)
        noise = torch.randn(clean.shape, generator=noise_generator)
        timesteps = torch.randint(0, num_train_timesteps, (len(clean),), generator=noise_generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        hidden_states = None
        if encode_prompts is not None:
            drop = torch.rand(len(clean), generator=noise_generator) < config.prompt_dropout
            prompts = ["" if d else c for c, d in zip(batch.captions, drop.tolist(), strict=True)]
            with torch.no_grad():
                hidden_states = encode_prompts(prompts)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16_autocast and clean.device.type == "cpu"):
            if hidden_states is None:
                output = unet(noisy, timesteps).sample
            else:
                output = unet(noisy, timesteps, encoder_hidden_states=hidden_states).sample
        output = output.float()
        loss = F.mse_loss(output, noise)
        logs = {"mse": loss.item()}
        if extra_losses:
            info = DiffusionStep(step, unet, clean, noise, noisy, timesteps, output, hidden_states, batch)
            for name, term in extra_losses.items():
                value = term(info)
                logs[name] = value.item()
                loss = loss + value
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.update(unet)
        progress.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            checkpoint.save_training_state(
                state_path,
                unet,
                optimizer,
                schedule,
                rng,
                step + 1,
                extra_modules={"ema": ema.model},
                segments=segments,
            )
    unet.eval()
    return ema.model


def config_record(config: DiffusionTrainConfig) -> dict:
    """The config as a plain dict for ``training.json``."""
    return asdict(config)
