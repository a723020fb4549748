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
  communication fully hidden (the paper's goal, DistriFusion Sec. 4.1), an upper bound, not a measurement.

On a CPU machine all ranks share its cores, so the measured multi-process latencies show overheads,
not speed-ups; the table says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from workbench import launch
from workbench.distrifusion.comm import CommStats, PatchComm, PendingGather
from workbench.distrifusion.config import MODES, PatchLayout, PatchParallelConfig
from workbench.distrifusion.layers import count_downsamples
from workbench.distrifusion.runner import _collective_device, _parallelized, generate, load_generation_pipeline
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


class _ComputeOnlyComm(PatchComm):
    """Rank 0's shapes without communication: every "gather" repeats the local tensor (wrong values, same work).

    Timing a UNet call under it measures what one rank computes (its rows with halos, its queries against
    the whole image's keys, GroupNorm statistics) with the communication taken out.
    """

    def __init__(self, layout: PatchLayout, stats: CommStats):
        self.layout, self.stats, self.num_local = layout, stats, 1
        self.patch_index, self.batch_group = torch.tensor([0]), torch.tensor([0])

    def all_gather(self, fresh: torch.Tensor, *, kind: str, async_op: bool = False) -> PendingGather:
        return PendingGather(fresh.unsqueeze(1).expand(1, self.num_patches, *fresh.shape[1:]).contiguous())

    def gather_output(self, local: torch.Tensor) -> torch.Tensor:
        return local.unsqueeze(0).expand(self.layout.world_size, *local.shape).contiguous()


def _rank_compute_ms(pipe, scenario: Scenario, num_devices: int, *, repeats: int) -> float:
    """Best-of-``repeats`` ms of one rank's share of a UNet call, communication taken out.

    The minimum, not the median: on a shared machine it is the steadiest estimate of the compute itself.
    """
    unet = pipe.unet
    device = unet.device
    batch = 2 if scenario.prompt is not None and scenario.guidance_scale > 1 else 1
    sample = torch.randn(
        batch, unet.config.in_channels, scenario.height, scenario.width, generator=torch.Generator().manual_seed(0)
    ).to(device, unet.dtype)
    kwargs = {}
    if getattr(unet.config, "cross_attention_dim", None):
        kwargs["encoder_hidden_states"] = torch.zeros(batch, 8, unet.config.cross_attention_dim, device=device)
    config = PatchParallelConfig(mode="full_sync")
    parallel = (
        _parallelized(unet, config, num_devices, _ComputeOnlyComm) if num_devices > 1 else contextlib.nullcontext()
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        _scaling_table(uncond, uncond_label, sizes, args.devices, repeats=3 if quick else 5, device=device)
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
    full_ms = _rank_compute_ms(pipe, scenario, 1, repeats=7)
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
        try:
            rank_ms = _rank_compute_ms(pipe, scenario, n, repeats=7)
        except ValueError:
            rank_ms = float("nan")
        if device.type == "cuda" and torch.cuda.device_count() < n:
            print(
                f"{n:>2} {'(no real ranks)':20s} needs {n} GPUs for NCCL ranks; rank compute {rank_ms:.1f} ms, "
                f"MODELLED speed-up {full_ms / rank_ms:.2f}"
            )
            rows.append(
                dict(
                    scenario=scenario.name,
                    model=label,
                    devices=n,
                    mode="modelled only",
                    rank_compute_ms=rank_ms,
                    modelled_speedup=full_ms / rank_ms,
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
                rank_compute_ms=rank_ms,
                modelled_speedup=full_ms / rank_ms,
                layout=measured["layout"],
            )
            rows.append(row)
            _print_row(row)
    print(
        "rank compute (measured): one rank's share of a UNet call (its batch half under the guidance split, its "
        "rows with halos, its queries against all keys) with the gathers replaced by local copies, best of 7, "
        "in this process. MODELLED speed-up = single-device compute / rank compute: N devices like this one, "
        "communication fully hidden (an upper bound, not a measurement). blocked ms: time rank 0 spent waiting "
        "for gathers per step after the warm-up (synchronous gathers in full, asynchronous ones only where "
        "compute did not hide them); of it output: the synchronous gather of the step's output, which the "
        "method does not overlap (it includes waiting for the slowest rank)."
    )
    return rows


def _scaling_table(
    model: str, label: str, sizes: list[int], devices: list[int], *, repeats: int, device: torch.device | None = None
) -> None:
    """Modelled speed-up against canvas size: how far one rank's compute is from 1/N of the whole.

    On a CPU one thread throughout, so that a small patch and the whole image get the same (serial) efficiency;
    what remains is the method's own overhead per layer (halo rows, gathers' copies, GroupNorm statistics,
    keys of the whole image), which a larger canvas amortises. The settings are timed in interleaved
    rounds, so that a drift in the machine's speed hits them alike.

    A UNet call also has a cost no split divides (time embedding, Python, small ops per layer): the
    one-device call on the smallest canvas the UNet takes (2^levels square) estimates it as F, and
    ``bound`` = T1 / (F + (T1 - F) / N) / N is the best "of ideal" any row split could reach with no
    patch overhead at all.
    """
    device = device or torch.device("cpu")
    pipe, _ = load_generation_pipeline(model)
    pipe.to(device)
    smallest = 2 ** count_downsamples(pipe.unet)
    fixed = Scenario("fixed", model, smallest, smallest)
    best: dict[tuple[int, int], float] = {}  # (canvas side, N) -> best ms; N = 1 is one device
    refused: dict[tuple[int, int], str] = {}
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for _ in tqdm(range(repeats), desc="scaling rounds"):
            best[0, 1] = min(best.get((0, 1), float("inf")), _rank_compute_ms(pipe, fixed, 1, repeats=3))
            for size in sizes:
                scenario = Scenario(f"{size}x{size}", model, size, size)
                for n in [1, *devices]:
                    if (size, n) in refused:
                        continue
                    try:
                        ms = _rank_compute_ms(pipe, scenario, n, repeats=1)
                    except ValueError as error:
                        refused[size, n] = str(error)
                        continue
                    best[size, n] = min(best.get((size, n), float("inf")), ms)
    finally:
        torch.set_num_threads(previous)

    fixed_ms = best[0, 1]
    where = "1 CPU thread" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"\n== compute scaling, {label}, {where}, best of {repeats} interleaved rounds ==")
    print(f"fixed cost of a UNet call (one device, {smallest}x{smallest} canvas): F = {fixed_ms:.1f} ms")
    print(
        f"{'canvas':>8} {'N':>2} {'one device ms':>14} {'rank ms':>9} {'modelled speed-up':>17} "
        f"{'of ideal':>9} {'bound':>6}"
    )
    for size in sizes:
        full_ms = best[size, 1]
        for n in devices:
            if (size, n) in refused:
                print(f"{size:>8} {n:>2} refused: {refused[size, n][:100]}")
                continue
            speedup = full_ms / best[size, n]
            bound = full_ms / (fixed_ms + (full_ms - fixed_ms) / n) / n
            print(
                f"{size:>8} {n:>2} {full_ms:>14.1f} {best[size, n]:>9.1f} {speedup:>17.2f} {speedup / n:>9.0%} "
                f"{bound:>6.0%}"
            )
    print(
        "of ideal = modelled speed-up / N; the target is >= 90 % (within 10 % of the N-fold reduction). "
        "bound = the most a split can reach with F undivided."
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
