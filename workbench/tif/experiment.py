"""The few-shot experiment on the toy world: TiF against its ablations and toy CLIP, with the cost of each.

Per (shots, draw): train one adapter per class on fresh shots of :class:`~workbench.tif.task.MarkTask`,
measure every test image's noise-prediction errors once on the full grid (the same noise for every class),
and score every rule on that one matrix: TiF's weights, uniform weights (Diffusion Classifier's rule with
the same adapters), large or small t only, truncated and pruned variants (their pruning replayed on the
matrix, which the shared noise makes exact; checked against a real pruned run). Beside them, in both
namings of the classes (``[names]``: the toy models' words for mark and shape; ``[tokens]``: meaningless
tokens, the paper's customised setting): Diffusion Classifier with class prompts and no adapters, toy CLIP
zero-shot, and TiF ensembled with zero-shot CLIP; and a logistic-regression probe on toy CLIP image
features, which reads no name.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from workbench.tif.classify import (
    ClassCondition,
    ClassificationResult,
    ClassifyConfig,
    class_distance,
    classify,
    grid_indices,
    simulate_pruning,
    timestep_weights,
    weight_knee,
)
from workbench.tif.learner import (
    AdapterTrainConfig,
    FewShotSet,
    encode_prompt_states,
    levels_for_shots,
    load_class_adapters,
    model_space,
    save_class_adapters,
    train_class_adapters,
)
from workbench.tif.task import MarkTask

__all__ = [
    "NAMINGS",
    "ExperimentConfig",
    "adapter_conditions",
    "clip_zero_shot",
    "demo_adapters",
    "image_losses",
    "load_or_run_results",
    "prompt_conditions",
    "reproduce",
    "reproduce_marks_only",
    "run_draw",
    "run_fewshot_experiment",
    "setting_methods",
    "stable_diffusion_demo",
    "summarise",
    "summary_markdown",
    "truncated_schedules",
]

logger = logging.getLogger(__name__)

TEST_SEED = 424_242  # the test set never shares a stream with the shots
DEMO_ADAPTERS = "toy-t2i-tif"  # folder under the zoo's data directory


@dataclass(frozen=True)
class ExperimentConfig:
    """One measured run.

    Pruning schedules (Diffusion Classifier's, over TiF's truncated grid): the grid steps whose TiF weight
    is at least ``truncate_below`` of the largest (the first m steps of the full grid) are the truncated
    grid; stage one evaluates its middle step for every class and keeps ``keep`` classes, stage two
    evaluates the other m - 1 steps for those only. ``full_grid_pruning`` is the same idea on the whole
    grid (Diffusion Classifier's own setting), for TiF and for uniform weights.
    """

    shots: tuple[int, ...] = (1, 2, 4, 8, 16)  # the paper's settings
    draws: int = 3  # the paper: 3 split seeds
    test_per_class: int = 4
    num_timesteps: int = 10  # the full grid (every rule is scored on it)
    truncate_below: float = 0.1  # truncated grid: the steps whose TiF weight is >= this share of the max
    pruning_keep: tuple[int, ...] = (3, 2)  # classes kept after the one-step first stage (one schedule each)
    full_grid_pruning: ClassifyConfig = field(default_factory=lambda: ClassifyConfig((2, 10), (3, 1)))
    adapter_steps: int = 40
    adapter_rank: int = 8
    # None: the official recipe by shot count (levels_for_shots); an int: that many levels at every count.
    # Ours: 1 (the low-resolution blocks only); adapting more lets the adapters learn the salient cue.
    adapter_levels: int | None = 1
    adapter_learning_rate: float = 3e-3  # ours: the toy UNet's adapters need larger steps than SD's 1e-4
    timing_images: int = 3  # images classified for real with pruning (seconds, and the replay check)
    seed: int = 0
    task: MarkTask = field(default_factory=MarkTask)

    def __post_init__(self) -> None:
        if not self.shots or any(not isinstance(s, int) or s < 1 for s in self.shots):
            raise ValueError(f"shots must be positive integers, got {self.shots}")
        for name in ("draws", "test_per_class", "adapter_steps", "timing_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.full_grid_pruning.timesteps_per_stage[-1] != self.num_timesteps:
            raise ValueError(
                f"full_grid_pruning.timesteps_per_stage must end at num_timesteps={self.num_timesteps}, "
                f"got {self.full_grid_pruning.timesteps_per_stage}"
            )
        if not self.pruning_keep or any(not isinstance(k, int) or k < 1 for k in self.pruning_keep):
            raise ValueError(f"pruning_keep must be positive integers, got {self.pruning_keep}")
        if not 0.0 < self.truncate_below < 1.0:
            raise ValueError(f"truncate_below must be in (0, 1), got {self.truncate_below}")

    @classmethod
    def quick(cls) -> ExperimentConfig:
        """A smoke-test size: one setting, one draw, three classes, a few images, a few training steps."""
        return cls(
            shots=(2,),
            draws=1,
            test_per_class=2,
            num_timesteps=8,
            pruning_keep=(2,),
            full_grid_pruning=ClassifyConfig((2, 8), (2, 1)),
            adapter_steps=8,
            timing_images=1,
            task=MarkTask(shapes=("circle",)),
        )

    @classmethod
    def fine_grained(cls) -> ExperimentConfig:
        """Three classes that differ only in the mark (one shape): TiF's own premise, where nothing salient
        tells the classes apart; little to prune among three classes."""
        return cls(
            test_per_class=8,
            pruning_keep=(2,),
            full_grid_pruning=ClassifyConfig((2, 10), (2, 1)),
            task=MarkTask(shapes=("circle",)),
        )

    def levels(self, shots_per_class: int) -> int | None:
        """The UNet levels that get adapters at this shot count."""
        return levels_for_shots(shots_per_class) if self.adapter_levels is None else self.adapter_levels


def truncated_schedules(
    weights_at_grid: torch.Tensor, num_train_timesteps: int, *, threshold: float, keeps: tuple[int, ...]
) -> dict[str, ClassifyConfig]:
    """TiF's truncated grid and its pruned schedules, from the weights on an evenly spaced full grid.

    The truncated grid is the first m full-grid steps, m the count of steps whose weight is at least
    ``threshold`` of the largest (TiF's weights fall with t, so these come first). Returns
    ``{"TiF truncated": ..., "TiF pruned (keep k)": ...}``, every grid a part of the full grid.
    """
    grid_size = len(weights_at_grid)
    spacing = num_train_timesteps // grid_size
    m = max(1, int((weights_at_grid >= threshold * weights_at_grid.max()).sum()))
    upper = spacing * m
    schedules = {"TiF truncated": ClassifyConfig((m,), (1,), max_timestep=upper)}
    for keep in keeps:  # (a one-step truncated grid leaves nothing to prune: the schedule is the truncated one)
        stages = ((1, m), (keep, 1)) if m > 1 else ((1,), (1,))
        schedules[f"TiF pruned (keep {keep})"] = ClassifyConfig(*stages, max_timestep=upper)
    return schedules


def adapter_conditions(pipe, prompt: str, class_names) -> list[ClassCondition]:
    """TiF's conditions: the one shared prompt, one adapter per class (named after it)."""
    states = encode_prompt_states(pipe, prompt)
    return [ClassCondition(name, states, name) for name in class_names]


def prompt_conditions(pipe, prompts: dict[str, str]) -> list[ClassCondition]:
    """Diffusion Classifier's conditions: one prompt per class, the base model (no adapter)."""
    return [ClassCondition(name, encode_prompt_states(pipe, text), None) for name, text in prompts.items()]


def _accuracy(predictions: torch.Tensor, labels: np.ndarray) -> float:
    return float((predictions.numpy() == labels).mean())


def _scores(errors: torch.Tensor, weights_at_grid: torch.Tensor) -> torch.Tensor:
    return (errors.double() * weights_at_grid.double()).mean(dim=-1)  # (N, K)


def clip_zero_shot(clip, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
    """Toy CLIP's zero-shot probabilities (N, K): softmax over the class prompts of the image-text similarity."""
    with torch.no_grad():
        text = clip.encode_text(prompts)
        image = clip.encode_image(torch.from_numpy(np.asarray(images, dtype=np.float32)))
        return (clip.clip.logit_scale.exp() * image @ text.T).softmax(dim=1).float().cpu()


def _linear_probe(clip, shots: FewShotSet, test: FewShotSet) -> tuple[np.ndarray, float]:
    """Linear-probe probabilities of toy CLIP on the test images (N, K) and the seconds per test image."""
    from sklearn.linear_model import LogisticRegression

    with torch.no_grad():
        train_features = clip.encode_image(torch.from_numpy(shots.images)).float().numpy()
        probe = LogisticRegression(C=10.0, max_iter=2000).fit(train_features, shots.labels)
        start = time.perf_counter()
        test_features = clip.encode_image(torch.from_numpy(test.images)).float().numpy()
        probabilities = probe.predict_proba(test_features)
    return probabilities, (time.perf_counter() - start) / len(test)


NAMINGS = ("names", "tokens")  # how the name-reading baselines see the classes (see MarkTask.class_prompts)


def run_draw(
    pipe,
    noise_scheduler,
    clip,
    shots: FewShotSet,
    test: FewShotSet,
    *,
    config: ExperimentConfig,
    seed: int,
    dc_results: dict[str, ClassificationResult] | None = None,
    class_prompts: dict[str, dict[str, str]] | None = None,
    progress: bool = True,
) -> dict:
    """Train adapters on ``shots``, score every rule on ``test``; returns plain numbers and curves.

    Args:
        dc_results: Diffusion Classifier's results on ``test`` per naming (``"names"``, ``"tokens"``).
        class_prompts: the class prompts per naming, for zero-shot CLIP.

    The adapters stay attached to ``pipe.unet`` afterwards (named after the classes), so a caller can save
    them; delete them with ``pipe.unet.delete_adapters(...)`` before the next draw.
    """
    shots_per_class = int(np.bincount(shots.labels).min())
    adapter_config = AdapterTrainConfig(
        rank=config.adapter_rank,
        levels=config.levels(shots_per_class),
        steps=config.adapter_steps,
        learning_rate=config.adapter_learning_rate,
        seed=seed,
    )
    start = time.perf_counter()
    train_class_adapters(pipe, noise_scheduler, shots, config=adapter_config, progress=progress)
    train_seconds = time.perf_counter() - start

    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    distance = class_distance(model_space(pipe, shots.images), torch.from_numpy(shots.labels))
    weights = {
        kind: timestep_weights(kind, noise_scheduler, distance=distance)
        for kind in ("tif", "uniform", "large", "small")
    }
    latents = model_space(pipe, test.images)
    conditions = adapter_conditions(pipe, shots.prompt, shots.class_names)
    full = ClassifyConfig((config.num_timesteps,), (1,))
    noise_generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(latents), config.num_timesteps, *latents.shape[1:]), generator=noise_generator)
    result = classify(
        pipe.unet, noise_scheduler, latents, conditions, weights["tif"], config=full, noise=noise, progress=progress
    )
    grid, errors, labels = result.timesteps, result.errors, test.labels
    seconds_per_call = float(result.seconds.sum() / result.unet_calls.sum())
    num_classes = len(shots.class_names)
    row: dict = {
        "shots": shots_per_class,
        "seed": seed,
        "distance": distance,
        "knee": weight_knee(weights["tif"]),
        "train_seconds": train_seconds,
        "seconds_per_unet_call": seconds_per_call,
    }
    accuracy, calls, seconds = {}, {}, {}
    for kind, name in (("tif", "TiF"), ("uniform", "uniform t"), ("large", "large t only"), ("small", "small t only")):
        predictions = _scores(errors, weights[kind][grid]).argmin(dim=1)
        accuracy[name] = _accuracy(predictions, labels)
        calls[name] = float(result.unet_calls.float().mean())
        seconds[name] = float(result.seconds.mean())
    conflicting = test.spurious != labels
    for kind, name in (("tif", "TiF"), ("uniform", "uniform t")):
        predictions = _scores(errors, weights[kind][grid]).argmin(dim=1).numpy()
        row[f"{name} on conflicting"] = float((predictions[conflicting] == labels[conflicting]).mean())

    # Truncation and pruning: replayed on the matrix (the shared noise makes that exact); the first pruned
    # schedule also runs for real on a few images (its seconds, and a check of the replay).
    schedules = truncated_schedules(
        weights["tif"][grid], num_train_timesteps, threshold=config.truncate_below, keeps=config.pruning_keep
    )
    replays = [("tif", name, schedule) for name, schedule in schedules.items()]
    replays += [("tif", "TiF pruned, full grid", config.full_grid_pruning)]
    replays += [("uniform", "uniform t pruned, full grid", config.full_grid_pruning)]
    for kind, name, schedule in replays:
        sub_grid, _ = schedule.stage_slots(num_train_timesteps)
        slots = grid_indices(grid, sub_grid)
        predictions, pruned_calls = simulate_pruning(
            errors[..., slots], weights[kind][sub_grid], schedule, num_train_timesteps
        )
        accuracy[name] = _accuracy(predictions, labels)
        calls[name] = float(pruned_calls.float().mean())
        seconds[name] = calls[name] * seconds_per_call
    row["truncated_max_timestep"] = schedules["TiF truncated"].max_timestep
    headline = next((name for name in schedules if name.startswith("TiF pruned")), "TiF truncated")
    schedule = schedules[headline]
    slots = grid_indices(grid, schedule.stage_slots(num_train_timesteps)[0])
    timed = slice(0, min(config.timing_images, len(latents)))
    real = classify(
        pipe.unet,
        noise_scheduler,
        latents[timed],
        conditions,
        weights["tif"],
        config=schedule,
        noise=noise[timed][:, slots],
        progress=False,
    )
    replay, _ = simulate_pruning(errors[timed][..., slots], weights["tif"][grid[slots]], schedule, num_train_timesteps)
    row["pruning replay matches"] = bool(torch.equal(real.predictions, replay))
    row["pruned_seconds_measured"] = float(real.seconds.mean())
    seconds[headline] = float(real.seconds.mean())

    # Accuracy against UNet calls on nested sub-grids of the full grid.
    curve = []
    for size in [s for s in range(1, config.num_timesteps + 1) if config.num_timesteps % s == 0]:
        stride = config.num_timesteps // size
        slots = torch.arange(stride // 2, config.num_timesteps, stride)[:size]
        point = {"calls": num_classes * size}
        for kind, name in (("tif", "TiF"), ("uniform", "uniform t")):
            point[name] = _accuracy(_scores(errors[..., slots], weights[kind][grid][slots]).argmin(dim=1), labels)
        curve.append(point)

    tif_scores = _scores(errors, weights["tif"][grid])
    for naming in NAMINGS:
        if dc_results is not None and naming in dc_results:
            dc = dc_results[naming]
            accuracy[f"DC class prompts [{naming}]"] = _accuracy(dc.predictions, labels)
            calls[f"DC class prompts [{naming}]"] = float(dc.unet_calls.float().mean())
            seconds[f"DC class prompts [{naming}]"] = float(dc.seconds.mean())
        if clip is not None and class_prompts is not None and naming in class_prompts:
            start = time.perf_counter()
            zero_shot = clip_zero_shot(clip, test.images, list(class_prompts[naming].values())).numpy()
            zero_shot_seconds = (time.perf_counter() - start) / len(test)
            accuracy[f"CLIP zero-shot [{naming}]"] = float((zero_shot.argmax(1) == labels).mean())
            calls[f"CLIP zero-shot [{naming}]"] = 0.0
            seconds[f"CLIP zero-shot [{naming}]"] = zero_shot_seconds
            # Ensemble (ours; the release has no fusion code): TiF scores -> probabilities with a label-free
            # temperature (the mean spread of the scores across classes), multiplied with CLIP's.
            temperature = float(tif_scores.std(dim=1).mean()) or 1.0
            log_p = torch.log_softmax(-tif_scores / temperature, dim=1).numpy() + np.log(zero_shot + 1e-12)
            accuracy[f"TiF + CLIP [{naming}]"] = float((log_p.argmax(1) == labels).mean())
            calls[f"TiF + CLIP [{naming}]"] = calls["TiF"]
            seconds[f"TiF + CLIP [{naming}]"] = seconds["TiF"] + zero_shot_seconds
    if clip is not None:
        probe, probe_seconds = _linear_probe(clip, shots, test)
        accuracy["CLIP linear probe"] = float((probe.argmax(1) == labels).mean())
        calls["CLIP linear probe"] = 0.0
        seconds["CLIP linear probe"] = probe_seconds

    # Per-step view: which class the single step t picks, against the truth and the spurious cue.
    per_step_pick = errors.argmin(dim=1).numpy()  # (N, G)
    row["per_step"] = {
        "timesteps": grid.tolist(),
        "accuracy": (per_step_pick == labels[:, None]).mean(axis=0).tolist(),
        "follows_spurious": (per_step_pick == test.spurious[:, None]).mean(axis=0).tolist(),
        "tif_weight": weights["tif"][grid].tolist(),
    }
    row.update(accuracy=accuracy, unet_calls=calls, seconds=seconds, curve=curve)
    return row


def run_fewshot_experiment(
    pipe,
    noise_scheduler,
    clip=None,
    *,
    config: ExperimentConfig = ExperimentConfig(),
    results_path: str | Path | None = None,
    save_adapters: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Every (shots, draw) of ``config``; one row each (see :func:`run_draw`).

    Args:
        results_path: JSON file rewritten after every draw (a long run leaves its partial results).
        save_adapters: folder for the adapters of the first draw of the middle shot setting (fp16).
    """
    task = config.task
    test = task.test_set(config.test_per_class, TEST_SEED)
    latents = model_space(pipe, test.images)
    prompts = {naming: task.class_prompts(naming) for naming in NAMINGS}
    dc = {
        naming: classify(
            pipe.unet,
            noise_scheduler,
            latents,
            prompt_conditions(pipe, prompts[naming]),
            torch.ones(noise_scheduler.config.num_train_timesteps, dtype=torch.float64),
            config=ClassifyConfig((config.num_timesteps,), (1,)),
            generator=torch.Generator().manual_seed(config.seed),
            progress=progress,
        )
        for naming in NAMINGS
    }
    rows = []
    for shots_per_class in config.shots:
        for draw in range(config.draws):
            seed = config.seed * 10_007 + shots_per_class * 101 + draw
            shots = task.shots(shots_per_class, seed)
            row = run_draw(
                pipe,
                noise_scheduler,
                clip,
                shots,
                test,
                config=config,
                seed=seed,
                dc_results=dc,
                class_prompts=prompts,
                progress=progress,
            )
            row["draw"] = draw
            rows.append(row)
            logger.info("tif: %d shots, draw %d: %s", shots_per_class, draw, row["accuracy"])
            middle = config.shots[len(config.shots) // 2]
            if save_adapters is not None and draw == 0 and shots_per_class == middle:
                save_class_adapters(
                    pipe.unet,
                    save_adapters,
                    shots.class_names,
                    metadata={
                        "prompt": shots.prompt,
                        "distance": row["distance"],
                        "shots": shots_per_class,
                        "seed": seed,
                        "adapter_steps": config.adapter_steps,
                        "adapter_rank": config.adapter_rank,
                        "adapter_levels": config.levels(shots_per_class),
                        "adapter_learning_rate": config.adapter_learning_rate,
                        "task": asdict(task),
                    },
                    dtype=torch.float16,
                )
            pipe.unet.delete_adapters(list(shots.class_names))
            if results_path is not None:
                Path(results_path).parent.mkdir(parents=True, exist_ok=True)
                Path(results_path).write_text(json.dumps({"config": _config_record(config), "rows": rows}, indent=1))
    return rows


def _config_record(config: ExperimentConfig) -> dict:
    record = asdict(config)
    record["task"] = asdict(config.task)
    return record


def summarise(rows: list[dict], methods: Sequence[str] | None = None) -> list[dict]:
    """Accuracy (mean and spread over draws, in %) per method and shot count, plus cost per method.

    Args:
        methods: the methods to list, in order (default: every method of the rows).
    """
    known = list(rows[0]["accuracy"])
    methods = known if methods is None else list(methods)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"methods: {unknown} are not in the rows; known: {known}")
    table = []
    for method in methods:
        entry: dict = {"method": method}
        for shots in sorted({r["shots"] for r in rows}):
            values = [100 * r["accuracy"][method] for r in rows if r["shots"] == shots]
            spread = np.std(values, ddof=1) if len(values) > 1 else math.nan
            entry[f"{shots} shot"] = f"{np.mean(values):.1f} ± {spread:.1f}" if len(values) > 1 else f"{values[0]:.1f}"
        entry["UNet calls / image"] = float(np.mean([r["unet_calls"][method] for r in rows]))
        seconds = [r["seconds"].get(method) for r in rows if r["seconds"].get(method) is not None]
        entry["s / image"] = float(np.mean(seconds)) if seconds else "-"
        table.append(entry)
    return table


def summary_markdown(rows: list[dict], methods: Sequence[str] | None = None) -> str:
    """:func:`summarise` as a markdown table."""
    table = summarise(rows, methods)
    keys = list(table[0])
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row[k]) for k in keys) + " |" for row in table]
    return "\n".join(lines)


def setting_methods(rows: list[dict], setting: str) -> list[str]:
    """The methods of one setting: ``"customised"`` (class names carry no meaning: the ``[tokens]``
    baselines and every method that reads no name), ``"named"`` (the ``[names]`` baselines beside TiF),
    ``"cost"`` (TiF's truncated and pruned schedules and Diffusion Classifier's pruning)."""
    methods = list(rows[0]["accuracy"])
    if setting == "customised":
        return [m for m in methods if "[names]" not in m and "pruned" not in m and "truncated" not in m]
    if setting == "named":
        return ["TiF", "uniform t", *(m for m in methods if "[names]" in m)]
    if setting == "cost":
        return ["TiF", "uniform t", *(m for m in methods if "pruned" in m or "truncated" in m)]
    raise ValueError(f"setting must be 'customised', 'named' or 'cost', got {setting!r}")


def demo_adapters(pipe, noise_scheduler, *, quick: bool = False, folder: str | Path | None = None) -> dict:
    """Attach the shipped demo adapters (``data/toy-t2i-tif``) to ``pipe.unet``; train tiny ones if absent.

    Returns the adapters' record (class names, shared prompt, distance d, shots, how they were made).
    """
    from workbench import zoo

    folder = Path(folder) if folder is not None else zoo.DATA_DIR / DEMO_ADAPTERS
    if (folder / "tif.json").is_file():
        return load_class_adapters(pipe.unet, folder)
    logger.warning("no shipped adapters at %s: training small ones (%s)", folder, "quick" if quick else "full")
    defaults = ExperimentConfig()
    task, shots_per_class = defaults.task, 4
    shots = task.shots(shots_per_class, 0)
    steps = 8 if quick else defaults.adapter_steps
    config = AdapterTrainConfig(
        levels=defaults.levels(shots_per_class), steps=steps, learning_rate=defaults.adapter_learning_rate
    )
    train_class_adapters(pipe, noise_scheduler, shots, config=config)
    distance = class_distance(model_space(pipe, shots.images), torch.from_numpy(shots.labels))
    return {
        "class_names": list(shots.class_names),
        "prompt": shots.prompt,
        "distance": distance,
        "shots": shots_per_class,
        "seed": 0,
        "adapter_steps": steps,
        "task": asdict(task),
        "trained_now": True,
    }


def reproduce(quick: bool, out_dir: Path):
    """The ``tif`` section of ``python -m workbench reproduce``: nine classes (mark x shape), both namings."""
    config = ExperimentConfig.quick() if quick else ExperimentConfig()
    return _reproduce(config, out_dir, title="TiF learner: few-shot classification by diffusion time steps")


def reproduce_marks_only(quick: bool, out_dir: Path):
    """The ``tif-marks`` section: three classes that differ only in the mark (:meth:`ExperimentConfig.fine_grained`)."""
    config = ExperimentConfig.quick() if quick else ExperimentConfig.fine_grained()
    return _reproduce(config, out_dir, title="TiF learner, three classes that differ only in the mark", adapters=False)


def _reproduce(config: ExperimentConfig, out_dir: Path, *, title: str, adapters: bool = True):
    from workbench import zoo
    from workbench.plots.tif import accuracy_calls_figure, per_step_figure
    from workbench.reproduce import ReproSection

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = zoo.load("toy-t2i")
    pipe.set_progress_bar_config(disable=True)
    rows = run_fewshot_experiment(
        pipe,
        zoo.noise_scheduler(),
        zoo.load("toyclip"),
        config=config,
        results_path=out_dir / "results.json",
        save_adapters=out_dir / "adapters" if adapters else None,
        progress=False,
    )
    table = summarise(rows)
    figures = []
    for name, figure in (("accuracy_calls", accuracy_calls_figure(rows)), ("per_step", per_step_figure(rows))):
        figure.savefig(out_dir / f"{name}.png", dpi=110)
        figures.append(out_dir / f"{name}.png")
    by_name = {r["method"]: r for r in table}
    mean = {m: np.mean([r["accuracy"][m] for r in rows]) * 100 for m in rows[0]["accuracy"]}
    cost = {m: by_name[m]["UNet calls / image"] for m in by_name}
    replay = all(r["pruning replay matches"] for r in rows)
    pruned = sorted((m for m in mean if m.startswith("TiF pruned (keep")), key=lambda m: cost[m])
    meets = [m for m in pruned if cost["TiF"] / cost[m] >= 3 and mean["TiF"] - mean[m] <= 1]
    pruning = "; ".join(
        f"{m}: {cost['TiF'] / cost[m]:.2f}x fewer calls ({cost['TiF']:.0f} -> {cost[m]:.0f}) at "
        f"{mean['TiF'] - mean[m]:+.1f} points lost"
        for m in ("TiF truncated", *pruned, "TiF pruned, full grid")
        if m in mean
    )
    dc_pruned = "uniform t pruned, full grid"
    others = ", ".join(
        f"{name} {mean[name]:.1f} %"
        for name in (
            "uniform t",
            "large t only",
            "small t only",
            "DC class prompts [names]",
            "DC class prompts [tokens]",
            "CLIP zero-shot [names]",
            "CLIP zero-shot [tokens]",
            "CLIP linear probe",
            "TiF + CLIP [names]",
            "TiF + CLIP [tokens]",
        )
        if name in mean
    )
    verdict = (
        f"Mean over all settings: TiF {mean['TiF']:.1f} %; {others}. TiF "
        f"{'beats' if mean['TiF'] > mean['uniform t'] else 'does not beat'} uniform weighting with the same adapters. "
        f"Cost against TiF on the full grid: {pruning}. "
        f"The 3x-at-most-1-point target {'holds (' + ', '.join(meets) + ')' if meets else 'does not hold'}. "
        f"Diffusion Classifier's own pruning of uniform weights on the full grid: "
        f"{cost['uniform t'] / cost[dc_pruned]:.2f}x at {mean['uniform t'] - mean[dc_pruned]:+.1f} points. "
        f"Pruning replayed on the error matrix equals a real pruned run: {replay}."
    )
    task = config.task
    notes = (
        f"Task: {len(task.class_names)} classes ({', '.join(task.class_names)}), spurious "
        f"{task.spurious_attribute} ({', '.join(task.spurious_values)}) tied to the mark in the shots, independent "
        f"in the {len(task.class_names) * config.test_per_class} test images; {config.draws} draw(s) per setting; "
        f"grid of {config.num_timesteps} steps. [names]: class prompts say mark and shape; [tokens]: one "
        "meaningless token per class (the customised setting); TiF, its ablations and the linear probe read no "
        f"name. Truncated grid: the steps with TiF weight >= {config.truncate_below:g} of the max; pruned: its "
        f"middle step for every class, then the rest for the best {' or '.join(map(str, config.pruning_keep))} "
        "classes. "
        f"Adapters rank {config.adapter_rank}, {config.adapter_steps} steps, levels {config.adapter_levels}. "
        "Seconds of the headline pruned schedule are measured on a real pruned run; other pruned and "
        "truncated seconds are calls x the measured seconds per call."
    )
    return ReproSection(
        title=title,
        claim=(
            "Class adapters compared at small time steps (TiF weighting) classify by the nuanced attribute and "
            "resist a salient attribute spuriously tied to the label in the few shots, beating uniform weighting."
        ),
        rows=table,
        verdict=verdict,
        figures=figures,
        notes=notes,
    )


def image_losses(
    pipe,
    noise_scheduler,
    image: np.ndarray,
    record: dict,
    *,
    num_timesteps: int = 25,
    seed: int = 0,
):
    """Every class adapter's error against t for one image (K classes x ``num_timesteps``, shared noise).

    Args:
        image: (3, H, W) in [0, 1].
        record: what :func:`demo_adapters` returned (class names, prompt, distance).

    Returns:
        The :class:`~workbench.tif.classify.ClassificationResult` of that image (TiF weights, no pruning).
    """
    weights = timestep_weights("tif", noise_scheduler, distance=float(record["distance"]))
    return classify(
        pipe.unet,
        noise_scheduler,
        model_space(pipe, np.asarray(image)[None]),
        adapter_conditions(pipe, record["prompt"], record["class_names"]),
        weights,
        config=ClassifyConfig((num_timesteps,), (1,)),
        generator=torch.Generator().manual_seed(seed),
        progress=False,
    )


def load_or_run_results(*, quick: bool, path: str | Path | None = None, fine_grained: bool = False) -> list[dict]:
    """The measured rows shipped beside the demo adapters, else a run of the quick config.

    Args:
        path: the rows' JSON file (default: ``results.json``, or ``fine_grained_results.json`` with
            ``fine_grained``, in the demo adapters' folder).
        fine_grained: the three-class task (:meth:`ExperimentConfig.fine_grained`) instead of the default.
    """
    from workbench import zoo

    name = "fine_grained_results.json" if fine_grained else "results.json"
    path = Path(path) if path is not None else zoo.DATA_DIR / DEMO_ADAPTERS / name
    if path.is_file():
        return json.loads(path.read_text())["rows"]
    logger.warning("no measured results at %s: running the %s experiment", path, "quick" if quick else "full")
    pipe = zoo.load("toy-t2i")
    pipe.set_progress_bar_config(disable=True)
    if quick:
        config = ExperimentConfig.quick()
    else:
        config = ExperimentConfig.fine_grained() if fine_grained else ExperimentConfig()
    return run_fewshot_experiment(pipe, zoo.noise_scheduler(), zoo.load("toyclip"), config=config, progress=False)


def stable_diffusion_demo(pipe, *, shots_per_class: int = 1, steps: int = 2, num_timesteps: int = 4) -> dict:
    """TiF end to end on a Stable Diffusion pipeline: adapters on toy shots (resized), pruned classification.

    On the tiny random stand-in this shows the code path only (its accuracy means nothing); on real
    weights raise ``steps`` (the official recipe: 150-1000) and ``num_timesteps``.

    Returns:
        class names, true labels, predictions, UNet calls per image with and without pruning.
    """
    from diffusers import DDPMScheduler

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    task = MarkTask(shapes=("circle",))
    shots, test = task.shots(shots_per_class, 0), task.test_set(1, TEST_SEED)

    def resized(data: FewShotSet) -> FewShotSet:
        images = torch.nn.functional.interpolate(torch.from_numpy(data.images), size=(size, size), mode="bilinear")
        return FewShotSet(images.numpy(), data.labels, data.class_names, data.prompt, data.spurious)

    shots, test = resized(shots), resized(test)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    config = AdapterTrainConfig(steps=steps, batch_size=1, levels=levels_for_shots(shots_per_class))
    train_class_adapters(pipe, noise_scheduler, shots, config=config, progress=False)
    distance = class_distance(model_space(pipe, shots.images), torch.from_numpy(shots.labels))
    pruning = ClassifyConfig((num_timesteps // 2, num_timesteps), (2, 1)) if num_timesteps % 2 == 0 else None
    result = classify(
        pipe.unet,
        noise_scheduler,
        model_space(pipe, test.images),
        adapter_conditions(pipe, shots.prompt, shots.class_names),
        timestep_weights("tif", noise_scheduler, distance=distance),
        config=pruning or ClassifyConfig((num_timesteps,), (1,)),
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    return {
        "class_names": list(shots.class_names),
        "labels": test.labels.tolist(),
        "predictions": result.predictions.tolist(),
        "unet_calls_pruned": result.unet_calls.tolist(),
        "unet_calls_unpruned": len(shots.class_names) * num_timesteps,
        "distance": distance,
    }
