"""The patch-parallel UNet: a context manager around a stock diffusers UNet (DistriFusion, arXiv 2402.19481, Sec. 4.1).

Inside the ``with`` block the UNet's ``forward`` takes the full, replicated batch as usual, cuts out this
rank's batch half and row patch, runs the stock forward with the patch layers of
:mod:`workbench.distrifusion.layers`, and all-gathers the output patches, so every rank returns the full
noise prediction. The scheduler then runs redundantly on every rank, kept identical by a shared seed
(Sec. 4.1). Any sampling loop or pipeline therefore runs unchanged inside the block::

    with patch_parallel(pipe.unet, PatchParallelConfig(mode="corrected_async_gn")):
        image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]

A run is one generation: the step counter (which decides the warm-up, Sec. 4.1 and 5.1) restarts when the
timestep goes up, or on :meth:`PatchParallelRun.reset`.

:func:`parallelize` is the context manager with any communication backend (a function that builds a
:class:`~workbench.distrifusion.comm.PatchComm` for a layout); :func:`patch_parallel` is it over
torch.distributed, and :func:`workbench.distrifusion.simulate.simulate_patch_parallel` over the
one-process simulator.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from workbench.distrifusion.agreement import check_call, check_config, check_end
from workbench.distrifusion.comm import CommStats, DistributedComm, PatchComm, assemble_output
from workbench.distrifusion.config import PatchLayout, PatchParallelConfig, check_patch_geometry, resolve_layout
from workbench.distrifusion.layers import LayerContext, check_supported, count_downsamples, install

__all__ = ["CommFactory", "InputCheck", "PatchParallelRun", "parallelize", "patch_parallel"]

logger = logging.getLogger(__name__)

CommFactory = Callable[[PatchLayout, CommStats], PatchComm]
"""Builds the communicator of a layout: ``make_comm(layout, stats) -> PatchComm``."""

InputCheck = Callable[[int, dict[str, object]], None]
"""Called with (the UNet call's index in the block, its bound arguments) before every patch-parallel call."""

# UNet arguments whose tensors are full-size feature maps (ControlNet / adapter residuals): not split here.
_UNSUPPORTED_ARGUMENTS = (
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
)


class PatchParallelRun:
    """The state of a patch-parallel UNet inside its ``with`` block.

    Attributes:
        config: the configuration.
        world_size: number of ranks (real or simulated).
        layout: the split of the last call (None before the first call).
        step: UNet calls so far in the current run (generation).
        calls: UNet calls so far in the block, over all runs.
        stats: bytes received and time blocked per rank (cleared by :meth:`reset`).
    """

    def __init__(
        self,
        unet: nn.Module,
        config: PatchParallelConfig,
        world_size: int,
        make_comm: CommFactory,
        *,
        check_inputs: InputCheck | None = None,
    ):
        self.unet = unet
        self.config = config
        self.world_size = world_size
        self.layout: PatchLayout | None = None
        self.step = 0
        self.calls = 0
        self.stats = CommStats()
        self._make_comm = make_comm
        self._check_inputs = check_inputs
        self._context = LayerContext(mode=config.mode, warmup_steps=config.warmup_steps)
        self._layers: list = []
        self._restore_layers: Callable[[], None] | None = None
        self._last_timestep: float | None = None
        self._num_downsamples = count_downsamples(unet)
        self._original_forward = type(unet).forward.__get__(unet)
        self._signature = inspect.signature(self._original_forward)

    @property
    def comm(self) -> PatchComm | None:
        """The communicator of the current layout (None before the first call)."""
        return self._context.comm

    def reset(self) -> None:
        """Start a new run: step 0 (synchronous), no stale activations, statistics cleared."""
        for layer in self._layers:
            layer.reset()
        self.step = 0
        self._last_timestep = None
        self.stats.clear()

    def close(self, *, drain: bool = True) -> None:
        """Wait for gathers in flight (when ``drain``) and put the stock modules back."""
        try:
            if drain:
                for layer in self._layers:
                    layer.exchanger.finish()
        finally:
            self._uninstall()

    def _install(self) -> None:
        if self._restore_layers is None:
            self._layers, self._restore_layers = install(self.unet, self._context)

    def _uninstall(self) -> None:
        if self._restore_layers is not None:
            self._restore_layers()
            self._restore_layers, self._layers = None, []

    def _use_layout(self, layout: PatchLayout) -> None:
        logger.debug(
            "patch parallelism: %d rank(s) = %d batch group(s) x %d row patch(es), mode %s",
            layout.world_size,
            layout.num_batch_groups,
            layout.num_patches,
            self.config.mode,
        )
        self.reset()
        self.layout = layout
        self._context.comm = self._make_comm(layout, self.stats)
        if layout.num_patches > 1 and self.config.mode != "naive_patch":
            self._install()
        else:
            self._uninstall()

    def forward(self, sample: torch.Tensor, timestep, *args, **kwargs):
        """The UNet's forward on the full batch, computed patch-parallel; same arguments and output."""
        arguments = self._signature.bind(sample, timestep, *args, **kwargs).arguments
        for name in _UNSUPPORTED_ARGUMENTS:
            if arguments.get(name) is not None:
                raise ValueError(f"{name} (ControlNet/adapter residuals) is not supported under patch parallelism")
        if self._check_inputs is not None:  # before anything that could fail on one rank only
            self._check_inputs(self.calls, arguments)
        self.calls += 1
        timestep_value = float(torch.as_tensor(timestep).max())
        if self._last_timestep is not None and timestep_value > self._last_timestep:
            self.reset()  # a new generation starts: timesteps only go down within one
        self._last_timestep = timestep_value

        batch, _, height, _ = sample.shape
        layout = resolve_layout(self.world_size, batch, self.config)
        if layout != self.layout:
            self._use_layout(layout)
        check_patch_geometry(height, layout.num_patches, self._num_downsamples)
        comm = self._context.comm
        pieces = _local_pieces(comm, layout, batch, height)

        local_arguments = {name: _split_batch(value, pieces, batch) for name, value in arguments.items()}
        local_arguments["sample"] = torch.cat([sample[b0:b1, :, r0:r1] for b0, b1, r0, r1 in pieces])
        self._context.step = self.step
        self._context.input_rows = self._input_rows(sample, pieces)
        self.stats.start_call()
        output = self._original_forward(**local_arguments)
        comm.flush()
        return_dict = arguments.get("return_dict", True)
        local = output.sample if return_dict else output[0]
        full = assemble_output(comm.gather_output(local), layout)
        self.step += 1
        return type(output)(sample=full) if return_dict else (full,)

    def _input_rows(self, sample: torch.Tensor, pieces: list[tuple[int, int, int, int]]) -> dict[int, torch.Tensor]:
        """The first convolution's input rows with their halo, cut from the replicated input (no exchange)."""
        conv_in = getattr(self.unet, "conv_in", None)
        if self._restore_layers is None or not isinstance(conv_in, nn.Module) or not hasattr(conv_in, "halo"):
            return {}
        p = conv_in.halo
        source = 2 * sample - 1.0 if getattr(self.unet.config, "center_input_sample", False) else sample
        padded = F.pad(source, (0, 0, p, p))
        return {p: torch.cat([padded[b0:b1, :, r0 : r1 + 2 * p] for b0, b1, r0, r1 in pieces])}


def _local_pieces(comm: PatchComm, layout: PatchLayout, batch: int, height: int) -> list[tuple[int, int, int, int]]:
    """(batch start, batch end, row start, row end) of each local patch."""
    rows, sub_batch = height // layout.num_patches, batch // layout.num_batch_groups
    return [
        (g * sub_batch, (g + 1) * sub_batch, i * rows, (i + 1) * rows)
        for g, i in zip(comm.batch_group.tolist(), comm.patch_index.tolist(), strict=True)
    ]


def _split_batch(value, pieces: list[tuple[int, int, int, int]], batch: int):
    """Each local patch's slice of a batched argument (tensors with ``batch`` rows, recursively in dicts)."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return torch.cat([value[b0:b1] for b0, b1, _, _ in pieces])
    if isinstance(value, dict):
        return {key: _split_batch(item, pieces, batch) for key, item in value.items()}
    return value


@contextlib.contextmanager
def parallelize(
    unet: nn.Module,
    config: PatchParallelConfig,
    world_size: int,
    make_comm: CommFactory,
    *,
    check_inputs: InputCheck | None = None,
) -> Iterator[PatchParallelRun]:
    """Override ``unet.forward`` with the patch-parallel one for the block, over any communicator; undo after.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` or ``UNet2DModel``.
        config: the mode, warm-up and batch split.
        world_size: N, the number of ranks the work is split over.
        make_comm: builds the communicator for a layout (:class:`~workbench.distrifusion.comm.DistributedComm`
            on real ranks, :class:`~workbench.distrifusion.comm.SimulatedComm` for all ranks in one process,
            or a benchmark's stand-in).
        check_inputs: called before every UNet call with its index in the block and its arguments.

    Yields:
        The :class:`PatchParallelRun`.

    Raises:
        TypeError: ``config`` is not a :class:`PatchParallelConfig`, or a layer has no patch-parallel version.
        RuntimeError: ``unet.forward`` is already overridden.
    """
    if not isinstance(config, PatchParallelConfig):
        raise TypeError(f"config must be a PatchParallelConfig, got {type(config).__name__}")
    if "forward" in vars(unet):
        raise RuntimeError("the UNet's forward is already overridden (a patch_parallel block or an offload hook)")
    if config.mode != "naive_patch":
        problems = check_supported(unet)
        if problems:
            raise TypeError("the UNet cannot run patch-parallel:\n  " + "\n  ".join(problems))
    run = PatchParallelRun(unet, config, world_size, make_comm, check_inputs=check_inputs)
    unet.forward = run.forward
    failed = False
    try:
        yield run
    except BaseException:
        failed = True
        raise
    finally:
        del unet.forward
        try:
            run.close(drain=not failed)
        except Exception:  # a broken group after a failure: the original error matters more
            if not failed:
                raise
            logger.exception("while closing a failed patch-parallel run")


@contextlib.contextmanager
def patch_parallel(
    unet: nn.Module, config: PatchParallelConfig, *, timeout_s: float = 60.0
) -> Iterator[PatchParallelRun]:
    """Run ``unet`` patch-parallel over the default torch.distributed group for the ``with`` block.

    Every rank enters the block with the same UNet and config and makes the same UNet calls with the same
    inputs. The ranks check it: on entry they compare the config's fields and a checksum of the weights;
    before every UNet call, its position in the block and every argument (the latents, the timestep, the
    prompt embeddings and any added conditioning: count, sum and sum of absolute values); on leaving, the
    number of calls, so that different prompts, seeds or step counts are refused rather than giving a
    wrong image. A difference raises the same ``ValueError`` on every rank, naming the field and each
    rank's value. The per-call check is one small synchronous all-gather (a few dozen numbers).
    Initialise the group first, e.g. with :func:`workbench.launch.init_distributed` (gloo on CPU, NCCL on
    GPUs, with a short timeout).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` or ``UNet2DModel`` (same weights on every rank).
        config: the mode, warm-up and batch split.
        timeout_s: the timeout of the batch-half groups and, on gloo, of waits on asynchronous gathers
            (on NCCL the groups' watchdog ends a stalled gather).

    Yields:
        The :class:`PatchParallelRun` (step counter, communication statistics).

    Raises:
        RuntimeError: no process group.
        TypeError: a layer type without a patch-parallel version.
        ValueError: mismatched configs, weights, inputs or step counts across ranks; a height that does not split.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "patch_parallel needs an initialised torch.distributed group (workbench.launch.init_distributed); "
            "use workbench.distrifusion.simulate_patch_parallel for a single process"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    check_config(config, unet)
    timeout = datetime.timedelta(seconds=timeout_s)
    halves: list[dist.ProcessGroup] = []
    if config.split_batch and world >= 2 and world % 2 == 0:
        halves = [
            dist.new_group(list(range(world // 2)), timeout=timeout),
            dist.new_group(list(range(world // 2, world)), timeout=timeout),
        ]

    # On NCCL a wait with a timeout holds the host until the collective ends; without one it only orders the
    # compute stream after it, so the host keeps queueing kernels. The groups' timeout (NCCL's watchdog)
    # still ends a stalled collective.
    wait_timeout_s = None if dist.get_backend() == "nccl" else timeout_s

    def make_comm(layout: PatchLayout, stats: CommStats) -> DistributedComm:
        group = halves[layout.batch_group(rank)] if layout.num_batch_groups == 2 else None
        return DistributedComm(
            layout, rank, group, stats, timeout_s=wait_timeout_s, bucket_size=config.async_bucket_size
        )

    # The same argument names on every rank (the same UNet class), so every rank sends the same fields.
    names = [name for name in inspect.signature(type(unet).forward).parameters if name != "self"]

    def check_inputs(calls: int, arguments: dict[str, object]) -> None:
        check_call(calls, arguments, names)

    try:
        with parallelize(unet, config, world, make_comm, check_inputs=check_inputs) as run:
            yield run
            check_end(run.calls, names)  # not after an error: the ranks may be at different collectives
    finally:
        for group in halves:
            with contextlib.suppress(Exception):
                dist.destroy_process_group(group)
