"""What one patch-parallel rank computes: its modelled speed-up against the canvas size, and where its time goes.

DistriFusion's speed-up comes from each of N devices computing 1/N of the image while the exchanges hide
behind the computation (Li et al., CVPR 2024, arXiv 2402.19481, Sec. 4.1); the paper's speed-ups grow
with the resolution (Fig. 6). On one machine we time exactly what one rank computes in the steady state
after the warm-up (its rows with their halos, its queries against the whole image's keys, the corrected
GroupNorm statistics), with every all-gather replaced by a local copy of the same size
(:class:`ComputeOnlyComm`): T_rank(N). Then

    modelled speed-up = T_1 / T_rank(N),    of ideal = speed-up / N,

an upper bound for N devices like this one with communication fully hidden, not a measurement of N
devices. A UNet call also has a cost that no split divides (time embedding, Python, per-layer dispatch):
the one-device call on the smallest canvas the UNet takes estimates it as F, and

    bound = T_1 / (F + (T_1 - F) / N) / N

is the most "of ideal" any row split could reach with no overhead of its own.

:func:`rank_breakdown` splits both sides by the kinds of layer the method changes (Sec. 4.2), with
``torch.profiler``: each layer runs inside a ``record_function`` range named by its kind, and a kind's
time is its ranges' time less the ranges of other kinds nested in them (a GroupNorm inside an attention
module counts as GroupNorm only). See ``workbench/benchmarks/README.md`` for how to read the tables.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import ModelMixin
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from tqdm.auto import tqdm

from workbench.distrifusion.comm import CommStats, PatchComm, PendingGather
from workbench.distrifusion.config import Mode, PatchLayout, PatchParallelConfig
from workbench.distrifusion.layers import HaloConv2d, PatchGroupNorm, count_downsamples, is_self_attention
from workbench.distrifusion.parallel import parallelize

__all__ = [
    "KINDS",
    "ComputeOnlyComm",
    "LayerKindRow",
    "ScalingRow",
    "compute_scaling",
    "layer_kind",
    "print_breakdown_table",
    "print_scaling_table",
    "rank_breakdown",
    "rank_compute_ms",
    "unet_inputs",
]

KINDS = ("convolutions with a halo", "GroupNorm", "self-attention", "everything else")


class ComputeOnlyComm(PatchComm):
    """One rank's work without communication: every "gather" repeats the local tensor (wrong values, same work).

    Timing a UNet call under it measures what one rank computes with the communication taken out. The rank
    is the second patch: with three or more patches it has neighbours on both sides, the most work any rank
    does (the step waits for the slowest).
    """

    def __init__(self, layout: PatchLayout, stats: CommStats):
        self.layout, self.stats, self.num_local = layout, stats, 1
        self.patch_index = torch.tensor([min(1, layout.num_patches - 1)])
        self.batch_group = torch.tensor([0])

    def all_gather(self, fresh: torch.Tensor, *, kind: str, async_op: bool = False) -> PendingGather:
        return PendingGather(fresh.unsqueeze(1).expand(1, self.num_patches, *fresh.shape[1:]).contiguous())

    def gather_output(self, local: torch.Tensor) -> torch.Tensor:
        return local.unsqueeze(0).expand(self.layout.world_size, *local.shape).contiguous()


def unet_inputs(unet: ModelMixin, *, batch_size: int, height: int, width: int) -> tuple[torch.Tensor, dict]:
    """A fixed noise sample for timing ``unet`` on its device and dtype, and its keyword arguments (an
    all-zero text embedding of 8 tokens for a text-conditioned UNet)."""
    device, dtype = unet.device, unet.dtype
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch_size, unet.config.in_channels, height, width, generator=generator).to(device, dtype)
    kwargs = {}
    if getattr(unet.config, "cross_attention_dim", None):
        kwargs["encoder_hidden_states"] = torch.zeros(
            batch_size, 8, unet.config.cross_attention_dim, device=device, dtype=dtype
        )
    return sample, kwargs


def _as_rank(unet: ModelMixin, num_devices: int, mode: Mode) -> contextlib.AbstractContextManager:
    """The UNet as one rank of ``num_devices`` in ``mode``'s steady state (no warm-up), gathers taken out."""
    if num_devices == 1:
        return contextlib.nullcontext()
    return parallelize(unet, PatchParallelConfig(mode=mode, warmup_steps=0), num_devices, ComputeOnlyComm)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def rank_compute_ms(
    unet: ModelMixin,
    *,
    height: int,
    width: int,
    num_devices: int,
    batch_size: int = 1,
    repeats: int = 5,
    mode: Mode = "corrected_async_gn",
) -> float:
    """Best-of-``repeats`` ms of one rank's share of a UNet call on ``unet``'s device (``num_devices=1``: the
    whole call), communication taken out; one untimed call first (synchronous: step 0), the timed ones in
    ``mode``'s steady state. The minimum, not the median: on a shared machine it is the steadiest estimate
    of the compute itself. With ``batch_size`` 2 and an even N the ranks split the batch, as under
    classifier-free guidance. Runs with the process's current threads.

    Raises:
        ValueError: ``repeats`` < 1, or a canvas that does not split into ``num_devices`` patches.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = unet.device
    sample, kwargs = unet_inputs(unet, batch_size=batch_size, height=height, width=width)
    times = []
    with torch.no_grad(), _as_rank(unet, num_devices, mode):
        for _ in range(repeats + 1):
            _synchronize(device)
            start = time.perf_counter()
            unet(sample, 500, **kwargs)
            _synchronize(device)
            times.append(time.perf_counter() - start)
    return min(times[1:]) * 1e3


@dataclass(frozen=True)
class ScalingRow:
    """One (canvas, N) of :func:`compute_scaling`; times in ms, ``rank_ms`` NaN where the canvas was refused."""

    size: int
    num_devices: int
    one_device_ms: float
    rank_ms: float
    fixed_ms: float
    refused: str | None = None
    batch_size: int = 1

    @property
    def speedup(self) -> float:
        """Modelled speed-up T_1 / T_rank(N)."""
        return self.one_device_ms / self.rank_ms

    @property
    def of_ideal(self) -> float:
        """Modelled speed-up / N (1.0: the whole N-fold reduction)."""
        return self.speedup / self.num_devices

    @property
    def bound(self) -> float:
        """The most ``of_ideal`` a split can reach with the fixed cost F undivided."""
        n, t1, fixed = self.num_devices, self.one_device_ms, self.fixed_ms
        return t1 / (fixed + (t1 - fixed) / n) / n


def compute_scaling(
    unet: ModelMixin,
    sizes: list[int],
    devices: list[int],
    *,
    repeats: int = 5,
    mode: Mode = "corrected_async_gn",
    batch_size: int = 1,
    progress: bool = True,
) -> list[ScalingRow]:
    """Modelled speed-up against canvas size (square canvases of side ``sizes``, N in ``devices``).

    With ``batch_size`` 2, a call as under classifier-free guidance and the paper's default layout: with an
    even N the ranks split the batch first and the rows within each half (N = 2: no patches at all). The
    settings are timed in interleaved rounds, so that a drift in the machine's speed hits them alike; each
    keeps its best (see :func:`rank_compute_ms`). On a CPU with one thread, so that a small patch and the
    whole image get the same (serial) efficiency and what remains is the method's own overhead. The
    process's memory allocator is left as it is (``python -m workbench bench`` opts into a steady one).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(n < 2 for n in devices):
        raise ValueError(f"devices must all be >= 2, got {devices}")
    smallest = 2 ** count_downsamples(unet)
    if any(size < smallest or size % smallest for size in sizes):
        raise ValueError(f"sizes must be positive multiples of {smallest} (2^downsampling levels), got {sizes}")
    best: dict[tuple[int, int], float] = {}  # (canvas side, N) -> ms; (0, 1) is the fixed cost
    refused: dict[tuple[int, int], str] = {}

    def time_once(key: tuple[int, int], side: int, n: int, calls: int) -> None:
        try:
            ms = rank_compute_ms(
                unet, height=side, width=side, num_devices=n, batch_size=batch_size, repeats=calls, mode=mode
            )
        except ValueError as error:
            refused[key] = str(error)
            return
        best[key] = min(best.get(key, math.inf), ms)

    with _threads(1 if unet.device.type == "cpu" else None):
        for _ in tqdm(range(repeats), desc="scaling rounds", disable=not progress):
            time_once((0, 1), smallest, 1, calls=3)
            for size in sizes:
                for n in [1, *devices]:
                    if (size, n) not in refused:
                        time_once((size, n), size, n, calls=1)
    return [
        ScalingRow(
            size, n, best[size, 1], best.get((size, n), math.nan), best[0, 1], refused.get((size, n)), batch_size
        )
        for size in sizes
        for n in devices
    ]


def print_scaling_table(rows: list[ScalingRow], *, title: str) -> None:
    """The scaling table: one line per (canvas, N), after the fixed cost F."""
    print(f"\n== {title} ==")
    if rows:
        print(f"fixed cost of a UNet call (one device, smallest canvas): F = {rows[0].fixed_ms:.1f} ms")
    header = ("canvas", 8), ("N", 2), ("one device ms", 14), ("rank ms", 9), ("modelled speed-up", 17)
    print(" ".join(f"{name:>{width}}" for name, width in header) + f" {'of ideal':>9} {'bound':>6}")
    for row in rows:
        if row.refused is not None:
            print(f"{row.size:>8} {row.num_devices:>2} refused: {row.refused[:100]}")
            continue
        print(
            f"{row.size:>8} {row.num_devices:>2} {row.one_device_ms:>14.1f} {row.rank_ms:>9.1f} "
            f"{row.speedup:>17.2f} {row.of_ideal:>9.0%} {row.bound:>6.0%}"
        )


# ----------------------------------------------------------------------------------------------------
# Where one rank's time goes, by kind of layer.


@dataclass(frozen=True)
class LayerKindRow:
    """One kind of layer (:data:`KINDS`) in :func:`rank_breakdown`; times in ms per UNet call.

    Attributes:
        kind: the kind.
        ideal_ms: the one-device call's time in these layers / N.
        rank_ms: one rank's time in them.
        layers: how many layers of the kind the rank runs (0 for "everything else").
    """

    kind: str
    ideal_ms: float
    rank_ms: float
    layers: int

    @property
    def excess_ms(self) -> float:
        """What the split costs in these layers beyond 1/N of the one-device call."""
        return self.rank_ms - self.ideal_ms


def layer_kind(module: nn.Module) -> str | None:
    """The kind (one of :data:`KINDS` but the last) of a stock or patch-parallel layer; None for the rest."""
    if isinstance(module, HaloConv2d) or (isinstance(module, nn.Conv2d) and module.padding[0] > 0):
        return KINDS[0]
    if isinstance(module, (PatchGroupNorm, nn.GroupNorm)):
        return KINDS[1]
    if is_self_attention(module):
        return KINDS[2]
    return None


@contextlib.contextmanager
def _labelled_layers(unet: nn.Module) -> Iterator[dict[str, int]]:
    """Run every layer with a kind inside a ``record_function`` range of that name; yields layers per kind."""
    inner = {id(m.conv) for m in unet.modules() if isinstance(m, HaloConv2d)}
    inner |= {id(m.norm) for m in unet.modules() if isinstance(m, PatchGroupNorm)}
    wrapped, counts = [], dict.fromkeys(KINDS[:-1], 0)
    for module in unet.modules():
        kind = layer_kind(module)
        if kind is None or id(module) in inner:  # the stock layer inside a patch layer: labelled as the latter
            continue
        counts[kind] += 1

        def labelled(*args, _forward=module.forward, _kind=kind, **kwargs):
            with record_function(_kind):
                return _forward(*args, **kwargs)

        module.forward = labelled
        wrapped.append(module)
    try:
        yield counts
    finally:
        for module in wrapped:
            del module.forward


def _kind_times(call, *, on_gpu: bool) -> tuple[float, dict[str, float]]:
    """(the call's time, exclusive time per kind), in seconds, from its profiler event and its descendants."""

    def duration(event) -> float:
        return (event.device_time_total if on_gpu else event.cpu_time_total) * 1e-6

    def nearest_kinds(event) -> list:
        found = []
        for child in event.cpu_children:
            found += [child] if child.name in KINDS else nearest_kinds(child)
        return found

    seconds = dict.fromkeys(KINDS, 0.0)
    stack = nearest_kinds(call)
    top = sum(duration(event) for event in stack)
    while stack:
        event = stack.pop()
        nested = nearest_kinds(event)
        seconds[event.name] += duration(event) - sum(duration(n) for n in nested)
        stack += nested
    seconds[KINDS[-1]] = duration(call) - top
    return duration(call), seconds


def rank_breakdown(
    unet: ModelMixin,
    *,
    height: int,
    width: int,
    num_devices: int,
    repeats: int = 5,
    mode: Mode = "corrected_async_gn",
) -> list[LayerKindRow]:
    """Per kind of layer (:data:`KINDS`): the one-device call's time / N and one rank's time, ms per call.

    Each side runs ``repeats`` profiled calls after an untimed one and reports the fastest call, so that its
    kinds add up to one call. On a CPU with one thread (CPU time); on a GPU the kernels' time. The
    profiler's own cost per operation falls inside the layers on both sides, more on the rank's, whose
    patch layers run more and smaller operations.

    Raises:
        ValueError: ``num_devices`` < 2, ``repeats`` < 1, or a canvas that does not split into N patches.
    """
    if num_devices < 2:
        raise ValueError(f"num_devices must be >= 2, got {num_devices}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    on_gpu = unet.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    sample, kwargs = unet_inputs(unet, batch_size=1, height=height, width=width)
    best: dict[str, tuple[float, dict[str, float]]] = {}
    counts: dict[str, int] = {}
    with _threads(None if on_gpu else 1), torch.no_grad():
        for side, n in (("one", 1), ("rank", num_devices)):
            with _as_rank(unet, n, mode):
                unet(sample, 500, **kwargs)  # untimed; installs the patch layers (step 0 is synchronous)
                with _labelled_layers(unet) as counts, profile(activities=activities) as profiler:
                    for _ in range(repeats):
                        with record_function("UNet call"):
                            unet(sample, 500, **kwargs)
                        _synchronize(unet.device)
            calls = [event for event in profiler.events() if event.name == "UNet call"]
            best[side] = min((_kind_times(call, on_gpu=on_gpu) for call in calls), key=lambda timing: timing[0])
    return [
        LayerKindRow(
            kind,
            1e3 * best["one"][1][kind] / num_devices,
            1e3 * best["rank"][1][kind],
            counts.get(kind, 0),
        )
        for kind in KINDS
    ]


def print_breakdown_table(rows: list[LayerKindRow], *, title: str) -> None:
    """The breakdown table: one line per kind, and the total with its "of ideal"."""
    print(f"\n== {title} ==")
    print(f"{'layers':>26} {'count':>5} {'ideal share':>11} {'rank':>8} {'excess':>8}")
    for row in rows:
        count = str(row.layers) if row.kind != KINDS[-1] else "-"
        print(f"{row.kind:>26} {count:>5} {row.ideal_ms:>11.2f} {row.rank_ms:>8.2f} {row.excess_ms:>+8.2f}")
    ideal, rank = sum(row.ideal_ms for row in rows), sum(row.rank_ms for row in rows)
    print(f"{'total':>26} {'':>5} {ideal:>11.2f} {rank:>8.2f} {rank - ideal:>+8.2f}   of ideal {ideal / rank:.0%}")
