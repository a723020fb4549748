"""The patch-parallel configuration and the rank layout it implies (DistriFusion, arXiv 2402.19481, Sec. 4-5).

:class:`PatchParallelConfig` is a frozen value: building one starts nothing. The number of devices is not
part of it; it comes from the process group (or the simulator's ``num_devices``), and
:func:`resolve_layout` turns (world size, batch size, config) into the split of batch and rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "MODES",
    "Mode",
    "PatchLayout",
    "PatchParallelConfig",
    "check_patch_geometry",
    "resolve_layout",
]

Mode = Literal["full_sync", "sync_gn", "corrected_async_gn", "stale_gn", "separate_gn", "no_sync", "naive_patch"]
MODES: tuple[str, ...] = get_args(Mode)

# What each mode does after the warm-up (during warm-up every mode but naive_patch is full_sync):
#   conv halos and attention K/V         GroupNorm statistics
#   full_sync           fresh, synchronous gathers           fresh, synchronous
#   sync_gn             stale (previous step), async         fresh, synchronous
#   corrected_async_gn  stale, async                         stale global + (fresh - stale) local, async
#   stale_gn            stale, async                         stale others + fresh own, async
#   separate_gn         stale, async                         local only
#   no_sync             frozen at the last warm-up step      local only
#   naive_patch         none: each patch is an image of its own, from step 0


@dataclass(frozen=True)
class PatchParallelConfig:
    """How the UNet is split over devices (DistriFusion, Li et al., CVPR 2024, arXiv 2402.19481).

    Attributes:
        mode: the synchronisation scheme (table above). ``corrected_async_gn`` is the paper's method
            (displaced patch parallelism, Sec. 4.1, with corrected asynchronous GroupNorm, Sec. 4.2);
            ``full_sync`` is exact; ``naive_patch`` is the paper's baseline with no exchange at all.
        warmup_steps: synchronous UNet calls after the first one. The paper runs step 0 plus "another
            4-step synchronous patch parallelism" (Sec. 5.1), so ``warmup_steps=4`` makes calls 0..4
            synchronous, as the official code's ``counter <= warmup_steps`` does.
        split_batch: classifier-free guidance split (Sec. 5.1): when the world size and the batch are
            both even, ranks [0, N/2) take the first half of the batch (the unconditional one under
            guidance) and ranks [N/2, N) the second; patches are then cut within each half. Otherwise
            every rank takes the whole batch.
        async_bucket_size: how many layers' asynchronous gathers travel together as one collective (one
            flat buffer, launched when the bucket is full and at the end of every UNet call), like the
            official code's ``comm_checkpoint``. Fewer, larger collectives cost less per byte; 1 launches
            every layer's gather on its own. Values are unchanged by it; only real ranks use it
            (``python -m workbench bench distrifusion --async-bucket-size K`` measures the time blocked).
    """

    mode: Mode = "corrected_async_gn"  # paper's default (official DistriConfig)
    warmup_steps: int = 4  # paper: step 0 + 4 synchronous steps
    split_batch: bool = True  # official default
    async_bucket_size: int = 8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if (
            isinstance(self.async_bucket_size, bool)
            or not isinstance(self.async_bucket_size, int)
            or self.async_bucket_size < 1
        ):
            raise ValueError(f"async_bucket_size must be an int >= 1, got {self.async_bucket_size!r}")
        if not isinstance(self.split_batch, bool):
            raise TypeError(f"split_batch must be a bool, got {type(self.split_batch).__name__}")


@dataclass(frozen=True)
class PatchLayout:
    """Which rank computes what.

    Attributes:
        world_size: number of ranks N.
        num_batch_groups: 2 with the classifier-free guidance split, else 1.
        num_patches: row patches per batch group (N / num_batch_groups).
    """

    world_size: int
    num_batch_groups: int
    num_patches: int

    def batch_group(self, rank: int) -> int:
        """The batch half (0 or 1) that ``rank`` computes."""
        return rank // self.num_patches

    def patch_index(self, rank: int) -> int:
        """The row patch (0 = top) that ``rank`` computes."""
        return rank % self.num_patches


def resolve_layout(world_size: int, batch_size: int, config: PatchParallelConfig) -> PatchLayout:
    """Split ``world_size`` ranks over the batch halves and row patches (see ``config.split_batch``)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    split = config.split_batch and world_size >= 2 and world_size % 2 == 0 and batch_size % 2 == 0
    groups = 2 if split else 1
    return PatchLayout(world_size=world_size, num_batch_groups=groups, num_patches=world_size // groups)


def check_patch_geometry(height: int, num_patches: int, num_downsamples: int) -> None:
    """Refuse heights that cannot be cut into ``num_patches`` equal row patches at every UNet level.

    Every level's feature map must split into equal patches whose heights the stride-2 downsamplers can
    halve, i.e. ``height`` must be a multiple of ``num_patches * 2**num_downsamples``.
    """
    factor = num_patches * 2**num_downsamples
    lowest = height // 2**num_downsamples
    if num_patches > lowest:
        raise ValueError(
            f"num_patches={num_patches} is larger than the {lowest} rows of the lowest UNet resolution "
            f"(height {height} / 2^{num_downsamples}); use at most {max(lowest, 1)} devices per image or a taller "
            f"canvas"
        )
    if height % factor:
        raise ValueError(
            f"height must be a multiple of num_patches * 2^{num_downsamples} = {factor} so that every UNet "
            f"level splits into {num_patches} equal row patches, got height {height}"
        )
