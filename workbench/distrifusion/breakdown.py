"""Where one rank's time goes: its layers, by kind, against the same layers' share of the one-device call.

:mod:`workbench.distrifusion.scaling` gives one number per canvas: the rank's time against T_1 / N. This
module splits both sides by the kinds of layer that DistriFusion changes (Li et al., CVPR 2024, Sec. 4.2):

* convolutions with a halo (kernel > 1): the patch plus ``padding`` rows of each neighbour;
* GroupNorm: the patch's statistics, the exchange, the whole-image normalisation;
* self-attention: the patch's queries against the whole image's keys and values;
* everything else (1x1 convolutions, activations, up- and down-sampling, the time embedding, the Python
  and dispatch between layers, and the rank's cutting of its input and assembling of the output).

For each kind, the *ideal share* is the one-device call's time in those layers divided by N, and the
excess of the rank over it is that kind's contribution to the gap between "of ideal" and 100 %. Times are
exclusive (a GroupNorm inside an attention module counts as GroupNorm only) and come from forward hooks.
The hooks' own cost (µs per layer, the same layers on both sides) falls mostly outside the clock readings,
so under "everything else", where the rank pays it whole and the ideal share 1/N of it: a small part of
that row's excess, the largest part on small canvases. The rank is timed as in
:func:`~workbench.distrifusion.scaling.rank_compute_ms`: a middle rank in ``mode``'s steady state, its
gathers replaced by local copies.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import ModelMixin
from diffusers.models.attention_processor import Attention
from torch import nn

from workbench.distrifusion.config import Mode, PatchParallelConfig
from workbench.distrifusion.layers import HaloConv2d, PatchGroupNorm, _is_self_attention
from workbench.distrifusion.runner import _parallelized
from workbench.distrifusion.scaling import ComputeOnlyComm, _synchronize, serial_cpu_timing, unet_inputs

__all__ = ["KINDS", "KindTimer", "LayerKindTime", "layer_kind", "rank_breakdown"]

KINDS = ("convolutions with a halo", "GroupNorm", "self-attention", "everything else")


@dataclass(frozen=True)
class LayerKindTime:
    """One kind of layer in :func:`rank_breakdown`; times in ms per UNet call."""

    kind: str
    ideal_ms: float
    rank_ms: float
    layers: int

    @property
    def excess_ms(self) -> float:
        return self.rank_ms - self.ideal_ms


def layer_kind(module: nn.Module) -> str | None:
    """The kind (one of :data:`KINDS` but the last) of a stock or patch-parallel layer; None for the rest."""
    if isinstance(module, HaloConv2d) or (isinstance(module, nn.Conv2d) and module.padding[0] > 0):
        return KINDS[0]
    if isinstance(module, (PatchGroupNorm, nn.GroupNorm)):
        return KINDS[1]
    if isinstance(module, Attention) and _is_self_attention(module):
        return KINDS[2]
    return None


class KindTimer:
    """Exclusive time per kind over nested ``enter``/``exit`` calls: a layer inside another pauses it."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)
        self._open: list[list] = []  # [kind, start of its current stretch]

    def enter(self, kind: str) -> None:
        now = self.clock()
        if self._open:
            outer = self._open[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._open.append([kind, now])

    def exit(self) -> None:
        now = self.clock()
        kind, start = self._open.pop()
        self.seconds[kind] += now - start
        if self._open:
            self._open[-1][1] = now

    def clear(self) -> None:
        if self._open:
            raise RuntimeError("the timer was cleared inside a timed layer")
        self.seconds.clear()


@contextmanager
def _timed_kinds(unet: nn.Module, timer: KindTimer, synchronize: Callable[[], None]) -> Iterator[dict[str, int]]:
    """Hooks on every layer with a kind (as the UNet is now); yields the number of layers per kind."""
    wrapped = {id(getattr(module, "conv", None)) for module in unet.modules() if isinstance(module, HaloConv2d)}
    wrapped |= {id(module.norm) for module in unet.modules() if isinstance(module, PatchGroupNorm)}
    handles, counts = [], defaultdict(int)
    for module in unet.modules():
        kind = layer_kind(module)
        if kind is None or id(module) in wrapped:  # the stock layer inside a patch layer: timed as the latter
            continue
        counts[kind] += 1

        def before(_module, _args, kind=kind):
            synchronize()
            timer.enter(kind)

        def after(_module, _args, _output):
            synchronize()
            timer.exit()

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def rank_breakdown(
    unet: ModelMixin,
    *,
    height: int,
    width: int,
    num_devices: int,
    repeats: int = 5,
    mode: Mode = "corrected_async_gn",
    steady_allocator: bool = True,
) -> list[LayerKindTime]:
    """Per kind of layer (:data:`KINDS`): the one-device call's time / N and one rank's time, ms per call.

    The one-device call and the rank are timed in ``repeats`` interleaved rounds after an untimed one;
    each side reports the round whose whole call was fastest, so that its kinds add up to one call. On a
    CPU with one thread and, with ``steady_allocator``, glibc keeping freed memory, as
    :func:`~workbench.distrifusion.scaling.compute_scaling`; on a GPU the hooks synchronise the device,
    which slows both sides alike.

    Raises:
        ValueError: ``num_devices`` < 2, ``repeats`` < 1, or a canvas that does not split into N patches.
    """
    if num_devices < 2:
        raise ValueError(f"num_devices must be >= 2, got {num_devices}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = unet.device
    sample, kwargs = unet_inputs(unet, batch_size=1, height=height, width=width)

    synchronize = functools.partial(_synchronize, device)

    def timed_call(timer: KindTimer) -> tuple[float, dict[str, float]]:
        timer.clear()
        synchronize()
        start = time.perf_counter()
        unet(sample, 500, **kwargs)
        synchronize()
        return time.perf_counter() - start, dict(timer.seconds)

    timer = KindTimer()
    config = PatchParallelConfig(mode=mode, warmup_steps=0)
    best: dict[str, tuple[float, dict[str, float]]] = {}
    with serial_cpu_timing(device, steady_allocator=steady_allocator), torch.no_grad():
        for round_ in range(repeats + 1):  # round 0 untimed
            with _timed_kinds(unet, timer, synchronize):
                timings = {"one": timed_call(timer)}
            with _parallelized(unet, config, num_devices, ComputeOnlyComm):
                unet(sample, 500, **kwargs)  # installs the patch layers; step 0 is synchronous
                with _timed_kinds(unet, timer, synchronize) as rank_counts:
                    timings["rank"] = timed_call(timer)
            for side, timing in timings.items():
                if round_ > 0 and (side not in best or timing[0] < best[side][0]):
                    best[side] = timing

    rows = []
    for kind in KINDS:
        sides = {}
        for side, (total, seconds) in best.items():
            sides[side] = total - sum(seconds.values()) if kind == KINDS[-1] else seconds.get(kind, 0.0)
        layers = rank_counts.get(kind, 0) if kind != KINDS[-1] else 0
        rows.append(LayerKindTime(kind, 1e3 * sides["one"] / num_devices, 1e3 * sides["rank"], layers))
    return rows
