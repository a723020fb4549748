"""SADM's 2-D tier: point clouds, an MLP denoiser, and measures of how well samples cover the data.

A 2-D world (a ring of 8 Gaussians, two moons, a Swiss roll) stands in for images: the same loop, the
same structure game (:func:`workbench.sadm.train_sadm`), seconds per run on a CPU. The denoiser is a
plain torch MLP with the diffusers call convention (``model(x_t, t).sample``), so the zoo's loop trains
it unchanged; the world's batches carry points where the toy world's carry images.

Measures (generated vs held-out real points): the energy distance (Székely & Rizzo 2013), precision (the
share of samples within ``delta`` of a real point), recall (the share of real points within ``delta`` of
a sample) and, for the ring, the modes covered.

The ring's law is a known Gaussian mixture, so its exact posterior mean E[x_0 | x_t]
(:func:`ring_posterior_mean`) is available: the x̂_0 that a perfect ε-denoiser predicts. The structure
game can be told to compare x̂_0 with it instead of with x_0 (``reference="posterior mean"``), which
tests why the term hurts: see :mod:`workbench.sadm`.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from torch import nn

from workbench.sadm import SADMConfig, StructureCritic, predicted_clean, train_sadm
from workbench.sampling import denoise, initial_noise
from workbench.training import DiffusionStep, DiffusionTrainConfig

__all__ = [
    "PointBatch",
    "PointDenoiser",
    "PointWorld",
    "RingPosteriorDenoiser",
    "Run2D",
    "energy_distance",
    "point_metrics",
    "prediction_spread",
    "ring_posterior_mean",
    "sample_points",
    "train_points",
]

RING_MODES, RING_RADIUS, RING_STD = 8, 1.0, 0.05


@dataclass(frozen=True)
class PointBatch:
    """A batch of 2-D points; ``images`` so the zoo's loop reads it like a toy-world batch."""

    images: np.ndarray  # (N, 2) float32
    captions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PointWorld:
    """A 2-D data distribution scaled to about [-1, 1].

    Args:
        kind: ``"ring"`` (8 Gaussians of std 0.05 on the unit circle), ``"moons"`` or ``"swissroll"``.
    """

    kind: Literal["ring", "moons", "swissroll"] = "ring"

    def __post_init__(self) -> None:
        if self.kind not in ("ring", "moons", "swissroll"):
            raise ValueError(f"kind must be 'ring', 'moons' or 'swissroll', got {self.kind!r}")

    def sample(self, n: int, rng: np.random.Generator | int, *, caption_dropout: float = 0.0) -> PointBatch:
        """``n`` points (``caption_dropout`` is accepted for the loop's sake and ignored: there are no captions)."""
        if not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        rng = np.random.default_rng(rng)
        if self.kind == "ring":
            angle = 2 * np.pi * rng.integers(0, RING_MODES, n) / RING_MODES
            points = RING_RADIUS * np.stack([np.cos(angle), np.sin(angle)], 1) + RING_STD * rng.normal(size=(n, 2))
        elif self.kind == "moons":
            upper = rng.random(n) < 0.5
            angle = np.pi * rng.random(n)
            x = np.where(upper, np.cos(angle), 1 - np.cos(angle))
            y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
            points = (np.stack([x, y], 1) - [0.5, 0.25]) / 1.2 + 0.04 * rng.normal(size=(n, 2))
        else:
            turn = 1.5 * np.pi * (1 + 2 * rng.random(n))
            points = np.stack([turn * np.cos(turn), turn * np.sin(turn)], 1) / 14 + 0.03 * rng.normal(size=(n, 2))
        return PointBatch(points.astype(np.float32), [""] * n)

    def modes(self) -> np.ndarray | None:
        """The ring's 8 centres (8, 2); None for the other worlds."""
        if self.kind != "ring":
            return None
        angle = 2 * np.pi * np.arange(RING_MODES) / RING_MODES
        return RING_RADIUS * np.stack([np.cos(angle), np.sin(angle)], 1)


@dataclass
class PointOutput:
    sample: torch.Tensor


class PointDenoiser(nn.Module):
    """ε_θ(x_t, t) for 2-D points: a sinusoidal time embedding and a residual MLP.

    Called like a diffusers UNet (``model(x_t, t).sample``), so the zoo's loop and :func:`denoise` take it.

    Args:
        width: hidden units.
        depth: residual blocks.
        dim: the points' dimension.
    """

    def __init__(self, *, width: int = 128, depth: int = 3, dim: int = 2):
        super().__init__()
        self.time_dim = 32
        self.inp = nn.Linear(dim + self.time_dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(width, width)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, dim))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> PointOutput:
        t = torch.as_tensor(timestep, device=sample.device).float().flatten().expand(len(sample))
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=sample.device) / half)
        angles = t[:, None] * freqs[None]
        h = self.inp(torch.cat([sample.float(), angles.sin(), angles.cos()], 1))
        for block in self.blocks:
            h = h + block(h)
        return PointOutput(self.out(h))


def point_scheduler() -> DDPMScheduler:
    """DDPM's linear schedule (1e-4 to 0.02 over 1000 steps), ε-prediction, no clipping."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


def ring_posterior_mean(noise_scheduler, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The exact E[x_0 | x_t] for the ring of Gaussians (the ε-MSE-optimal denoiser's x̂_0).

    With x_0 ~ (1/8) Σ_k N(μ_k, s² I) and x_t = a x_0 + b ε (a² = ᾱ_t, b² = 1 - ᾱ_t): the mode posterior is
    softmax_k(-|x_t - a μ_k|² / 2v) with v = a² s² + b², and E[x_0 | x_t, k] = μ_k + (a s² / v)(x_t - a μ_k).

    Args:
        noise_scheduler: the training scheduler (its ``alphas_cumprod``).
        noisy: (B, 2) x_t.
        timesteps: (B,) t.
    """
    if noisy.ndim != 2 or noisy.shape[1] != 2 or timesteps.shape != noisy.shape[:1]:
        raise ValueError(
            f"noisy must be (B, 2) and timesteps (B,), got {tuple(noisy.shape)} and {tuple(timesteps.shape)}"
        )
    modes = torch.from_numpy(PointWorld("ring").modes()).to(noisy.device, torch.float64)
    abar = noise_scheduler.alphas_cumprod.to(noisy.device, torch.float64)[timesteps][:, None, None]
    a, variance = abar.sqrt(), abar * RING_STD**2 + (1 - abar)  # (B, 1, 1)
    offset = noisy.double()[:, None] - a * modes[None]  # (B, K, 2)
    weights = torch.softmax(-offset.pow(2).sum(-1, keepdim=True) / (2 * variance), dim=1)
    means = modes[None] + a * RING_STD**2 / variance * offset
    return (weights * means).sum(1).to(noisy.dtype)


class RingPosteriorDenoiser(nn.Module):
    """The ring's exact ε-MSE-optimal denoiser, ε*(x_t, t) = (x_t - √ᾱ_t E[x_0 | x_t]) / √(1 - ᾱ_t).

    A yardstick: its x̂_0 is the posterior mean, so :func:`prediction_spread` of it is the spread that a
    *perfect* model's one-step predictions have (below the data's at every t > 0).
    """

    def __init__(self):
        super().__init__()
        self.scheduler = point_scheduler()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> PointOutput:
        t = torch.as_tensor(timestep, device=sample.device).long().flatten().expand(len(sample))
        abar = self.scheduler.alphas_cumprod.to(sample.device, torch.float32)[t][:, None]
        mean = ring_posterior_mean(self.scheduler, sample.float(), t)
        return PointOutput((sample.float() - abar.sqrt() * mean) / (1 - abar).sqrt())


Reference = Literal["data", "posterior mean"]


@dataclass
class Run2D:
    """A finished 2-D run: the EMA denoiser, the critic (None when plain), its logs and its time."""

    denoiser: PointDenoiser
    critic: StructureCritic | None
    history: list[dict[str, float]]
    seconds: float
    steps: int


def train_points(
    world: PointWorld,
    *,
    sadm: SADMConfig | None,
    steps: int = 2000,
    batch_size: int = 256,
    seed: int = 0,
    width: int = 128,
    learning_rate: float = 1e-3,
    state_path: str | Path | None = None,
    callback: Callable[[int, Mapping[str, float]], None] | None = None,
    reference: Reference = "data",
) -> Run2D:
    """Train a :class:`PointDenoiser` on ``world`` plainly (``sadm=None``) or with the structure game.

    The zoo's loop does the training (through :func:`workbench.sadm.train_sadm`); without ``state_path``
    the training state goes to a temporary folder. Points are unbounded, so x̂_0 is not clamped.

    Args:
        world: the 2-D data.
        sadm: the game's settings (``clip_prediction`` is set to None here), or None for plain training.
        steps, batch_size, seed, learning_rate: the loop's settings (seed: data, noise, weights, critic).
        width: the denoiser's hidden units.
        state_path: training-state file for checkpoints and resume.
        callback: ``(step, logs)`` after every step (e.g. a live loss plot).
        reference: the real side of the game: ``"data"`` (x_0, the method) or ``"posterior mean"``
            (:func:`ring_posterior_mean`; the ring only, an ablation).
    """
    if reference not in ("data", "posterior mean"):
        raise ValueError(f"reference must be 'data' or 'posterior mean', got {reference!r}")
    if reference == "posterior mean" and (world.kind != "ring" or sadm is None):
        raise ValueError(
            f"reference='posterior mean' needs the ring world and a game, got kind={world.kind!r}, sadm={sadm!r}"
        )
    scheduler = point_scheduler()
    oracle = None
    if reference == "posterior mean":

        def oracle(info: DiffusionStep) -> torch.Tensor:
            return ring_posterior_mean(scheduler, info.noisy, info.timesteps)

    if sadm is not None:
        sadm = replace(sadm, clip_prediction=None)
    config = DiffusionTrainConfig(
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=min(100, steps),
        ema_decay=0.995,
        prompt_dropout=0.0,
        caption_dropout=0.0,
        checkpoint_every=max(1, steps),
        seed=seed,
        bf16_autocast=False,  # the MLP is tiny; bf16 would only cost precision
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser = PointDenoiser(width=width)
    history: list[dict[str, float]] = []

    def record(step: int, logs: Mapping[str, float]) -> None:
        history.append({"step": step, **logs})
        if callback is not None:
            callback(step, logs)

    with tempfile.TemporaryDirectory(prefix="sadm-2d-") as folder:
        path = Path(state_path) if state_path is not None else Path(folder) / "state.safetensors"
        start = time.perf_counter()
        ema, critic = train_sadm(
            denoiser,
            scheduler,
            world,
            config=config,
            state_path=path,
            sadm=sadm,
            critic_seed=seed,
            encode_images=torch.from_numpy,
            callback=record,
            description=f"2-D {world.kind} {'sadm' if sadm else 'plain'}",
            reference=oracle,
        )
        seconds = time.perf_counter() - start
    return Run2D(ema, critic, history, seconds, steps)


@torch.no_grad()
def sample_points(denoiser: nn.Module, n: int, *, num_inference_steps: int = 50, seed: int = 0) -> np.ndarray:
    """``n`` points (n, 2) by DPM-Solver++(2M) on the training schedule, from noise seeded by ``seed``."""
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")
    noise = initial_noise((n, 2), torch.Generator().manual_seed(seed))
    denoiser.eval()
    return denoise(denoiser, scheduler, noise, num_inference_steps=num_inference_steps, progress=False).numpy()


def energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between two (N, D) samples (0 for equal distributions)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"a and b must be (N, D) with the same D and N >= 2, got {a.shape} and {b.shape}")

    def mean_distance(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1)).mean())

    return 2 * mean_distance(a, b) - mean_distance(a, a) - mean_distance(b, b)


def point_metrics(
    generated: np.ndarray, real: np.ndarray, world: PointWorld, *, delta: float = 0.1
) -> dict[str, float]:
    """Energy distance, precision, recall (within ``delta``) and, for the ring, modes covered (of 8).

    A mode counts as covered when at least a quarter of its fair share of samples (1/8) lies within
    3 std of its centre.
    """
    generated, real = np.asarray(generated), np.asarray(real)
    distances = np.sqrt(((generated[:, None] - real[None]) ** 2).sum(-1))  # (N_gen, N_real)
    figures = {
        "energy distance": energy_distance(generated, real),
        "precision": float((distances.min(1) < delta).mean()),
        "recall": float((distances.min(0) < delta).mean()),
    }
    modes = world.modes()
    if modes is not None:
        to_mode = np.sqrt(((generated[:, None] - modes[None]) ** 2).sum(-1))
        near = to_mode.min(1) < 3 * RING_STD
        counts = np.bincount(to_mode.argmin(1)[near], minlength=len(modes))
        figures["modes covered"] = float((counts >= 0.25 * len(generated) / len(modes)).sum())
    return figures


@torch.no_grad()
def prediction_spread(
    denoiser: nn.Module,
    world: PointWorld,
    *,
    timesteps: tuple[int, ...] = (50, 100, 200, 300, 500, 700),
    n: int = 1000,
    seed: int = 0,
) -> dict[str, list[float]]:
    """What the structure term buys and costs, per t: spread and error of the one-step predictions x̂_0.

    For each t: ``spread ratio`` = mean pairwise distance among x̂_0 / the same among x_0 (1: the
    predictions spread like the data; below 1: shrunk toward the posterior mean), and ``mse`` = mean
    squared error of x̂_0 against x_0.

    Returns:
        ``{"t": [...], "spread ratio": [...], "mse": [...]}``.
    """
    scheduler = point_scheduler()
    clean = torch.from_numpy(world.sample(n, seed).images)
    generator = torch.Generator().manual_seed(seed)
    denoiser.eval()

    def mean_distance(x: torch.Tensor) -> float:
        return float(torch.cdist(x, x).sum() / (len(x) * (len(x) - 1)))

    figures: dict[str, list[float]] = {"t": [], "spread ratio": [], "mse": []}
    for t in timesteps:
        steps = torch.full((n,), int(t), dtype=torch.long)
        noisy = scheduler.add_noise(clean, torch.randn(clean.shape, generator=generator), steps)
        prediction = predicted_clean(scheduler, noisy, steps, denoiser(noisy, steps).sample)
        figures["t"].append(float(t))
        figures["spread ratio"].append(mean_distance(prediction) / mean_distance(clean))
        figures["mse"].append(float((prediction - clean).pow(2).sum(1).mean()))
    return figures
