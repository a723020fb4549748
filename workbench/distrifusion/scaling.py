"""What one rank computes, and the modelled speed-up of N devices against the canvas size.

DistriFusion's speed-up comes from each of N devices computing 1/N of the image while the exchanges hide
behind the computation (Li et al., CVPR 2024, Sec. 4.1); the paper's speed-ups grow with the resolution
(Fig. 1, Table 1: larger canvases amortise the per-layer overheads). On one machine we time exactly what
one rank computes in the steady state after the warm-up (its rows with their halos, its queries against
the whole image's keys, the corrected GroupNorm statistics), with every all-gather replaced by a local
copy of the same size: T_rank(N). Then

    modelled speed-up = T_1 / T_rank(N),    of ideal = speed-up / N,

an upper bound for N devices like this one with communication fully hidden, not a measurement of N devices.

A UNet call also has a cost that no split divides (time embedding, Python and per-layer dispatch): the
one-device call on the smallest canvas the UNet takes estimates it as F, and

    bound = T_1 / (F + (T_1 - F) / N) / N

is the most "of ideal" any row split could reach with no overhead of its own.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import ModelMixin
from tqdm.auto import tqdm

from workbench.distrifusion.comm import CommStats, PatchComm, PendingGather
from workbench.distrifusion.config import Mode, PatchLayout, PatchParallelConfig
from workbench.distrifusion.layers import count_downsamples
from workbench.distrifusion.runner import _parallelized
from workbench.runtime import steady_cpu_allocator

__all__ = ["ComputeOnlyComm", "ScalingRow", "compute_scaling", "rank_compute_ms", "serial_cpu_timing", "unet_inputs"]


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
    whole call), communication taken out; one untimed call first.

    The first call is synchronous (step 0) and the timed ones are in ``mode``'s steady state (no warm-up):
    with the default, the displaced exchange and the corrected GroupNorm of every step after the warm-up.
    The minimum, not the median: on a shared machine it is the steadiest estimate of the compute itself.
    With ``batch_size`` 2 and an even N the ranks split the batch, as under classifier-free guidance.

    Raises:
        ValueError: the canvas does not split into ``num_devices`` patches.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = unet.device
    sample, kwargs = unet_inputs(unet, batch_size=batch_size, height=height, width=width)
    parallel = (
        _parallelized(unet, PatchParallelConfig(mode=mode, warmup_steps=0), num_devices, ComputeOnlyComm)
        if num_devices > 1
        else contextlib.nullcontext()
    )
    times = []
    with torch.no_grad(), parallel:
        for _ in range(repeats + 1):
            _synchronize(device)
            start = time.perf_counter()
            unet(sample, 500, **kwargs)
            _synchronize(device)
            times.append(time.perf_counter() - start)
    return min(times[1:]) * 1e3


def unet_inputs(unet: ModelMixin, *, batch_size: int, height: int, width: int) -> tuple[torch.Tensor, dict]:
    """A fixed noise sample for timing ``unet`` on its device and dtype, and its keyword arguments (an
    all-zero text embedding of 8 tokens for a text-conditioned UNet)."""
    device, dtype = unet.device, unet.dtype
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch_size, unet.config.in_channels, height, width, generator=generator).to(device, dtype)
    kwargs = {}
    if getattr(unet.config, "cross_attention_dim", None):
        text = torch.zeros(batch_size, 8, unet.config.cross_attention_dim, device=device, dtype=dtype)
        kwargs["encoder_hidden_states"] = text
    return sample, kwargs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def serial_cpu_timing(device: torch.device, *, steady_allocator: bool) -> Iterator[None]:
    """On a CPU, one thread for the block (and, with ``steady_allocator``, glibc keeping freed memory from
    now on, :func:`workbench.runtime.steady_cpu_allocator`); nothing on a GPU."""
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
        if steady_allocator:
            steady_cpu_allocator()
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
    steady_allocator: bool = True,
) -> list[ScalingRow]:
    """Modelled speed-up against canvas size (square canvases of side ``sizes``, N in ``devices``).

    With ``batch_size`` 2, a call as under classifier-free guidance and the paper's default layout: with an
    even N the ranks split the batch first and the rows within each half (N = 2: no patches at all).

    The settings are timed in interleaved rounds, so that a drift in the machine's speed hits them alike;
    each keeps its best. Ranks run in ``mode``'s steady state (see :func:`rank_compute_ms`). On a CPU with
    one thread, so that a small patch and the whole image get the same (serial) efficiency and what
    remains is the method's own overhead; and, with ``steady_allocator``, with glibc keeping freed memory
    (process-wide, :func:`workbench.runtime.steady_cpu_allocator`): with the default allocator the
    one-device call of a large canvas pays page faults that a rank's patches do not, which flatters the split.
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

    with serial_cpu_timing(unet.device, steady_allocator=steady_allocator):
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
