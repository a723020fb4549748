"""The toy text-to-image pipeline: toy CLIP text states -> pixel-space UNet -> scheduler.

:class:`ToyTextToImagePipeline` mirrors ``StableDiffusionPipeline`` where the methods touch it
(``unet``, ``scheduler``, ``text_encoder``, ``encode_prompt`` with the same signature and return value,
``__call__`` with ``prompt``, ``num_inference_steps``, ``timesteps``, ``guidance_scale``, ``guidance_rescale``,
``generator`` and ``latents``), so a paper method written against one runs on the other. It has no VAE:
the UNet works on pixels in [-1, 1] (``vae`` is None and ``vae_scale_factor`` is 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DConditionModel

from workbench.sampling import StepInfo, denoise, initial_noise
from workbench.toyclip import ToyCLIPModel

__all__ = ["ToyTextToImagePipeline"]


class ToyTextToImagePipeline(DiffusionPipeline):
    """Text-to-image on the toy world.

    Components:
        unet: ``UNet2DConditionModel`` on RGB pixels, epsilon prediction.
        scheduler: any diffusers scheduler with Stable Diffusion's scaled-linear betas.
        text_encoder: :class:`~workbench.toyclip.ToyCLIPModel`; its per-token states are the UNet's
            ``encoder_hidden_states``.

    Example:
        >>> from workbench import zoo
        >>> pipe = zoo.load("toy-t2i")
        >>> images = pipe("a red circle", num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images
    """

    model_cpu_offload_seq = "text_encoder->unet"
    vae = None
    vae_scale_factor = 1

    def __init__(self, unet: UNet2DConditionModel, scheduler: SchedulerMixin, text_encoder: ToyCLIPModel):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder)

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        device: torch.device | str | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text states for the prompts and (with guidance) the negative prompts, as Stable Diffusion's.

        Returns:
            ``(prompt_embeds, negative_prompt_embeds)``, each (B * num_images_per_prompt, L, D); the second
            is None without guidance. The default negative prompt is the empty string, the prompt the
            model was trained with when its caption was dropped.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        device = device or self.unet.device
        embeds = self.text_encoder.encode_text_states(prompts).to(device)
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return embeds, None
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        negative = self.text_encoder.encode_text_states(negatives).to(device)
        return embeds, negative.repeat_interleave(num_images_per_prompt, dim=0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = 20,
        timesteps: Sequence[int] | None = None,
        guidance_scale: float = 4.0,
        guidance_rescale: float = 0.0,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback: Callable[[StepInfo], None] | None = None,
        progress: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt``.

        Args:
            height, width: output size in pixels (default: the UNet's ``sample_size``); multiples of
                2^(number of down blocks - 1).
            num_inference_steps, timesteps: the schedule; ``timesteps`` (descending ints) overrides.
            guidance_scale: classifier-free guidance weight (1 disables guidance).
            guidance_rescale: rescale of the guided prediction toward the conditional one's standard
                deviation, in [0, 1], as ``StableDiffusionPipeline``'s (see :func:`~workbench.sampling.denoise`).
            generator: seeds the initial noise (a list gives one generator per image).
            latents: initial noise (B, 3, H, W) instead of drawing it.
            output_type: "np" ((B, H, W, 3) in [0, 1]), "pt" ((B, 3, H, W) in [0, 1]) or "pil".
        """
        if output_type not in ("np", "pt", "pil"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'pil', got {output_type!r}")
        size = self.unet.config.sample_size
        height, width = height or size, width or size
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
        guided = guidance_scale > 1.0
        prompt_embeds, negative_embeds = self.encode_prompt(
            prompt, self.unet.device, num_images_per_prompt, guided, negative_prompt
        )
        shape = (len(prompt_embeds), self.unet.config.in_channels, height, width)
        if latents is None:
            latents = initial_noise(shape, generator, device=self.unet.device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        samples = denoise(
            self.unet,
            self.scheduler,
            latents,
            num_inference_steps=None if timesteps is not None else num_inference_steps,
            timesteps=timesteps,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            generator=generator,
            callback=callback,
            progress=progress,
        )
        images = ((samples.float() + 1) / 2).clamp(0, 1).cpu()
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).numpy()
        elif output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def as_channels_first(images: np.ndarray) -> np.ndarray:
    """(B, H, W, C) pipeline output to the (B, C, H, W) layout of the toy world and metrics."""
    return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))
