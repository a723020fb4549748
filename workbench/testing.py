"""Tiny, randomly initialised diffusers models built from configs, for tests and offline demos.

They have the layouts of the real ones (Stable Diffusion's ``UNet2DConditionModel`` with cross-attention,
a VAE, a CLIP text model and tokenizer; SDXL's two text encoders and added text/time conditioning) at a
few thousand parameters, the way diffusers' own tests build them (``get_dummy_components``). The
tokenizer's vocabulary is written locally: nothing is downloaded.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)

__all__ = [
    "tiny_clip_tokenizer",
    "tiny_dit",
    "tiny_stable_diffusion_pipeline",
    "tiny_stable_diffusion_xl_pipeline",
    "tiny_unet2d",
    "tiny_unet2d_condition",
    "tiny_unet2d_condition_xl",
    "tiny_vae",
]

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
_XL_TEXT_WIDTH = 32  # hidden size and projection size of both tiny SDXL text encoders


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def tiny_unet2d_condition(*, seed: int = 0, sample_size: int = 32, in_channels: int = 4) -> UNet2DConditionModel:
    """Stable Diffusion's UNet layout in miniature: two levels, cross-attention in both, 8 GroupNorm groups."""
    return _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=2,
            norm_num_groups=8,
        ),
    )


def tiny_unet2d(*, seed: int = 0, sample_size: int = 32, in_channels: int = 3) -> UNet2DModel:
    """A tiny ``UNet2DModel`` with self-attention at the lower level and in the mid block."""
    return _seeded(
        seed,
        lambda: UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
            norm_num_groups=8,
        ),
    )


def tiny_dit(*, seed: int = 0, sample_size: int = 16, in_channels: int = 3, num_classes: int = 4):
    """A tiny class-conditional ``DiTTransformer2DModel`` (one layer, two 8-wide heads, 4x4 patches).

    Called as ``model(x, t, class_labels=labels).sample``; ``labels`` are ints in ``[0, num_classes)``.
    """
    from diffusers import DiTTransformer2DModel

    return _seeded(
        seed,
        lambda: DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=in_channels,
            out_channels=in_channels,
            num_layers=1,
            sample_size=sample_size,
            patch_size=4,
            num_embeds_ada_norm=num_classes,
            norm_type="ada_norm_zero",
        ),
    )


def tiny_vae(*, seed: int = 0) -> AutoencoderKL:
    """A tiny random ``AutoencoderKL`` (4 latent channels, one downsampling: 32x32 images, 16x16 latents)."""
    return _seeded(
        seed,
        lambda: AutoencoderKL(
            block_out_channels=(16, 32),
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            sample_size=32,
        ),
    )


def tiny_clip_tokenizer(folder: str | Path):
    """A ``CLIPTokenizer`` over a character-level vocabulary written to ``folder`` (offline)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ".,!?'-")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=16)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_stable_diffusion_pipeline(folder: str | Path, *, seed: int = 0) -> StableDiffusionPipeline:
    """A tiny random ``StableDiffusionPipeline`` saved to ``folder`` and loaded back with ``from_pretrained``.

    The round trip through ``save_pretrained``/``from_pretrained`` is the point: it is the same code path
    that loads a real checkpoint by local path.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tokenizer = tiny_clip_tokenizer(folder / "_tokenizer_source")
    text_encoder = _seeded(
        seed + 1,
        lambda: CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=len(tokenizer),
                max_position_embeddings=16,
                layer_norm_eps=1e-5,
            )
        ),
    )
    vae = tiny_vae(seed=seed + 2)
    pipe = StableDiffusionPipeline(
        unet=tiny_unet2d_condition(seed=seed, sample_size=16),
        scheduler=DPMSolverMultistepScheduler(**SD_SCHEDULE, steps_offset=1),  # as Stable Diffusion ships it
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
    loaded = StableDiffusionPipeline.from_pretrained(folder / "pipeline", use_safetensors=True)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def tiny_unet2d_condition_xl(*, seed: int = 0, sample_size: int = 16) -> UNet2DConditionModel:
    """SDXL's UNet layout in miniature: attention only at the lower level (two transformer layers there),
    linear projections, and the added text/time conditioning (``addition_embed_type="text_time"``).

    ``added_cond_kwargs`` are ``text_embeds`` (B, 32), the pooled projection of the second text encoder,
    and ``time_ids`` (B, 6), (original size, crop top-left, target size); ``encoder_hidden_states`` are
    (B, L, 64), the two encoders' states side by side.
    """
    return _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=_XL_TEXT_WIDTH * 2,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + _XL_TEXT_WIDTH,  # 6 time ids x 8 + pooled text
            norm_num_groups=8,
        ),
    )


def tiny_stable_diffusion_xl_pipeline(folder: str | Path, *, seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny random ``StableDiffusionXLPipeline`` saved to ``folder`` and loaded back with ``from_pretrained``.

    SDXL's layout: two CLIP text encoders (the second with a projection, whose pooled output is the added
    ``text_embeds``), two tokenizers, a UNet with ``addition_embed_type="text_time"``
    (:func:`tiny_unet2d_condition_xl`) and the Euler scheduler SDXL ships with. 16x16 latents, 32x32 images.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    tokenizer = tiny_clip_tokenizer(folder / "_tokenizer_source")
    text_config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=_XL_TEXT_WIDTH,
        projection_dim=_XL_TEXT_WIDTH,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,  # SDXL reads the penultimate layer's states
        vocab_size=len(tokenizer),
        max_position_embeddings=16,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
    )
    vae = tiny_vae(seed=seed + 2)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=_seeded(seed + 1, lambda: CLIPTextModel(text_config)),
        text_encoder_2=_seeded(seed + 3, lambda: CLIPTextModelWithProjection(text_config)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=tiny_unet2d_condition_xl(seed=seed, sample_size=16),
        # as SDXL ships it
        scheduler=EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False,
    )
    pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
    loaded = StableDiffusionXLPipeline.from_pretrained(folder / "pipeline", use_safetensors=True, add_watermarker=False)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def tiny_ddpm_scheduler() -> DDPMScheduler:
    """Stable Diffusion's training schedule, for tests that add noise."""
    return DDPMScheduler(**SD_SCHEDULE, clip_sample=False)
