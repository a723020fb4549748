"""The zoo's diffusion training loop: epsilon prediction on fresh toy-world batches.

One loop trains both zoo diffusion models (text-conditioned and unconditional). Later papers extend it
rather than copy it: ``extra_losses`` maps a name to a callable that sees the step's tensors
(:class:`DiffusionStep`) and returns a scalar added to the denoising loss, which is how SADM adds its
adversarial structure term. ``objective`` replaces the denoising target itself (what the model sees and
what it must output): :func:`epsilon_objective` is the default, :func:`offset_noise_objective` is the
offset-noise variant, :func:`conditional_mean_objective` regresses x_0 from pure noise (SingDiffusion's
module), and a paper module may pass its own. ``encode_images`` maps the batch's images to the model's
space (a VAE's latents for Stable Diffusion). Runs resume from a safetensors training state; the weights
that ship are an exponential moving average (EMA) of the trained ones.

Three further hooks, for methods that train more than the denoiser:

- ``auxiliary``: name -> :class:`AuxiliaryModel`, a second model with its own optimiser (an adversarial
  critic) whose ``update`` runs once per step, *after* the denoiser's optimiser step, on the same step's
  tensors. Its weights and optimiser moments go into the training state, so a resumed run equals an
  unbroken one.
- ``model_kwargs``: batch -> extra keyword arguments of the model call (a DiT's ``class_labels``).
- ``callback``: called after every step with the step and its logged values (a live loss plot).

A non-finite loss stops the run with :class:`FloatingPointError`; the state file keeps the last good
checkpoint.

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

__all__ = [
    "EMA",
    "AuxiliaryModel",
    "DiffusionStep",
    "DiffusionTrainConfig",
    "Objective",
    "conditional_mean_objective",
    "epsilon_objective",
    "offset_noise_objective",
    "train_diffusion",
    "warmup_cosine",
]


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
    bf16_autocast: bool = True  # 1.4-1.8x faster on CPUs with bf16 support when linear layers or wide heads dominate

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
    target: torch.Tensor | None = None  # what model_output regresses to (eps, unless an objective changes it)


LossTerm = Callable[[DiffusionStep], torch.Tensor]


@dataclass
class AuxiliaryModel:
    """A second model trained alongside the denoiser, with its own optimiser (e.g. an adversarial critic).

    Attributes:
        module: the model; its ``state_dict`` is saved in the training state.
        optimizer: its optimiser; the per-parameter moments are saved too (hyper-parameters come from the
            constructor on resume, as for the denoiser's learning-rate schedule).
        update: called once per step after the denoiser's optimiser step with that step's
            :class:`DiffusionStep` (``model_output`` still carries the denoiser's graph: detach what the
            update must not differentiate through). It takes its own optimiser step and returns the values to
            log (name -> float).
    """

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    update: Callable[[DiffusionStep], Mapping[str, float]]


class _OptimizerTensors(torch.nn.Module):
    """An optimiser's per-parameter state as a module ``state_dict``, so a training state can carry it."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        super().__init__()
        self.optimizer = optimizer

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        state = self.optimizer.state_dict()["state"]
        return {f"{pid}.{key}": torch.as_tensor(value) for pid, entry in state.items() for key, value in entry.items()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            param_id, name = key.split(".", 1)
            state.setdefault(int(param_id), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})


# (clean x_0, noise eps, timesteps t, generator) -> (model input, model timesteps, regression target).
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, ...]]


def epsilon_objective(noise_scheduler: SchedulerMixin) -> Objective:
    """The denoising objective (DDPM, eq. 14): input ``x_t = add_noise(x_0, eps, t)``, target ``eps``."""

    def objective(clean, noise, timesteps, generator):
        return noise_scheduler.add_noise(clean, noise, timesteps), timesteps, noise

    return objective


def offset_noise_objective(noise_scheduler: SchedulerMixin, offset: float = 0.1) -> Objective:
    """Offset noise (Guttenberg, "Diffusion with Offset Noise", 2023): ``eps + offset * N(0, 1)`` per (B, C, 1, 1).

    The shared per-channel offset lets the model learn to change an image's mean brightness, which plain
    i.i.d. noise at Stable Diffusion's terminal SNR barely allows. ``offset`` 0.1 is the blog's value.
    """
    if not offset >= 0:
        raise ValueError(f"offset must be >= 0, got {offset}")

    def objective(clean, noise, timesteps, generator):
        shift = torch.randn((*clean.shape[:2], 1, 1), generator=generator)
        noise = noise + offset * shift
        return noise_scheduler.add_noise(clean, noise, timesteps), timesteps, noise

    return objective


def conditional_mean_objective(timestep: int = 1) -> Objective:
    """Regress x_0 from pure noise at a constant placeholder ``timestep``: the optimum is E[x_0 | c].

    This is the t = T limit of x_0 prediction, where x_T carries no information about x_0. SingDiffusion
    (Zhang et al., "Tackling the Singularities at the Endpoints of Time Intervals in Diffusion Models",
    CVPR 2024, arXiv 2403.08381) trains its first-step module this way; its code passes t = 1.
    """

    def objective(clean, noise, timesteps, generator):
        return noise, torch.full_like(timesteps, timestep), clean

    return objective


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
    objective: Objective | None = None,
    encode_images: Callable[[np.ndarray], torch.Tensor] | None = None,
    auxiliary: Mapping[str, AuxiliaryModel] | None = None,
    model_kwargs: Callable[[ToyBatch], Mapping[str, torch.Tensor]] | None = None,
    callback: Callable[[int, Mapping[str, float]], None] | None = None,
) -> torch.nn.Module:
    """Train ``unet`` in place; return its EMA copy (the weights to ship).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (with ``encode_prompts``) or ``UNet2DModel``.
        noise_scheduler: gives the training schedule (``alphas_cumprod``, ``add_noise``).
        world: the toy world the batches come from (or any object with the same
            ``sample(n, rng, caption_dropout=...)`` returning a batch with ``images`` and ``captions``).
        config: hyper-parameters (the seed included).
        state_path: safetensors file for periodic training state; an existing one is resumed.
        encode_prompts: captions -> encoder hidden states (B, L, D); None for an unconditional model.
        extra_losses: name -> term added to the loss (e.g. SADM's structure discriminator).
        description: progress-bar label.
        objective: what the model sees and must output (default :func:`epsilon_objective`); the loss is
            the MSE between the model's output and the objective's target.
        encode_images: images (B, 3, H, W) in [0, 1] -> model space (default: pixels in [-1, 1]).
        auxiliary: name -> :class:`AuxiliaryModel` trained alongside (its ``update`` runs after each
            denoiser step; its weights and optimiser moments are checkpointed as ``aux.NAME``).
        model_kwargs: batch -> extra keyword arguments of the model call, e.g. ``class_labels`` for a
            ``DiTTransformer2DModel``.
        callback: called after every step with ``(step, logs)``; ``logs`` holds ``"mse"``, each extra loss
            and each auxiliary update's values.

    Raises:
        FloatingPointError: the loss (or an auxiliary update's value) is NaN or infinite; the run stops
            before that step's update and the state file keeps the last checkpoint.
    """
    objective = objective or epsilon_objective(noise_scheduler)
    extra_losses = dict(extra_losses or {})
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.steps))
    rng = np.random.default_rng(config.seed)
    noise_generator = torch.Generator().manual_seed(config.seed)
    ema = EMA(unet, config.ema_decay)
    auxiliary = dict(auxiliary or {})
    saved_modules: dict[str, torch.nn.Module] = {"ema": ema.model}
    for name, model in auxiliary.items():
        saved_modules[f"aux.{name}"] = model.module
        saved_modules[f"aux_optimizer.{name}"] = _OptimizerTensors(model.optimizer)
    start = checkpoint.load_training_state(state_path, unet, optimizer, schedule, rng, extra_modules=saved_modules)
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
        if encode_images is None:
            clean = torch.from_numpy(to_model_space(batch.images))
        else:
            with torch.no_grad():
                clean = encode_images(batch.images).float()
        noise_generator.manual_seed(config.seed * 1_000_003 + step)
        noise = torch.randn(clean.shape, generator=noise_generator)
        timesteps = torch.randint(0, num_train_timesteps, (len(clean),), generator=noise_generator)
        noisy, timesteps, target = objective(clean, noise, timesteps, noise_generator)
        hidden_states = None
        if encode_prompts is not None:
            drop = torch.rand(len(clean), generator=noise_generator) < config.prompt_dropout
            prompts = ["" if d else c for c, d in zip(batch.captions, drop.tolist(), strict=True)]
            with torch.no_grad():
                hidden_states = encode_prompts(prompts)
        kwargs = {} if model_kwargs is None else dict(model_kwargs(batch))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16_autocast and clean.device.type == "cpu"):
            if hidden_states is None:
                output = unet(noisy, timesteps, **kwargs).sample
            else:
                output = unet(noisy, timesteps, encoder_hidden_states=hidden_states, **kwargs).sample
        output = output.float()
        loss = F.mse_loss(output, target)
        logs = {"mse": loss.item()}
        info = DiffusionStep(step, unet, clean, noise, noisy, timesteps, output, hidden_states, batch, target)
        for name, term in extra_losses.items():
            value = term(info)
            logs[name] = value.item()
            loss = loss + value
        _check_finite(step, loss.item(), logs, state_path)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.update(unet)
        for name, model in auxiliary.items():
            values = {f"{name}.{key}": float(value) for key, value in model.update(info).items()}
            _check_finite(step, sum(values.values()), values, state_path)
            logs.update(values)
        progress.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
        if callback is not None:
            callback(step, logs)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            checkpoint.save_training_state(
                state_path,
                unet,
                optimizer,
                schedule,
                rng,
                step + 1,
                extra_modules=saved_modules,
                segments=segments,
            )
    unet.eval()
    return ema.model


def _check_finite(step: int, total: float, logs: Mapping[str, float], state_path: str | Path) -> None:
    if not math.isfinite(total):
        raise FloatingPointError(
            f"training stopped at step {step}: non-finite loss {total} (terms {dict(logs)}); the last good "
            f"checkpoint is {state_path} (if one was written). Lower the learning rate or the extra terms' weights."
        )


def config_record(config: DiffusionTrainConfig) -> dict:
    """The config as a plain dict for ``training.json``."""
    return asdict(config)
