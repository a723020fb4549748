"""SADM: structure-guided adversarial training of diffusion models.

Yang, Qian, Zhang, Liu, Cui, "Structure-Guided Adversarial Training of Diffusion Models", CVPR 2024,
arXiv 2402.17563. Plain training fits every sample on its own; SADM also asks the denoiser to reproduce
the *manifold structure* of a training mini-batch, its pairwise relations, measured in the feature space
of a *structure discriminator* (the critic) that is trained adversarially to make the real and the
generated structures as far apart as it can.

No code was released with the paper, and the formulas below are ours where the paper's text available to
us is silent (marked "our choice"). Symbols and code names:

==========================  ===================================  ==========================================
symbol                      meaning                              code
==========================  ===================================  ==========================================
x_0^i, i in B               the batch's clean data               ``DiffusionStep.clean``
x̂_0^i = x̂_θ(x_t^i, t^i)    the denoiser's one-step prediction   :func:`predicted_clean`
f_φ                         the critic's encoder                 :class:`StructureCritic`
S(X)_ij = <z_i, z_j>        relations, z = f_φ(x) / |f_φ(x)|     :func:`relation_matrix`
D_φ(X_0, X̂)                 structure distance                   :func:`structure_distance`
λ, w_s(t)                   weight and time window of the term   :class:`SADMConfig`
==========================  ===================================  ==========================================

The game (our form of the paper's min-max objective):

    D_φ(X_0, X̂) = 1 / (B (B - 1)) Σ_{i≠j} (S(X_0)_ij - S(X̂)_ij)^2
    critic:    max_φ D_φ(X_0, stopgrad X̂)
    denoiser:  min_θ L_denoise(θ) + λ(step) · D_φ(X_0, X̂_θ)   over the samples with t ≤ t_max

Our choices, and why:

- **Relation = cosine affinity, i ≠ j.** Bounded in [-1, 1], so the critic cannot win by inflating its
  features' scale, and the diagonal (always 1) carries nothing. ``relation="centred_cosine"`` subtracts
  the batch's mean feature first: with plain cosine, a component that every sample shares (the toy
  world's large uniform backgrounds) can align all features, so every relation is near 1 and the
  distance, with its gradient, vanishes.
- **Fakes = one-step predictions x̂_0 of the same batch**, so the comparison is paired (row i of both
  matrices is the same sample) and costs no sampling: the critic reuses the step's forward pass.
- **Time window t ≤ t_max (700 of 1000).** With an ε-prediction, x̂_0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t divides by
  √ᾱ_t, which is 0.068 at t = 999 on Stable Diffusion's schedule: near T the prediction is mostly amplified
  ε-error, and its structure says little about the model. Images' x̂_0 are clamped to the data range.
- **Critic:** a small convolutional encoder (images, latents) or MLP (points) with AdamW weight decay; it
  sees x_0-space tensors only, not t, so it works unchanged for any denoiser that predicts in that space.
- **Alternation:** one critic step after every denoiser step, on the same batch (the critic's update is an
  :class:`~workbench.training.AuxiliaryModel` of the zoo's loop); λ warms up linearly.

What we measured, and why the term hurts at toy scale (:mod:`workbench.sadm.experiment`; the figures are in
the ``sadm`` section of ``python -m workbench reproduce``):

- On a 2-D ring of Gaussians and on fine-tunes of a small image UNet, over three training seeds, the term
  never helped. Where its critic works, samples get worse (2-D: lower precision, fewer modes; images: a
  larger Frechet distance for the shipped 300-step pair, no clear difference over three training seeds at
  150 steps); plain training given SADM's wall-clock instead (a step costs more) is better still.
  Varying λ, the time window, the critic's width and the relation moves the outcome between "no
  difference" and "worse".
- The first reading: the fakes are one-step predictions, and the ε-MSE-optimal x̂_0 is the posterior mean
  E[x_0 | x_t], which spreads less than the x_0 it averages over (increasingly with t); a critic finds
  that shrinkage, and a denoiser pushed to undo it moves ε̂ off the score that sampling needs.
- The test: on the ring the posterior mean is known exactly, and ``reference=`` lets the game compare x̂_0
  with it instead of with x_0 (a perfect denoiser then owes the game nothing). The distance the critic
  found fell about sixteen-fold, but the harm stayed (precision still clearly below plain training's; no
  clear difference from the ordinary game). So the shrinkage is most of what the critic sees, not the main
  cause of the damage. What remains is the game itself: cosine relations are scale-free, so a critic can
  magnify arbitrarily small differences by shrinking its features (trained against predictions equal to
  the reference up to float32 rounding, it still reports a distance), and its gradient pushes ε̂ after the
  residual errors of an imperfect model. The paper's own fakes, relation and critic conditioning could not
  be read and may differ; a norm-constrained or t-conditioned critic is the next thing to try.

:func:`train_sadm` runs the zoo's loop (:func:`workbench.training.train_diffusion`) with the structure
term as an extra loss and the critic as an auxiliary model; with ``sadm=None`` it is plain training by the
same code, for comparisons at equal seed and budget. Any diffusers denoiser works (``UNet2DModel``,
``UNet2DConditionModel``, ``DiTTransformer2DModel`` via ``model_kwargs``), and so does any module whose
``forward(sample, timestep, ...)`` returns an object with ``.sample``
(:class:`workbench.sadm.toy2d.PointDenoiser`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin
from torch import nn

from workbench.toyworld import to_model_space
from workbench.training import AuxiliaryModel, DiffusionStep, DiffusionTrainConfig, train_diffusion

__all__ = [
    "Relation",
    "SADMConfig",
    "StructureCritic",
    "StructureGame",
    "critic_loss",
    "predicted_clean",
    "relation_matrix",
    "structure_distance",
    "train_sadm",
]


Relation = Literal["cosine", "centred_cosine"]


@dataclass(frozen=True)
class SADMConfig:
    """The structure game's settings (all our choices: the paper's values were not available to us).

    Attributes:
        structure_weight: λ, the weight of the structure term in the denoiser's loss (>= 0).
        weight_warmup_steps: λ rises linearly from 0 over this many steps (0: full weight at once).
        max_timestep: the term uses only the samples with t <= max_timestep (w_s(t) = 1 there, else 0).
        critic_width: channels (images) or hidden units (points) of the critic's encoder.
        feature_dim: dimension of the critic's features z.
        critic_learning_rate, critic_weight_decay: the critic's AdamW.
        clip_prediction: clamp x̂_0 to [-c, c] (images live in [-1, 1]); None leaves it unclamped.
        relation: ``"cosine"`` or ``"centred_cosine"`` (see :func:`relation_matrix`).
    """

    structure_weight: float = 0.05
    weight_warmup_steps: int = 50
    max_timestep: int = 700
    critic_width: int = 32
    feature_dim: int = 16
    critic_learning_rate: float = 1e-4
    critic_weight_decay: float = 1e-2
    clip_prediction: float | None = 1.0
    relation: Relation = "cosine"

    def __post_init__(self) -> None:
        if self.relation not in ("cosine", "centred_cosine"):
            raise ValueError(f"relation must be 'cosine' or 'centred_cosine', got {self.relation!r}")
        for name in ("structure_weight", "critic_weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(self.critic_learning_rate) and self.critic_learning_rate > 0):
            raise ValueError(f"critic_learning_rate must be a finite number > 0, got {self.critic_learning_rate!r}")
        if self.weight_warmup_steps < 0:
            raise ValueError(f"weight_warmup_steps must be >= 0, got {self.weight_warmup_steps}")
        if self.max_timestep < 0:
            raise ValueError(f"max_timestep must be >= 0, got {self.max_timestep}")
        for name in ("critic_width", "feature_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.clip_prediction is not None and not (math.isfinite(self.clip_prediction) and self.clip_prediction > 0):
            raise ValueError(f"clip_prediction must be None or a finite number > 0, got {self.clip_prediction!r}")

    def weight_at(self, step: int) -> float:
        """λ at training step ``step`` (linear warm-up)."""
        if self.weight_warmup_steps == 0:
            return self.structure_weight
        return self.structure_weight * min(1.0, (step + 1) / self.weight_warmup_steps)


def relation_matrix(features: torch.Tensor, kind: Relation = "cosine") -> torch.Tensor:
    """Pairwise cosine affinities of a batch: ``S_ij = <z_i, z_j>``, ``z = f / |f|``; the diagonal is 0.

    Args:
        features: (B, ...) one feature vector per sample (flattened), B >= 2.
        kind: ``"cosine"``, or ``"centred_cosine"``: the batch's mean feature is subtracted first, so a
            component all samples share (a common background, a critic's bias) cannot make every pair
            look alike (a correlation across the batch; for B = 2 every pair is then -1).

    Returns:
        (B, B) symmetric, entries in [-1, 1] off the diagonal, zeros on it (i = j carries no structure).
    """
    if features.ndim < 2 or features.shape[0] < 2:
        raise ValueError(
            f"features must be (B, ...) with batch size B >= 2 (a batch of one has no structure), "
            f"got shape {tuple(features.shape)}"
        )
    if kind not in ("cosine", "centred_cosine"):
        raise ValueError(f"kind must be 'cosine' or 'centred_cosine', got {kind!r}")
    flat = features.flatten(1).float()
    if kind == "centred_cosine":
        flat = flat - flat.mean(0, keepdim=True)
    z = F.normalize(flat, dim=1, eps=1e-8)
    relations = z @ z.T
    return relations * (1 - torch.eye(len(z), dtype=relations.dtype, device=relations.device))


def structure_distance(real: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """``1 / (B (B - 1)) Σ_{i≠j} (real_ij - generated_ij)^2`` between two (B, B) relation matrices."""
    if real.shape != generated.shape or real.ndim != 2 or real.shape[0] != real.shape[1] or len(real) < 2:
        raise ValueError(
            f"real and generated must be square (B, B) relation matrices of the same B >= 2, "
            f"got {tuple(real.shape)} and {tuple(generated.shape)}"
        )
    size = len(real)
    return (real - generated).pow(2).sum() / (size * (size - 1))


class StructureCritic(nn.Module):
    """The structure discriminator's encoder f_φ: x_0-space tensors -> (B, feature_dim) features.

    Images or latents (C, H, W) get three convolutions (the last two halve the resolution), an average pool
    to 4x4 (position matters in the toy world, so the features keep a coarse layout) and a linear layer;
    points (D,) get a two-hidden-layer MLP. Our design: the paper's critic architecture was not available.

    Args:
        sample_shape: one sample's shape, ``(C, H, W)`` or ``(D,)``.
        width: channels or hidden units.
        feature_dim: output dimension.
    """

    def __init__(self, sample_shape: Sequence[int], *, width: int = 32, feature_dim: int = 16):
        super().__init__()
        shape = tuple(int(s) for s in sample_shape)
        if width < 1 or feature_dim < 1:
            raise ValueError(f"width and feature_dim must be >= 1, got {width} and {feature_dim}")
        if len(shape) == 3:
            channels = shape[0]
            self.encoder = nn.Sequential(
                nn.Conv2d(channels, width, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
                nn.SiLU(),
                nn.Conv2d(2 * width, 2 * width, 4, stride=2, padding=1),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(4),
                nn.Flatten(),
                nn.Linear(2 * width * 16, feature_dim),
            )
        elif len(shape) == 1:
            self.encoder = nn.Sequential(
                nn.Linear(shape[0], width),
                nn.SiLU(),
                nn.Linear(width, width),
                nn.SiLU(),
                nn.Linear(width, feature_dim),
            )
        else:
            raise ValueError(f"sample_shape must be (C, H, W) or (D,), got {shape}")
        self.sample_shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.float())


def predicted_clean(
    noise_scheduler: SchedulerMixin, noisy: torch.Tensor, timesteps: torch.Tensor, model_output: torch.Tensor
) -> torch.Tensor:
    """The denoiser's one-step x̂_0 (DDPM, Ho et al. 2020, eq. 15 for ε; Salimans & Ho 2022 for v).

    ``epsilon``: x̂_0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t; ``v_prediction``: x̂_0 = √ᾱ_t x_t - √(1-ᾱ_t) v̂;
    ``sample``: the output itself. Differentiable in ``model_output``.
    """
    if model_output.shape != noisy.shape:
        raise ValueError(
            f"model_output must have the input's shape {tuple(noisy.shape)} (a denoiser predicts in its input's "
            f"space), got {tuple(model_output.shape)}"
        )
    kind = noise_scheduler.config.prediction_type
    abar = noise_scheduler.alphas_cumprod.to(noisy.device, torch.float32)[timesteps]
    abar = abar.reshape(-1, *([1] * (noisy.ndim - 1)))
    if kind == "epsilon":
        return (noisy - (1 - abar).sqrt() * model_output) / abar.sqrt()
    if kind == "v_prediction":
        return abar.sqrt() * noisy - (1 - abar).sqrt() * model_output
    if kind == "sample":
        return model_output
    raise ValueError(f"noise_scheduler: prediction_type must be epsilon, v_prediction or sample, got {kind!r}")


def critic_loss(
    critic: nn.Module, clean: torch.Tensor, prediction: torch.Tensor, *, relation: Relation = "cosine"
) -> torch.Tensor:
    """The critic's loss, ``-D_φ(X_0, stopgrad X̂)``: gradients reach the critic only."""
    real = relation_matrix(critic(clean.detach()), relation)
    generated = relation_matrix(critic(prediction.detach()), relation)
    return -structure_distance(real, generated)


class StructureGame:
    """The critic, its optimiser, and the two halves of the game for the zoo's training loop.

    ``term`` is the denoiser's extra loss λ(step) · D_φ(X_0, X̂_θ) (the critic frozen: gradients reach the
    denoiser only); ``auxiliary`` is the critic's update (:class:`~workbench.training.AuxiliaryModel`).
    Both use only the samples with t <= ``config.max_timestep``; with fewer than two such samples the step
    has no structure and both are skipped (the term is 0).

    Args:
        noise_scheduler: the training scheduler (for x̂_0).
        sample_shape: one sample's shape in model space (the critic's input).
        config: the game's settings.
        seed: the critic's initial weights.
        reference: what the *real* structure is measured on, ``reference(info) -> (B, ...)`` in x_0 space
            (default: the clean batch x_0). An ablation hook: e.g. the exact posterior mean E[x_0 | x_t]
            where the data's law is known (:func:`workbench.sadm.toy2d.ring_posterior_mean`), which a
            perfect denoiser's x̂_0 matches, so the game then asks nothing of it that denoising does not.
    """

    def __init__(
        self,
        noise_scheduler: SchedulerMixin,
        sample_shape: Sequence[int],
        config: SADMConfig,
        *,
        seed: int = 0,
        reference: Callable[[DiffusionStep], torch.Tensor] | None = None,
    ):
        self.noise_scheduler = noise_scheduler
        self.config = config
        self.reference = reference
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.critic = StructureCritic(sample_shape, width=config.critic_width, feature_dim=config.feature_dim)
        self.optimizer = torch.optim.AdamW(
            self.critic.parameters(), lr=config.critic_learning_rate, weight_decay=config.critic_weight_decay
        )

    def _pairs(self, info: DiffusionStep) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(x_0, x̂_0) of the samples in the time window, or None when fewer than two are."""
        keep = info.timesteps <= self.config.max_timestep
        if int(keep.sum()) < 2:
            return None
        prediction = predicted_clean(self.noise_scheduler, info.noisy, info.timesteps, info.model_output)
        if self.config.clip_prediction is not None:
            prediction = prediction.clamp(-self.config.clip_prediction, self.config.clip_prediction)
        if self.reference is None:
            real = info.clean
        else:
            real = self.reference(info).detach()
            if real.shape != info.clean.shape:
                raise ValueError(
                    f"reference: must return the clean batch's shape {tuple(info.clean.shape)}, got {tuple(real.shape)}"
                )
        return real[keep], prediction[keep]

    def term(self, info: DiffusionStep) -> torch.Tensor:
        """λ(step) · D_φ(X_0, X̂_θ), differentiable in the denoiser only."""
        pairs = self._pairs(info)
        weight = self.config.weight_at(info.step)
        if pairs is None or weight == 0:
            return info.model_output.sum() * 0.0
        clean, prediction = pairs
        self.critic.requires_grad_(False)
        try:
            with torch.no_grad():
                real = relation_matrix(self.critic(clean), self.config.relation)
            generated = relation_matrix(self.critic(prediction), self.config.relation)
        finally:
            self.critic.requires_grad_(True)
        return weight * structure_distance(real, generated)

    def update(self, info: DiffusionStep) -> dict[str, float]:
        """One critic step (maximise D on the step's batch); logs the distance it saw before the step."""
        pairs = self._pairs(info)
        if pairs is None:
            return {"distance": 0.0}
        loss = critic_loss(self.critic, *pairs, relation=self.config.relation)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"distance": -loss.item()}

    @property
    def auxiliary(self) -> AuxiliaryModel:
        return AuxiliaryModel(self.critic, self.optimizer, self.update)


def train_sadm(
    denoiser: nn.Module,
    noise_scheduler: SchedulerMixin,
    world,
    *,
    config: DiffusionTrainConfig,
    state_path: str | Path,
    sadm: SADMConfig | None = SADMConfig(),
    critic_seed: int = 0,
    encode_images: Callable[[np.ndarray], torch.Tensor] | None = None,
    encode_prompts: Callable[[list[str]], torch.Tensor] | None = None,
    model_kwargs: Callable[[object], Mapping[str, torch.Tensor]] | None = None,
    callback: Callable[[int, Mapping[str, float]], None] | None = None,
    description: str = "sadm",
    reference: Callable[[DiffusionStep], torch.Tensor] | None = None,
) -> tuple[nn.Module, StructureCritic | None]:
    """Train ``denoiser`` in place with the structure game (``sadm``) or plainly (``sadm=None``).

    The zoo's loop (:func:`~workbench.training.train_diffusion`) does the work: tqdm, periodic training
    states (the critic and its optimiser included) and resume. Returns the EMA copy of the denoiser and the
    critic (None for plain training).

    Args:
        denoiser: any diffusers denoiser (or a module with the same call convention).
        noise_scheduler: the training scheduler (its ``prediction_type`` gives x̂_0).
        world: the data (``sample(n, rng, caption_dropout=...)``, e.g. a :class:`~workbench.toyworld.ToyWorld`).
        config: the loop's settings; ``batch_size`` must be >= 2 (a structure needs pairs).
        state_path: training-state file (resumed when it exists).
        sadm: the game's settings; None trains plainly through the same loop.
        critic_seed: the critic's initial weights.
        encode_images, encode_prompts, model_kwargs, callback, description: passed to the loop.
        reference: what the real structure is measured on (default x_0; see :class:`StructureGame`).

    Raises:
        ValueError: a batch size below 2, or a denoiser whose output shape differs from its input's.
        FloatingPointError: a non-finite loss (the state file keeps the last good checkpoint).
    """
    if config.batch_size < 2:
        raise ValueError(f"config.batch_size must be >= 2 (structure is pairwise), got {config.batch_size}")
    if sadm is not None and not isinstance(sadm, SADMConfig):
        raise TypeError(f"sadm must be a SADMConfig or None, got {type(sadm).__name__}")
    sample_shape = _check_denoiser(denoiser, world, encode_images, encode_prompts, model_kwargs)
    if reference is not None and sadm is None:
        raise ValueError("reference: only the structure game uses it; got a reference with sadm=None")
    game = (
        None
        if sadm is None
        else StructureGame(noise_scheduler, sample_shape, sadm, seed=critic_seed, reference=reference)
    )
    ema = train_diffusion(
        denoiser,
        noise_scheduler,
        world,
        config=config,
        state_path=state_path,
        encode_prompts=encode_prompts,
        encode_images=encode_images,
        extra_losses=None if game is None else {"structure": game.term},
        auxiliary=None if game is None else {"critic": game.auxiliary},
        model_kwargs=model_kwargs,
        callback=callback,
        description=description,
    )
    return ema, None if game is None else game.critic


@torch.no_grad()
def _check_denoiser(denoiser, world, encode_images, encode_prompts, model_kwargs) -> tuple[int, ...]:
    """One sample's model-space shape, after checking that the denoiser's output has its input's shape."""
    probe = world.sample(2, np.random.default_rng(0))  # its own stream: the training data are untouched
    if encode_images is None:
        clean = torch.from_numpy(to_model_space(probe.images)).float()
    else:
        clean = encode_images(probe.images).float()
    kwargs = {} if model_kwargs is None else dict(model_kwargs(probe))
    if encode_prompts is not None:
        kwargs["encoder_hidden_states"] = encode_prompts(list(probe.captions))
    was_training = denoiser.training
    denoiser.eval()
    try:
        output = denoiser(clean, torch.zeros(len(clean), dtype=torch.long), **kwargs).sample
    finally:
        denoiser.train(was_training)
    if output.shape != clean.shape:
        raise ValueError(
            f"denoiser: its output shape {tuple(output.shape)} must equal its input shape {tuple(clean.shape)} "
            "(SADM compares x̂_0 with x_0); check out_channels"
        )
    return tuple(clean.shape[1:])
