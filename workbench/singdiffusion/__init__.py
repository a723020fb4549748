"""SingDiffusion: the singular first step at t = T, filled by a module that predicts E[x_0 | prompt].

Paper: Pengze Zhang, Hubery Yin, Chen Li, Xiaohua Xie, "Tackling the Singularities at the Endpoints of
Time Intervals in Diffusion Models", CVPR 2024, arXiv 2403.08381.

The idea in our words. Every sampler treats a reverse step as Gaussian. Near t = T that holds only
given the condition: x_T is independent of (x_0, c), so the best guess of x_0 from x_T is E[x_0 | c], a
finite mean image, while an epsilon model's own estimate ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``
is 0/0 there. Pipelines skip this step: they start at t0 = timesteps[0] (981 or 999 for Stable
Diffusion, where sqrt(abar) is still about 0.07) with pure noise as if it were x_{t0}. During training the
model read the image's mean brightness from that residual sqrt(abar) x_0 (the pixel mean of the noise is
tiny), so from pure noise it falls back to the data's average brightness: black and white prompts come
out grey. The singularity at t = 0 is intrinsic and needs nothing here.

The fix (the paper's module and first step):

- a time-free network g(x_T, c) trained by ``|| g(x_T, c) - x_0 ||^2`` with x_T ~ N(0, I) independent of
  (x_0, c); its optimum is E[x_0 | c] (10 % empty prompts give the unconditional mean for guidance);
- guidance at this step: ``x_bar = x_bar_c - (1 - 1/g) x_bar_u`` for g > 1, i.e. the usual guided
  mean divided by g;
- the first step ``x_{t0} = sqrt(abar_{t0}) x_bar + sqrt(1 - abar_{t0}) x_T`` (DDIM from abar = 0 to t0),
  handed to the unchanged pipeline through ``latents=``: every later step is the base sampler's.

Symbols and code names: x_T -> ``noise``; x_bar -> ``mean`` (:func:`predict_mean`); abar_{t0} ->
:func:`first_step_alpha_cumprod`; x_{t0} -> :func:`singular_latents`. :class:`ToyWorldOracle` gives the
exact E[x_0 | c] of the toy world, so a notebook can separate the idea from the trained module.

Sigma-parametrised samplers (Euler, Heun, LMS, ...) keep x / sqrt(abar) as their state and pipelines
multiply supplied latents by ``init_noise_sigma``: :func:`singular_latents` returns the latents that,
after that multiplication, equal the sampler's state at t0 (the official rule would scale twice there).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from workbench.sampling import set_timesteps
from workbench.toyworld import ATTRIBUTES, ToyWorld, to_model_space
from workbench.training import DiffusionTrainConfig, Objective, conditional_mean_objective, train_diffusion
from workbench.zoo import build_time_free_unet

__all__ = [
    "PLACEHOLDER_TIMESTEP",
    "CaptionedImages",
    "ToyWorldOracle",
    "build_mean_predictor",
    "first_step_alpha_cumprod",
    "first_step_latents",
    "guided_mean",
    "mean_objective",
    "parse_toy_prompt",
    "predict_mean",
    "singular_latents",
    "train_mean_predictor",
]

logger = logging.getLogger(__name__)

PLACEHOLDER_TIMESTEP = 1  # the official code passes t = 1 (so does zoo's toy-t2i-sing training)

# Schedulers whose state is the VP sample x_t (init_noise_sigma 1) or x_t / sqrt(abar_t) (sigma form).
VP_STATE_SCHEDULERS = (
    DDIMScheduler,
    DDPMScheduler,
    PNDMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    UniPCMultistepScheduler,
    DEISMultistepScheduler,
)
SIGMA_STATE_SCHEDULERS = (
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    KDPM2DiscreteScheduler,
)


# ----------------------------------------------------------------------------------------------------
# The module: a time-free UNet2DConditionModel


def build_mean_predictor(
    *,
    sample_size: int,
    in_channels: int,
    cross_attention_dim: int,
    block_out_channels: Sequence[int] = (32, 64),
    seed: int = 0,
) -> UNet2DConditionModel:
    """The SingDiffusion module: a diffusers ``UNet2DConditionModel`` used without time.

    It maps pure noise x_T (B, in_channels, sample_size, sample_size) and text states (B, L,
    cross_attention_dim) to x_bar, an estimate of E[x_0 | c]. diffusers' UNet has no switch to drop its
    time embedding, so the module is always called with the constant :data:`PLACEHOLDER_TIMESTEP`: the
    time MLP then sees one input and acts as a learned per-channel bias, carrying no time information
    (the official code reaches the same by setting every ResNet block's ``time_emb_proj`` to None).
    Cross-attention at the lower level reads the prompt (:func:`workbench.zoo.build_time_free_unet`).

    Args:
        sample_size, in_channels: the base model's latent (or pixel) size and channels.
        cross_attention_dim: the width of the base pipeline's text states.
        block_out_channels: channels per level (two levels; cross-attention at the second).
        seed: initialisation seed.
    """
    return build_time_free_unet(
        sample_size=sample_size,
        in_channels=in_channels,
        cross_attention_dim=cross_attention_dim,
        block_out_channels=tuple(block_out_channels),
        seed=seed,
    )


def mean_objective() -> Objective:
    """The module's training objective for :func:`workbench.training.train_diffusion`.

    Input: the noise eps itself (x_T, independent of the image); timestep: :data:`PLACEHOLDER_TIMESTEP`;
    target: x_0. The minimiser of ``E || g(x_T, c) - x_0 ||^2`` is E[x_0 | c].
    """
    return conditional_mean_objective(PLACEHOLDER_TIMESTEP)


@dataclass(frozen=True)
class CaptionedBatch:
    images: np.ndarray  # (B, 3, H, W) in [0, 1]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class CaptionedImages:
    """A fixed set of images with captions, as a data source for :func:`train_mean_predictor`.

    Args:
        images: float (N, 3, H, W) in [0, 1].
        captions: N captions.
    """

    images: np.ndarray
    captions: Sequence[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        if images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
            raise ValueError(f"images must be (N, 3, H, W) with N >= 1, got shape {images.shape}")
        if len(self.captions) != len(images):
            raise ValueError(f"captions must have one entry per image ({len(images)}), got {len(self.captions)}")

    def sample(self, n: int, rng: np.random.Generator, *, caption_dropout: float = 0.0) -> CaptionedBatch:
        """``n`` pairs drawn with replacement."""
        if caption_dropout != 0.0:
            raise ValueError(
                f"caption_dropout must be 0 for free-text captions, got {caption_dropout} "
                "(set DiffusionTrainConfig(caption_dropout=0.0))"
            )
        index = rng.integers(0, len(self.images), size=n)
        return CaptionedBatch(np.asarray(self.images, dtype=np.float32)[index], [self.captions[i] for i in index])


def _latent_shape(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
    """(channels, height, width) of the pipeline's latents for an image of ``height`` x ``width`` pixels
    (default: the UNet's sample size); the toy pipeline's latents are its pixels."""
    config = pipe.unet.config
    factor = getattr(pipe, "vae_scale_factor", 1) or 1
    height = height or config.sample_size * factor
    width = width or config.sample_size * factor
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    return config.in_channels, height // factor, width // factor


def _check_module(
    module: UNet2DConditionModel, pipe, prompt_width: int | None = None, latent_shape: tuple | None = None
) -> None:
    if not isinstance(module, UNet2DConditionModel):
        raise TypeError(f"module must be a UNet2DConditionModel, got {type(module).__name__}")
    channels, height, width = latent_shape or _latent_shape(pipe)
    config = module.config
    if (config.in_channels, config.sample_size, config.sample_size) != (channels, height, width):
        raise ValueError(
            f"module was built for {config.in_channels}x{config.sample_size}x{config.sample_size} latents, "
            f"the pipeline's are {channels}x{height}x{width}"
        )
    if prompt_width is not None and config.cross_attention_dim != prompt_width:
        raise ValueError(
            f"module has cross_attention_dim {config.cross_attention_dim}, the pipeline's text states are "
            f"{prompt_width} wide: train the module on this pipeline's text encoder"
        )


def _encode_images(pipe) -> Callable[[np.ndarray], torch.Tensor] | None:
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return None

    def encode(images: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(to_model_space(np.asarray(images, dtype=np.float32))).to(vae.device, vae.dtype)
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor  # deterministic: the mode

    return encode


def train_mean_predictor(
    module: UNet2DConditionModel,
    pipe,
    data: ToyWorld | CaptionedImages,
    *,
    config: DiffusionTrainConfig,
    state_path: str | Path,
    description: str = "mean predictor",
) -> UNet2DConditionModel:
    """Train the module for ``pipe``'s latent space and text encoder with the zoo's loop; return its EMA copy.

    The loop is :func:`workbench.training.train_diffusion` with :func:`mean_objective`: images are encoded
    by ``pipe.vae`` where the pipeline has one (Stable Diffusion), captions by ``pipe.encode_prompt``
    (empty with probability ``config.prompt_dropout``, which the guided first step needs).

    Args:
        module: from :func:`build_mean_predictor`, shaped for ``pipe``'s latents and text width.
        pipe: a ``ToyTextToImagePipeline`` or ``StableDiffusionPipeline`` (only its text encoder, VAE and
            scheduler config are used; the base UNet is not).
        data: the toy world, or :class:`CaptionedImages` (then ``config.caption_dropout`` must be 0).
        config: hyper-parameters; ``state_path``: resumable training state.
    """
    device = pipe.unet.device
    text_width = pipe.encode_prompt([""], device, 1, False)[0].shape[-1]
    factor = getattr(pipe, "vae_scale_factor", 1) or 1
    size = module.config.sample_size * factor
    image_size = data.image_size if isinstance(data, ToyWorld) else np.asarray(data.images).shape[-1]
    if image_size != size:
        raise ValueError(f"data: images are {image_size}px, the module's latents need {size}px images")
    _check_module(module, pipe, text_width, _latent_shape(pipe, size, size))
    return train_diffusion(
        module,
        pipe.scheduler,
        data,
        config=config,
        state_path=state_path,
        encode_prompts=lambda captions: pipe.encode_prompt(list(captions), device, 1, False)[0],
        encode_images=_encode_images(pipe),
        objective=mean_objective(),
        description=description,
    )


# ----------------------------------------------------------------------------------------------------
# Mean sources: the trained module, and the toy world's exact per-prompt mean


@torch.no_grad()
def predict_mean(module: UNet2DConditionModel, noise: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """x_bar = g(x_T, c): the module's E[x_0 | c] (B, C, H, W) for noise (B, C, H, W) and text states (B, L, D)."""
    timestep = torch.tensor(PLACEHOLDER_TIMESTEP, device=noise.device)
    dtype = module.dtype
    out = module(noise.to(dtype), timestep, encoder_hidden_states=prompt_embeds.to(dtype)).sample
    return out.to(noise.dtype)


_PROMPT_FILLER = {"a", "on", "background", "shape"}


def parse_toy_prompt(prompt: str) -> dict[str, str]:
    """The toy-world attributes a caption names ("a red circle on a black background" -> colour, shape,
    background); the empty prompt names none.

    Raises:
        ValueError: a word outside the toy world's captions, or two values of one attribute.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    lookup = {value: attribute for attribute, values in ATTRIBUTES.items() for value in values}
    attributes: dict[str, str] = {}
    for word in words:
        if word in _PROMPT_FILLER:
            continue
        if word not in lookup:
            raise ValueError(f"prompt {prompt!r}: the toy world's captions have no word {word!r}")
        attribute = lookup[word]
        if attributes.get(attribute, word) != word:
            raise ValueError(f"prompt {prompt!r} names two {attribute}s: {attributes[attribute]!r} and {word!r}")
        attributes[attribute] = word
    return attributes


@dataclass(frozen=True)
class ToyWorldOracle:
    """The exact E[x_0 | c] of the toy world, estimated by averaging images drawn with the prompt's attributes.

    Captions in training drop attribute words at random, so a partial prompt ("a red circle") means the
    world with those attributes fixed and the others at their world frequencies, which is what is sampled.

    Args:
        world: the toy world (its image size sets the output size).
        num_images: images averaged per prompt (the estimate's pixel std is about 0.5 / sqrt(num_images)).
        seed: seed of the images drawn.
    """

    world: ToyWorld = field(default_factory=ToyWorld)
    num_images: int = 2000
    seed: int = 777

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")

    def mean_images(self, prompts: Sequence[str]) -> torch.Tensor:
        """Per-prompt mean images in model space [-1, 1], (len(prompts), 3, H, W) float32."""
        cache: dict[str, torch.Tensor] = {}
        for prompt in prompts:
            if prompt not in cache:
                fixed = parse_toy_prompt(prompt)
                images = self.world.sample(self.num_images, self.seed, fixed=fixed).images
                cache[prompt] = torch.from_numpy(to_model_space(images.mean(axis=0)))
        return torch.stack([cache[p] for p in prompts])


MeanSource = UNet2DConditionModel | ToyWorldOracle


def guided_mean(conditional: torch.Tensor, unconditional: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """The first step's guidance: ``x_bar_c - (1 - 1/g) x_bar_u`` for g > 1, else x_bar_c.

    As in the paper's released pipeline. This is the usual guided combination
    ``x_bar_u + g (x_bar_c - x_bar_u)`` divided by g, which keeps a
    mean at the scale of a mean.
    """
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    if guidance_scale <= 1.0:
        return conditional
    if unconditional is None:
        raise ValueError("guidance_scale > 1 needs the unconditional mean (unconditional is None)")
    return conditional - (1.0 - 1.0 / guidance_scale) * unconditional


# ----------------------------------------------------------------------------------------------------
# The first step


def _check_scheduler(scheduler: SchedulerMixin) -> None:
    if not isinstance(scheduler, VP_STATE_SCHEDULERS + SIGMA_STATE_SCHEDULERS):
        allowed = sorted(cls.__name__ for cls in VP_STATE_SCHEDULERS + SIGMA_STATE_SCHEDULERS)
        raise ValueError(f"scheduler {type(scheduler).__name__} is not a supported VP scheduler; allowed: {allowed}")
    if scheduler.config.get("rescale_betas_zero_snr", False):
        raise ValueError(
            "scheduler has rescale_betas_zero_snr=True: with zero terminal SNR the first step already starts "
            "from x_T, so SingDiffusion is not needed (and the module would be ignored)"
        )
    if scheduler.config.get("prediction_type") == "flow_prediction" or scheduler.config.get("use_flow_sigmas"):
        raise ValueError("scheduler is a flow-matching configuration, not VP")


def first_step_alpha_cumprod(scheduler: SchedulerMixin) -> float:
    """abar at the sampler's first point, after ``set_timesteps``.

    From the scheduler's own first sigma where it keeps one (DPM-Solver++, UniPC, DEIS and the sigma-form
    samplers, whose sigmas may be Karras-spaced between training steps): ``abar = 1 / (1 + sigma_0^2)``;
    otherwise ``alphas_cumprod[timesteps[0]]`` (DDIM, DDPM, PNDM).
    """
    _check_scheduler(scheduler)
    if scheduler.timesteps is None or len(scheduler.timesteps) == 0:
        raise ValueError("scheduler: call set_timesteps first")
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > 0:
        sigma = float(torch.as_tensor(sigmas).flatten()[0])
        abar = 1.0 / (1.0 + sigma**2)
    else:
        t0 = round(float(scheduler.timesteps[0]))
        abar = float(scheduler.alphas_cumprod[t0])
    if not abar > 0.0:
        raise ValueError("scheduler has zero signal at its first step (zero terminal SNR): the method is not needed")
    return abar


def _prompt_list(prompt: str | Sequence[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    return prompts


def _check_prompt_length(pipe, prompts: Sequence[str]) -> None:
    """Refuse prompts the pipeline's tokenizer would truncate (the module would see a different prompt)."""
    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
    for tokenizer in tokenizers:  # transformers CLIPTokenizers (Stable Diffusion, SDXL's two)
        for p in prompts:
            count = len(tokenizer(p).input_ids)
            if count > tokenizer.model_max_length:
                raise ValueError(f"prompt {p!r} has {count} tokens; the tokenizer allows {tokenizer.model_max_length}")
    if not tokenizers:  # the toy pipeline: open_clip's tokenizer in toyclip
        clip = pipe.text_encoder
        for p in prompts:
            count = len(clip.tokenizer.encode(p)) + 2  # + start and end tokens
            if count > clip.config.context_length:
                raise ValueError(f"prompt {p!r} has {count} tokens; the tokenizer allows {clip.config.context_length}")


@torch.no_grad()
def singular_latents(
    pipe,
    prompt: str | Sequence[str],
    mean_source: MeanSource,
    *,
    num_inference_steps: int | None = 20,
    timesteps: Sequence[int] | None = None,
    guidance_scale: float = 4.0,
    negative_prompt: str | Sequence[str] | None = None,
    num_images_per_prompt: int = 1,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """The SingDiffusion initial latents for ``pipe(prompt, latents=...)`` with the same schedule.

    Draws x_T (or takes ``noise``), predicts x_bar for the prompts (and, for g > 1, for the negative
    prompts or ""), guides it with :func:`guided_mean`, and returns
    ``(sqrt(abar_{t0}) x_bar + sqrt(1 - abar_{t0}) x_T) / c`` where c = sqrt(abar_{t0}) *
    ``init_noise_sigma`` for sigma-form samplers (so that the pipeline's multiplication by
    ``init_noise_sigma`` yields their state ``x_bar + sigma_{t0} x_T``) and c = 1 for VP samplers.

    Args:
        pipe: ``ToyTextToImagePipeline``, ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``; its
            scheduler is reset with the schedule given here, which must be the one passed to ``pipe``.
        prompt: the prompt(s).
        mean_source: the trained module (``UNet2DConditionModel``) or a :class:`ToyWorldOracle`.
        num_inference_steps, timesteps: the sampler's schedule (t0 = its first timestep).
        guidance_scale: g, the pipeline's guidance scale.
        negative_prompt: gives x_bar_u (default "").
        num_images_per_prompt: images per prompt.
        generator: draws x_T when ``noise`` is None (the same generator the base run would use).
        noise: x_T, (B, C, H, W) standard normal.
        height, width: the image size passed to ``pipe`` (default: the UNet's sample size times the VAE
            factor); the module must have been trained for these latents.

    Returns:
        latents (B, C, H, W) in the pipeline's dtype and device.
    """
    prompts = _prompt_list(prompt)
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    _check_scheduler(pipe.scheduler)
    _check_prompt_length(pipe, prompts + ([] if negative_prompt is None else _prompt_list(negative_prompt)))
    if not isinstance(mean_source, UNet2DConditionModel | ToyWorldOracle):
        raise TypeError(
            f"mean_source must be a UNet2DConditionModel (the trained module) or a ToyWorldOracle, "
            f"got {type(mean_source).__name__}"
        )
    device, dtype = pipe.unet.device, pipe.unet.dtype
    latent_shape = _latent_shape(pipe, height, width)
    channels, height, width = latent_shape
    shape = (len(prompts) * num_images_per_prompt, channels, height, width)
    if noise is None:
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    noise = noise.to(device, torch.float32)
    guided = guidance_scale > 1.0
    if isinstance(mean_source, ToyWorldOracle):
        if channels != 3 or getattr(pipe, "vae", None) is not None or mean_source.world.image_size != height:
            raise ValueError(
                f"mean_source: the toy-world oracle is a {mean_source.world.image_size}px pixel-space mean; "
                f"the pipeline works on {channels}x{height}x{width} latents"
            )
        expand = [p for p in prompts for _ in range(num_images_per_prompt)]
        conditional = mean_source.mean_images(expand).to(device)
        unconditional = None
        if guided:
            negatives = [""] * len(prompts) if negative_prompt is None else _prompt_list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
            unconditional = mean_source.mean_images([n for n in negatives for _ in range(num_images_per_prompt)])
            unconditional = unconditional.to(device)
    else:
        embeds, negative_embeds = pipe.encode_prompt(
            prompt=prompts,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt,
        )[:2]
        _check_module(mean_source, pipe, embeds.shape[-1], latent_shape)
        conditional = predict_mean(mean_source, noise, embeds)
        unconditional = predict_mean(mean_source, noise, negative_embeds) if guided else None
    mean = guided_mean(conditional.float(), None if unconditional is None else unconditional.float(), guidance_scale)
    scheduler = pipe.scheduler
    set_timesteps(
        scheduler,
        num_inference_steps=None if timesteps is not None else num_inference_steps,
        timesteps=timesteps,
        device=device,
    )
    return first_step_latents(scheduler, mean, noise).to(dtype)


def first_step_latents(scheduler: SchedulerMixin, mean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The first step from x_T to t0 = ``scheduler.timesteps[0]`` (after ``set_timesteps``), as ``latents=``.

    ``x_{t0} = sqrt(abar_{t0}) mean + sqrt(1 - abar_{t0}) noise`` is the DDIM step from abar = 0 (where the
    noise prediction is x_T exactly and the x_0 prediction is ``mean``). Sigma-form samplers (Euler, ...)
    keep ``x_{t0} / sqrt(abar_{t0})`` and pipelines multiply ``latents`` by ``init_noise_sigma``, so for
    them the result is divided by ``sqrt(abar_{t0}) * init_noise_sigma``.

    Args:
        scheduler: a supported VP scheduler with its timesteps set.
        mean: x_bar (B, C, H, W), the estimate of E[x_0 | c] in the model's space.
        noise: x_T (B, C, H, W), standard normal.
    """
    if mean.shape != noise.shape:
        raise ValueError(f"mean and noise must have the same shape, got {tuple(mean.shape)} and {tuple(noise.shape)}")
    abar = first_step_alpha_cumprod(scheduler)
    latents = math.sqrt(abar) * mean + math.sqrt(1.0 - abar) * noise
    if isinstance(scheduler, SIGMA_STATE_SCHEDULERS):
        latents = latents / (math.sqrt(abar) * float(scheduler.init_noise_sigma))
    return latents
