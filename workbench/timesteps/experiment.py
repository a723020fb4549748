"""The measured effect on the toy world, and the reproduction section.

For each solver, each N and each schedule, :func:`run_experiment` samples the same initial noise with the
same prompts and measures

- **ODE error:** RMSE (pixels in [-1, 1]) between the end point and a reference solution of the same
  probability-flow ODE (the guided one, with the same guidance scale) from the same noise. The reference
  is DPM-Solver++(2M) on ~``reference_steps`` steps uniform in lambda, rounded to distinct integer
  timesteps (every timestep near t_0), ending at sigma(t_0) like every run here. Its own error is
  estimated against the same solve on half the steps and reported.
- **Frechet distance** in the toy CLIP's image-feature space between the samples and toy-world images
  drawn with the prompts' attributes (:mod:`workbench.metrics`).

Solvers run as :func:`~workbench.timesteps.solver_scheduler` builds them, with the step orders of the
bound: DPM-Solver++(2M) (``solver_type="heun"``: its weights are the bound's) and UniPC order 3.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench.sampling import denoise, initial_noise
from workbench.timesteps.optimize import SCHEDULE_NAMES, SOLVERS, StepOptimConfig, make_schedule, solver_scheduler
from workbench.timesteps.schedule import NoiseSchedule, StepSchedule
from workbench.toyworld import ToyWorld

if TYPE_CHECKING:
    from workbench.reproduce import ReproSection

__all__ = [
    "ExperimentConfig",
    "ExperimentResult",
    "compare_samples",
    "compare_schedules",
    "pipeline_samples",
    "reference_timesteps",
    "reproduce",
    "run_experiment",
    "sample_schedules",
]

logger = logging.getLogger(__name__)

_LOW_STEPS = (4, 5, 6)  # "low NFE", where the paper's gains are largest


@dataclass(frozen=True)
class ExperimentConfig:
    """What :func:`run_experiment` measures (defaults: the full run; :meth:`quick` for ~1 minute).

    Attributes:
        num_steps: the N (NFE) values.
        solvers: (solver, order) pairs; each is run with schedules optimised for it.
        schedules: names from :data:`~workbench.timesteps.SCHEDULE_NAMES` ("ays" only runs at N = 10).
        num_images: samples per (solver, N, schedule) for the Frechet distance.
        num_error_images: the first this many are also solved with the reference (ODE error).
        reference_steps: steps of the reference solve (uniform in lambda before rounding).
        guidance_scale: classifier-free guidance of the text-to-image model (its pipeline's default).
        batch_size: images per UNet call (doubled by guidance).
        seed: noise, prompts and the real images for the Frechet distance.
        step_optim: the optimiser's settings.
    """

    num_steps: tuple[int, ...] = (4, 5, 6, 8, 10)  # the brief's NFE range
    solvers: tuple[tuple[str, int], ...] = (("dpmsolver++", 2), ("unipc", 3))
    schedules: tuple[str, ...] = SCHEDULE_NAMES
    num_images: int = 256
    num_error_images: int = 32
    reference_steps: int = 1000
    guidance_scale: float = 4.0  # ToyTextToImagePipeline's default
    batch_size: int = 64
    seed: int = 0
    step_optim: StepOptimConfig = field(default_factory=StepOptimConfig)

    def __post_init__(self) -> None:
        if not self.num_steps or any(not isinstance(n, int) or n < 1 for n in self.num_steps):
            raise ValueError(f"num_steps must be a non-empty tuple of positive integers, got {self.num_steps!r}")
        for pair in self.solvers:
            if len(pair) != 2 or pair[0] not in SOLVERS or pair[1] not in (1, 2, 3):
                raise ValueError(f"solvers must hold (solver, order) pairs from {SOLVERS} x (1, 2, 3), got {pair!r}")
            if min(self.num_steps) < pair[1]:
                raise ValueError(f"num_steps must be >= each solver's order, got {self.num_steps} for {pair}")
        unknown = [s for s in self.schedules if s not in SCHEDULE_NAMES]
        if not self.schedules or unknown:
            raise ValueError(f"schedules must be names from {SCHEDULE_NAMES}, got {self.schedules!r}")
        for name in ("num_images", "num_error_images", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_error_images > self.num_images:
            raise ValueError(f"num_error_images ({self.num_error_images}) must be <= num_images ({self.num_images})")
        if not isinstance(self.reference_steps, int) or self.reference_steps < 20:
            raise ValueError(f"reference_steps must be an integer >= 20, got {self.reference_steps!r}")
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")

    @classmethod
    def quick(cls) -> ExperimentConfig:
        """About a minute on 2 CPU cores: two N, no AYS, few images, a short reference."""
        return cls(
            num_steps=(4, 6),
            schedules=("optimized", "uniform_lambda", "uniform_time", "karras"),
            num_images=12,
            num_error_images=4,
            reference_steps=80,
        )


@dataclass
class ExperimentResult:
    """The measurements of :func:`run_experiment`.

    Attributes:
        rows: one per (solver, order, N, schedule): ``bound`` (F), ``ode_error`` (RMSE to the reference),
            ``fd`` (Frechet distance; None without a toy CLIP), ``timesteps``.
        reference: how the reference was solved and its estimated own error.
        previews: (solver, N) -> schedule name -> the first few samples in [0, 1], (B, 3, H, W).
        config: the settings used.
    """

    rows: list[dict[str, object]]
    reference: dict[str, object]
    previews: dict[tuple[str, int], dict[str, torch.Tensor]]
    config: ExperimentConfig

    def table(self, metric: str) -> list[dict[str, object]]:
        """Pivot: one row per (solver, N), one column per schedule, cells ``metric``."""
        names = list(dict.fromkeys(r["schedule"] for r in self.rows))
        table: dict[tuple, dict[str, object]] = {}
        for row in self.rows:
            key = (row["solver"], row["order"], row["num_steps"])
            entry = table.setdefault(
                key, {"solver": f"{row['solver']} ({row['order']})", "N": row["num_steps"], "metric": metric}
            )
            entry[row["schedule"]] = row[metric]
        return [{**entry, **{n: entry.get(n, "n/a") for n in names}} for entry in table.values()]

    def markdown(self, metric: str) -> str:
        """:meth:`table` as a Markdown table (4 significant digits)."""
        rows = self.table(metric)
        keys = list(rows[0])
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in rows:
            lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
        return "\n".join(lines)

    def wins(self, metric: str, *, baseline: str = "uniform_lambda", steps: Sequence[int] = _LOW_STEPS) -> list:
        """(solver, N, optimized, baseline) for each N in ``steps`` where both were measured."""
        out = []
        for row in self.table(metric):
            if row["N"] in steps and isinstance(row.get("optimized"), float) and isinstance(row.get(baseline), float):
                out.append((row["solver"], row["N"], row["optimized"], row[baseline]))
        return out

    def best_other(self, metric: str, *, steps: Sequence[int] = _LOW_STEPS) -> list:
        """(solver, N, optimized, best other schedule's name, its value) for each N in ``steps``."""
        out = []
        for row in self.table(metric):
            others = {k: v for k, v in row.items() if k not in ("solver", "N", "metric", "optimized")}
            others = {k: v for k, v in others.items() if isinstance(v, float)}
            if row["N"] in steps and isinstance(row.get("optimized"), float) and others:
                name = min(others, key=others.get)
                out.append((row["solver"], row["N"], row["optimized"], name, others[name]))
        return out

    def verdict(self) -> str:
        """Where optimised steps beat uniform log-SNR, and the best other schedule, at low N (measured)."""
        parts = []
        for metric, label in (("ode_error", "ODE error"), ("fd", "Frechet distance")):
            wins = self.wins(metric)
            if not wins:
                continue
            better = [f"{s} N={n}" for s, n, opt, base in wins if opt < base]
            worse = [f"{s} N={n} ({opt:.3g} vs {base:.3g})" for s, n, opt, base in wins if opt >= base]
            text = f"{label}: optimized beats uniform-logSNR in {len(better)} of {len(wins)} low-N cases"
            text += f"; not in {', '.join(worse)}" if worse else ""
            best = self.best_other(metric)
            lost = [f"{s} N={n} ({opt:.3g} vs {name} {value:.3g})" for s, n, opt, name, value in best if opt >= value]
            text += f". Against the best other schedule at each N it wins {len(best) - len(lost)} of {len(best)}"
            parts.append(text + (f"; loses {', '.join(lost)}" if lost else ""))
        return ". ".join(parts) + "." if parts else "nothing measured at low N"


def reference_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """Descending distinct integer timesteps for a dense reference solve: ``num_steps`` + 1 points
    uniform in lambda from T to t_0, rounded, duplicates (near t_0) merged, the end (timestep 0) dropped."""
    lambdas = np.linspace(
        schedule.lambda_(schedule.t_max), schedule.lambda_(schedule.time_of_timestep(0)), num_steps + 1
    )
    points = np.rint(schedule.timestep_of_time(schedule.time(lambdas))).astype(np.int64)
    points = np.unique(np.clip(points, 0, schedule.num_train_timesteps - 1))[::-1]
    return points[points > 0].copy()


def compare_schedules(
    schedule: NoiseSchedule,
    *,
    solver: str = "unipc",
    order: int = 3,
    num_steps: int = 6,
    baselines: Sequence[str] = ("uniform_lambda",),
    config: StepOptimConfig | None = None,
) -> dict[str, StepSchedule]:
    """The optimised steps and the named baselines for one (solver, order, N), keyed by name.

    Each carries ``info["bound"]``. Baselines that do not apply (AYS off 10 steps) are left out.
    """
    out = {"optimized": make_schedule("optimized", schedule, num_steps, solver=solver, order=order, config=config)}
    for name in baselines:
        if name == "ays" and num_steps != 10:
            continue
        out[name] = make_schedule(name, schedule, num_steps, solver=solver, order=order, config=config)
    return out


@torch.no_grad()
def sample_schedules(
    unet: torch.nn.Module,
    scheduler: object,
    latents: torch.Tensor,
    schedules: Mapping[str, StepSchedule] | Mapping[str, Sequence[int]],
    *,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Run ``scheduler`` from the same ``latents`` (B, C, H, W) with each schedule; end points by name.

    ``schedules`` maps names to :class:`StepSchedule` values or to integer timesteps. The scheduler is
    reset for every run and batch (``set_timesteps``), so the results do not depend on the order.
    ``progress`` shows a bar over the steps of each run (for long reference solves).
    """
    out = {}
    for name, steps in schedules.items():
        timesteps = steps.timesteps() if isinstance(steps, StepSchedule) else list(steps)
        chunks = []
        for start in range(0, len(latents), batch_size):
            part = slice(start, start + batch_size)
            chunks.append(
                denoise(
                    unet,
                    scheduler,
                    latents[part],
                    timesteps=timesteps,
                    prompt_embeds=None if prompt_embeds is None else prompt_embeds[part],
                    negative_prompt_embeds=None if negative_prompt_embeds is None else negative_prompt_embeds[part],
                    guidance_scale=guidance_scale,
                    progress=progress,
                )
            )
        out[name] = torch.cat(chunks)
    return out


def compare_samples(
    pipe: object,
    schedules: Mapping[str, StepSchedule],
    *,
    solver: str = "unipc",
    order: int = 3,
    prompt: str = "a red circle",
    num_images: int = 6,
    guidance_scale: float = 4.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Samples in [0, 1] (B, 3, H, W) of ``pipe`` with each schedule, from the same noise and prompt.

    ``pipe`` is the toy text-to-image pipeline (or any pipeline with ``unet``, ``scheduler`` and, for
    prompts, ``encode_prompt``); its scheduler is left untouched (a solver scheduler is built from it).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    unet = pipe.unet
    shape = (num_images, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = initial_noise(shape, torch.Generator().manual_seed(seed), device=unet.device, dtype=unet.dtype)
    conditioning: dict[str, object] = {}
    if hasattr(pipe, "encode_prompt"):
        guided = guidance_scale > 1
        embeds, negative = pipe.encode_prompt([prompt] * num_images, unet.device, 1, guided, None)
        conditioning = {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "guidance_scale": guidance_scale}
    scheduler = solver_scheduler(solver, order, pipe.scheduler)
    samples = sample_schedules(unet, scheduler, latents, schedules, **conditioning)
    return {name: ((x.float() + 1) / 2).clamp(0, 1).cpu() for name, x in samples.items()}


@torch.no_grad()
def pipeline_samples(
    pipe: object,
    schedules: Mapping[str, StepSchedule] | Mapping[str, Sequence[int]],
    *,
    solver: str = "unipc",
    order: int = 3,
    prompt: str | list[str] = "a red circle",
    seed: int = 0,
    **call_kwargs: object,
) -> dict[str, torch.Tensor]:
    """Images in [0, 1] (B, 3, H, W) of a stock pipeline for each schedule, through its own ``timesteps=``.

    Works alike on the toy text-to-image pipeline, ``StableDiffusionPipeline`` and
    ``StableDiffusionXLPipeline``: for the call, the pipeline's scheduler is replaced by
    :func:`~workbench.timesteps.solver_scheduler` ``(solver, order, pipe.scheduler)`` (put back afterwards),
    and every schedule starts from the same seed.

    Args:
        pipe: a diffusers text-to-image pipeline whose ``__call__`` takes ``timesteps``.
        schedules: names to :class:`StepSchedule` values or to descending integer timesteps.
        solver, order: the solver the schedules were made for.
        prompt: the prompt(s).
        seed: seeds a CPU ``torch.Generator`` for the initial noise of every run.
        call_kwargs: more arguments of the pipeline call (``height``, ``width``, ``guidance_scale``, ...).
    """
    original = pipe.scheduler
    pipe.scheduler = solver_scheduler(solver, order, original)
    try:
        out = {}
        for name, steps in schedules.items():
            timesteps = steps.timesteps() if isinstance(steps, StepSchedule) else list(steps)
            generator = torch.Generator().manual_seed(seed)
            images = pipe(prompt, timesteps=timesteps, generator=generator, output_type="pt", **call_kwargs).images
            out[name] = images.float().cpu()
    finally:
        pipe.scheduler = original
    return out


def run_experiment(
    pipe: object,
    *,
    toyclip: torch.nn.Module | None = None,
    config: ExperimentConfig | None = None,
    world: ToyWorld | None = None,
    progress: bool = True,
) -> ExperimentResult:
    """Measure ODE error and Frechet distance for every (solver, N, schedule) of ``config``.

    Args:
        pipe: a pipeline with ``unet`` and ``scheduler`` (its betas and prediction type are used); with
            ``encode_prompt`` (the toy text-to-image pipeline) prompts are the captions of toy-world
            draws, else sampling is unconditional.
        toyclip: the feature extractor of the Frechet distance (None: no Frechet distance).
        config: what to measure (default: the full run).
        world: the toy world the real images come from (default: the unbiased one).
        progress: show a progress bar.
    """
    config = config or ExperimentConfig()
    world = world or ToyWorld(image_size=pipe.unet.config.sample_size)
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    real = world.sample(config.num_images, np.random.default_rng(config.seed))
    conditioning: dict[str, object] = {"guidance_scale": 1.0, "batch_size": config.batch_size}
    if hasattr(pipe, "encode_prompt"):
        guided = config.guidance_scale > 1
        embeds, negative = pipe.encode_prompt(real.captions, device, 1, guided, None)
        conditioning.update(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=config.guidance_scale)
    shape = (config.num_images, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = initial_noise(shape, torch.Generator().manual_seed(config.seed), device=device, dtype=dtype)
    error_conditioning = {
        k: (v[: config.num_error_images] if isinstance(v, torch.Tensor) else v) for k, v in conditioning.items()
    }

    # The reference: DPM-Solver++(2M) on dense steps, and on half as many for its own error estimate.
    start = time.perf_counter()
    reference_solver = solver_scheduler("dpmsolver++", 2, pipe.scheduler)
    dense = reference_timesteps(schedule, config.reference_steps)
    half = reference_timesteps(schedule, config.reference_steps // 2)
    references = sample_schedules(
        unet,
        reference_solver,
        latents[: config.num_error_images],
        {"dense": dense, "half": half},
        **error_conditioning,
        progress=progress,
    )
    reference = {
        "solver": "DPM-Solver++(2M, heun), final sigma(t_0)",
        "steps": len(dense),
        "self_error": _rmse(references["half"], references["dense"]),
        "half_steps": len(half),
        "seconds": time.perf_counter() - start,
    }
    logger.info("reference: %d steps, error of the %d-step solve %.2e", len(dense), len(half), reference["self_error"])

    real_features = None
    if toyclip is not None:
        from workbench.metrics import clip_features

        real_features = clip_features(toyclip, torch.from_numpy(real.images))

    cells = [(s, o, n, name) for s, o in config.solvers for n in config.num_steps for name in config.schedules]
    cells = [c for c in cells if c[3] != "ays" or c[2] == 10]
    rows, previews = [], {}
    for solver, order, num_steps, name in tqdm(cells, desc="timesteps experiment", disable=not progress):
        steps = make_schedule(name, schedule, num_steps, solver=solver, order=order, config=config.step_optim)
        scheduler = solver_scheduler(solver, order, pipe.scheduler)
        samples = sample_schedules(unet, scheduler, latents, {name: steps}, **conditioning)[name]
        images = ((samples.float() + 1) / 2).clamp(0, 1).cpu()
        fd = None
        if real_features is not None:
            from workbench.metrics import clip_features, frechet_distance

            fd = frechet_distance(clip_features(toyclip, images), real_features)
        rows.append(
            {
                "solver": solver,
                "order": order,
                "num_steps": num_steps,
                "schedule": name,
                "bound": float(steps.info["bound"]),
                "ode_error": _rmse(samples[: config.num_error_images], references["dense"]),
                "fd": fd,
                "timesteps": steps.timesteps().tolist(),
            }
        )
        previews.setdefault((solver, num_steps), {})[name] = images[:8]
    return ExperimentResult(rows, reference, previews, config)


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the per-image root-mean-square difference."""
    return float(((a.double() - b.double()) ** 2).flatten(1).mean(1).sqrt().mean())


def reproduce(*, quick: bool, out_dir: Path) -> ReproSection:
    """Run :func:`run_experiment` on the zoo's text-to-image model; table, curves and samples."""
    import matplotlib.pyplot as plt

    from workbench import zoo
    from workbench.plots.timesteps import (
        bound_vs_metric_figure,
        metric_curves_figure,
        sample_rows_figure,
        schedules_figure,
    )
    from workbench.reproduce import ReproSection

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = zoo.load("toy-t2i")
    config = ExperimentConfig.quick() if quick else ExperimentConfig()
    result = run_experiment(pipe, toyclip=zoo.load("toyclip"), config=config)

    figures = []
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    n_show = 10 if 10 in config.num_steps else max(config.num_steps)
    solver, order = config.solvers[-1]
    shown = compare_schedules(
        schedule,
        solver=solver,
        order=order,
        num_steps=n_show,
        baselines=[s for s in config.schedules if s != "optimized"],
        config=config.step_optim,
    )
    for name, fig in (
        ("schedules.png", schedules_figure(shown, title=f"{solver} order {order}, N = {n_show}")),
        ("ode_error.png", metric_curves_figure(result.rows, "ode_error")),
        ("frechet_distance.png", metric_curves_figure(result.rows, "fd")),
        ("bound_vs_error.png", bound_vs_metric_figure(result.rows, "ode_error")),
        (
            "samples.png",
            sample_rows_figure(
                result.previews[(solver, min(config.num_steps))], title=f"{solver}, N = {min(config.num_steps)}"
            ),
        ),
    ):
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        figures.append(out_dir / name)
    rows = [_rounded(r) for r in result.table("ode_error") + result.table("fd")]
    ref = result.reference
    notes = (
        ("Quick mode: a smoke test with few images and steps; its numbers are noisy. " if quick else "")
        + f"ODE error: RMSE (pixels in [-1, 1], mean over {config.num_error_images} images) to a reference "
        f"solve of the same guided probability-flow ODE (guidance {config.guidance_scale}) from the same noise: "
        f"{ref['solver']} on {ref['steps']} distinct timesteps (uniform in log-SNR, rounded); its own error, "
        f"estimated against {ref['half_steps']} steps, is {ref['self_error']:.2e}. Frechet distance: toy-CLIP "
        f"features of {config.num_images} samples vs as many toy-world images with the prompts' attributes. "
        f"Solvers: DPM-Solver++(2M, heun) and UniPC order 3 (bh2), lower-order final steps, ending at sigma(t_0). "
        f"The bound uses p = {config.step_optim.power}, tau = {config.step_optim.truncation}. "
        "AYS is SD 1.5's 10-step list, applied to the toy model's (identical) schedule."
    )
    return ReproSection(
        title="Optimized time steps (Xue et al., CVPR 2024)",
        claim=(
            "Choosing the time steps of DPM-Solver++/UniPC by minimising a model-free error bound (< 15 s) "
            "improves sampling at low NFE over uniform-time, uniform-logSNR and EDM (Karras) steps."
        ),
        rows=rows,
        verdict=result.verdict(),
        figures=figures,
        notes=notes,
    )


def _rounded(row: Mapping[str, object]) -> dict[str, object]:
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items()}
