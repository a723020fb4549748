"""What every patch-parallel rank must share, compared across the ranks by name.

DistriFusion (Li et al., CVPR 2024, arXiv 2402.19481, Sec. 4.1) runs the same model, scheduler and seed on
every device, each computing its patch of the same latent; nothing in the method notices when a rank
brings a different config, weights, prompt or step count: it computes a wrong image. These checks gather a
few numbers per field from every rank (one small synchronous all-gather) and raise the same
``ValueError`` on every rank when they differ, naming the field and each rank's value: the config's
fields and a weight checksum on entering a block (:func:`check_config`), the position in the block and
every UNet argument before each call (:func:`check_call`: count, sum and sum of |x| of each tensor), and the
number of calls on leaving (:func:`check_end`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from workbench.distrifusion.comm import collective_device
from workbench.distrifusion.config import MODES, PatchParallelConfig

__all__ = ["check_call", "check_config", "check_end"]


@dataclass(frozen=True)
class _Field:
    """One compared quantity: a fixed number of float64 values, and how to show them."""

    name: str
    values: tuple[float, ...]
    show: Callable[[tuple[float, ...]], str]
    rtol: float = 0.0
    hint: str = ""


def _same(a: tuple[float, ...], b: tuple[float, ...], rtol: float) -> bool:
    return all(
        (math.isnan(x) and math.isnan(y)) or abs(x - y) <= rtol * max(abs(x), abs(y)) for x, y in zip(a, b, strict=True)
    )


def _agree(fields: list[_Field], where: str) -> None:
    """All-gather the fields and raise the same ``ValueError`` on every rank if any rank's differ."""
    device = collective_device()
    local = torch.tensor([v for field in fields for v in field.values], dtype=torch.float64, device=device)
    gathered = torch.empty((dist.get_world_size(), local.numel()), dtype=torch.float64, device=device)
    dist.all_gather(list(gathered.unbind(0)), local)
    per_rank = gathered.cpu().tolist()
    problems = []
    start = 0
    for field in fields:
        end = start + len(field.values)
        values = [tuple(row[start:end]) for row in per_rank]
        start = end
        if not all(_same(value, values[0], field.rtol) for value in values):
            shown = "; ".join(f"rank {r}: {field.show(value)}" for r, value in enumerate(values))
            problems.append(f"{field.name} differs across ranks ({shown})" + (f": {field.hint}" if field.hint else ""))
            if field.name == "position in the block":
                break  # the ranks are at different points: the other fields compare unrelated calls
    if problems:
        raise ValueError(f"patch_parallel: the ranks disagree {where}: " + "; ".join(problems))


def _show_number(values: tuple[float, ...]) -> str:
    return f"{values[0]:g}"


def _show_mode(values: tuple[float, ...]) -> str:
    return repr(MODES[int(values[0])])


def check_config(config: PatchParallelConfig, unet: nn.Module) -> None:
    """On entering a block: the config's fields, the UNet's parameter count and a checksum of its weights."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for parameter in unet.parameters():
        total += parameter.detach().double().sum().cpu()
        count += parameter.numel()
    fields = [
        _Field("mode", (float(MODES.index(config.mode)),), _show_mode),
        _Field("warmup_steps", (float(config.warmup_steps),), _show_number),
        _Field("split_batch", (float(config.split_batch),), lambda v: str(bool(v[0]))),
        _Field("async_bucket_size", (float(config.async_bucket_size),), _show_number),
        _Field("UNet parameter count", (float(count),), _show_number),
        _Field("UNet weights (sum of all parameters)", (float(total),), lambda v: f"{v[0]:.9g}", rtol=1e-9),
    ]
    _agree(fields, "on entering the block")


# The UNet arguments by the names a reader knows them by, and what usually makes them differ.
_ARGUMENT_NAMES = {
    "sample": ("the input latents (sample)", "seed every rank's generator the same"),
    "timestep": ("the timestep", "every rank needs the same scheduler and num_inference_steps (or timesteps)"),
    "encoder_hidden_states": ("the prompt embeddings (encoder_hidden_states)", "every rank needs the same prompt"),
    "added_cond_kwargs": ("the added conditioning (added_cond_kwargs)", "every rank needs the same conditioning"),
}


def _summary(value: object) -> tuple[float, float, float]:
    """(number of values, sum, sum of |x|) of a tensor, a number, or the tensors and numbers in a dict or list."""
    if isinstance(value, torch.Tensor):
        values = value.detach().double()
        return float(values.numel()), float(values.sum()), float(values.abs().sum())
    if isinstance(value, (bool, int, float)):
        return 1.0, float(value), abs(float(value))
    if isinstance(value, dict):
        value = [value[key] for key in sorted(value)]
    if isinstance(value, (list, tuple)):
        parts = [_summary(item) for item in value]
        return tuple(float(sum(column)) for column in zip(*parts, strict=True)) if parts else (0.0, 0.0, 0.0)
    return 0.0, 0.0, 0.0  # None, or something that is not data


def _show_summary(values: tuple[float, ...]) -> str:
    count, total, absolute = values
    if count == 0:
        return "none"
    if count == 1:
        return f"{total:.6g}"
    return f"{count:.0f} values, sum {total:.6g}, sum of |x| {absolute:.6g}"


_CALL, _END = 1, 2  # what a rank is doing when it sends its position: about to call the UNet, leaving the block


def _position(event: int, calls: int) -> tuple[float, ...]:
    return float(event), float(calls)


def _show_position(values: tuple[float, ...]) -> str:
    event, calls = int(values[0]), int(values[1])
    if event == _CALL:
        return f"at UNet call {calls + 1}"
    return f"left the block after {calls} UNet calls"


def _call_fields(event: int, calls: int, arguments: dict[str, object] | None, names: list[str]) -> list[_Field]:
    """What every rank sends before each UNet call (``event`` _CALL) and on leaving the block (_END)."""
    position = "the ranks made different numbers of UNet calls (num_inference_steps?)"
    fields = [_Field("position in the block", _position(event, calls), _show_position, hint=position)]
    for name in names:
        summary = _summary(arguments.get(name)) if arguments is not None else (math.nan,) * 3
        label, hint = _ARGUMENT_NAMES.get(name, (name, ""))
        fields.append(_Field(label, summary, _show_summary, rtol=1e-6, hint=hint))
    return fields


def check_call(calls: int, arguments: dict[str, object], names: list[str]) -> None:
    """Before a UNet call: its position in the block (``calls`` made before it) and every argument in ``names``."""
    _agree(_call_fields(_CALL, calls, arguments, names), f"before UNet call {calls + 1}")


def check_end(calls: int, names: list[str]) -> None:
    """On leaving a block after ``calls`` UNet calls (a rank still calling the UNet then differs)."""
    _agree(_call_fields(_END, calls, None, names), "on leaving the block")
