"""LoRA adapters (peft) on diffusers UNets: the fine-tuning hook that few-shot methods (TiF) build on.

A thin layer over diffusers' ``PeftAdapterMixin``: :func:`add_lora` attaches a peft ``LoraConfig``
adapter to the attention projections and leaves only its weights trainable; :func:`save_lora` and
:func:`load_lora` write and read the adapter alone as safetensors. LoRA's ``B`` matrices start at zero,
so a freshly attached adapter leaves the model's output unchanged (Hu et al., 2021, Sec. 4.1). Several named
adapters can live in one UNet: :func:`block_linears` lists the linears to adapt (optionally only the
low-resolution blocks), and :func:`use_adapter` switches between them by name (None: the base model).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig

__all__ = [
    "ATTENTION_PROJECTIONS",
    "FEED_FORWARD_PROJECTIONS",
    "adapter_names",
    "add_lora",
    "block_linears",
    "load_lora",
    "save_lora",
    "use_adapter",
]

# The query/key/value/output projections of every diffusers attention block (self and cross).
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# The two linears of a transformer block's feed-forward (GEGLU's projection, then the output).
FEED_FORWARD_PROJECTIONS = ("ff.net.0.proj", "ff.net.2")


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


def block_linears(
    unet: torch.nn.Module,
    *,
    projections: Sequence[str] = ATTENTION_PROJECTIONS + FEED_FORWARD_PROJECTIONS,
    levels: int | None = None,
) -> list[str]:
    """Full names of the linears ending in ``projections``, optionally only in the low-resolution blocks.

    Args:
        unet: a diffusers UNet with ``down_blocks``, ``mid_block`` and ``up_blocks``.
        projections: module-name suffixes to collect.
        levels: None for every block; ``k`` >= 1 for the mid block plus the ``k`` lowest-resolution
            down blocks that have attention and the up blocks at the same resolutions (k = 1 on Stable
            Diffusion is ``down_blocks.2``, ``mid_block``, ``up_blocks.1``).

    Returns:
        Module names, usable as peft ``target_modules`` (also once adapters wrap them).
    """
    if levels is not None and (not isinstance(levels, int) or levels < 1):
        raise ValueError(f"levels must be None or a positive integer, got {levels!r}")
    num_levels = len(unet.down_blocks)
    prefixes = None
    if levels is not None:
        attention_levels = [i for i, block in enumerate(unet.down_blocks) if getattr(block, "attentions", None)]
        chosen = attention_levels[-levels:]
        prefixes = ("mid_block.", *(f"down_blocks.{i}." for i in chosen))
        prefixes += tuple(f"up_blocks.{num_levels - 1 - i}." for i in chosen)
    names = [
        name
        for name, module in unet.named_modules()
        if (isinstance(module, torch.nn.Linear) or isinstance(getattr(module, "base_layer", None), torch.nn.Linear))
        and any(name == p or name.endswith("." + p) for p in projections)
        and (prefixes is None or name.startswith(prefixes))
    ]
    if not names:
        raise ValueError(f"projections {list(projections)} with levels={levels} match no linear of the unet")
    return names


def adapter_names(unet: torch.nn.Module) -> list[str]:
    """The names of the adapters attached to ``unet`` (empty when none)."""
    return list(getattr(unet, "peft_config", {}) or {})


def use_adapter(unet: torch.nn.Module, adapter_name: str | None) -> None:
    """Make ``adapter_name`` the one active adapter of ``unet``; None runs the base model.

    The other adapters stay attached and inactive, so switching never reloads the base weights.
    """
    names = adapter_names(unet)
    if adapter_name is None:
        if names:
            unet.disable_adapters()
        return
    if adapter_name not in names:
        raise ValueError(f"adapter_name {adapter_name!r} is not attached to the unet; attached: {names}")
    unet.enable_adapters()
    unet.set_adapter(adapter_name)
