"""LoRA adapters (peft) on diffusers UNets: the fine-tuning hook that few-shot methods (TiF) build on.

A thin layer over diffusers' ``PeftAdapterMixin``: :func:`add_lora` attaches a peft ``LoraConfig``
adapter to the attention projections and leaves only its weights trainable; :func:`save_lora` and
:func:`load_lora` write and read the adapter alone as safetensors. LoRA's ``B`` matrices start at zero,
so a freshly attached adapter leaves the model's output unchanged (Hu et al., 2021, Sec. 4.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig

__all__ = ["ATTENTION_PROJECTIONS", "add_lora", "load_lora", "save_lora"]

# The query/key/value/output projections of every diffusers attention block (self and cross).
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(
    unet: torch.nn.Module,
    *,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
    adapter_name: str = "default",
    generator: torch.Generator | None = None,
) -> list[torch.nn.Parameter]:
    """Attach a LoRA adapter of ``rank`` to ``unet`` (in place), freeze everything else.

    Args:
        unet: a diffusers model with ``add_adapter`` (``UNet2DConditionModel``, ``UNet2DModel``).
        rank: the adapter's rank r (>= 1).
        alpha: LoRA's scale numerator (the update is ``alpha / r * B A``); default ``rank`` (scale 1).
        target_modules: module-name suffixes to adapt (default: every attention projection).
        adapter_name: name of the adapter (several may coexist).
        generator: seeds the random ``A`` matrices (``B`` starts at zero).

    Returns:
        The adapter's parameters: the only ones left with ``requires_grad``.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not hasattr(unet, "add_adapter"):
        raise TypeError(f"unet must be a diffusers model with peft support, got {type(unet).__name__}")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(target_modules), init_lora_weights=True)
    unet.requires_grad_(False)
    seed = None if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            unet.add_adapter(config, adapter_name=adapter_name)
        except ValueError as error:
            raise ValueError(
                f"target_modules {list(target_modules)} do not fit {type(unet).__name__}: {error}"
            ) from error
    parameters = [p for name, p in unet.named_parameters() if "lora_" in name and f".{adapter_name}." in name]
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


def save_lora(unet: torch.nn.Module, out_dir: str | Path, *, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` of ``unet`` (its weights and config) to ``out_dir`` as safetensors."""
    out_dir = Path(out_dir)
    unet.save_lora_adapter(out_dir, adapter_name=adapter_name, safe_serialization=True)
    return out_dir


def load_lora(unet: torch.nn.Module, path: str | Path, *, adapter_name: str = "default") -> None:
    """Attach the adapter saved by :func:`save_lora` at ``path`` to ``unet`` (same architecture)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path: no LoRA adapter at {path}")
    unet.load_lora_adapter(str(path), prefix=None, adapter_name=adapter_name, use_safetensors=True)
