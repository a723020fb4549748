"""Balancing Act on the toy world: the ADP training command, the sampling runner and the measurements.

The unconditional zoo model was trained on :data:`workbench.zoo.BIASED_WORLD` (80 % circles, 70 % red).
Guidance reads toyclip's zero-shot pseudo-labels only (through the ADP, or through toyclip itself for the
image-space baseline); every reported discrepancy is read by the evaluation CNN trained on true labels.
The Frechet distance is toyclip's, against real images of the *target* world.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench import metrics, zoo
from workbench.attribute_classifier import AttributeClassifier, classify
from workbench.debias.adp import (
    ADPTrainConfig,
    AttributeDistributionPredictor,
    check_compatible,
    collect_generated,
    collect_inverted,
    per_step_accuracy,
    train_adp,
    unet_fingerprint,
)
from workbench.debias.guidance import AttributeTarget, GuidanceConfig, assign_classes, h_guidance, x0_guidance
from workbench.sampling import denoise, initial_noise
from workbench.toyclip import ToyCLIPModel, zero_shot_classify
from workbench.toyworld import ToyWorld, caption

__all__ = [
    "ADP_DIR",
    "CLASSIFIER_DIR",
    "DEFAULT_SCALES",
    "METHODS",
    "NUM_INFERENCE_STEPS",
    "SCENARIOS",
    "TARGET_WEIGHTS",
    "TOY_HEADS",
    "TUNING_SEEDS",
    "TUNING_WEIGHTS",
    "VALUES",
    "Scenario",
    "batch_size_sweep",
    "compare_methods",
    "comparison_sizes",
    "default_config",
    "flatness",
    "guided_batch",
    "load_adps",
    "load_classifier",
    "observed_distribution",
    "reproduce",
    "results_markdown",
    "sample",
    "sweep_sizes",
    "target_weight",
    "target_world_images",
    "toyclip_log_probabilities",
    "train_toy_adps",
    "training_distribution",
    "tune_weights",
    "tuning_sizes",
]

logger = logging.getLogger(__name__)

ADP_DIR = zoo.DATA_DIR / "toy-uncond-adp"
CLASSIFIER_DIR = zoo.DATA_DIR / "toy-attribute-classifier"
NUM_INFERENCE_STEPS = 10  # the shipped heads' schedule (the paper: 50 DDIM steps)
VALUES: dict[str, tuple[str, ...]] = {a: tuple(v) for a, v in zoo.BIASED_WORLD.bias.items()}
METHODS = ("unguided", "h-sample", "x0-sample", "distribution")
# Guidance scale per method for the shipped heads: the order of magnitude where each method starts to move a
# batch (seed 100, a batch of 32). Each target then multiplies it by its weight from TARGET_WEIGHTS.
DEFAULT_SCALES = {"distribution": 20000.0, "h-sample": 1000.0, "x0-sample": 1.0}
# Per method, the weight of each toy target (keyed by its attributes), chosen by `python -m workbench debias
# tune --mode MODE` (:func:`tune_weights`: TUNING_WEIGHTS[MODE] on TUNING_SEEDS, lowest discrepancy; the
# measured tables are docs/results/debias/tuning-MODE.json). The shape head moves its batch less per unit of
# scale than the colour head.
TARGET_WEIGHTS: dict[str, dict[tuple[str, ...], float]] = {
    "distribution": {("shape",): 3.0, ("colour",): 0.35, ("shape", "colour"): 1.5},
    "h-sample": {("shape",): 1.0, ("colour",): 10.0, ("shape", "colour"): 3.0},
    "x0-sample": {("shape",): 3.0, ("colour",): 1.0, ("shape", "colour"): 1.0},
}
TUNING_WEIGHTS = {
    "distribution": (0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
    "h-sample": (0.3, 1.0, 3.0, 10.0),
    "x0-sample": (0.3, 1.0, 3.0, 10.0),
}
TUNING_SEEDS = (100, 101)  # not evaluation seeds (compare_methods uses 0, 1, 2)
HELD_OUT_SEED = 654_321
# Position-free heads: shapes move in the toy world (the official flattened heads suit aligned faces). Colour
# is a channel statistic (mean pooling spreads the gradient over all positions); shape needs the maximum too.
TOY_HEADS = {"shape": "pooled", "colour": "mean"}


def load_adps(path: str | Path | None = None) -> dict[str, AttributeDistributionPredictor]:
    """The shipped ADP heads (``data/toy-uncond-adp``), attribute -> predictor."""
    folder = Path(path) if path is not None else ADP_DIR
    if not (folder / "training.json").is_file():
        raise FileNotFoundError(f"no ADP heads at {folder}; train them with `python -m workbench debias train-adp`")
    record = json.loads((folder / "training.json").read_text())
    return {
        a: AttributeDistributionPredictor.from_pretrained(folder / a, use_safetensors=True).eval()
        for a in record["attributes"]
    }


def load_classifier(path: str | Path | None = None) -> AttributeClassifier:
    """The shipped evaluation CNN (``data/toy-attribute-classifier``)."""
    folder = Path(path) if path is not None else CLASSIFIER_DIR
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no evaluation classifier at {folder}; train it with `python -m workbench debias train-classifier`"
        )
    return AttributeClassifier.from_pretrained(folder, use_safetensors=True).eval()


def training_distribution(attribute: str) -> np.ndarray:
    """The biased world's frequencies of ``attribute`` over :data:`VALUES` (what the model learned)."""
    if attribute not in VALUES:
        raise ValueError(f"attribute must be one of {list(VALUES)}, got {attribute!r}")
    return np.array([zoo.BIASED_WORLD.bias[attribute][v] for v in VALUES[attribute]])


def toyclip_log_probabilities(clip: ToyCLIPModel, values: Mapping[str, Sequence[str]] = VALUES):
    """A differentiable zero-shot classifier: images in [0, 1] -> attribute -> log-probabilities (B, K)."""
    with torch.no_grad():
        texts = {a: clip.encode_text([caption({a: v}) for v in vs]) for a, vs in values.items()}
        scale = clip.clip.logit_scale.exp()

    def classifier(images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = clip.encode_image(images)
        return {a: (scale * features @ text.T).log_softmax(-1) for a, text in texts.items()}

    return classifier


def _pseudo_labels(clip: ToyCLIPModel, images: torch.Tensor) -> dict[str, np.ndarray]:
    return {a: zero_shot_classify(clip, images, a, values=v).numpy() for a, v in VALUES.items()}


def _true_labels(batch) -> dict[str, np.ndarray]:
    return {a: np.array([VALUES[a].index(v) for v in batch.values(a)]) for a in VALUES}


def train_toy_adps(
    out_dir: str | Path | None = None,
    *,
    num_generated: int = 384,
    num_real: int = 384,
    num_inference_steps: int = NUM_INFERENCE_STEPS,
    heads: Mapping[str, str] | None = None,
    config: ADPTrainConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Collect h along the toy-uncond sampler's trajectories, pseudo-label with toyclip, train per-step heads.

    Data: ``num_generated`` samples (labelled by toyclip on the final image) and ``num_real`` real images
    of a balanced circle/square, red/blue world, DDIM-inverted through the same timesteps (labelled by
    toyclip too). ``heads`` picks the head per attribute (default :data:`TOY_HEADS`; ``config.head`` is
    replaced by it). Held-out per-step accuracy is measured against the pseudo-labels and against the truth
    (exact labels for real images, the evaluation CNN's reading for generated ones).

    Returns:
        the record written to ``out_dir/training.json`` (when ``out_dir`` is given).
    """
    config = config or ADPTrainConfig()
    heads = dict(TOY_HEADS) | dict(heads or {})
    unknown = set(heads) - set(VALUES)
    if unknown:
        raise ValueError(f"heads: unknown attribute(s) {sorted(unknown)}; allowed: {list(VALUES)}")
    start = time.perf_counter()
    pipe, clip = zoo.load("toy-uncond"), zoo.load("toyclip")
    unet, scheduler = pipe.unet.eval(), pipe.scheduler
    generator = torch.Generator().manual_seed(seed)
    h_gen, images, timesteps = collect_generated(
        unet, scheduler, num_generated, num_inference_steps=num_inference_steps, generator=generator, progress=progress
    )
    balanced = ToyWorld(bias={a: {v: 1 / len(vs) for v in vs} for a, vs in VALUES.items()})
    real = balanced.sample(num_real, np.random.default_rng(seed))
    h_real, _ = collect_inverted(
        unet, scheduler, real.images, num_inference_steps=num_inference_steps, progress=progress
    )
    collect_seconds = time.perf_counter() - start
    h = torch.cat([h_gen, h_real])
    pseudo_gen, pseudo_real = _pseudo_labels(clip, images), _pseudo_labels(clip, torch.from_numpy(real.images))
    true_real = _true_labels(real)
    true_gen = classify(load_classifier(), images) if CLASSIFIER_DIR.is_dir() else None
    source = np.array(["generated"] * num_generated + ["real"] * num_real)
    fingerprint = unet_fingerprint(unet)
    record: dict = {
        "command": " ".join(
            [
                "python -m workbench debias train-adp",
                *(sys.argv[3:] if sys.argv[1:3] == ["debias", "train-adp"] else []),
            ]
        ),
        "attributes": list(VALUES),
        "values": {a: list(v) for a, v in VALUES.items()},
        "unet_fingerprint": fingerprint,
        "scheduler_class": type(scheduler).__name__,
        "num_inference_steps": num_inference_steps,
        "timesteps": timesteps,
        "num_generated": num_generated,
        "num_real": num_real,
        "seed": seed,
        "heads": heads,
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__ if k != "head"},
        "pseudo_label_agreement_with_truth": {
            a: {
                "real": float((pseudo_real[a] == true_real[a]).mean()),
                **({"generated": float((pseudo_gen[a] == true_gen[a]).mean())} if true_gen else {}),
            }
            for a in VALUES
        },
        "accuracy": {},
    }
    adps = {}
    train_seconds = time.perf_counter()
    for attribute in VALUES:
        labels = np.concatenate([pseudo_gen[attribute], pseudo_real[attribute]])
        adp, held_out = train_adp(
            h,
            labels,
            attribute=attribute,
            values=VALUES[attribute],
            timesteps=timesteps,
            unet_fingerprint=fingerprint,
            scheduler_class=type(scheduler).__name__,
            generator=generator,
            config=replace(config, head=heads[attribute]),
            progress=progress,
        )
        adps[attribute] = adp
        accuracy = {"pseudo": per_step_accuracy(adp, h[held_out], labels[held_out]).round(4).tolist()}
        real_rows = held_out[source[held_out] == "real"]
        accuracy["true_real"] = (
            per_step_accuracy(adp, h[real_rows], true_real[attribute][real_rows - num_generated]).round(4).tolist()
        )
        if true_gen is not None:
            gen_rows = held_out[source[held_out] == "generated"]
            accuracy["true_generated"] = (
                per_step_accuracy(adp, h[gen_rows], true_gen[attribute][gen_rows]).round(4).tolist()
            )
        record["accuracy"][attribute] = accuracy
        if out_dir is not None:
            adp.save_pretrained(Path(out_dir) / attribute, safe_serialization=True)
    record["seconds"] = {
        "collect": round(collect_seconds, 1),
        "train_heads": round(time.perf_counter() - train_seconds, 1),
    }
    record["torch"] = torch.__version__
    if out_dir is not None:
        (Path(out_dir) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def target_weight(attributes: str | Sequence[str], mode: str = "distribution") -> float:
    """The tuned weight (:data:`TARGET_WEIGHTS`) of a toy-world target over ``attributes`` for ``mode``."""
    if mode not in TARGET_WEIGHTS:
        raise ValueError(f"mode must be one of {list(TARGET_WEIGHTS)}, got {mode!r}")
    key = (attributes,) if isinstance(attributes, str) else tuple(attributes)
    if key not in TARGET_WEIGHTS[mode]:
        raise ValueError(f"attributes: no tuned weight for {key}; tuned: {list(TARGET_WEIGHTS[mode])}")
    return TARGET_WEIGHTS[mode][key]


def _tuned(targets: Sequence[AttributeTarget], mode: str) -> tuple[AttributeTarget, ...]:
    return tuple(replace(t, weight=target_weight(t.attributes, mode)) for t in targets)


def default_config(
    targets: AttributeTarget | Sequence[AttributeTarget], mode: str = "distribution", **options
) -> GuidanceConfig:
    """A :class:`GuidanceConfig` with the toy model's tuned scale for ``mode`` (``options`` override)."""
    targets = (targets,) if isinstance(targets, AttributeTarget) else tuple(targets)
    return GuidanceConfig(targets=targets, mode=mode, **({"scale": DEFAULT_SCALES.get(mode, 1.0)} | options))


def sample(
    pipe,
    num_images: int,
    *,
    config: GuidanceConfig | None = None,
    adps: Mapping[str, AttributeDistributionPredictor] | None = None,
    clip: ToyCLIPModel | None = None,
    num_inference_steps: int = NUM_INFERENCE_STEPS,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """``num_images`` samples (N, 3, H, W) in [0, 1] from an unconditional pixel pipeline, guided by ``config``.

    Batches of ``batch_size`` run through ``workbench.sampling.denoise`` with the pipeline's scheduler;
    ``config=None`` samples unguided. "h-sample" and "x0-sample" assign classes over all ``num_images``
    in the targets' proportions; "x0-sample" needs ``clip`` (its zero-shot classifier guides).
    """
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    unet, scheduler = pipe.unet, pipe.scheduler
    generator = generator or torch.Generator().manual_seed(0)
    sizes = [min(batch_size, num_images - s) for s in range(0, num_images, batch_size)]
    assignments = None
    if config is not None:
        if config.mode in ("distribution", "h-sample"):
            if adps is None:
                raise ValueError(f"adps: mode {config.mode!r} needs trained ADP heads (see load_adps)")
            check_compatible(
                [adps[a] for a in config.attributes if a in adps],
                unet,
                scheduler,
                num_inference_steps=num_inference_steps,
            )
        if config.mode == "distribution" and min(sizes) < 2:
            raise ValueError(
                f"batch_size: distribution guidance needs batches of >= 2 images, got batches of {sizes} "
                f"(num_images={num_images}, batch_size={batch_size})"
            )
        if config.mode == "x0-sample" and clip is None:
            raise ValueError("clip: mode 'x0-sample' needs the toyclip model as its image classifier")
        if config.mode != "distribution":
            values = (
                VALUES if config.mode == "x0-sample" else {a: adps[a].values for a in config.attributes if a in adps}
            )
            missing = [a for a in config.attributes if a not in values]
            if missing:
                raise ValueError(f"adps: no trained ADP for attribute(s) {missing}; available: {sorted(values)}")
            assignments = [
                assign_classes(t.probabilities([values[a] for a in t.attributes]), num_images, generator)
                for t in config.targets
            ]
    classifier = toyclip_log_probabilities(clip) if config is not None and config.mode == "x0-sample" else None
    size, channels = unet.config.sample_size, unet.config.in_channels
    chunks, start = [], 0
    for count in tqdm(sizes, desc=config.mode if config else "unguided", disable=not progress, leave=False):
        noise = initial_noise((count, channels, size, size), generator)
        batch_assignments = None if assignments is None else [a[start : start + count] for a in assignments]
        if config is None:
            context = _nothing()
        elif config.mode == "x0-sample":
            context = x0_guidance(
                unet, scheduler.alphas_cumprod, classifier, VALUES, config, assignments=batch_assignments
            )
        else:
            context = h_guidance(unet, adps, config, assignments=batch_assignments)
        with context:
            x = denoise(unet, scheduler, noise, num_inference_steps=num_inference_steps, progress=False)
        chunks.append(((x + 1) / 2).clamp(0, 1))
        start += count
    return torch.cat(chunks)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def observed_distribution(
    labels: Mapping[str, np.ndarray], attributes: Sequence[str], values: Mapping[str, Sequence[str]] = VALUES
) -> np.ndarray:
    """The label histogram over the (row-major) product of ``attributes``' values."""
    sizes = [len(values[a]) for a in attributes]
    joint = np.ravel_multi_index([labels[a] for a in attributes], sizes)
    return np.bincount(joint, minlength=int(np.prod(sizes))) / len(joint)


def _joint_labels(labels: Mapping[str, np.ndarray], attributes: Sequence[str]) -> np.ndarray:
    return np.ravel_multi_index([labels[a] for a in attributes], [len(VALUES[a]) for a in attributes])


def target_world_images(targets: Sequence[AttributeTarget], num_images: int, rng: np.random.Generator) -> np.ndarray:
    """Real toy images (N, 3, H, W) of the world the targets ask for: targeted attributes follow the targets,
    the others keep the biased world's frequencies."""
    combos = {}
    for target in list(targets) + [
        AttributeTarget(a, dict(zoo.BIASED_WORLD.bias[a]))
        for a in VALUES
        if all(a not in t.attributes for t in targets)
    ]:
        classes = list(np.ndindex(*[len(VALUES[a]) for a in target.attributes]))
        probabilities = target.probabilities([VALUES[a] for a in target.attributes]).double().numpy()
        picks = rng.choice(len(classes), size=num_images, p=probabilities / probabilities.sum())
        for a_index, attribute in enumerate(target.attributes):
            combos[attribute] = np.array([classes[p][a_index] for p in picks])
    keys = list(zip(*[combos[a] for a in VALUES], strict=True))
    images = np.empty((num_images, 3, 32, 32), dtype=np.float32)
    for key in set(keys):
        rows = [i for i, k in enumerate(keys) if k == key]
        fixed = {a: VALUES[a][k] for a, k in zip(VALUES, key, strict=True)}
        images[rows] = zoo.BIASED_WORLD.sample(len(rows), rng, fixed=fixed).images
    return images


@dataclass(frozen=True)
class Scenario:
    """A named set of targets for the measurements (each method weighs them by :data:`TARGET_WEIGHTS`)."""

    name: str
    targets: tuple[AttributeTarget, ...]


SCENARIOS = (
    Scenario(
        "balanced shape 50/50",
        (AttributeTarget("shape", {"circle": 0.5, "square": 0.5}),),
    ),
    Scenario(
        "colour red 30 / blue 70",
        (AttributeTarget("colour", {"red": 0.3, "blue": 0.7}),),
    ),
    Scenario(
        "joint shape x colour (anti-correlated)",
        (
            AttributeTarget(
                ("shape", "colour"),
                {("circle", "red"): 0.1, ("circle", "blue"): 0.4, ("square", "red"): 0.4, ("square", "blue"): 0.1},
            ),
        ),
    ),
)


def _discrepancy(labels: Mapping[str, np.ndarray], targets: Sequence[AttributeTarget]) -> float:
    """Fairness discrepancy, averaged over the targets (one per target, over its classes)."""
    values = [
        metrics.fairness_discrepancy(
            t.probabilities([VALUES[a] for a in t.attributes]).double().numpy(), _joint_labels(labels, t.attributes)
        )
        for t in targets
    ]
    return float(np.mean(values))


def compare_methods(
    *,
    num_images: int = 512,
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 64,
    scenarios: Sequence[Scenario] = SCENARIOS,
    methods: Sequence[str] = METHODS,
    progress: bool = True,
) -> list[dict]:
    """Fairness discrepancy (evaluation CNN), toyclip Frechet distance to the target world and seconds per
    batch, for each scenario and method, as mean and spread over ``seeds``.

    Returns:
        rows: scenario, method, fd_mean, fd_std, frechet_mean, frechet_std, seconds_per_batch, cost (x unguided),
        and the observed distribution (mean over seeds).
    """
    pipe, clip, adps, evaluator = zoo.load("toy-uncond"), zoo.load("toyclip"), load_adps(), load_classifier()
    pipe.unet.eval()
    sample(pipe, 2, batch_size=2, progress=False)  # warm-up, so the first timed method pays no one-off costs
    results: dict[tuple[str, str], list[tuple[float, float, float, np.ndarray]]] = {}
    for seed in seeds:
        references = {
            s.name: metrics.clip_features(
                clip, target_world_images(s.targets, num_images, np.random.default_rng(HELD_OUT_SEED + seed))
            )
            for s in scenarios
        }
        unguided = None
        for scenario in scenarios:
            for method in methods:
                if method == "unguided" and unguided is not None:
                    images, seconds = unguided
                else:
                    config = None if method == "unguided" else default_config(_tuned(scenario.targets, method), method)
                    begin = time.perf_counter()
                    images = sample(
                        pipe,
                        num_images,
                        config=config,
                        adps=adps,
                        clip=clip,
                        batch_size=batch_size,
                        generator=torch.Generator().manual_seed(seed),
                        progress=progress,
                    )
                    seconds = (time.perf_counter() - begin) / -(-num_images // batch_size)
                    if method == "unguided":
                        unguided = (images, seconds)
                labels = classify(evaluator, images)
                frechet = metrics.frechet_distance(metrics.clip_features(clip, images), references[scenario.name])
                attributes = [a for t in scenario.targets for a in t.attributes]
                results.setdefault((scenario.name, method), []).append(
                    (
                        _discrepancy(labels, scenario.targets),
                        frechet,
                        seconds,
                        observed_distribution(labels, attributes),
                    )
                )
                logger.info(
                    "seed %d, %s, %s: FD %.3f", seed, scenario.name, method, results[(scenario.name, method)][-1][0]
                )
    rows = []
    for (scenario, method), runs in results.items():
        fd, frechet, seconds, observed = (np.array(x) for x in zip(*runs, strict=True))
        base = np.mean([r[2] for r in results[(scenario, "unguided")]]) if (scenario, "unguided") in results else np.nan
        rows.append(
            {
                "scenario": scenario,
                "method": method,
                "fd_mean": float(fd.mean()),
                "fd_std": float(fd.std()),
                "frechet_mean": float(frechet.mean()),
                "frechet_std": float(frechet.std()),
                "seconds_per_batch": float(seconds.mean()),
                "cost": float(seconds.mean() / base),
                "observed": observed.mean(0).round(3).tolist(),
            }
        )
    return rows


def batch_size_sweep(
    *,
    batch_sizes: Sequence[int] = (4, 8, 16, 32, 64),
    num_images: int = 256,
    target: AttributeTarget | None = None,
    scale: float | None = None,
    reference_batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Discrepancy against batch size at one scale, with and without the batch-size normalisation.

    "batch" uses ``scale`` with the gradient multiplied by the batch size N (the default); "none" (the
    official update) uses ``scale * reference_batch_size``, so both push each sample equally at
    N = ``reference_batch_size``: the unnormalised scale is "tuned" there and kept while N changes. Every
    batch size samples the same ``num_images`` (a multiple of every size) from the same noise stream;
    unguided sampling does not couple a batch's images, so it runs once and is cut into batches of each size.

    Two readings, because a per-batch discrepancy mixes two things. The *pooled* distribution of all
    ``num_images`` images says how far guidance moved the population: the normalisation is right when it does
    not depend on N (within its sampling error ``share_se``, the binomial standard error over ``num_images``).
    The *per-batch* discrepancy adds the sampling noise of a small batch: even N images drawn independently
    from the target itself miss it by ``iid_batch_fd[N]`` on average (about 0.27 at N = 4 and 0.07 at N = 64
    for a 50/50 target), so a per-batch curve falls with N whatever the scale does.

    Default target: colour 30 % red / 70 % blue, whose toyclip pseudo-labels are almost exact, so the sweep
    measures the scale and not the pseudo-labeller's error.

    Returns:
        {"target": p_ref, "class_names", "num_images", "scale", "weight" (the target's), "reference_batch_size",
        "iid_batch_fd": {N: expected per-batch discrepancy of N images drawn from the target}, "curves":
        {"unguided" | "batch" | "none": {N: {"share": pooled distribution, "share_se", "pooled_fd", "batch_fd",
        "batch_fd_std"}}}}.
    """
    target = target or AttributeTarget("colour", {"red": 0.3, "blue": 0.7}, weight=target_weight("colour"))
    scale = DEFAULT_SCALES["distribution"] if scale is None else scale
    bad = [b for b in batch_sizes if b < 2 or num_images % b]
    if bad:
        raise ValueError(f"batch_sizes must be >= 2 and divide num_images={num_images}, got {bad}")
    if reference_batch_size < 2:
        raise ValueError(f"reference_batch_size must be >= 2, got {reference_batch_size}")
    pipe, adps, evaluator = zoo.load("toy-uncond"), load_adps(), load_classifier()
    pipe.unet.eval()
    class_names = [" ".join(c) for c in itertools.product(*[VALUES[a] for a in target.attributes])]
    probabilities = target.probabilities([VALUES[a] for a in target.attributes]).double().numpy()
    rng = np.random.default_rng(seed)
    iid = {
        size: float(
            np.mean(np.linalg.norm(rng.multinomial(size, probabilities, 20_000) / size - probabilities, axis=1))
        )
        for size in batch_sizes
    }

    def reading(labels: np.ndarray, size: int) -> dict:
        share = np.bincount(labels, minlength=len(probabilities)) / len(labels)
        per_batch = [
            metrics.fairness_discrepancy(probabilities, chunk) for chunk in np.split(labels, len(labels) // size)
        ]
        return {
            "share": share.round(4).tolist(),
            "share_se": float(np.sqrt(share[0] * (1 - share[0]) / len(labels))),
            "pooled_fd": metrics.fairness_discrepancy(probabilities, labels),
            "batch_fd": float(np.mean(per_batch)),
            "batch_fd_std": float(np.std(per_batch)),
        }

    def labels_of(config: GuidanceConfig | None, size: int) -> np.ndarray:
        images = sample(
            pipe,
            num_images,
            config=config,
            adps=adps,
            batch_size=size,
            generator=torch.Generator().manual_seed(seed),
            progress=progress,
        )
        return _joint_labels(classify(evaluator, images), target.attributes)

    unguided = labels_of(None, max(batch_sizes))
    curves: dict[str, dict[int, dict]] = {"unguided": {size: reading(unguided, size) for size in batch_sizes}}
    for name in ("batch", "none"):
        factor = reference_batch_size if name == "none" else 1
        config = GuidanceConfig(target, scale=scale * factor, scale_normalization=name)
        curves[name] = {size: reading(labels_of(config, size), size) for size in batch_sizes}
    return {
        "target": probabilities.tolist(),
        "class_names": class_names,
        "num_images": num_images,
        "scale": scale,
        "weight": target.weight,
        "reference_batch_size": reference_batch_size,
        "iid_batch_fd": iid,
        "curves": curves,
    }


def flatness(sweep: Mapping) -> dict[str, dict[str, float]]:
    """Per setting of :func:`batch_size_sweep`: the range over batch sizes of the pooled share of the first
    class, against twice its largest sampling error (flat when ``range <= 2 * se``)."""
    summary = {}
    for name, points in sweep["curves"].items():
        shares = [p["share"][0] for p in points.values()]
        summary[name] = {
            "share_min": float(min(shares)),
            "share_max": float(max(shares)),
            "range": float(max(shares) - min(shares)),
            "two_se": float(2 * max(p["share_se"] for p in points.values())),
        }
    return summary


def tune_weights(
    mode: str = "distribution",
    *,
    weights: Sequence[float] | None = None,
    scenarios: Sequence[Scenario] = SCENARIOS,
    num_images: int = 128,
    batch_size: int = 64,
    seeds: Sequence[int] = TUNING_SEEDS,
    progress: bool = True,
) -> dict:
    """Choose each target's weight (the multiplier of ``mode``'s scale) on held-out seeds.

    For every scenario (one target each), weight (default ``TUNING_WEIGHTS[mode]``) and seed (never an
    evaluation seed), ``num_images`` images are guided by ``mode`` and read by the evaluation CNN; the weight
    with the lowest fairness discrepancy, averaged over the seeds, is chosen. toyclip's Frechet distance to the
    target world is recorded alongside. This is how :data:`TARGET_WEIGHTS` was set
    (``python -m workbench debias tune --mode MODE``).

    Returns:
        {"command", "mode", "seeds", "scale", "num_images", "batch_size", "rows": [{scenario, attributes,
        weight, fd, fd_per_seed, frechet, observed}], "chosen": {",".join(attributes): weight}}.
    """
    if mode not in TUNING_WEIGHTS:
        raise ValueError(f"mode must be one of {list(TUNING_WEIGHTS)}, got {mode!r}")
    weights = TUNING_WEIGHTS[mode] if weights is None else weights
    if not weights or any(not (math.isfinite(w) and w >= 0) for w in weights):
        raise ValueError(f"weights must be finite numbers >= 0, got {list(weights)}")
    if not seeds or set(seeds) & {0, 1, 2}:
        raise ValueError(f"seeds must be held-out seeds, not the evaluation seeds 0, 1, 2; got {list(seeds)}")
    several = [s.name for s in scenarios if len(s.targets) != 1]
    if several:
        raise ValueError(f"scenarios: tune_weights needs one target per scenario, got several in {several}")
    pipe, clip, adps, evaluator = zoo.load("toy-uncond"), zoo.load("toyclip"), load_adps(), load_classifier()
    pipe.unet.eval()
    rows, chosen = [], {}
    for scenario in scenarios:
        (target,) = scenario.targets
        references = {
            seed: metrics.clip_features(
                clip, target_world_images(scenario.targets, num_images, np.random.default_rng(HELD_OUT_SEED + seed))
            )
            for seed in seeds
        }
        measured = []
        for weight in weights:
            fd, frechet, observed = [], [], []
            for seed in seeds:
                images = sample(
                    pipe,
                    num_images,
                    config=default_config(replace(target, weight=weight), mode),
                    clip=clip,
                    adps=adps,
                    batch_size=batch_size,
                    generator=torch.Generator().manual_seed(seed),
                    progress=progress,
                )
                labels = classify(evaluator, images)
                fd.append(_discrepancy(labels, scenario.targets))
                frechet.append(metrics.frechet_distance(metrics.clip_features(clip, images), references[seed]))
                observed.append(observed_distribution(labels, target.attributes))
            row = {
                "scenario": scenario.name,
                "attributes": list(target.attributes),
                "weight": weight,
                "fd": float(np.mean(fd)),
                "fd_per_seed": [round(f, 4) for f in fd],
                "frechet": float(np.mean(frechet)),
                "observed": np.mean(observed, axis=0).round(3).tolist(),
            }
            logger.info(
                "tune %s, %s, weight %g: FD %.3f, Frechet %.2f", mode, scenario.name, weight, row["fd"], row["frechet"]
            )
            measured.append(row)
        rows += measured
        chosen[",".join(target.attributes)] = min(measured, key=lambda r: r["fd"])["weight"]
    return {
        "command": f"python -m workbench debias tune --mode {mode}",
        "mode": mode,
        "seeds": list(seeds),
        "scale": DEFAULT_SCALES[mode],
        "num_images": num_images,
        "batch_size": batch_size,
        "rows": rows,
        "chosen": chosen,
    }


def comparison_sizes(quick: bool) -> dict:
    """Sample counts of :func:`compare_methods`: tiny in quick mode, >= 500 per method and 3 seeds in full."""
    return dict(num_images=8, seeds=(0,), batch_size=8) if quick else dict(num_images=512, seeds=(0, 1, 2))


def sweep_sizes(quick: bool) -> dict:
    """Settings of :func:`batch_size_sweep` for quick and full mode."""
    return dict(batch_sizes=(4, 16), num_images=16) if quick else dict(batch_sizes=(4, 8, 16, 32, 64), num_images=256)


def tuning_sizes(quick: bool) -> dict:
    """Settings of :func:`tune_weights` for quick and full mode."""
    return dict(weights=(1.0, 2.0), num_images=8, batch_size=8, seeds=(100,)) if quick else dict(num_images=128)


def reproduce(*, quick: bool, out_dir: Path):
    """Reproduction-report section: discrepancy, Frechet distance and cost per method, and the batch-size sweep."""
    from workbench.plots.debias import batch_size_figure
    from workbench.reproduce import ReproSection

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = compare_methods(**comparison_sizes(quick), progress=False)
    sweep = batch_size_sweep(**sweep_sizes(quick), progress=False)
    (out_dir / "methods.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out_dir / "batch_size.json").write_text(json.dumps(sweep, indent=1) + "\n")
    path = out_dir / "batch_size.png"
    batch_size_figure(sweep).savefig(path, dpi=120, bbox_inches="tight")
    table = [
        {
            "target": r["scenario"],
            "method": r["method"],
            "FD (eval CNN)": f"{r['fd_mean']:.3f} ± {r['fd_std']:.3f}",
            "Frechet (toyclip) to target world": f"{r['frechet_mean']:.2f} ± {r['frechet_std']:.2f}",
            "observed": r["observed"],
            "s / batch": round(r["seconds_per_batch"], 2),
            "cost x unguided": round(r["cost"], 2),
        }
        for r in rows
    ]
    verdicts = []
    for scenario in {r["scenario"] for r in rows}:
        by = {r["method"]: r for r in rows if r["scenario"] == scenario}
        if "distribution" in by and "unguided" in by:
            better = by["distribution"]["fd_mean"] < by["unguided"]["fd_mean"]
            best = min(by.values(), key=lambda r: r["fd_mean"])
            verdicts.append(
                f"{scenario}: distribution guidance {'lowers' if better else 'does not lower'} FD "
                f"({by['unguided']['fd_mean']:.3f} -> {by['distribution']['fd_mean']:.3f}) with Frechet "
                f"{by['unguided']['frechet_mean']:.1f} -> {by['distribution']['frechet_mean']:.1f}; lowest FD: "
                f"{best['method']} ({best['fd_mean']:.3f}, Frechet {best['frechet_mean']:.1f})"
            )
    flat = flatness(sweep)
    sweep_note = "; ".join(
        f"{name}: {f['share_min']:.2f}..{f['share_max']:.2f} (range {f['range']:.2f}, "
        f"{'within' if f['range'] <= f['two_se'] else 'beyond'} twice the sampling error {f['two_se']:.2f})"
        for name, f in flat.items()
    )
    sizes = comparison_sizes(quick)
    return ReproSection(
        title="Balancing Act: distribution guidance in h-space",
        claim="guiding h so that the batch's predicted attribute distribution matches a target reduces the "
        "fairness discrepancy more than per-sample guidance, at the same image quality and almost no extra cost.",
        rows=table,
        verdict="; ".join(sorted(verdicts)) + f". Batch size {sorted(sweep['curves']['batch'], key=int)} at one "
        f"scale, pooled share of {sweep['class_names'][0]} (target {sweep['target'][0]:.2f}) over "
        f"{sweep['num_images']} images: {sweep_note}.",
        figures=[path],
        notes=f"{sizes['num_images']} samples per method and seed, seeds {list(sizes['seeds'])}, batch "
        f"{sizes.get('batch_size', 64)}, {NUM_INFERENCE_STEPS} DPM-Solver++ steps; scales {DEFAULT_SCALES}, "
        f"times each target's weight per method {TARGET_WEIGHTS} (`python -m workbench debias tune`, seeds "
        f"{list(TUNING_SEEDS)}). FD is read by the evaluation CNN trained on true labels; guidance only saw toyclip "
        "pseudo-labels. The batch-size sweep (seed 0) reads the pooled share (left: flat when the scale needs "
        "no re-tuning) and the per-batch discrepancy (right), which falls with batch size even for batches drawn "
        "from the target itself (dashed). Raw numbers: methods.json, batch_size.json.",
    )


def guided_batch(
    pipe,
    adps: Mapping[str, AttributeDistributionPredictor],
    evaluator: AttributeClassifier,
    *,
    attribute: str = "shape",
    share: float = 0.5,
    scale: float = DEFAULT_SCALES["distribution"],
    num_images: int = 16,
    seed: int = 0,
) -> dict:
    """One batch guided toward ``share`` of the attribute's first value (circle, red) and its reading.

    Returns:
        {"images": (N, 3, H, W), "observed": the evaluation CNN's distribution, "target", "class_names"}.
    """
    if attribute not in VALUES:
        raise ValueError(f"attribute must be one of {list(VALUES)}, got {attribute!r}")
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")
    first, second = VALUES[attribute]
    target = AttributeTarget(attribute, {first: share, second: 1 - share}, weight=target_weight(attribute))
    images = sample(
        pipe,
        num_images,
        config=GuidanceConfig(target, scale=scale),
        adps=adps,
        batch_size=num_images,
        generator=torch.Generator().manual_seed(seed),
        progress=False,
    )
    return {
        "images": images,
        "observed": observed_distribution(classify(evaluator, images), [attribute]),
        "target": target.probabilities([VALUES[attribute]]).numpy(),
        "class_names": VALUES[attribute],
    }


def results_markdown(rows: Sequence[Mapping]) -> str:
    """The rows of :func:`compare_methods` as a markdown table (mean ± spread over seeds)."""
    lines = [
        "| target | method | FD (eval CNN) | Frechet to target world | observed | s / batch | cost |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['method']} | {r['fd_mean']:.3f} ± {r['fd_std']:.3f} | "
            f"{r['frechet_mean']:.2f} ± {r['frechet_std']:.2f} | {r['observed']} | {r['seconds_per_batch']:.2f} | "
            f"{r['cost']:.2f}x |"
        )
    return "\n".join(lines)
