"""``python -m workbench distrifusion``: generate an image patch-parallel (DistriFusion, arXiv 2402.19481).

Under torchrun every process is one rank (gloo on CPU, NCCL on GPUs)::

    torchrun --nproc_per_node=2 -m workbench distrifusion --model toy-uncond --height 128 --width 128 \\
        --mode corrected_async_gn --compare --output distrifusion.png

Without torchrun it runs on one device, or simulates N ranks in this process with ``--simulate N``.
``--compare`` also samples on a single device and prints the PSNR of the patch-parallel image against it.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline

from workbench.distrifusion.config import MODES, PatchParallelConfig
from workbench.distrifusion.runner import GenerationResult, generate, load_generation_pipeline
from workbench.metrics import psnr

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench distrifusion", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        default="toy-uncond",
        help="zoo name, random:toy-uncond / random:toy-t2i (untrained), or a pipeline path/id",
    )
    parser.add_argument("--height", type=int, default=None, help="canvas height (default: the UNet's sample size)")
    parser.add_argument("--width", type=int, default=None, help="canvas width (default: the UNet's sample size)")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps")
    parser.add_argument("--mode", choices=MODES, default=PatchParallelConfig.mode)
    parser.add_argument("--warmup-steps", type=int, default=PatchParallelConfig.warmup_steps)
    parser.add_argument("--no-split-batch", action="store_true", help="do not split the guidance batch over ranks")
    parser.add_argument(
        "--async-bucket-size",
        type=int,
        default=PatchParallelConfig.async_bucket_size,
        help="layers' asynchronous gathers sent together as one collective",
    )
    parser.add_argument("--prompt", default=None, help="text prompt (text-to-image models)")
    parser.add_argument("--guidance-scale", type=float, default=4.0, help="text-to-image only")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--simulate", type=int, default=None, metavar="N", help="simulate N ranks in one process")
    parser.add_argument("--compare", action="store_true", help="also sample on one device; print the PSNR")
    parser.add_argument("--output", type=Path, default=None, help="save the images side by side as PNG")
    parser.add_argument("--timeout", type=float, default=60.0, help="process-group timeout in seconds")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` without the program name."""
    args = _parser().parse_args(argv)
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed and args.simulate is not None:
        raise SystemExit("--simulate runs in one process: do not start it under torchrun")
    rank = 0
    if distributed:
        from workbench.launch import init_distributed

        info = init_distributed(timeout_s=args.timeout)
        rank = info.rank
    pipe, label = load_generation_pipeline(args.model)
    if distributed:
        pipe.to(info.device)
    size = pipe.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    text = not isinstance(pipe, DDPMPipeline)
    common = dict(
        height=args.height or size,
        width=args.width or size,
        num_inference_steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        prompt=(args.prompt or "a red circle") if text else args.prompt,
        guidance_scale=args.guidance_scale if text else 1.0,
        label=label,
    )
    parallel = distributed or args.simulate is not None
    config = (
        PatchParallelConfig(
            mode=args.mode,
            warmup_steps=args.warmup_steps,
            split_batch=not args.no_split_batch,
            async_bucket_size=args.async_bucket_size,
        )
        if parallel
        else None
    )
    result = generate(pipe, config, simulate_devices=args.simulate, timeout_s=args.timeout, **common)
    reference = generate(pipe, None, **common) if args.compare and rank == 0 else None
    if rank == 0:
        _report(result, reference, config, args)
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


def _report(result: GenerationResult, reference: GenerationResult | None, config, args) -> None:
    print(f"model: {result.label}")
    if result.layout is not None:
        layout = result.layout
        print(
            f"ranks: {layout.world_size} = {layout.num_batch_groups} batch group(s) x {layout.num_patches} "
            f"row patch(es); mode {config.mode}, warm-up {config.warmup_steps}"
        )
    else:
        print("ranks: 1 (single device)")
    steps = result.step_seconds
    print(
        f"end to end: {result.seconds:.3f} s for {len(steps)} steps; "
        f"median step {statistics.median(steps) * 1e3:.1f} ms"
        if steps
        else f"end to end: {result.seconds:.3f} s"
    )
    if result.stats:
        print(
            f"communication per rank per step: {result.stats['bytes_per_step'] / 1e6:.3f} MB "
            + ", ".join(
                f"{k.removesuffix('_bytes_per_step')} {v / 1e6:.3f} MB"
                for k, v in result.stats.items()
                if k.endswith("_bytes_per_step")
            )
        )
        print(
            f"blocked in communication per rank: {result.stats['blocked_ms_per_step']:.1f} ms per step, "
            f"{result.stats['blocked_ms_per_steady_step']:.1f} ms per step after the warm-up, of which "
            f"{result.stats['output_blocked_ms_per_steady_step']:.1f} ms in the synchronous gather of the output"
            " (0 when communication is hidden; a host timing, meaningful with gloo, not with NCCL's streams)"
        )
    images = [result.images]
    if reference is not None:
        print(
            f"single device: {reference.seconds:.3f} s; PSNR of the patch-parallel image against it: "
            f"{psnr(result.images, reference.images):.2f} dB"
        )
        images.append(reference.images)
    if args.output is not None:
        from PIL import Image

        row = torch.cat([torch.cat(list(batch), dim=-1) for batch in images], dim=-2)  # (3, rows, columns)
        array = (row.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(args.output)
        print(f"saved {args.output}" + (" (top: patch-parallel, bottom: single device)" if reference else ""))


if __name__ == "__main__":
    main()
