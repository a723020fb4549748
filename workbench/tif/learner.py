"""Class-specific LoRA adapters: one per class, all held in one UNet, trained on the few shots.

The loop is :func:`workbench.training.train_diffusion` (the zoo's): the shots are served by a small sampler
with the ``sample(n, rng, caption_dropout=...)`` method the loop expects, every caption is the one shared
class prompt, and only the active adapter's weights have gradients, so the base weights never change.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import SchedulerMixin
from safetensors import safe_open
from safetensors.torch import save_file

from workbench.adapters import (
    ATTENTION_PROJECTIONS,
    FEED_FORWARD_PROJECTIONS,
    adapter_names,
    add_lora,
    block_linears,
    load_lora,
    save_lora,
    use_adapter,
)
from workbench.toyworld import ToyBatch, to_model_space
from workbench.training import DiffusionTrainConfig, train_diffusion

__all__ = [
    "AdapterTrainConfig",
    "FewShotSet",
    "encode_prompt_states",
    "levels_for_shots",
    "load_class_adapters",
    "model_space",
    "save_class_adapters",
    "train_class_adapters",
]


@dataclass(frozen=True)
class FewShotSet:
    """Labelled images of K classes.

    Attributes:
        images: float32 (N, 3, H, W) in [0, 1].
        labels: int64 (N,) class indices into ``class_names``.
        class_names: the K classes (also the adapter names).
        prompt: the one prompt shared by every class (identity lives in the adapters).
        spurious: optional int64 (N,) per image, the class its spurious cue points to (for analysis).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    prompt: str
    spurious: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got shape {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must have shape ({len(self.images)},), got {self.labels.shape}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"labels must index class_names {self.class_names}, got {np.unique(self.labels)}")
        for name in self.class_names:
            if not name or "." in name:
                raise ValueError(f"class_names: {name!r} cannot be an adapter name (empty or contains '.')")

    def __len__(self) -> int:
        return len(self.images)

    def of_class(self, index: int) -> np.ndarray:
        return self.images[self.labels == index]


@dataclass(frozen=True)
class AdapterTrainConfig:
    rank: int = 8  # official: 16 (FGVC, re-ID), 8 (ISIC)
    levels: int | None = None  # None: every attention level; 1: mid + lowest level (official for 1-4 shots)
    steps: int = 150  # official FGVC: 150 (1 shot) to 1000 (16 shots); ours are per class, toy scale
    batch_size: int = 8  # official: 1
    learning_rate: float = 1e-3  # official 1e-4 at rank 16 on SD; the toy model needs larger steps
    projections: tuple[str, ...] = ATTENTION_PROJECTIONS + FEED_FORWARD_PROJECTIONS  # official: attention + GEGLU
    seed: int = 0
    bf16_autocast: bool = True

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.levels is not None and (not isinstance(self.levels, int) or self.levels < 1):
            raise ValueError(f"levels must be None or a positive integer, got {self.levels!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


def levels_for_shots(shots: int) -> int | None:
    """The official recipe's adapted blocks by shot count: 1 level for 1-4 shots, 2 for 8, all for 16+."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    return 1 if shots <= 4 else 2 if shots <= 8 else None


class _ShotSampler:
    """The few shots of one class as the ``world`` of :func:`train_diffusion` (random picks, random flips)."""

    def __init__(self, images: np.ndarray, prompt: str):
        self.images, self.prompt = images, prompt

    def sample(self, n: int, rng: np.random.Generator, *, caption_dropout: float = 0.0) -> ToyBatch:
        picks = self.images[rng.integers(0, len(self.images), size=n)]
        flip = rng.random(n) < 0.5
        picks = np.where(flip[:, None, None, None], picks[..., ::-1], picks).astype(np.float32)
        zeros = np.zeros(n, dtype=np.float32)
        return ToyBatch(images=picks, labels={}, x=zeros, y=zeros, captions=[self.prompt] * n)


def model_space(pipe, images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] to the UNet's space: pixels in [-1, 1] (toy), or the VAE's scaled
    posterior mean (Stable Diffusion, as the official inference code does)."""
    images = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if images.shape[-2:] != (size, size):
        raise ValueError(f"images must be {size}x{size} for this pipeline, got {tuple(images.shape[-2:])}")
    if getattr(pipe, "vae", None) is None:
        return torch.from_numpy(to_model_space(images.numpy()))
    vae = pipe.vae
    with torch.no_grad():
        posterior = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist
    return (posterior.mean * vae.config.scaling_factor).float().cpu()


def encode_prompt_states(pipe, prompts: str | Sequence[str]) -> torch.Tensor:
    """Text states (B, L, D) the UNet cross-attends to, from the pipeline's own ``encode_prompt``."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return pipe.encode_prompt(prompts, pipe.unet.device, 1, False)[0]


def train_class_adapters(
    pipe,
    noise_scheduler: SchedulerMixin,
    shots: FewShotSet,
    *,
    config: AdapterTrainConfig = AdapterTrainConfig(),
    progress: bool = True,
) -> list[str]:
    """Attach and train one LoRA adapter per class on ``pipe.unet`` (in place); returns the adapter names.

    Each adapter is trained with the denoising loss on its class's shots only (t uniform, the shared
    prompt ``shots.prompt``), through :func:`train_diffusion`. Adapters already attached under the same
    names are an error; other adapters stay untouched.

    Raises:
        ValueError: a class without shots, or an adapter of that name already attached.
    """
    unet = pipe.unet
    counts = np.bincount(shots.labels, minlength=len(shots.class_names))
    empty = [n for n, c in zip(shots.class_names, counts, strict=True) if c == 0]
    if empty:
        raise ValueError(f"shots: class(es) {empty} have no images; every class needs at least one shot")
    clash = [n for n in shots.class_names if n in adapter_names(unet)]
    if clash:
        raise ValueError(f"shots.class_names: adapters {clash} are already attached; delete them first")
    model_space(pipe, shots.images[:1])  # validates the image size for this pipeline
    states = encode_prompt_states(pipe, shots.prompt)
    targets = block_linears(unet, projections=config.projections, levels=config.levels)
    generator = torch.Generator().manual_seed(config.seed)
    for name in shots.class_names:
        add_lora(unet, rank=config.rank, target_modules=targets, adapter_name=name, generator=generator)
    encode_images = None if getattr(pipe, "vae", None) is None else (lambda images: model_space(pipe, images))
    for index, name in enumerate(shots.class_names):
        use_adapter(unet, name)
        for parameter_name, parameter in unet.named_parameters():
            parameter.requires_grad_("lora_" in parameter_name and f".{name}." in parameter_name)
        train_config = DiffusionTrainConfig(
            steps=config.steps,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            warmup_steps=max(1, config.steps // 10),
            ema_decay=0.0,  # the adapter as trained (no averaging, as the official recipe)
            prompt_dropout=0.0,
            caption_dropout=0.0,
            checkpoint_every=config.steps,
            seed=config.seed * 1_009 + index,
            bf16_autocast=config.bf16_autocast,
        )
        with tempfile.TemporaryDirectory(prefix="workbench-tif-") as folder:
            train_diffusion(
                unet,
                noise_scheduler,
                _ShotSampler(shots.of_class(index), shots.prompt),
                config=train_config,
                state_path=Path(folder) / "state.safetensors",
                encode_prompts=lambda prompts: states.expand(len(prompts), -1, -1),
                encode_images=encode_images,
                description=f"adapter {name}",
            )
    unet.requires_grad_(False)
    unet.eval()
    return list(shots.class_names)


def save_class_adapters(
    unet: torch.nn.Module,
    out_dir: str | Path,
    class_names: Sequence[str],
    *,
    metadata: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write each class's adapter to ``out_dir/NAME`` (safetensors) and ``out_dir/tif.json``.

    Args:
        dtype: store the weights in this floating dtype (e.g. ``torch.float16`` to halve the files);
            None keeps the model's. Loading casts them back to the model's dtype.
    """
    out_dir = Path(out_dir)
    missing = [n for n in class_names if n not in adapter_names(unet)]
    if missing:
        raise ValueError(f"class_names: no adapter attached for {missing}; attached: {adapter_names(unet)}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    for name in class_names:
        folder = save_lora(unet, out_dir / name, adapter_name=name)
        if dtype is not None:
            for file in folder.glob("*.safetensors"):
                with safe_open(str(file), "pt") as handle:
                    file_metadata = handle.metadata()
                    tensors = {key: handle.get_tensor(key).to(dtype) for key in handle.keys()}  # noqa: SIM118
                save_file(tensors, str(file), metadata=file_metadata)
    record = {"class_names": list(class_names), **(metadata or {})}
    (out_dir / "tif.json").write_text(json.dumps(record, indent=2, default=_plain))
    return out_dir


def load_class_adapters(unet: torch.nn.Module, folder: str | Path) -> dict:
    """Attach every adapter saved by :func:`save_class_adapters`; returns the saved ``tif.json`` record."""
    folder = Path(folder)
    if not (folder / "tif.json").is_file():
        raise FileNotFoundError(f"folder: no tif.json in {folder} (write it with save_class_adapters)")
    record = json.loads((folder / "tif.json").read_text())
    for name in record["class_names"]:
        load_lora(unet, folder / name, adapter_name=name)
    unet.requires_grad_(False)
    return record


def _plain(value):
    if isinstance(value, AdapterTrainConfig):
        return asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
