"""UniPC with custom timesteps, so optimised steps ride the stock pipelines' ``timesteps=`` argument.

Stock ``UniPCMultistepScheduler.set_timesteps`` takes custom ``sigmas`` only for flow-matching models and
no ``timesteps`` at all, so ``StableDiffusionPipeline``/``StableDiffusionXLPipeline`` refuse
``pipe(..., timesteps=...)`` with it (their ``retrieve_timesteps`` checks the signature).
:class:`UniPCCustomTimestepsScheduler` is UniPC with the same update (UniPC: Zhao et al., NeurIPS 2023,
arXiv 2302.04867) and one addition: ``set_timesteps(timesteps=...)`` for VP (``alphas_cumprod``) schedules.
It builds the arrays UniPC builds for its own spacings: sigma = sqrt((1 - alpha-bar) / alpha-bar) at
each requested timestep, then the final sigma of ``final_sigmas_type`` ("sigma_min": sigma at timestep
0, where the bound of arXiv 2402.17376 ends the last step; "zero": a jump to the data prediction).

It is a diffusers scheduler like any other: ``from_config`` swaps it with UniPC, DPM-Solver or Euler in
either direction, and a pipeline saved with it loads back with it (``from_pretrained`` finds it in this
module once :mod:`workbench.timesteps` is imported; diffusers imports no other library by name).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import (
    # A pipeline saved with this scheduler records it as ["workbench.timesteps.scheduler", class name];
    # diffusers' from_pretrained picks its loading method from the base classes this module exposes.
    SchedulerMixin,  # noqa: F401
    UniPCMultistepScheduler,
)

from workbench.sampling import check_timesteps

__all__ = ["UniPCCustomTimestepsScheduler"]

# UniPC options that make set_timesteps build its own sigma spacing, which custom timesteps replace.
_OWN_SPACINGS = (
    "use_flow_sigmas",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_dynamic_shifting",
)


class UniPCCustomTimestepsScheduler(UniPCMultistepScheduler):
    """``UniPCMultistepScheduler`` whose ``set_timesteps`` also takes ``timesteps=`` (VP schedules).

    Example:
        >>> pipe.scheduler = UniPCCustomTimestepsScheduler.from_config(pipe.scheduler.config)
        >>> images = pipe("a red circle", timesteps=[999, 700, 400, 150, 30]).images
    """

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """UniPC's ``set_timesteps``, or with ``timesteps`` a run over exactly those timesteps.

        Args:
            num_inference_steps, device, sigmas, mu: as ``UniPCMultistepScheduler.set_timesteps``.
            timesteps: strictly decreasing integers in [0, num_train_timesteps), the model's timesteps of
                the run (the N evaluation points; the end point comes from ``final_sigmas_type``).

        Raises:
            ValueError: ``timesteps`` together with ``num_inference_steps`` or ``sigmas``, timesteps that
                are not strictly decreasing integers in range, or a config whose own sigma spacing
                (Karras, exponential, beta, flow) or ``solver_p`` custom timesteps would contradict.
        """
        if timesteps is None:
            super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
            return
        if num_inference_steps is not None or sigmas is not None:
            raise ValueError("timesteps: pass only one of num_inference_steps, sigmas and timesteps")
        for flag in _OWN_SPACINGS:
            if self.config.get(flag, False):
                raise ValueError(f"timesteps: custom timesteps need a VP schedule without {flag}=True")
        if self.solver_p is not None:
            raise ValueError("timesteps: custom timesteps are not supported with a solver_p")
        if self.config.final_sigmas_type not in ("sigma_min", "zero"):
            raise ValueError(f"final_sigmas_type must be 'sigma_min' or 'zero', got {self.config.final_sigmas_type!r}")
        values = check_timesteps(timesteps, self.config.num_train_timesteps)
        # UniPC's own reset (model_outputs, lower_order_nums, last_sample, step and begin index), then the
        # arrays for the requested points in place of its spacing.
        super().set_timesteps(len(values), device=device)
        alphas_cumprod = self.alphas_cumprod.double()
        train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        if self.config.final_sigmas_type == "sigma_min":
            final = train_sigmas[:1]
        else:
            final = torch.zeros(1, dtype=torch.float64)
        self.sigmas = torch.cat([train_sigmas[values], final]).float()  # on the CPU, as UniPC keeps them
        self.timesteps = torch.tensor(values, dtype=torch.int64, device=device)
        self.num_inference_steps = len(values)
