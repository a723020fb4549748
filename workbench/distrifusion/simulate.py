"""One process that computes what N patch-parallel ranks compute, and activation staleness.

:func:`simulate_patch_parallel` runs the same patch layers as the real ranks, with all N patches stacked
along the batch and gathers that are reshapes (:class:`~workbench.distrifusion.comm.SimulatedComm`). Its
output equals the multi-process output to float tolerance, and it counts the same bytes per rank, so the
notebook and quick experiments need no processes.

:func:`measure_staleness` records how much each layer's input changes between consecutive denoising
steps on the stock UNet: the quantity DistriFusion bets is small (Sec. 3 and Fig. 2 of arXiv
2402.19481: "inputs across adjacent denoising steps are similar").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import SchedulerMixin
from torch import nn

from workbench.distrifusion.comm import SimulatedComm
from workbench.distrifusion.config import PatchParallelConfig
from workbench.distrifusion.layers import is_self_attention
from workbench.distrifusion.parallel import PatchParallelRun, parallelize
from workbench.sampling import denoise

__all__ = ["StalenessRecord", "measure_staleness", "simulate_patch_parallel"]


@contextlib.contextmanager
def simulate_patch_parallel(
    unet: nn.Module, config: PatchParallelConfig, *, num_devices: int
) -> Iterator[PatchParallelRun]:
    """Run ``unet`` as ``num_devices`` patch-parallel ranks would, in this process, for the ``with`` block.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` or ``UNet2DModel``.
        config: the mode, warm-up and batch split.
        num_devices: the simulated world size N.

    Yields:
        The :class:`~workbench.distrifusion.parallel.PatchParallelRun` (bytes are per simulated rank).
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices must be an int >= 1, got {num_devices!r}")

    with parallelize(unet, config, num_devices, SimulatedComm) as run:
        yield run


@dataclass
class StalenessRecord:
    """Relative change of each layer's input between consecutive steps.

    Attributes:
        layer_names: the recorded modules (exchanging layers: convolutions with kernel > 1, self-attention).
        layer_kinds: "conv" or "attention" per layer.
        resolutions: the feature-map height of each layer's input.
        change: (num_layers, num_steps - 1): ``||A_t - A_{t+1}|| / ||A_t||`` for step t vs the one before.
        timesteps: the model timestep of each step (length num_steps).
    """

    layer_names: list[str]
    layer_kinds: list[str]
    resolutions: list[int]
    change: np.ndarray
    timesteps: np.ndarray


@torch.no_grad()
def measure_staleness(
    unet: nn.Module,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    *,
    num_inference_steps: int,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> StalenessRecord:
    """Sample once on the stock UNet and record how much each exchanging layer's input moves per step.

    These inputs are exactly what a displaced (asynchronous) step reads stale for the other patches.
    """
    modules = [
        (name, module, "conv" if isinstance(module, nn.Conv2d) else "attention")
        for name, module in unet.named_modules()
        if (isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1) or is_self_attention(module)
    ]
    previous: dict[str, torch.Tensor] = {}
    changes: dict[str, list[float]] = {name: [] for name, _, _ in modules}
    heights: dict[str, int] = {}

    def hook(name: str):
        def record(_module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().float()
            heights.setdefault(name, x.shape[-2] if x.ndim == 4 else -1)
            if name in previous:
                before = previous[name]
                changes[name].append(float((x - before).norm() / x.norm().clamp_min(1e-12)))
            previous[name] = x.clone()

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module, _ in modules]
    timesteps: list[float] = []
    try:
        denoise(
            unet,
            scheduler,
            latents,
            num_inference_steps=num_inference_steps,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            guidance_scale=guidance_scale,
            progress=False,
            callback=lambda info: timesteps.append(float(info.timestep)),
        )
    finally:
        for handle in handles:
            handle.remove()
    return StalenessRecord(
        layer_names=[name for name, _, _ in modules],
        layer_kinds=[kind for _, _, kind in modules],
        resolutions=[heights.get(name, -1) for name, _, _ in modules],
        change=np.array([changes[name] for name, _, _ in modules], dtype=np.float64),
        timesteps=np.array(timesteps),
    )
