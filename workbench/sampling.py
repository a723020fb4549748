"""The shared raw sampling loop: any diffusers UNet, any diffusers scheduler, any schedule.

Methods ride the stock diffusers pipelines (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, the
toy :class:`~workbench.pipelines.ToyTextToImagePipeline`) through their own extension points (``timesteps=``,
``latents=``, ``callback_on_step_end``, hooks, attention processors), so every paper works on SD and SDXL
without a second loop. :func:`denoise` remains for pixel-space pipelines without a ``timesteps``/canvas
argument (``DDPMPipeline``) and for experiments that need the raw loop (reference ODE solves); it is
k-diffusion style (the schedule is an argument, each step calls ``callback``, noise comes from a passed
``generator``) and takes SDXL's added conditioning as ``added_cond_kwargs``. Decoding is the caller's job.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

__all__ = ["StepInfo", "check_timesteps", "denoise", "initial_noise", "set_timesteps"]


@dataclass
class StepInfo:
    """What a ``callback`` sees after each step."""

    index: int  # step number, 0-based
    timestep: torch.Tensor  # the model's t at this step
    latents: torch.Tensor  # x after the step
    noise_pred: torch.Tensor  # guided eps_theta(x_t, t)


def check_timesteps(timesteps: Sequence[int] | torch.Tensor, num_train_timesteps: int) -> list[int]:
    """Custom ``timesteps`` as a list of ints, checked: strictly decreasing integers in [0, num_train_timesteps).

    diffusers itself truncates floats and accepts repeated or ascending lists silently, which break the
    multistep solvers' step index; this refuses them.

    Raises:
        ValueError: empty, not integers, not strictly decreasing, or out of range.
    """
    requested = torch.as_tensor(timesteps).flatten()
    if requested.is_floating_point() and not torch.equal(requested, requested.round()):
        raise ValueError(f"timesteps must be integers (round them yourself), got {requested.tolist()}")
    values = requested.long().tolist()
    if not values:
        raise ValueError("timesteps must not be empty")
    if any(b >= a for a, b in itertools.pairwise(values)) or values[0] >= num_train_timesteps or values[-1] < 0:
        raise ValueError(f"timesteps must be strictly decreasing integers in [0, {num_train_timesteps}), got {values}")
    return values


def set_timesteps(
    scheduler: SchedulerMixin,
    *,
    num_inference_steps: int | None = None,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Reset ``scheduler`` for a new run with ``num_inference_steps`` or an explicit descending ``timesteps``.

    Custom timesteps (checked by :func:`check_timesteps`) go through ``set_timesteps(timesteps=...)``,
    exactly as the stock pipelines pass them (their ``retrieve_timesteps``), so a scheduler that works
    here works there. Stock ``UniPCMultistepScheduler`` has no such argument for VP models; use
    :class:`workbench.timesteps.UniPCCustomTimestepsScheduler`, which :func:`workbench.timesteps.solver_scheduler`
    returns.

    Returns:
        ``scheduler.timesteps``.

    Raises:
        TypeError: the scheduler's ``set_timesteps`` takes no ``timesteps``.
    """
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("pass exactly one of num_inference_steps and timesteps")
    if timesteps is None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler.timesteps
    values = check_timesteps(timesteps, scheduler.config.num_train_timesteps)
    if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise TypeError(
            f"scheduler: {type(scheduler).__name__}.set_timesteps takes no custom timesteps (nor does the stock "
            "pipelines' timesteps= argument with it); use DPMSolverMultistepScheduler, EulerDiscreteScheduler, or "
            "for UniPC workbench.timesteps.UniPCCustomTimestepsScheduler.from_config(scheduler.config)"
        )
    scheduler.set_timesteps(timesteps=values, device=device)
    return scheduler.timesteps


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
    guidance_rescale: float = 0.0,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
    negative_added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
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
        guidance_rescale: phi in [0, 1] of Lin et al. (WACV 2024, "Common Diffusion Noise Schedules and
            Sample Steps are Flawed", Section 3.4): the guided prediction is rescaled to the conditional
            one's standard deviation and mixed back with weight phi, as ``StableDiffusionPipeline``'s
            argument of the same name (diffusers' ``rescale_noise_cfg``); 0 leaves guidance unchanged.
        added_cond_kwargs, negative_added_cond_kwargs: the extra conditioning of a UNet with an
            ``addition_embed_type`` (SDXL's "text_time": ``text_embeds`` (B, D_pooled) and ``time_ids``
            (B, 6)), for the prompts and, with guidance, for the negative prompts; refused for a UNet
            without one.
        generator: passed to ``scheduler.step`` (stochastic samplers draw from it).
        callback: called with a :class:`StepInfo` after every step.
        progress: show a tqdm bar.

    Raises:
        ValueError: the UNet needs added conditioning that is missing (or gets some it has no use for), or
            ``guidance_rescale`` is outside [0, 1].
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    guided = negative_prompt_embeds is not None and guidance_scale > 1.0
    if guided and guidance_rescale > 0.0:
        # imported here: the Stable Diffusion pipeline module pulls in transformers (~3 s)
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    added = _added_conditioning(unet, added_cond_kwargs, negative_added_cond_kwargs if guided else None, guided)
    if configure_scheduler:
        set_timesteps(scheduler, num_inference_steps=num_inference_steps, timesteps=timesteps, device=latents.device)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    conditioning = torch.cat([negative_prompt_embeds, prompt_embeds]) if guided else prompt_embeds
    unet_kwargs = {} if added is None else {"added_cond_kwargs": added}
    latents = latents * scheduler.init_noise_sigma
    for index, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False)):
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if conditioning is None:
            noise_pred = unet(model_input, t).sample
        else:
            noise_pred = unet(model_input, t, encoder_hidden_states=conditioning, **unet_kwargs).sample
        if guided:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            if guidance_rescale > 0.0:
                noise_pred = rescale_noise_cfg(noise_pred, noise_text, guidance_rescale=guidance_rescale)
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
        if callback is not None:
            callback(StepInfo(index, t, latents, noise_pred))
    return latents


def _added_conditioning(
    unet: torch.nn.Module,
    positive: Mapping[str, torch.Tensor] | None,
    negative: Mapping[str, torch.Tensor] | None,
    guided: bool,
) -> dict[str, torch.Tensor] | None:
    """The UNet's ``added_cond_kwargs`` for the (guidance-doubled) batch, checked against its config."""
    kind = getattr(getattr(unet, "config", None), "addition_embed_type", None)
    if kind is None:
        if positive is not None or negative is not None:
            raise ValueError(
                "added_cond_kwargs: this UNet has no addition_embed_type, so it takes no added conditioning"
            )
        return None
    if positive is None:
        raise ValueError(
            f"added_cond_kwargs: the UNet has addition_embed_type={kind!r} (SDXL's is 'text_time': text_embeds and "
            "time_ids) and needs them; pass added_cond_kwargs, or sample with the stock pipeline "
            "(StableDiffusionXLPipeline), whose timesteps=, latents= and callback_on_step_end carry the methods"
        )
    if not guided:
        return dict(positive)
    if negative is None or set(negative) != set(positive):
        raise ValueError(
            f"negative_added_cond_kwargs: guidance needs the same keys as added_cond_kwargs ({sorted(positive)}), "
            f"got {None if negative is None else sorted(negative)}"
        )
    return {key: torch.cat([negative[key], value]) for key, value in positive.items()}
