"""Run a diffusers UNet patch-parallel: the context managers, and a sampler for the command line.

:func:`patch_parallel` (real ranks, torch.distributed) and
:func:`workbench.distrifusion.simulate.simulate_patch_parallel` (one process) wrap a stock
``UNet2DModel``/``UNet2DConditionModel`` in place until the ``with`` block ends: the UNet's ``forward``
takes the full, replicated batch as usual, cuts out this rank's batch half and row patch, runs the stock
forward with the patch layers of :mod:`workbench.distrifusion.layers`, and all-gathers the output
patches so every rank returns the full noise prediction (DistriFusion, arXiv 2402.19481, Sec. 4.1: the
scheduler then runs redundantly on every rank, kept identical by a shared seed). Any sampling loop or
pipeline therefore runs unchanged inside the block::

    with patch_parallel(pipe.unet, PatchParallelConfig(mode="corrected_async_gn")):
        image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]

A run is one generation: the step counter (for the warm-up) restarts when the timestep goes up, or on
:meth:`PatchParallelRun.reset`.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import DDPMPipeline, DiffusionPipeline
from torch import nn

from workbench.distrifusion.comm import CommStats, DistributedComm, PatchComm, assemble_output
from workbench.distrifusion.config import PatchLayout, PatchParallelConfig, check_patch_geometry, resolve_layout
from workbench.distrifusion.layers import LayerContext, check_supported, count_downsamples, install
from workbench.sampling import StepInfo, denoise, initial_noise

__all__ = [
    "GenerationResult",
    "PatchParallelRun",
    "generate",
    "launch_generation",
    "load_generation_pipeline",
    "patch_parallel",
    "sample_images",
]

logger = logging.getLogger(__name__)

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
        step: UNet calls so far in the current run.
        stats: bytes received per rank (cleared by :meth:`reset`).
        call_seconds: wall time of each UNet call in the current run (without device synchronisation).
    """

    def __init__(
        self,
        unet: nn.Module,
        config: PatchParallelConfig,
        world_size: int,
        make_comm: Callable[[PatchLayout, CommStats], PatchComm],
        *,
        check_inputs: Callable[[torch.Tensor], None] | None = None,
    ):
        self.unet = unet
        self.config = config
        self.world_size = world_size
        self.layout: PatchLayout | None = None
        self.step = 0
        self.stats = CommStats()
        self.call_seconds: list[float] = []
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
        return self._context.comm

    def reset(self) -> None:
        """Start a new run: step 0 (synchronous), no stale activations, statistics cleared."""
        for layer in self._layers:
            layer.reset()
        self.step = 0
        self._last_timestep = None
        self.stats.clear()
        self.call_seconds.clear()

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
        timestep_value = float(torch.as_tensor(timestep).max())
        if self._last_timestep is not None and timestep_value > self._last_timestep:
            self.reset()  # a new generation starts: timesteps only go down within one
        self._last_timestep = timestep_value

        batch, _, height, _ = sample.shape
        layout = resolve_layout(self.world_size, batch, self.config)
        if layout != self.layout:
            self._use_layout(layout)
        check_patch_geometry(height, layout.num_patches, self._num_downsamples)
        if self.step == 0 and self._check_inputs is not None:
            self._check_inputs(sample)
        comm = self._context.comm
        pieces = _local_pieces(comm, layout, batch, height)

        local_arguments = {name: _split_batch(value, pieces, batch) for name, value in arguments.items()}
        local_arguments["sample"] = torch.cat([sample[b0:b1, :, r0:r1] for b0, b1, r0, r1 in pieces])
        self._context.step = self.step
        self._context.input_rows = self._input_rows(sample, pieces)
        self.stats.start_call()
        start = time.perf_counter()
        output = self._original_forward(**local_arguments)
        comm.flush()
        return_dict = arguments.get("return_dict", True)
        local = output.sample if return_dict else output[0]
        full = assemble_output(comm.gather_output(local), layout)
        self.call_seconds.append(time.perf_counter() - start)
        self.step += 1
        return type(output)(sample=full) if return_dict else (full,)

    def _input_rows(self, sample: torch.Tensor, pieces: list[tuple[int, int, int, int]]) -> dict[int, torch.Tensor]:
        """The first convolution's input rows with their halo, cut from the replicated input."""
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
def _parallelized(
    unet: nn.Module,
    config: PatchParallelConfig,
    world_size: int,
    make_comm: Callable[[PatchLayout, CommStats], PatchComm],
    *,
    check_inputs: Callable[[torch.Tensor], None] | None = None,
) -> Iterator[PatchParallelRun]:
    """Override ``unet.forward`` with the patch-parallel one for the block; undo everything after."""
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


def _agree(values: torch.Tensor, what: str, *, rtol: float = 0.0) -> None:
    """All-gather ``values`` (1-D) and raise on every rank if any rank's differ from rank 0's."""
    device = _collective_device()
    local = values.to(device=device, dtype=torch.float64).flatten()
    gathered = torch.empty((dist.get_world_size(), local.numel()), dtype=torch.float64, device=device)
    dist.all_gather(list(gathered.unbind(0)), local)
    gathered = gathered.cpu()
    reference = gathered[0]
    bad = [r for r in range(len(gathered)) if not torch.allclose(gathered[r], reference, rtol=rtol, atol=0.0)]
    if bad:
        raise ValueError(f"ranks {bad} disagree with rank 0 on {what}: {gathered.tolist()}")


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _model_fingerprint(unet: nn.Module) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for parameter in unet.parameters():
        total += parameter.detach().double().sum().cpu()
        count += parameter.numel()
    return torch.stack([total, torch.tensor(float(count), dtype=torch.float64)])


def _digest_number(text: str) -> float:
    return float(int(text[:12], 16))  # 48 bits: exact in float64


@contextlib.contextmanager
def patch_parallel(
    unet: nn.Module, config: PatchParallelConfig, *, timeout_s: float = 60.0
) -> Iterator[PatchParallelRun]:
    """Run ``unet`` patch-parallel over the default torch.distributed group for the ``with`` block.

    Every rank enters the block with the same UNet, config and inputs (checked: an all-gather of a
    config hash and a weight checksum on entry, and of the input latents at step 0 of every run, raise
    a ``ValueError`` on every rank when they differ). Initialise the group first, e.g. with
    :func:`workbench.launch.init_distributed` (gloo on CPU, NCCL on GPUs, with a short timeout).

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
        ValueError: mismatched configs, weights or latents across ranks; a height that does not split.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "patch_parallel needs an initialised torch.distributed group (workbench.launch.init_distributed); "
            "use workbench.distrifusion.simulate_patch_parallel for a single process"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    descriptor = torch.cat(
        [
            torch.tensor([_digest_number(config.digest()), float(world)], dtype=torch.float64),
            _model_fingerprint(unet),
        ]
    )
    _agree(descriptor, "the patch-parallel config or the UNet weights", rtol=1e-9)
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

    def check_inputs(sample: torch.Tensor) -> None:
        values = sample.detach().double()
        summary = torch.stack([values.sum(), values.abs().sum(), torch.tensor(float(values.numel()))])
        _agree(summary.cpu(), "the input latents (seed every rank's generator the same)", rtol=1e-6)

    try:
        with _parallelized(unet, config, world, make_comm, check_inputs=check_inputs) as run:
            yield run
    finally:
        for group in halves:
            with contextlib.suppress(Exception):
                dist.destroy_process_group(group)


# ----------------------------------------------------------------------------------------------------
# Sampling for the command line, the launch helper and the benchmark.


@dataclass
class GenerationResult:
    """What one generation produced.

    Attributes:
        images: (B, 3, H, W) in [0, 1], on the CPU.
        seconds: end-to-end wall time of the sampling loop.
        step_seconds: wall time of each step (UNet call + scheduler).
        stats: communication summary per rank (empty for a single device).
        label: what model ran (says "random-init" for untrained weights).
        layout: the split the ranks used (None on a single device).
    """

    images: torch.Tensor
    seconds: float
    step_seconds: list[float] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    label: str = ""
    layout: PatchLayout | None = None


def load_generation_pipeline(model: str) -> tuple[DiffusionPipeline, str]:
    """A pipeline by zoo name, ``random:toy-uncond`` / ``random:toy-t2i`` (untrained, labelled), or path/id.

    Returns:
        ``(pipeline, label)``; the label says "random-init" when the weights are untrained.
    """
    from workbench import zoo

    if model.startswith("random:"):
        name = model.split(":", 1)[1]
        if name == "toy-uncond":
            return DDPMPipeline(unet=zoo.build_toy_uncond_unet(), scheduler=zoo.sampling_scheduler()), (
                "toy-uncond architecture, random-init (untrained)"
            )
        if name == "toy-t2i":
            from workbench.pipelines import ToyTextToImagePipeline
            from workbench.toyclip import ToyCLIPModel

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                text_encoder = ToyCLIPModel().eval()
            pipe = ToyTextToImagePipeline(
                unet=zoo.build_toy_t2i_unet(), scheduler=zoo.sampling_scheduler(), text_encoder=text_encoder
            )
            return pipe, "toy-t2i architecture, random-init (untrained)"
        raise ValueError(f"model: random-init is available for random:toy-uncond and random:toy-t2i, got {model!r}")
    pipe = zoo.load_pipeline(model)
    return pipe, model


def sample_images(
    pipe: DiffusionPipeline,
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    generator: torch.Generator,
    batch_size: int = 1,
    prompt: str | None = None,
    guidance_scale: float = 1.0,
    progress: bool = True,
    callback: Callable[[StepInfo], None] | None = None,
) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from ``pipe`` at any canvas size (runs as-is inside a parallel block).

    ``DDPMPipeline`` (pixel space, no canvas argument) runs through :func:`workbench.sampling.denoise`;
    text-to-image pipelines (the toy one, Stable Diffusion) through their own ``__call__``.
    """
    unet = pipe.unet
    device = next(unet.parameters()).device
    if isinstance(pipe, DDPMPipeline):
        if prompt is not None:
            raise ValueError("prompt: an unconditional pipeline takes no prompt")
        shape = (batch_size, unet.config.in_channels, height, width)
        noise = initial_noise(shape, generator, dtype=unet.dtype).to(device)
        samples = denoise(
            unet,
            pipe.scheduler,
            noise,
            num_inference_steps=num_inference_steps,
            generator=generator,
            callback=callback,
            progress=progress,
        )
        return ((samples.float() + 1) / 2).clamp(0, 1).cpu()
    if prompt is None:
        raise ValueError("prompt: a text-to-image pipeline needs a prompt")
    kwargs = (
        {"callback": callback, "progress": progress}
        if "progress" in inspect.signature(pipe.__call__).parameters
        else {}
    )
    output = pipe(
        [prompt] * batch_size,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generator,
        output_type="pt",
        **kwargs,
    )
    return output.images.float().cpu()


def generate(
    pipe: DiffusionPipeline,
    config: PatchParallelConfig | None,
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 1,
    prompt: str | None = None,
    guidance_scale: float = 1.0,
    simulate_devices: int | None = None,
    label: str = "",
    timeout_s: float = 60.0,
    progress: bool = True,
) -> GenerationResult:
    """One timed generation, on one device (``config`` None), simulated (``simulate_devices``) or over the group.

    Under torch.distributed every rank calls this with the same arguments and gets the same images.
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    step_times: list[float] = []
    clock = [0.0]
    on_gpu = pipe.unet.device.type == "cuda"

    def on_step(_: StepInfo) -> None:
        if on_gpu:  # the step's kernels have been queued, not run
            torch.cuda.synchronize()
        now = time.perf_counter()
        step_times.append(now - clock[0])
        clock[0] = now

    if rank != 0 and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # the pipelines' own bars: rank 0 only
    kwargs = dict(
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        generator=torch.Generator().manual_seed(seed),
        batch_size=batch_size,
        prompt=prompt,
        guidance_scale=guidance_scale,
        progress=progress and rank == 0,
        callback=on_step,
    )
    if config is None:
        parallel = contextlib.nullcontext(None)
    elif simulate_devices is not None:
        from workbench.distrifusion.simulate import simulate_patch_parallel

        parallel = simulate_patch_parallel(pipe.unet, config, num_devices=simulate_devices)
    else:
        parallel = patch_parallel(pipe.unet, config, timeout_s=timeout_s)
    with torch.no_grad(), parallel as run:
        start = clock[0] = time.perf_counter()
        images = sample_images(pipe, **kwargs)
        seconds = time.perf_counter() - start
        stats = run.stats.summary(steady_from=config.warmup_steps + 1) if run is not None else {}
        layout = run.layout if run is not None else None
    return GenerationResult(images, seconds, step_times, stats, label, layout)


def launch_generation(
    model: str,
    config: PatchParallelConfig | None,
    *,
    num_processes: int,
    height: int,
    width: int,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 1,
    prompt: str | None = None,
    guidance_scale: float = 1.0,
    timeout_s: float = 300.0,
    init_timeout_s: float = 60.0,
) -> GenerationResult:
    """Start ``num_processes`` ranks (gloo on CPU, NCCL on GPUs), generate patch-parallel, return rank 0's result.

    The notebook's way to run the real multi-process code (:func:`workbench.launch.run`); a rank that
    fails, dies or stalls raises :class:`workbench.launch.LaunchError` within the timeouts.

    Args:
        model: a zoo name, ``random:toy-uncond``/``random:toy-t2i`` (untrained, labelled), or a pipeline
            path or hub id whose weights are available offline.
        config: the patch-parallel config (None: every rank samples on its own device, as a reference).
        num_processes: the number of ranks N.
        timeout_s: limit for the whole launch; init_timeout_s: the process group's timeout.
    """
    from workbench import launch

    kwargs = dict(
        model=model,
        config=asdict(config) if config is not None else None,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        seed=seed,
        batch_size=batch_size,
        prompt=prompt,
        guidance_scale=guidance_scale,
        timeout_s=init_timeout_s,
    )
    launched = launch.run(
        "workbench.distrifusion.runner:_generation_worker",
        nproc=num_processes,
        kwargs=kwargs,
        timeout_s=timeout_s,
        init_timeout_s=init_timeout_s,
    )
    first = launched.results[0]
    layout = PatchLayout(**first["layout"]) if first.get("layout") else None
    return GenerationResult(
        first["images"], first["seconds"], first["step_seconds"], first["stats"], first["label"], layout
    )


def _generation_worker(*, model: str, config: dict | None, timeout_s: float, **kwargs) -> dict[str, object]:
    """One rank of :func:`launch_generation` (and of the command line): load, generate, report."""
    pipe, label = load_generation_pipeline(model)
    pipe.to(_collective_device())
    parsed = PatchParallelConfig(**config) if config is not None else None
    result = generate(pipe, parsed, label=label, timeout_s=timeout_s, **kwargs)
    out: dict[str, object] = {
        "seconds": result.seconds,
        "step_seconds": result.step_seconds,
        "stats": result.stats,
        "label": label,
        "layout": asdict(result.layout) if result.layout is not None else None,
    }
    if dist.get_rank() == 0:
        out["images"] = result.images
    return out
