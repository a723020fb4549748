"""``python -m workbench bench distrifusion``: latency, communication and PSNR of patch parallelism.

For N = 1, 2, 4 ranks and each mode, at the toy resolution (32x32) and on a larger canvas (the
convolutional toy UNet2DModel at 128x128), it measures:

* latency per step (median) and end to end, on real processes (gloo over loopback on a CPU);
* bytes received per rank per step (counted at every all-gather);
* time a rank is blocked in communication per step after the warm-up (all of a synchronous gather,
  only the unhidden wait of an asynchronous one): ~0 when compute hides communication, apart from the
  synchronous gather of each step's output, shown on its own;
* PSNR against the single-device image (same seed);
* the compute of one rank (its share of a UNet call with the gathers replaced by local copies, in this
  process) and the *modelled* speed-up ``T(one device) / T(one rank's compute)``: one device per rank,
  communication fully hidden (the paper's goal, DistriFusion Sec. 4.1), an upper bound, not a measurement;
  and against canvas size, with the bound that the UNet's fixed per-call cost puts on any split
  (:mod:`workbench.distrifusion.scaling`);
* where one rank's time goes, by kind of layer, against the same layers' share of the one-device call
  (:mod:`workbench.distrifusion.breakdown`).

On a CPU machine all ranks share its cores, so the measured multi-process latencies show overheads,
not speed-ups; the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from workbench import launch
from workbench.distrifusion.breakdown import KINDS, rank_breakdown
from workbench.distrifusion.config import MODES, PatchParallelConfig
from workbench.distrifusion.layers import count_downsamples
from workbench.distrifusion.runner import _collective_device, generate, load_generation_pipeline
from workbench.distrifusion.scaling import compute_scaling, rank_compute_ms
from workbench.metrics import psnr
from workbench.runtime import describe_machine, quick_mode

__all__ = ["Scenario", "main"]


@dataclass(frozen=True)
class Scenario:
    """One benchmarked setting."""

    name: str
    model: str
    height: int
    width: int
    prompt: str | None = None
    guidance_scale: float = 1.0


def _resolve_model(name: str) -> tuple[str, str]:
    """The zoo model if trained, else its random-init architecture; (model spec, label)."""
    from workbench import zoo

    if (zoo.DATA_DIR / name).is_dir():
        return name, f"{name} (trained)"
    return f"random:{name}", f"{name} RANDOM-INIT (untrained: PSNR says nothing about quality)"


def _bench_worker(
    *, model: str, modes: list[str], warmup_steps: int, async_bucket_size: int, **common
) -> dict[str, object]:
    """One rank of a benchmark launch: every mode in turn on the same process group (start-up paid once)."""
    import torch.distributed as dist

    pipe, _ = load_generation_pipeline(model)
    pipe.to(_collective_device())
    generate(pipe, PatchParallelConfig(mode="full_sync"), **common | {"num_inference_steps": 2}, progress=False)
    out: dict[str, object] = {}
    for mode in modes:
        config = PatchParallelConfig(mode=mode, warmup_steps=warmup_steps, async_bucket_size=async_bucket_size)
        try:
            result = generate(pipe, config, **common, progress=False)
        except ValueError as error:  # the canvas does not split into N patches: same on every rank
            out[mode] = {"error": str(error)}
            continue
        out[mode] = {
            "seconds": result.seconds,
            "step_seconds": result.step_seconds,
            "stats": result.stats,
            "layout": asdict(result.layout) if result.layout else None,
        }
        if dist.get_rank() == 0:
            out[f"images/{mode}"] = result.images
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` without the program name."""
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
        "--scaling",
        type=int,
        nargs="*",
        default=None,
        help="canvas sides of the compute-scaling table (default 128 256 512)",
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
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON")
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
        Scenario("toy 32x32", uncond, 32, 32),
        Scenario(f"canvas {args.large}x{args.large}", uncond, args.large, args.large),
    ]
    labels = {uncond: uncond_label}
    if not quick:
        t2i, labels_t2i = _resolve_model("toy-t2i")
        labels[t2i] = labels_t2i
        scenarios.append(Scenario("toy-t2i 32x32, guidance 4", t2i, 32, 32, prompt="a red circle", guidance_scale=4.0))
    rows = []
    for scenario in scenarios:
        rows += _bench_scenario(
            scenario,
            labels[scenario.model],
            args.devices,
            modes,
            steps,
            args.warmup_steps,
            args.async_bucket_size,
            device,
        )
    sizes = args.scaling if args.scaling is not None else ([64] if quick else [128, 256, 512])
    if sizes:
        _scaling_table(
            uncond,
            uncond_label,
            sizes,
            args.devices,
            repeats=3 if quick else 5,
            device=device,
            batch_size=args.scaling_batch,
        )
    side = args.breakdown if args.breakdown is not None else (sizes[min(1, len(sizes) - 1)] if sizes else 0)
    if side:
        _breakdown_tables(uncond, uncond_label, side, args.devices, repeats=3 if quick else 5, device=device)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"written to {args.json}")


def _bench_scenario(
    scenario: Scenario,
    label: str,
    devices: list[int],
    modes: list[str],
    steps: int,
    warmup_steps: int,
    async_bucket_size: int,
    device: torch.device,
) -> list[dict]:
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
    print(f"\n== {scenario.name}: {label} ==")
    print(
        f"{'N':>2} {'mode':20s} {'end-to-end s':>12s} {'step ms':>8s} {'MB/step/rank':>12s} {'blocked ms':>10s} "
        f"{'of it output':>12s} {'PSNR dB':>8s} {'rank compute ms':>15s} {'modelled speed-up':>17s}"
    )
    row = dict(
        scenario=scenario.name,
        model=label,
        devices=1,
        mode="single device",
        seconds=single.seconds,
        step_ms=statistics.median(single.step_seconds) * 1e3,
        mb_per_step=0.0,
        blocked_ms=0.0,
        output_blocked_ms=0.0,
        psnr_db=float("inf"),
        rank_compute_ms=full_ms,
        modelled_speedup=1.0,
    )
    rows = [row]
    _print_row(row)
    for n in devices:
        rank_ms = {mode: _rank_ms_or_nan(pipe.unet, n, mode, shape) for mode in modes}
        if device.type == "cuda" and torch.cuda.device_count() < n:
            for mode in modes:
                print(
                    f"{n:>2} {mode:20s} no real ranks (needs {n} GPUs for NCCL); rank compute {rank_ms[mode]:.1f} ms, "
                    f"MODELLED speed-up {full_ms / rank_ms[mode]:.2f}"
                )
                rows.append(
                    dict(
                        scenario=scenario.name,
                        model=label,
                        devices=n,
                        mode=mode,
                        rank_compute_ms=rank_ms[mode],
                        modelled_speedup=full_ms / rank_ms[mode],
                    )
                )
            continue
        launched = launch.run(
            "workbench.benchmarks.distrifusion:_bench_worker",
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
            if "error" in first[mode]:
                print(f"{n:>2} {mode:20s} refused: {first[mode]['error'][:120]}")
                continue
            measured = first[mode]
            row = dict(
                scenario=scenario.name,
                model=label,
                devices=n,
                mode=mode,
                seconds=measured["seconds"],
                step_ms=statistics.median(measured["step_seconds"]) * 1e3,
                mb_per_step=measured["stats"].get("bytes_per_step", 0.0) / 1e6,
                blocked_ms=measured["stats"].get("blocked_ms_per_steady_step", 0.0),
                output_blocked_ms=measured["stats"].get("output_blocked_ms_per_steady_step", 0.0),
                psnr_db=psnr(first[f"images/{mode}"], single.images),
                rank_compute_ms=rank_ms[mode],
                modelled_speedup=full_ms / rank_ms[mode],
                layout=measured["layout"],
            )
            rows.append(row)
            _print_row(row)
    print(
        "rank compute (measured): one rank's share of a UNet call in the mode's steady state (its batch half "
        "under the guidance split, its rows with halos, its queries against all keys) with the gathers replaced "
        "by local copies, best of 7, in this process with its threads (a small patch uses several threads less "
        "well than the whole image; the scaling table pins one). MODELLED speed-up = single-device compute / "
        "rank compute: N devices like this one, communication fully hidden (an upper bound, not a measurement; "
        "naive patches skip the whole image's keys, so theirs can pass N). blocked ms: time rank 0 spent waiting "
        "for gathers per step after the warm-up (synchronous gathers in full, asynchronous ones only where "
        "compute did not hide them); of it output: the synchronous gather of the step's output, which the "
        "method does not overlap (it includes waiting for the slowest rank)."
    )
    return rows


def _rank_ms_or_nan(unet, num_devices: int, mode: str, shape: dict) -> float:
    try:
        return rank_compute_ms(unet, num_devices=num_devices, mode=mode, **shape)
    except ValueError:  # the canvas does not split into N patches
        return float("nan")


def _scaling_table(
    model: str,
    label: str,
    sizes: list[int],
    devices: list[int],
    *,
    repeats: int,
    device: torch.device | None = None,
    batch_size: int = 1,
) -> None:
    """Print :func:`~workbench.distrifusion.scaling.compute_scaling`: modelled speed-up, of ideal and the bound
    that the fixed per-call cost puts on any split, against canvas size."""
    device = device or torch.device("cpu")
    pipe, _ = load_generation_pipeline(model)
    pipe.to(device)
    rows = compute_scaling(pipe.unet, sizes, devices, repeats=repeats, batch_size=batch_size)
    where = _timing_device_label(device)
    batch = "" if batch_size == 1 else f", batch {batch_size} (split over the ranks first, as under guidance)"
    print(f"\n== compute scaling, {label}{batch}, {where}, best of {repeats} interleaved rounds ==")
    smallest = 2 ** count_downsamples(pipe.unet)
    print(f"fixed cost of a UNet call (one device, {smallest}x{smallest} canvas): F = {rows[0].fixed_ms:.1f} ms")
    print(
        f"{'canvas':>8} {'N':>2} {'one device ms':>14} {'rank ms':>9} {'modelled speed-up':>17} "
        f"{'of ideal':>9} {'bound':>6}"
    )
    for row in rows:
        if row.refused is not None:
            print(f"{row.size:>8} {row.num_devices:>2} refused: {row.refused[:100]}")
            continue
        print(
            f"{row.size:>8} {row.num_devices:>2} {row.one_device_ms:>14.1f} {row.rank_ms:>9.1f} "
            f"{row.speedup:>17.2f} {row.of_ideal:>9.0%} {row.bound:>6.0%}"
        )
    print(
        "of ideal = modelled speed-up / N; the target is >= 90 % (within 10 % of the N-fold reduction). "
        "bound = the most a split can reach with F undivided."
    )


def _timing_device_label(device: torch.device) -> str:
    """Where the scaling and breakdown tables time: one CPU thread (they pin it), or the GPU's name."""
    return "1 CPU thread" if device.type == "cpu" else torch.cuda.get_device_name(device)


def _breakdown_tables(
    model: str, label: str, side: int, devices: list[int], *, repeats: int, device: torch.device
) -> None:
    """Print :func:`~workbench.distrifusion.breakdown.rank_breakdown` at one canvas for every N."""
    pipe, _ = load_generation_pipeline(model)
    pipe.to(device)
    where = _timing_device_label(device)
    for n in devices:
        print(f"\n== where one rank's time goes, {label}, {side}x{side}, N = {n}, {where}, ms per UNet call ==")
        try:
            rows = rank_breakdown(pipe.unet, height=side, width=side, num_devices=n, repeats=repeats)
        except ValueError as error:
            print(f"refused: {error}")
            continue
        print(f"{'layers':>26} {'count':>5} {'ideal share':>11} {'rank':>8} {'excess':>8}")
        for row in rows:
            count = str(row.layers) if row.kind != KINDS[-1] else "-"
            print(f"{row.kind:>26} {count:>5} {row.ideal_ms:>11.2f} {row.rank_ms:>8.2f} {row.excess_ms:>+8.2f}")
        ideal, rank = sum(row.ideal_ms for row in rows), sum(row.rank_ms for row in rows)
        total = f"{'total':>26} {'':>5} {ideal:>11.2f} {rank:>8.2f} {rank - ideal:>+8.2f}"
        print(f"{total}   of ideal {ideal / rank:.0%}")
    print(
        "ideal share = the one-device call's time in those layers / N; exclusive times from forward hooks; "
        "the rank as in the scaling table."
    )


def _print_row(row: dict) -> None:
    value = row["psnr_db"]
    text = "exact" if value == float("inf") else f"{value:.2f}"
    print(
        f"{row['devices']:>2} {row['mode']:20s} {row['seconds']:>12.3f} {row['step_ms']:>8.1f} "
        f"{row['mb_per_step']:>12.3f} {row['blocked_ms']:>10.1f} {row['output_blocked_ms']:>12.1f} {text:>8s} "
        f"{row['rank_compute_ms']:>15.1f} {row['modelled_speedup']:>17.2f}"
    )


if __name__ == "__main__":
    main()
