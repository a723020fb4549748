"""``python -m workbench bench distrifusion``: latency, communication and PSNR of patch parallelism.

DistriFusion (Li et al., CVPR 2024, arXiv 2402.19481) reports latency against one device (Fig. 6), PSNR
against the one-device image (Table 1) and communication volume (Table 2). For N = 1, 2, 4 ranks and each
mode, at the toy resolution (32x32) and on a larger canvas, the latency table gives

* latency per step (median) and end to end, on real processes (gloo over loopback on a CPU);
* bytes received per rank per step, and the time a rank is blocked in communication per step after the
  warm-up (the synchronous gather of each step's output shown on its own);
* PSNR against the single-device image (same seed);
* one rank's compute and the *modelled* speed-up (:mod:`workbench.benchmarks.distrifusion_compute`).

Then the scaling table (modelled speed-up against canvas size) and the breakdown of one rank's time by kind
of layer. On a CPU all ranks share its cores, so the measured multi-process latencies show overheads, not
speed-ups; the output says so. How to read the tables: ``workbench/benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from workbench import launch, zoo
from workbench.benchmarks.distrifusion_compute import (
    compute_scaling,
    print_breakdown_table,
    print_scaling_table,
    rank_breakdown,
    rank_compute_ms,
)
from workbench.distrifusion.comm import collective_device
from workbench.distrifusion.config import MODES, PatchParallelConfig
from workbench.distrifusion.runner import generate, load_generation_pipeline
from workbench.metrics import psnr
from workbench.runtime import describe_machine, quick_mode

__all__ = ["LatencyRow", "Scenario", "bench_scenario", "bench_worker", "main", "print_latency_table"]


@dataclass(frozen=True)
class Scenario:
    """One benchmarked setting: a model (zoo name or ``random:NAME``) on a canvas, with an optional prompt."""

    name: str
    model: str
    label: str
    height: int
    width: int
    prompt: str | None = None
    guidance_scale: float = 1.0


@dataclass(frozen=True)
class LatencyRow:
    """One (scenario, N, mode) of the latency table; measured fields are None where no real ranks ran.

    Attributes:
        scenario, model: what ran.
        devices: N (1: the single-device reference).
        mode: the config's mode ("single device" for N = 1).
        rank_compute_ms: one rank's share of a UNet call, communication taken out (NaN: canvas refused).
        modelled_speedup: single-device compute / rank compute.
        seconds: end-to-end wall time of the generation.
        step_ms: median wall time of a step.
        mb_per_step: megabytes received per rank per step.
        blocked_ms: ms rank 0 was blocked in communication per step after the warm-up.
        output_blocked_ms: the part of it in the synchronous gather of the step's output.
        psnr_db: PSNR against the single-device image (inf: identical).
        refused: why the ranks refused this setting (a canvas that does not split), else None.
    """

    scenario: str
    model: str
    devices: int
    mode: str
    rank_compute_ms: float
    modelled_speedup: float
    seconds: float | None = None
    step_ms: float | None = None
    mb_per_step: float | None = None
    blocked_ms: float | None = None
    output_blocked_ms: float | None = None
    psnr_db: float | None = None
    refused: str | None = None


def bench_worker(
    *, model: str, modes: list[str], warmup_steps: int, async_bucket_size: int, **common
) -> dict[str, object]:
    """One rank of a benchmark launch (a :func:`workbench.launch.run` target): every mode in turn on the same
    process group, start-up paid once; ``common`` are :func:`~workbench.distrifusion.runner.generate`'s
    arguments. Returns per mode the timings and statistics (or the refusal), and rank 0's images."""
    launch.report_phase(f"loading the pipeline {model!r}")
    pipe, _ = load_generation_pipeline(model)
    pipe.to(collective_device())
    launch.report_phase("warm-up run (full_sync, 2 steps)")
    generate(pipe, PatchParallelConfig(mode="full_sync"), **common | {"num_inference_steps": 2}, progress=False)
    out: dict[str, object] = {}
    for mode in modes:
        config = PatchParallelConfig(mode=mode, warmup_steps=warmup_steps, async_bucket_size=async_bucket_size)
        launch.report_phase(f"benchmarking mode {mode}")
        try:
            result = generate(pipe, config, **common, progress=False)
        except ValueError as error:  # the canvas does not split into N patches: the same on every rank
            out[mode] = {"error": str(error)}
            continue
        out[mode] = {"seconds": result.seconds, "step_seconds": result.step_seconds, "stats": result.stats}
        if dist.get_rank() == 0:
            out[f"images/{mode}"] = result.images
    return out


def bench_scenario(
    scenario: Scenario,
    devices: list[int],
    modes: list[str],
    *,
    steps: int,
    warmup_steps: int,
    async_bucket_size: int,
    device: torch.device,
) -> list[LatencyRow]:
    """The latency rows of one scenario: the single device, then every (N, mode) on N real ranks (where
    there are N GPUs for NCCL, or on a CPU with gloo; otherwise the modelled figures alone)."""
    pipe, _ = load_generation_pipeline(scenario.model)
    pipe.to(device)
    common = dict(
        height=scenario.height,
        width=scenario.width,
        num_inference_steps=steps,
        seed=0,
        prompt=scenario.prompt,
        guidance_scale=scenario.guidance_scale,
    )
    generate(pipe, None, **common | {"num_inference_steps": 2}, progress=False)  # warm-up
    single = generate(pipe, None, **common, progress=False)
    batch = 2 if scenario.prompt is not None and scenario.guidance_scale > 1 else 1
    shape = dict(height=scenario.height, width=scenario.width, batch_size=batch, repeats=7)
    full_ms = rank_compute_ms(pipe.unet, num_devices=1, **shape)
    name = dict(scenario=scenario.name, model=scenario.label)
    rows = [
        LatencyRow(
            **name,
            devices=1,
            mode="single device",
            rank_compute_ms=full_ms,
            modelled_speedup=1.0,
            seconds=single.seconds,
            step_ms=statistics.median(single.step_seconds) * 1e3,
            mb_per_step=0.0,
            blocked_ms=0.0,
            output_blocked_ms=0.0,
            psnr_db=math.inf,
        )
    ]
    for n in devices:
        rank_ms = {}
        for mode in modes:
            try:
                rank_ms[mode] = rank_compute_ms(pipe.unet, num_devices=n, mode=mode, **shape)
            except ValueError:  # the canvas does not split into N patches (the ranks say why below)
                rank_ms[mode] = math.nan
        modelled = {mode: dict(rank_compute_ms=ms, modelled_speedup=full_ms / ms) for mode, ms in rank_ms.items()}
        if device.type == "cuda" and torch.cuda.device_count() < n:
            rows += [LatencyRow(**name, devices=n, mode=mode, **modelled[mode]) for mode in modes]
            continue
        launched = launch.run(
            "workbench.benchmarks.distrifusion:bench_worker",
            nproc=n,
            timeout_s=900,
            threads_per_process=max(1, torch.get_num_threads() // n),
            kwargs=dict(
                model=scenario.model,
                modes=modes,
                warmup_steps=warmup_steps,
                async_bucket_size=async_bucket_size,
                **common,
            ),
        )
        first = launched.results[0]
        for mode in modes:
            measured = first[mode]
            if "error" in measured:
                rows.append(LatencyRow(**name, devices=n, mode=mode, **modelled[mode], refused=measured["error"]))
                continue
            stats = measured["stats"]
            rows.append(
                LatencyRow(
                    **name,
                    devices=n,
                    mode=mode,
                    **modelled[mode],
                    seconds=measured["seconds"],
                    step_ms=statistics.median(measured["step_seconds"]) * 1e3,
                    mb_per_step=stats.get("bytes_per_step", 0.0) / 1e6,
                    blocked_ms=stats.get("blocked_ms_per_steady_step", 0.0),
                    output_blocked_ms=stats.get("output_blocked_ms_per_steady_step", 0.0),
                    psnr_db=psnr(first[f"images/{mode}"], single.images),
                )
            )
    return rows


def print_latency_table(rows: list[LatencyRow]) -> None:
    """The latency table, one block per scenario; "-" where a figure was not measured (no real ranks)."""

    def cell(value: float | None, width: int, digits: int) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    for scenario in dict.fromkeys(row.scenario for row in rows):
        block = [row for row in rows if row.scenario == scenario]
        print(f"\n== {scenario}: {block[0].model} ==")
        print(
            f"{'N':>2} {'mode':20s} {'end-to-end s':>12s} {'step ms':>8s} {'MB/step/rank':>12s} {'blocked ms':>10s} "
            f"{'of it output':>12s} {'PSNR dB':>8s} {'rank compute ms':>15s} {'modelled speed-up':>17s}"
        )
        for row in block:
            if row.refused is not None:
                print(f"{row.devices:>2} {row.mode:20s} refused: {row.refused[:120]}")
                continue
            psnr_text = "-" if row.psnr_db is None else "exact" if math.isinf(row.psnr_db) else f"{row.psnr_db:.2f}"
            print(
                f"{row.devices:>2} {row.mode:20s} {cell(row.seconds, 12, 3)} {cell(row.step_ms, 8, 1)} "
                f"{cell(row.mb_per_step, 12, 3)} {cell(row.blocked_ms, 10, 1)} {cell(row.output_blocked_ms, 12, 1)} "
                f"{psnr_text:>8s} {row.rank_compute_ms:>15.1f} {row.modelled_speedup:>17.2f}"
            )
    print(
        "rank compute: one rank's share of a UNet call in the mode's steady state, gathers replaced by local copies, "
        "best of 7, in this process with its threads. MODELLED speed-up = single-device compute / rank compute: "
        "N devices like this one, communication fully hidden (an upper bound, not a measurement). blocked ms: "
        "time rank 0 waited for gathers per step after the warm-up; of it output: the synchronous gather of the "
        "step's output. '-': not measured (no real ranks for this N)."
    )


def _resolve_model(name: str) -> tuple[str, str]:
    """The zoo model if it is shipped, else its random-init architecture; (model spec, label)."""
    if (zoo.DATA_DIR / name).is_dir():
        return name, f"{name} (trained)"
    return f"random:{name}", f"{name} RANDOM-INIT (untrained: PSNR says nothing about quality)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench bench distrifusion", description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[2, 4], help="process counts N besides 1")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None)
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default 20, quick 8)")
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument(
        "--async-bucket-size",
        type=int,
        default=PatchParallelConfig.async_bucket_size,
        help="asynchronous gathers sent together as one collective",
    )
    parser.add_argument("--large", type=int, default=128, help="side of the larger canvas")
    parser.add_argument("--quick", action="store_true", help="fewer modes and steps (also WORKBENCH_QUICK=1)")
    parser.add_argument(
        "--scaling", type=int, nargs="*", default=None, help="canvas sides of the scaling table (default 128 256 512)"
    )
    parser.add_argument(
        "--scaling-batch",
        type=int,
        default=1,
        help="batch of the scaling table; 2 as under classifier-free guidance, whose halves the ranks split",
    )
    parser.add_argument(
        "--breakdown",
        type=int,
        default=None,
        help="canvas side of the per-layer breakdown of a rank's time (default: the second scaling side; 0: none)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cpu or cuda[:k]: where the single-device runs and the rank compute run (default: cuda if available)",
    )
    parser.add_argument("--json", default=None, help="write every table's rows as JSON to this file")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` without the program name."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:k], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    if args.scaling_batch < 1:
        parser.error(f"--scaling-batch must be >= 1, got {args.scaling_batch}")
    quick = args.quick or quick_mode()
    steps = args.steps or (8 if quick else 20)
    modes = args.modes or (
        ["full_sync", "corrected_async_gn", "naive_patch"]
        if quick
        else ["full_sync", "sync_gn", "corrected_async_gn", "stale_gn", "naive_patch"]
    )
    print(f"machine: {describe_machine()}; load average {os.getloadavg()[0]:.1f}")
    threads = torch.get_num_threads()
    print(f"{steps} steps, warm-up {args.warmup_steps}, async bucket {args.async_bucket_size}. ", end="")
    if device.type == "cuda":
        print(
            f"Measured latencies: one device = {torch.cuda.get_device_name(device)}; N ranks = N processes, one GPU "
            f"each over NCCL, where there are N GPUs ({torch.cuda.device_count()} here); otherwise the N-rank rows "
            "are modelled only."
        )
    else:
        print(
            f"Measured latencies: one device = this process with {threads} thread(s); N ranks = N processes with "
            f"max(1, {threads} // N) thread(s) each, sharing this machine's {os.cpu_count()} cores (gloo over "
            "loopback): they show overheads, not the speed-up of N devices."
        )
    uncond, uncond_label = _resolve_model("toy-uncond")
    scenarios = [
        Scenario("toy 32x32", uncond, uncond_label, 32, 32),
        Scenario(f"canvas {args.large}x{args.large}", uncond, uncond_label, args.large, args.large),
    ]
    if not quick:
        t2i, t2i_label = _resolve_model("toy-t2i")
        scenarios.append(
            Scenario("toy-t2i 32x32, guidance 4", t2i, t2i_label, 32, 32, prompt="a red circle", guidance_scale=4.0)
        )
    options = dict(steps=steps, warmup_steps=args.warmup_steps, async_bucket_size=args.async_bucket_size)
    latency = [row for s in scenarios for row in bench_scenario(s, args.devices, modes, device=device, **options)]
    print_latency_table(latency)

    pipe, _ = load_generation_pipeline(uncond)
    pipe.to(device)
    where = "1 CPU thread" if device.type == "cpu" else torch.cuda.get_device_name(device)
    repeats = 3 if quick else 5
    sizes = args.scaling if args.scaling is not None else ([64] if quick else [128, 256, 512])
    scaling = []
    if sizes:
        scaling = compute_scaling(pipe.unet, sizes, args.devices, repeats=repeats, batch_size=args.scaling_batch)
        batch = "" if args.scaling_batch == 1 else f", batch {args.scaling_batch} split over the ranks first"
        print_scaling_table(
            scaling, title=f"compute scaling, {uncond_label}{batch}, {where}, best of {repeats} interleaved rounds"
        )
        print("of ideal = modelled speed-up / N; bound = the most a split can reach with F undivided.")
    side = args.breakdown if args.breakdown is not None else (sizes[min(1, len(sizes) - 1)] if sizes else 0)
    breakdown = {}
    for n in args.devices if side else []:
        title = f"where one rank's time goes, {uncond_label}, {side}x{side}, N = {n}, {where}, ms per UNet call"
        try:
            breakdown[n] = rank_breakdown(pipe.unet, height=side, width=side, num_devices=n, repeats=repeats)
        except ValueError as error:
            print(f"\n== {title} ==\nrefused: {error}")
            continue
        print_breakdown_table(breakdown[n], title=title)
    if breakdown:
        print("ideal share = the one-device call's time in those layers / N (torch.profiler, exclusive times).")
    if args.json is not None:
        tables = {
            "latency": [asdict(row) for row in latency],
            "scaling": [asdict(row) for row in scaling],
            "breakdown": {str(n): [asdict(row) for row in rows] for n, rows in breakdown.items()},
        }
        with open(args.json, "w") as f:
            json.dump(tables, f, indent=2)
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
