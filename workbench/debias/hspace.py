"""h-space access: read and replace the UNet's bottleneck features during an ordinary sampling run.

h is the output of the UNet's ``mid_block`` (Kwon et al.'s h-space, which Balancing Act steers). A forward
hook on ``unet.mid_block`` hands h to an *edit* function and puts back what it returns; the decoder's skip
connections are left alone, exactly as in the paper. A forward pre-hook on the UNet itself reads the
timestep the UNet receives, so the edit knows where in the schedule it is without touching the sampling
loop: the same context manager works inside ``workbench.sampling.denoise``, ``DDPMPipeline`` and
``StableDiffusionPipeline(...)`` calls. Both hooks are removed when the context exits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["HSpaceRecord", "hspace_edit", "mid_block", "record_hspace", "timestep_value"]

# edit(h, timestep) -> replacement h (same shape) or None to leave h unchanged.
HSpaceEdit = Callable[[torch.Tensor, int], torch.Tensor | None]


def mid_block(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet's bottleneck block (``UNet2DModel`` and ``UNet2DConditionModel``, toy, SD and SDXL layouts).

    Raises:
        TypeError: ``unet`` is not a module with a ``mid_block`` (e.g. a UNet built with ``mid_block_type=None``).
    """
    block = getattr(unet, "mid_block", None)
    if not isinstance(block, torch.nn.Module):
        raise TypeError(
            f"unet: {type(unet).__name__} has no mid_block, so it has no h-space; use a UNet2DModel or "
            "UNet2DConditionModel built with a mid block (mid_block_type not None)"
        )
    return block


def timestep_value(timestep: torch.Tensor | float | int) -> int:
    """The integer timestep of one UNet call (a scalar, or a per-sample tensor whose entries agree)."""
    t = torch.as_tensor(timestep).flatten()
    if t.numel() == 0:
        raise ValueError("timestep must not be empty")
    if t.numel() > 1 and not torch.all(t == t[0]):
        raise ValueError(f"timestep: h-space guidance needs one timestep per UNet call, got {t.tolist()}")
    return round(float(t[0]))


@contextlib.contextmanager
def hspace_edit(unet: torch.nn.Module, edit: HSpaceEdit) -> Iterator[None]:
    """Within the context, every UNet call passes its h through ``edit(h, timestep)``.

    ``h`` is the ``mid_block`` output (B, C, H, W); ``timestep`` the integer timestep of this call. A returned
    tensor replaces h for the decoder; ``None`` leaves the call exactly as it was (bit-identical output).
    The edit runs under the caller's grad mode (sampling loops run under ``no_grad``; an edit that needs a
    gradient opens ``torch.enable_grad()`` itself).
    """
    block = mid_block(unet)
    state: dict[str, int] = {}

    def read_timestep(module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        state["timestep"] = timestep_value(timestep)

    def replace_h(module, args, output):
        if "timestep" not in state:  # the mid block was called outside a UNet forward
            raise RuntimeError("hspace_edit: the mid block ran without a UNet call around it")
        new = edit(output, state["timestep"])
        if new is None:
            return None
        if new.shape != output.shape:
            raise ValueError(f"edit must return h of shape {tuple(output.shape)}, got {tuple(new.shape)}")
        return new.to(output.dtype)

    handles = [
        unet.register_forward_pre_hook(read_timestep, with_kwargs=True),
        block.register_forward_hook(replace_h),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class HSpaceRecord:
    """h of every UNet call in a context, in call order.

    Attributes:
        timesteps: the integer timestep of each call.
        h: the ``mid_block`` output of each call, (B, C, H, W), detached, on the CPU.
    """

    timesteps: list[int] = field(default_factory=list)
    h: list[torch.Tensor] = field(default_factory=list)

    def stacked(self, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All calls stacked along a step axis: (B, num_calls, C, H, W)."""
        if not self.h:
            raise ValueError("the record is empty: no UNet call ran inside record_hspace")
        return torch.stack([h.to(dtype) for h in self.h], dim=1)


@contextlib.contextmanager
def record_hspace(unet: torch.nn.Module, *, dtype: torch.dtype = torch.float16) -> Iterator[HSpaceRecord]:
    """Record h (stored in ``dtype``) at every UNet call inside the context; h itself is not changed."""
    record = HSpaceRecord()

    def keep(h: torch.Tensor, timestep: int) -> None:
        record.timesteps.append(timestep)
        record.h.append(h.detach().to("cpu", dtype))

    with hspace_edit(unet, keep):
        yield record
