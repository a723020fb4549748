"""Patch-parallel images against the single-device one: PSNR and bytes per step, per mode and N.

DistriFusion's Table 1 (Li et al., CVPR 2024, arXiv 2402.19481) compares each mode's image with the
single-device image of the same seed (PSNR, LPIPS). Here the N ranks are simulated in one process
(:func:`~workbench.distrifusion.simulate.simulate_patch_parallel`), which computes what the ranks compute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers import DiffusionPipeline

from workbench.distrifusion.config import Mode, PatchParallelConfig
from workbench.distrifusion.runner import generate
from workbench.metrics import psnr

__all__ = ["ModeComparison", "ModeRow", "compare_modes", "mode_table"]


@dataclass
class ModeComparison:
    """Patch-parallel images beside the single-device one.

    Attributes:
        reference: the single-device images (B, 3, H, W) in [0, 1].
        images: label -> patch-parallel images, same shape.
        psnr: label -> PSNR against the reference (dB; inf when identical).
        bytes_per_step: label -> bytes received per rank per UNet call.
        num_devices: simulated ranks.
        warmup_steps: synchronous steps after step 0.
    """

    reference: torch.Tensor
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    psnr: dict[str, float] = field(default_factory=dict)
    bytes_per_step: dict[str, float] = field(default_factory=dict)
    num_devices: int = 1
    warmup_steps: int = 0


def compare_modes(
    pipe: DiffusionPipeline,
    *,
    num_devices: int,
    modes: Sequence[Mode],
    warmup_steps: int = 4,
    height: int = 64,
    width: int = 64,
    num_inference_steps: int = 20,
    seed: int = 0,
    batch_size: int = 1,
    prompt: str | None = None,
    guidance_scale: float = 1.0,
    reference: torch.Tensor | None = None,
) -> ModeComparison:
    """Sample once on one device and once per mode on ``num_devices`` simulated ranks (same seed).

    Args:
        pipe: an unconditional ``DDPMPipeline`` or a text-to-image pipeline (then pass ``prompt``).
        num_devices: N, the simulated world size.
        modes: the modes to run (see :data:`~workbench.distrifusion.config.MODES`).
        warmup_steps: synchronous steps after step 0 (paper: 4).
        reference: the single-device images, when already computed for these settings.
    """
    common = dict(
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        seed=seed,
        batch_size=batch_size,
        prompt=prompt,
        guidance_scale=guidance_scale,
        progress=False,
    )
    if reference is None:
        reference = generate(pipe, None, **common).images
    result = ModeComparison(reference=reference, num_devices=num_devices, warmup_steps=warmup_steps)
    for mode in modes:
        config = PatchParallelConfig(mode=mode, warmup_steps=warmup_steps)
        run = generate(pipe, config, simulate_devices=num_devices, **common)
        result.images[mode] = run.images
        result.psnr[mode] = psnr(run.images, reference)
        result.bytes_per_step[mode] = run.stats.get("bytes_per_step", 0.0)
    return result


@dataclass(frozen=True)
class ModeRow:
    """One (N, mode) of :func:`mode_table`.

    Attributes:
        devices: N, the simulated ranks.
        mode: the config's mode.
        psnr_db: mean PSNR against the single-device image over the seeds (inf when every seed is exact).
        psnr_min_db: the lowest PSNR over the seeds.
        mb_per_step: megabytes received per rank per UNet call.
    """

    devices: int
    mode: str
    psnr_db: float
    psnr_min_db: float
    mb_per_step: float


def mode_table(
    pipe: DiffusionPipeline,
    *,
    devices: Sequence[int],
    modes: Sequence[Mode],
    warmup_steps: int = 4,
    height: int,
    width: int,
    num_inference_steps: int,
    seeds: Sequence[int] = (0,),
    prompt: str | None = None,
    guidance_scale: float = 1.0,
) -> tuple[list[ModeRow], dict[int, ModeComparison]]:
    """PSNR against the single-device image and bytes per step, for each N and mode (mean over seeds).

    Returns:
        ``(rows, comparisons)``: one :class:`ModeRow` per (N, mode), and the first seed's
        :class:`ModeComparison` per N (for figures).
    """
    rows: list[ModeRow] = []
    comparisons: dict[int, ModeComparison] = {}
    references: dict[int, torch.Tensor] = {}
    for n in devices:
        per_seed = []
        for seed in seeds:
            comparison = compare_modes(
                pipe,
                num_devices=n,
                modes=modes,
                warmup_steps=warmup_steps,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                seed=seed,
                prompt=prompt,
                guidance_scale=guidance_scale,
                reference=references.get(seed),
            )
            references[seed] = comparison.reference
            per_seed.append(comparison)
        comparisons[n] = per_seed[0]
        for mode in modes:
            values = [c.psnr[mode] for c in per_seed]
            finite = [v for v in values if math.isfinite(v)]
            mean = sum(finite) / len(finite) if len(finite) == len(values) else math.inf
            rows.append(ModeRow(n, mode, mean, min(values), per_seed[0].bytes_per_step[mode] / 1e6))
    return rows, comparisons
