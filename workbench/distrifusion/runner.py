"""Whole generations with patch parallelism: for the command line, the notebook and the benchmark.

The method is :mod:`workbench.distrifusion.parallel` (the context manager around a stock UNet); this module
runs it: :func:`generate` samples one timed generation on one device, on simulated ranks or over the
process group, :func:`sample_images` samples any pipeline at any canvas size, and :func:`launch_generation`
starts N local ranks (:func:`workbench.launch.run`) that each run :func:`generation_worker`.
DistriFusion (Li et al., CVPR 2024, arXiv 2402.19481, Sec. 4.1): every rank holds the whole model and the
whole latent, so every rank runs the same pipeline call with the same seed.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from diffusers import DDPMPipeline, DiffusionPipeline

from workbench import launch, zoo
from workbench.distrifusion.comm import collective_device
from workbench.distrifusion.config import PatchLayout, PatchParallelConfig
from workbench.distrifusion.parallel import patch_parallel
from workbench.distrifusion.simulate import simulate_patch_parallel
from workbench.sampling import StepInfo, denoise, initial_noise

__all__ = [
    "GenerationResult",
    "generate",
    "generation_worker",
    "launch_generation",
    "load_generation_pipeline",
    "sample_images",
]

_UNTRAINED_PREFIX = "random:"


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
    if model.startswith(_UNTRAINED_PREFIX):
        name = model.removeprefix(_UNTRAINED_PREFIX)
        if name not in ("toy-uncond", "toy-t2i"):
            raise ValueError(f"model: random-init is available for random:toy-uncond and random:toy-t2i, got {model!r}")
        return zoo.build_untrained_pipeline(name), f"{name} architecture, random-init (untrained)"
    return zoo.load_pipeline(model), model


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

    def on_step(info: StepInfo) -> None:
        launch.report_phase(f"denoising: {info.index + 1}/{num_inference_steps} steps done")
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
        parallel = simulate_patch_parallel(pipe.unet, config, num_devices=simulate_devices)
    else:
        parallel = patch_parallel(pipe.unet, config, timeout_s=timeout_s)
    with torch.no_grad(), parallel as run:
        launch.report_phase(f"denoising: 0/{num_inference_steps} steps done")
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
    fails, dies, stalls or never joins raises :class:`workbench.launch.LaunchError` within the timeouts,
    naming that rank and its last phase (loading, or the denoising step it had reached) in the message and
    in ``error.faulty``.

    Args:
        model: a zoo name, ``random:toy-uncond``/``random:toy-t2i`` (untrained, labelled), or a pipeline
            path or hub id whose weights are available offline.
        config: the patch-parallel config (None: every rank samples on its own device, as a reference).
        num_processes: the number of ranks N.
        timeout_s: limit for the whole launch; init_timeout_s: the process group's timeout.
    """
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
        "workbench.distrifusion.runner:generation_worker",
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


def generation_worker(*, model: str, config: dict | None, timeout_s: float, **kwargs) -> dict[str, object]:
    """One rank of :func:`launch_generation`: load, generate, report (images on rank 0 only).

    A :func:`workbench.launch.run` target: it runs after the default group is initialised; its arguments are
    JSON (``config`` as the fields of a :class:`PatchParallelConfig`, None for one device per rank) and the
    rest are :func:`generate`'s.
    """
    launch.report_phase(f"loading the pipeline {model!r}")
    pipe, label = load_generation_pipeline(model)
    pipe.to(collective_device())
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
