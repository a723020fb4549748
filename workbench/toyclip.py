"""The toy CLIP: a small open_clip ``CLIP`` trained contrastively on toy-world captions.

It plays four parts in the workbench: the text encoder of the toy text-to-image model (its per-token
states feed the UNet's cross-attention, as CLIP's do in Stable Diffusion), the zero-shot classifier
(the TiF baseline and Balancing Act's pseudo-labeller), and the feature extractor for the Frechet
distance (:mod:`workbench.metrics`).

The model is open_clip's own ``CLIP`` with a small custom config and open_clip's bundled BPE tokenizer
(no download). :class:`ToyCLIPModel` wraps it as a diffusers ``ModelMixin`` so that it saves and loads
as safetensors + ``config.json`` like every other zoo model, and can be a pipeline component.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from open_clip.loss import ClipLoss
from tqdm.auto import trange

from workbench import checkpoint
from workbench.toyworld import ATTRIBUTES, ToyBatch, ToyWorld, caption
from workbench.training import warmup_cosine

__all__ = ["ToyCLIPModel", "attribute_accuracy", "train_toyclip", "zero_shot_classify"]

logger = logging.getLogger(__name__)

# CLIP's normalisation constants (open_clip's OPENAI_DATASET_MEAN / STD).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ToyCLIPModel(ModelMixin, ConfigMixin):
    """open_clip ``CLIP`` with a small ViT and text transformer, as a diffusers model.

    Images go in as float (B, 3, H, W) in [0, 1]; the wrapper applies CLIP's normalisation.
    Text goes in as strings or as open_clip token ids (B, context_length).
    """

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 128,
        image_size: int = 32,
        patch_size: int = 4,  # 8x8 = 64 patches at 32x32
        vision_width: int = 128,
        vision_layers: int = 4,
        vision_head_width: int = 32,
        context_length: int = 32,  # toy captions are at most 12 tokens
        vocab_size: int = 49408,  # open_clip's BPE vocabulary
        text_width: int = 128,
        text_heads: int = 4,
        text_layers: int = 4,
    ):
        super().__init__()
        self.clip = open_clip.CLIP(
            embed_dim=embed_dim,
            vision_cfg=dict(
                image_size=image_size,
                patch_size=patch_size,
                width=vision_width,
                layers=vision_layers,
                head_width=vision_head_width,
            ),
            text_cfg=dict(
                context_length=context_length,
                vocab_size=vocab_size,
                width=text_width,
                heads=text_heads,
                layers=text_layers,
            ),
        )
        self.register_buffer("_mean", torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(_CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self._tokenizer: open_clip.SimpleTokenizer | None = None

    @property
    def tokenizer(self) -> open_clip.SimpleTokenizer:
        if self._tokenizer is None:
            self._tokenizer = open_clip.SimpleTokenizer(context_length=self.config.context_length)
        return self._tokenizer

    def tokenize(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """open_clip BPE token ids, (B, context_length), on the model's device."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts)).to(self.device)

    def _tokens(self, text: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        return text.to(self.device) if isinstance(text, torch.Tensor) else self.tokenize(text)

    def encode_text_states(self, text: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Per-token text states after the final layer norm, (B, context_length, text_width).

        These are the cross-attention inputs of the toy text-to-image UNet (the analogue of CLIP's
        ``last_hidden_state`` in Stable Diffusion).
        """
        clip, tokens = self.clip, self._tokens(text)
        x = clip.token_embedding(tokens) + clip.positional_embedding
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        return clip.ln_final(x)

    def encode_text(self, text: str | Sequence[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pooled text embedding, (B, embed_dim)."""
        return self.clip.encode_text(self._tokens(text), normalize=normalize)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embedding, (B, embed_dim), from float images (B, 3, H, W) in [0, 1]."""
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if images.shape[-2:] != (size, size):
            raise ValueError(f"images must be {size}x{size} for this toy CLIP, got {tuple(images.shape[-2:])}")
        images = (images.to(self.device, self.dtype) - self._mean) / self._std
        return self.clip.encode_image(images, normalize=normalize)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text features and the logit scale: the inputs of ``ClipLoss``."""
        return self.encode_image(images), self.encode_text(text), self.clip.logit_scale.exp()


@torch.no_grad()
def zero_shot_classify(
    model: ToyCLIPModel,
    images: torch.Tensor | np.ndarray,
    attribute: str,
    *,
    values: Sequence[str] | None = None,
    batch_size: int = 512,
) -> torch.Tensor:
    """Classify one attribute by the nearest caption ("a red shape", "a circle", ...).

    Args:
        values: the candidate values (default: all of ``ATTRIBUTES[attribute]``); e.g. ("circle", "square")
            for a world that has no triangles.

    Returns:
        int64 (N,) indices into ``values``.
    """
    return zero_shot_probabilities(model, images, attribute, values=values, batch_size=batch_size).argmax(dim=1)


@torch.no_grad()
def zero_shot_probabilities(
    model: ToyCLIPModel,
    images: torch.Tensor | np.ndarray,
    attribute: str,
    *,
    values: Sequence[str] | None = None,
    batch_size: int = 512,
) -> torch.Tensor:
    """Softmax over ``values`` (default: all the attribute's) of CLIP's image-caption similarity, (N, len)."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {sorted(ATTRIBUTES)}, got {attribute!r}")
    values = tuple(ATTRIBUTES[attribute]) if values is None else tuple(values)
    unknown = [v for v in values if v not in ATTRIBUTES[attribute]]
    if unknown or len(set(values)) < 2 or len(set(values)) != len(values):
        raise ValueError(
            f"values must be two or more distinct {attribute} values from {ATTRIBUTES[attribute]}, got {values}"
        )
    images = torch.as_tensor(images)
    text = model.encode_text([caption({attribute: v}) for v in values])
    scale = model.clip.logit_scale.exp()
    chunks = [(scale * model.encode_image(chunk) @ text.T).softmax(dim=1) for chunk in images.split(batch_size)]
    return torch.cat(chunks).float().cpu()


def attribute_accuracy(model: ToyCLIPModel, batch: ToyBatch, attributes: Sequence[str] = tuple(ATTRIBUTES)) -> dict:
    """Zero-shot accuracy per attribute on a labelled toy batch."""
    images = torch.from_numpy(batch.images)
    return {a: float((zero_shot_classify(model, images, a).numpy() == batch.labels[a]).mean()) for a in attributes}


def train_toyclip(
    out_dir: str | Path,
    *,
    steps: int = 1600,
    vision_steps: int = 800,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    warmup_steps: int = 100,
    caption_dropout: float = 0.3,  # teaches partial prompts: "a circle", "a red shape"
    seed: int = 0,
    checkpoint_every: int = 250,
    state_dir: str | Path | None = None,
) -> ToyCLIPModel:
    """Train the toy CLIP from scratch (or resume) with open_clip's contrastive ``ClipLoss``.

    Two stages: ``steps`` joint steps, then ``vision_steps`` with the text tower locked (only the image
    tower and the temperature learn). The joint stage alone left circles and squares of the same size
    confused (75 % zero-shot shape accuracy); the locked-text stage sharpens the image tower without
    changing a single text weight, so the text-to-image model, which reads only the text tower, is
    unaffected by it.

    Training state (weights, AdamW moments, data RNG) goes to ``state_dir`` every ``checkpoint_every``
    steps; a rerun with the same arguments resumes from it. The final model is saved to ``out_dir``
    (fp16 safetensors + config.json) with a ``training.json`` that records the arguments.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if vision_steps < 0:
        raise ValueError(f"vision_steps must be >= 0, got {vision_steps}")
    total = steps + vision_steps
    out_dir = Path(out_dir)
    state_path = Path(state_dir or Path("runs") / out_dir.name) / "state.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyCLIPModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1, betas=(0.9, 0.98))
    joint_factor, vision_factor = warmup_cosine(warmup_steps, steps), warmup_cosine(50, max(1, vision_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: joint_factor(step) if step < steps else 0.5 * vision_factor(step - steps)
    )
    data_rng = np.random.default_rng(seed)
    world = ToyWorld()
    start = checkpoint.load_training_state(state_path, model, optimizer, schedule, data_rng)
    segments = checkpoint.continue_segments(state_path, start, {"steps": steps, "vision_steps": vision_steps})
    for group, base_lr in zip(optimizer.param_groups, schedule.base_lrs, strict=True):
        group["lr"] = base_lr * schedule.lr_lambdas[0](start)  # the learning rate is the schedule's, not the file's
    loss_fn = ClipLoss()
    model.train()
    progress = trange(start, total, initial=start, total=total, desc="toyclip")
    for step in progress:
        if step == max(start, steps):
            _lock_text_tower(model)
        batch = world.sample(batch_size, data_rng, caption_dropout=caption_dropout)
        images = torch.from_numpy(batch.images)
        tokens = model.tokenize(batch.captions)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.device.type == "cpu"):
            image_features, text_features, logit_scale = model(images, tokens)
        loss = loss_fn(image_features.float(), text_features.float(), logit_scale.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # CLIP's clamp of the temperature
            model.clip.logit_scale.clamp_(0, math.log(100))
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == total:
            checkpoint.save_training_state(
                state_path, model, optimizer, schedule, data_rng, step + 1, segments=segments
            )
    model.eval()
    accuracy = attribute_accuracy(model, ToyWorld().sample(2000, np.random.default_rng(10_000 + seed)))
    logger.info("toyclip zero-shot accuracy: %s", accuracy)
    checkpoint.save_model(
        model,
        out_dir,
        training=dict(
            command=f"python -m workbench zoo train toyclip --steps {steps} --vision-steps {vision_steps} "
            f"--seed {seed}",
            steps=steps,
            vision_steps=vision_steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            caption_dropout=caption_dropout,
            seed=seed,
            zero_shot_accuracy=accuracy,
            segments=segments,
        ),
    )
    return model


def _lock_text_tower(model: ToyCLIPModel) -> None:
    """Freeze every text-side weight (AdamW then skips them: their grads stay None)."""
    for name, parameter in model.clip.named_parameters():
        if not name.startswith("visual.") and name != "logit_scale":
            parameter.requires_grad_(False)


def read_training_record(model_dir: str | Path) -> dict:
    """The ``training.json`` written beside a zoo checkpoint (command, seed, figures)."""
    return json.loads((Path(model_dir) / "training.json").read_text())
