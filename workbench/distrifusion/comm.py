"""Communication for patch parallelism: one interface, a torch.distributed and a single-process backend.

Every exchanging layer works on a *stack* of P local patches, (P, ...): on a real rank P = 1; in the
simulator one process plays all N ranks and P = N. :meth:`PatchComm.all_gather` returns, for every local
patch, the tensors of all patches of its group, (P, num_patches, ...), which is what
``torch.distributed.all_gather`` gives each rank. The layers are therefore the same code in both cases,
and the simulator computes what the ranks compute (DistriFusion, arXiv 2402.19481, Sec. 4.1: every
device holds a full copy of the model and exchanges activations with AllGather).

Communication volume is counted per rank: an all-gather of an n-byte tensor over a group of k ranks
brings ``(k - 1) n`` bytes to every rank.
"""

from __future__ import annotations

import datetime
import functools
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from workbench.distrifusion.config import PatchLayout

__all__ = [
    "CommStats",
    "DistributedComm",
    "PatchComm",
    "PendingGather",
    "SimulatedComm",
    "assemble_output",
    "collective_device",
]


@dataclass
class CommStats:
    """Bytes received per rank, by kind of exchange ("halo", "kv", "gn", "output"), and per UNet call; and
    the time the rank spent *blocked* in communication (waiting for a gather to complete) per call.

    Blocked time is the part of communication that compute did not hide: all of a synchronous gather
    (including waiting for the slowest rank), and of an asynchronous one only the wait at the next step
    if it has not arrived by then. DistriFusion's goal (Sec. 4.1) is that, after the warm-up, it is ~0.

    Attributes:
        bytes_by_kind: cumulative bytes per rank since the last :meth:`clear`.
        gathers_by_kind: number of collectives per rank, by kind.
        bytes_per_call: bytes per rank in each UNet call (one entry per call).
        blocked_per_call: seconds blocked in communication in each UNet call.
        output_blocked_per_call: the part of it spent in the synchronous gather of the step's output,
            which the method does not overlap (every rank needs the whole output for the scheduler).
    """

    bytes_by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    gathers_by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_per_call: list[int] = field(default_factory=list)
    blocked_per_call: list[float] = field(default_factory=list)
    output_blocked_per_call: list[float] = field(default_factory=list)

    def start_call(self) -> None:
        self.bytes_per_call.append(0)
        self.blocked_per_call.append(0.0)
        self.output_blocked_per_call.append(0.0)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_by_kind[kind] += nbytes
        self.gathers_by_kind[kind] += 1
        if self.bytes_per_call:
            self.bytes_per_call[-1] += nbytes

    def add_blocked(self, seconds: float, *, output: bool = False) -> None:
        if self.blocked_per_call:
            self.blocked_per_call[-1] += seconds
            if output:
                self.output_blocked_per_call[-1] += seconds

    def clear(self) -> None:
        self.bytes_by_kind.clear()
        self.gathers_by_kind.clear()
        self.bytes_per_call.clear()
        self.blocked_per_call.clear()
        self.output_blocked_per_call.clear()

    def summary(self, *, steady_from: int = 0) -> dict[str, float]:
        """Mean bytes per rank per UNet call, in total and by kind; and mean milliseconds blocked per call,
        over all calls and over the calls from index ``steady_from`` on (after the warm-up), in total and
        in the output's gather alone."""
        calls = max(len(self.bytes_per_call), 1)
        out: dict[str, float] = {"bytes_per_step": sum(self.bytes_per_call) / calls}
        out |= {f"{kind}_bytes_per_step": value / calls for kind, value in sorted(self.bytes_by_kind.items())}
        steady = self.blocked_per_call[steady_from:] or self.blocked_per_call
        out["blocked_ms_per_step"] = 1e3 * sum(self.blocked_per_call) / calls
        out["blocked_ms_per_steady_step"] = 1e3 * sum(steady) / max(len(steady), 1)
        steady_output = self.output_blocked_per_call[steady_from:] or self.output_blocked_per_call
        out["output_blocked_ms_per_steady_step"] = 1e3 * sum(steady_output) / max(len(steady_output), 1)
        return out


class PendingGather:
    """The result of an all-gather, possibly still in flight (``wait`` completes it, counting the time blocked)."""

    def __init__(
        self,
        result: torch.Tensor,
        work: dist.Work | None = None,
        timeout_s: float | None = None,
        stats: CommStats | None = None,
    ):
        self._result = result
        self._work = work
        self._timeout_s = timeout_s
        self._stats = stats

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            start = time.perf_counter()
            if self._timeout_s is None:
                self._work.wait()
            else:
                self._work.wait(timeout=datetime.timedelta(seconds=self._timeout_s))
            self._work = None
            if self._stats is not None:
                self._stats.add_blocked(time.perf_counter() - start)
        return self._result


class PatchComm(ABC):
    """All-gathers within a patch group, for a stack of P local patches.

    Attributes:
        layout: the split of ranks over batch halves and row patches.
        num_local: P, the number of patches this process computes (1 on a real rank).
        patch_index: (P,) long tensor, the row patch (0 = top) of each local patch.
        batch_group: (P,) long tensor, the batch half of each local patch.
        stats: where the traffic is counted.
    """

    layout: PatchLayout
    num_local: int
    patch_index: torch.Tensor
    batch_group: torch.Tensor
    stats: CommStats

    @property
    def num_patches(self) -> int:
        return self.layout.num_patches

    @functools.cached_property
    def patch_rows(self) -> list[int]:
        """``patch_index`` as Python ints (for indexing without a gather kernel)."""
        return self.patch_index.tolist()

    @functools.cached_property
    def own_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Index of each local patch's own slot in a gathered (P, Np, ...) tensor."""
        return torch.arange(self.num_local), self.patch_index

    @abstractmethod
    def all_gather(self, fresh: torch.Tensor, *, kind: str, async_op: bool = False) -> PendingGather:
        """Gather ``fresh`` (P, ...) over each local patch's group; the result is (P, num_patches, ...)."""

    @abstractmethod
    def gather_output(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's output (P * b, ...) stacked over all ranks: (world_size, b, ...)."""

    def flush(self) -> None:  # noqa: B027 (a hook: only a backend that holds gathers back overrides it)
        """Launch asynchronous gathers still held back for a bucket (called at the end of every UNet call)."""

    def _count(self, kind: str, per_rank_nbytes: int, group_size: int) -> None:
        self.stats.add(kind, per_rank_nbytes * (group_size - 1))


class SimulatedComm(PatchComm):
    """All N ranks in one process: a gather is a reshape of the stacked patches (no copies between ranks)."""

    def __init__(self, layout: PatchLayout, stats: CommStats):
        self.layout = layout
        self.num_local = layout.world_size
        ranks = torch.arange(layout.world_size)
        self.patch_index = ranks % layout.num_patches
        self.batch_group = ranks // layout.num_patches
        self.stats = stats

    def all_gather(self, fresh: torch.Tensor, *, kind: str, async_op: bool = False) -> PendingGather:
        groups, patches = self.layout.num_batch_groups, self.layout.num_patches
        if fresh.shape[0] != self.num_local:
            raise ValueError(f"expected {self.num_local} stacked patches, got shape {tuple(fresh.shape)}")
        tail = fresh.shape[1:]
        # (G, Np, ...) -> each of the Np ranks of group g sees all Np tensors of g: (G * Np, Np, ...)
        gathered = fresh.reshape(groups, 1, patches, *tail).expand(groups, patches, patches, *tail)
        self._count(kind, fresh[0].numel() * fresh.element_size(), patches)
        return PendingGather(gathered.reshape(self.num_local, patches, *tail))

    def gather_output(self, local: torch.Tensor) -> torch.Tensor:
        world = self.layout.world_size
        self._count("output", local.numel() * local.element_size() // world, world)
        return local.reshape(world, local.shape[0] // world, *local.shape[1:])


class DistributedComm(PatchComm):
    """One rank of a torch.distributed job (gloo on CPU, NCCL on GPUs).

    Args:
        layout: the split of ranks.
        rank: this process's rank in the default group.
        patch_group: the process group of this rank's batch half (the default group without the split).
        timeout_s: how long a wait on an asynchronous gather may take before it raises (None: no limit of
            its own; the process group's timeout still applies).
        bucket_size: asynchronous gathers launched together as one collective (1: each on its own).
    """

    def __init__(
        self,
        layout: PatchLayout,
        rank: int,
        patch_group: dist.ProcessGroup | None,
        stats: CommStats,
        *,
        timeout_s: float | None,
        bucket_size: int = 1,
    ):
        self.layout = layout
        self.rank = rank
        self.num_local = 1
        self.patch_index = torch.tensor([layout.patch_index(rank)])
        self.batch_group = torch.tensor([layout.batch_group(rank)])
        self.patch_group = patch_group
        self.stats = stats
        self.timeout_s = timeout_s
        self.bucket_size = bucket_size
        self._bucket: _GatherBucket | None = None

    def all_gather(self, fresh: torch.Tensor, *, kind: str, async_op: bool = False) -> PendingGather:
        if fresh.shape[0] != 1:
            raise ValueError(f"a rank gathers one patch, got shape {tuple(fresh.shape)}")
        local = fresh[0].contiguous()
        self._count(kind, local.numel() * local.element_size(), self.num_patches)
        if async_op and self.bucket_size > 1:
            if self._bucket is None:
                self._bucket = _GatherBucket(self)
            slot = self._bucket.add(local)
            if len(self._bucket) >= self.bucket_size:
                self.flush()
            return slot
        result = torch.empty((self.num_patches, *local.shape), dtype=local.dtype, device=local.device)
        # Gather straight into views of one buffer: no concatenation afterwards.
        start = time.perf_counter()
        work = dist.all_gather(list(result.unbind(0)), local, group=self.patch_group, async_op=async_op)
        if not async_op:
            self.stats.add_blocked(time.perf_counter() - start)
        return PendingGather(result.unsqueeze(0), work if async_op else None, self.timeout_s, self.stats)

    def flush(self) -> None:
        if self._bucket is not None:
            bucket, self._bucket = self._bucket, None
            bucket.launch()

    def gather_output(self, local: torch.Tensor) -> torch.Tensor:
        world = self.layout.world_size
        local = local.contiguous()
        result = torch.empty((world, *local.shape), dtype=local.dtype, device=local.device)
        start = time.perf_counter()
        dist.all_gather(list(result.unbind(0)), local)
        self.stats.add_blocked(time.perf_counter() - start, output=True)
        self._count("output", local.numel() * local.element_size(), world)
        return result


class _GatherBucket:
    """Asynchronous gathers that travel together: one flat buffer and one all-gather per dtype.

    Every rank fills its buckets in the same layer order and launches them at the same points, so the
    collectives match across ranks. A slot's ``wait`` launches its bucket first if nothing else has.
    """

    def __init__(self, comm: DistributedComm):
        self.comm = comm
        self.tensors: list[torch.Tensor] = []
        self.gathered: dict[torch.dtype, PendingGather] = {}  # (num_patches, flat size) per dtype
        self.offsets: list[int] = []

    def __len__(self) -> int:
        return len(self.tensors)

    def add(self, local: torch.Tensor) -> PendingGather:
        self.tensors.append(local)
        return _BucketSlot(self, len(self.tensors) - 1)

    def launch(self) -> None:
        if self.gathered or not self.tensors:
            return
        comm = self.comm
        offsets = [0] * len(self.tensors)
        for dtype in dict.fromkeys(t.dtype for t in self.tensors):  # first-seen order: the same on every rank
            members = [i for i, t in enumerate(self.tensors) if t.dtype == dtype]
            start = 0
            for i in members:
                offsets[i] = start
                start += self.tensors[i].numel()
            flat = torch.cat([self.tensors[i].reshape(-1) for i in members])
            result = torch.empty((comm.num_patches, flat.numel()), dtype=dtype, device=flat.device)
            work = dist.all_gather(list(result.unbind(0)), flat, group=comm.patch_group, async_op=True)
            self.gathered[dtype] = PendingGather(result, work, comm.timeout_s, comm.stats)
        self.offsets = offsets

    def result(self, index: int) -> torch.Tensor:
        """Tensor ``index`` of every patch, (num_patches, *shape), waiting for its collective if needed."""
        self.launch()
        tensor = self.tensors[index]
        result = self.gathered[tensor.dtype].wait()
        start = self.offsets[index]
        return result[:, start : start + tensor.numel()].reshape(-1, *tensor.shape)


class _BucketSlot(PendingGather):
    """One layer's share of a :class:`_GatherBucket`."""

    def __init__(self, bucket: _GatherBucket, index: int):
        self._bucket = bucket
        self._index = index

    def wait(self) -> torch.Tensor:
        return self._bucket.result(self._index).unsqueeze(0)


def assemble_output(stacked: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
    """(world_size, b, C, h, W) rank outputs -> the full (num_batch_groups * b, C, num_patches * h, W) batch."""
    world, b, channels, h, width = stacked.shape
    if world != layout.world_size:
        raise ValueError(f"expected {layout.world_size} rank outputs, got {world}")
    grid = stacked.reshape(layout.num_batch_groups, layout.num_patches, b, channels, h, width)
    return grid.permute(0, 2, 3, 1, 4, 5).reshape(layout.num_batch_groups * b, channels, layout.num_patches * h, width)


def collective_device() -> torch.device:
    """Where the default group's collectives take their tensors: this rank's GPU on NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
