"""The shared sampling loop: any diffusers UNet, any diffusers scheduler, any schedule.

:func:`denoise` is the loop every paper module and pipeline uses (k-diffusion style: the schedule is an
argument, the step hooks a ``callback``, the noise comes from a passed ``generator``). It works on pixels
(the toy models) and on latents (Stable Diffusion) alike; decoding is the caller's job.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import SchedulerMixin, UniPCMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

__all__ = ["StepInfo", "denoise", "initial_noise", "set_timesteps"]


@dataclass
class StepInfo:
    """What a ``callback`` sees after each step."""

    index: int  # step number, 0-based
    timestep: torch.Tensor  # the model's t at this step
    latents: torch.Tensor  # x after the step
    noise_pred: torch.Tensor  # guided eps_theta(x_t, t)


def set_timesteps(
    scheduler: SchedulerMixin,
    *,
    num_inference_steps: int | None = None,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Reset ``scheduler`` for a new run with ``num_inference_steps`` or an explicit descending ``timesteps``.

    Custom timesteps must be strictly decreasing integers in [0, num_train_timesteps). They go through
    ``set_timesteps(timesteps=...)`` where the scheduler accepts it (DPMSolverMultistep, Euler, DDPM, ...).
    ``UniPCMultistepScheduler`` takes custom sigmas only for flow models, so for it the run is reset with
    ``set_timesteps(len(timesteps))`` and then its ``timesteps`` and ``sigmas`` are overwritten with the
    requested points (sigma from ``alphas_cumprod`` at each timestep, then the final sigma of
    ``final_sigmas_type``), the same arrays its own ``set_timesteps`` builds.

    Returns:
        ``scheduler.timesteps``.
    """
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("pass exactly one of num_inference_steps and timesteps")
    if timesteps is None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler.timesteps
    requested = torch.as_tensor(timesteps).flatten()
    if requested.is_floating_point() and not torch.equal(requested, requested.round()):
        raise ValueError(f"timesteps must be integers (round them yourself), got {requested.tolist()}")
    values = requested.long().tolist()
    if not values:
        raise ValueError("timesteps must not be empty")
    num_train = scheduler.config.num_train_timesteps
    if any(b >= a for a, b in itertools.pairwise(values)) or values[0] >= num_train or values[-1] < 0:
        raise ValueError(f"timesteps must be strictly decreasing integers in [0, {num_train}), got {values}")
    if "timesteps" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(timesteps=values, device=device)
    elif isinstance(scheduler, UniPCMultistepScheduler):
        _unipc_set_custom_timesteps(scheduler, values, device)
    else:
        raise TypeError(f"{type(scheduler).__name__}.set_timesteps takes no custom timesteps")
    return scheduler.timesteps


def _unipc_set_custom_timesteps(
    scheduler: UniPCMultistepScheduler, values: list[int], device: torch.device | str | None
) -> None:
    config = scheduler.config
    for flag in (
        "use_flow_sigmas",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "use_dynamic_shifting",
    ):
        if config.get(flag, False):
            raise ValueError(f"timesteps: cannot set custom timesteps on a UniPC scheduler with {flag}=True")
    if scheduler.solver_p is not None:
        raise ValueError("timesteps: cannot set custom timesteps on a UniPC scheduler with a solver_p")
    if config.final_sigmas_type not in ("sigma_min", "zero"):
        raise ValueError(f"final_sigmas_type must be 'sigma_min' or 'zero', got {config.final_sigmas_type!r}")
    scheduler.set_timesteps(len(values), device=device)  # resets model_outputs, lower_order_nums, step_index
    alphas_cumprod = scheduler.alphas_cumprod.double()
    train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    final = train_sigmas[:1] if config.final_sigmas_type == "sigma_min" else torch.zeros(1, dtype=torch.float64)
    scheduler.sigmas = torch.cat([train_sigmas[values], final]).float()  # on CPU, as diffusers keeps them
    scheduler.timesteps = torch.tensor(values, dtype=torch.int64, device=device)
    scheduler.num_inference_steps = len(values)


def initial_noise(
    shape: Sequence[int],
    generator: torch.Generator | list[torch.Generator] | None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise from ``generator`` (one generator per image gives batch-independent noise)."""
    return randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=dtype)


@torch.no_grad()
def denoise(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    *,
    num_inference_steps: int | None = None,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    configure_scheduler: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """Run the reverse process from standard normal ``latents`` (B, C, H, W); return the final sample.

    Args:
        unet: ``UNet2DConditionModel`` (pass ``prompt_embeds``) or ``UNet2DModel``.
        scheduler: any diffusers scheduler; it is reset here unless ``configure_scheduler=False``
            (then the caller has already called ``set_timesteps`` with its own schedule).
        latents: initial noise, unscaled (the scheduler's ``init_noise_sigma`` is applied here).
        num_inference_steps, timesteps: the schedule (exactly one, unless ``configure_scheduler=False``).
        prompt_embeds, negative_prompt_embeds: (B, L, D) text states; both for classifier-free guidance.
        guidance_scale: w in ``eps_u + w (eps_c - eps_u)``; guidance runs when > 1 and
            ``negative_prompt_embeds`` is given.
        generator: passed to ``scheduler.step`` (stochastic samplers draw from it).
        callback: called with a :class:`StepInfo` after every step.
        progress: show a tqdm bar.
    """
    if configure_scheduler:
        set_timesteps(scheduler, num_inference_steps=num_inference_steps, timesteps=timesteps, device=latents.device)
    guided = negative_prompt_embeds is not None and guidance_scale > 1.0
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    conditioning = torch.cat([negative_prompt_embeds, prompt_embeds]) if guided else prompt_embeds
    latents = latents * scheduler.init_noise_sigma
    for index, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False)):
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if conditioning is None:
            noise_pred = unet(model_input, t).sample
        else:
            noise_pred = unet(model_input, t, encoder_hidden_states=conditioning).sample
        if guided:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
        if callback is not None:
            callback(StepInfo(index, t, latents, noise_pred))
    return latents
