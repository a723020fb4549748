"""Distribution guidance in h-space, and the per-sample baselines.

Balancing Act (Parihar et al., CVPR 2024, arXiv 2402.18206, "Distribution Guidance"): at every sampling step the
Attribute Distribution Predictor reads the batch's h, the batch's predicted attribute distribution

    p_hat = (1/N) sum_i softmax(ADP_t(h_i) / tau)

is compared with the target p_ref by a divergence L (Pearson chi-square in the official code, KL as an
option), and h alone takes one gradient step, ``h <- h - s * dL/dh``; the decoder then turns the edited h
into the noise prediction for an ordinary scheduler step. Only the ADP's head is differentiated, so a
guided step costs about as much as an unguided one.

Symbols: p_hat ``batch_distribution``, p_ref ``AttributeTarget.probabilities``, tau ``temperature``,
s ``scale`` times each target's ``weight``, L ``distribution_loss``.

Beyond the official code:
- targets need not be uniform, and a target may be *joint* over several attributes (per-sample outer
  product of the attributes' ADP outputs, averaged over the batch), not only marginals;
- ``scale_normalization="batch"`` multiplies the gradient by the batch size N. Since p_hat is a batch
  mean, each sample's gradient carries a factor 1/N,
  ``dL/dh_i = (1/N) sum_k 2 (p_hat_k - p_k) / p_k * dq_ik/dh_i`` (chi-square), so with the official update
  (``"none"``) a scale tuned at one batch size is too weak at a larger one and too strong at a smaller one.
  Times N, each sample's push depends on N only through p_hat, and the change of p_hat per step,
  ``(1/N) sum_i dq_i/dh_i . delta h_i``, not at all in expectation. What stays N-dependent is sampling
  noise: a batch of N is a sample of N, so its own discrepancy falls with N even when every batch is drawn
  from the target itself; the scale's independence shows in the distribution pooled over many batches;
- ``batch_groups`` splits the UNet batch into equal groups with a distribution each: 2 for a pipeline with
  classifier-free guidance, whose UNet batch is [unconditional; conditional] (the official SD code pools
  both halves into one p_hat).

Baselines (``mode``): ``"h-sample"`` pushes each sample's h toward an assigned class (assignments in the
target's proportions), ``"x0-sample"`` is universal-guidance-style image-space guidance: a differentiable
classifier on the predicted clean image x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), whose gradient
with respect to x_t shifts eps by ``scale * sqrt(1 - a_t) * grad``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from workbench.debias.adp import AttributeDistributionPredictor
from workbench.debias.hspace import hspace_edit, mid_block, timestep_value
from workbench.toyworld import ATTRIBUTES

__all__ = [
    "AttributeTarget",
    "GuidanceConfig",
    "assign_classes",
    "batch_distribution",
    "distribution_loss",
    "h_guidance",
    "x0_guidance",
]

# Targets may put zero mass on a class; the divergences divide by (or take the log of) p_ref floored here.
_TARGET_FLOOR = 1e-3


@dataclass(frozen=True)
class AttributeTarget:
    """A target distribution over one attribute, or jointly over several.

    Args:
        attributes: "shape", or ("shape", "colour") for a joint target over their value pairs. Toy-world
            attributes have their values checked here; any other name (e.g. "gender" on Stable Diffusion)
            is checked against its ADP's classes when guidance starts.
        distribution: value -> probability (``{"circle": 0.3, "square": 0.7}``; joint keys are tuples,
            ``{("circle", "red"): 0.4, ...}``; missing values get 0), or probabilities in the ADPs' value
            order (row-major over the attributes for a joint target).
        weight: this target's share of the guidance scale (separate scales for several targets).
    """

    attributes: str | tuple[str, ...]
    distribution: Mapping | Sequence[float]
    weight: float = 1.0

    def __post_init__(self) -> None:
        attributes = (self.attributes,) if isinstance(self.attributes, str) else tuple(self.attributes)
        if not attributes or len(set(attributes)) != len(attributes):
            raise ValueError(f"attributes must be one or more distinct names, got {self.attributes!r}")
        for attribute in attributes:
            if not isinstance(attribute, str) or not attribute:
                raise ValueError(f"attributes must be non-empty names, got {attribute!r}")
        object.__setattr__(self, "attributes", attributes)
        if isinstance(self.distribution, Mapping):
            distribution = {}
            for key, probability in self.distribution.items():
                key = (key,) if isinstance(key, str) else tuple(key)
                if len(key) != len(attributes):
                    raise ValueError(f"target: key {key} must name one value of each of {attributes}")
                for attribute, value in zip(attributes, key, strict=True):
                    if attribute in ATTRIBUTES and value not in ATTRIBUTES[attribute]:
                        raise ValueError(
                            f"target: unknown {attribute} value {value!r}; allowed: {list(ATTRIBUTES[attribute])}"
                        )
                distribution[key] = probability
            probabilities = list(distribution.values())
            object.__setattr__(self, "distribution", distribution)
        elif isinstance(self.distribution, str) or not isinstance(self.distribution, Sequence | np.ndarray):
            raise TypeError(f"target: distribution must be a mapping or a sequence, got {self.distribution!r}")
        else:
            probabilities = [float(p) for p in self.distribution]
            object.__setattr__(self, "distribution", tuple(probabilities))
        values = np.asarray(probabilities, dtype=np.float64)
        if values.size == 0 or not np.isfinite(values).all() or (values < 0).any():
            raise ValueError(f"target: probabilities must be finite and >= 0, got {probabilities}")
        if not math.isclose(values.sum(), 1.0, abs_tol=1e-6):
            raise ValueError(f"target: probabilities must sum to 1, got {values.sum():.6g} from {probabilities}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight}")

    def probabilities(self, values: Sequence[Sequence[str]]) -> torch.Tensor:
        """The target over the product of ``values`` (one value list per attribute), row-major, float32."""
        if len(values) != len(self.attributes):
            raise ValueError(f"values must give one value list per attribute of {self.attributes}")
        combos = list(itertools.product(*values))
        if isinstance(self.distribution, tuple):
            if len(self.distribution) != len(combos):
                raise ValueError(
                    f"target: {len(self.distribution)} probabilities for {self.attributes}, whose ADP values "
                    f"{[list(v) for v in values]} make {len(combos)} classes"
                )
            return torch.tensor(self.distribution, dtype=torch.float32)
        for key in self.distribution:
            if key not in combos:
                raise ValueError(
                    f"target: {key} is not among the ADP classes of {self.attributes}: {[list(v) for v in values]}"
                )
        return torch.tensor([float(self.distribution.get(c, 0.0)) for c in combos], dtype=torch.float32)


@dataclass(frozen=True)
class GuidanceConfig:
    """Settings of h-space guidance (``mode="distribution"`` is the paper's method).

    Args:
        targets: one :class:`AttributeTarget` or several (each attribute in at most one).
        mode: "distribution" (the paper), "h-sample" or "x0-sample" (the per-sample baselines).
        scale: s, the step size on h (x_t for "x0-sample"); tuned on the toy model at batch 64.
        loss: the divergence between p_hat and p_ref.
        temperature: tau; the official code divides the ADP's logits by 8.
        scale_normalization: "batch" (gradient times the batch size; independent of N) or "none" (official).
        batch_groups: the UNet batch holds this many equal groups, each guided on its own (2 under
            classifier-free guidance).
        window: guidance runs at timesteps t with ``window[0] <= t <= window[1]`` (the official code's
            ``timestep_list``; its default covers every step).
    """

    targets: AttributeTarget | tuple[AttributeTarget, ...]
    mode: Literal["distribution", "h-sample", "x0-sample"] = "distribution"
    scale: float = 1.0
    loss: Literal["chi2", "kl"] = "chi2"  # official unconditional code: Pearson chi-square
    temperature: float = 8.0  # official code: logits / 8
    scale_normalization: Literal["batch", "none"] = "batch"
    batch_groups: int = 1
    window: tuple[int, int] = (0, 999)

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, AttributeTarget) else tuple(self.targets)
        if not targets or not all(isinstance(t, AttributeTarget) for t in targets):
            raise TypeError(f"targets must be one or more AttributeTarget, got {self.targets!r}")
        named = [a for t in targets for a in t.attributes]
        if len(set(named)) != len(named):
            raise ValueError(f"targets: each attribute may appear in one target only, got {named}")
        object.__setattr__(self, "targets", targets)
        if self.mode not in ("distribution", "h-sample", "x0-sample"):
            raise ValueError(f"mode must be 'distribution', 'h-sample' or 'x0-sample', got {self.mode!r}")
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"scale must be a finite number >= 0, got {self.scale}")
        if self.loss not in ("chi2", "kl"):
            raise ValueError(f"loss must be 'chi2' or 'kl', got {self.loss!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.scale_normalization not in ("batch", "none"):
            raise ValueError(f"scale_normalization must be 'batch' or 'none', got {self.scale_normalization!r}")
        if not isinstance(self.batch_groups, int) or self.batch_groups < 1:
            raise ValueError(f"batch_groups must be a positive integer, got {self.batch_groups!r}")
        if len(self.window) != 2 or not 0 <= self.window[0] <= self.window[1]:
            raise ValueError(f"window must be (low, high) timesteps with 0 <= low <= high, got {self.window!r}")
        object.__setattr__(self, "window", (int(self.window[0]), int(self.window[1])))

    def active(self, timestep: int) -> bool:
        """Whether guidance runs at ``timestep`` (a non-zero scale and ``timestep`` inside the window)."""
        return self.scale > 0 and self.window[0] <= timestep <= self.window[1]

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(a for t in self.targets for a in t.attributes)


def batch_distribution(probabilities: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample joint over several attributes (outer product of each sample's (B, K_a) rows): (B, prod K_a).

    The batch's joint distribution is its mean over B; with one attribute this is the input itself.
    """
    joint = probabilities[0]
    for p in probabilities[1:]:
        joint = (joint[:, :, None] * p[:, None, :]).flatten(1)
    return joint


def distribution_loss(p_hat: torch.Tensor, target: torch.Tensor, kind: Literal["chi2", "kl"] = "chi2") -> torch.Tensor:
    """Divergence of the batch distribution ``p_hat`` (K,) from ``target`` (K,).

    chi2: ``sum_k (p_hat_k - p_k)^2 / p_k`` (Pearson); kl: ``sum_k p_hat_k log(p_hat_k / p_k)``. p_k is floored at
    1e-3 so a target with zero mass on a class stays finite.
    """
    reference = target.to(p_hat).clamp_min(_TARGET_FLOOR)
    if kind == "chi2":
        return ((p_hat - target.to(p_hat)) ** 2 / reference).sum()
    if kind == "kl":
        return (p_hat * (p_hat.clamp_min(1e-12).log() - reference.log())).sum()
    raise ValueError(f"kind must be 'chi2' or 'kl', got {kind!r}")


def assign_classes(target: torch.Tensor, num_images: int, generator: torch.Generator) -> torch.Tensor:
    """Class indices (num_images,) in the target's proportions (largest remainder), in random order."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    share = target.double() * num_images
    counts = share.floor().long()
    remainder = num_images - int(counts.sum())
    if remainder:
        counts[torch.argsort(share - counts, descending=True)[:remainder]] += 1
    labels = torch.repeat_interleave(torch.arange(len(target)), counts)
    return labels[torch.randperm(num_images, generator=generator)]


def _targets_and_heads(
    config: GuidanceConfig, adps: Mapping[str, AttributeDistributionPredictor]
) -> list[tuple[float, list[AttributeDistributionPredictor], torch.Tensor]]:
    resolved = []
    for target in config.targets:
        missing = [a for a in target.attributes if a not in adps]
        if missing:
            raise ValueError(f"adps: no trained ADP for attribute(s) {missing}; available: {sorted(adps)}")
        heads = [adps[a] for a in target.attributes]
        resolved.append((target.weight, heads, target.probabilities([h.values for h in heads])))
    return resolved


def _group_size(batch: int, groups: int) -> int:
    if batch % groups:
        raise ValueError(f"batch_groups: a UNet batch of {batch} does not split into {groups} equal groups")
    return batch // groups


@contextlib.contextmanager
def h_guidance(
    unet: torch.nn.Module,
    adps: Mapping[str, AttributeDistributionPredictor],
    config: GuidanceConfig,
    *,
    assignments: Sequence[torch.Tensor] | None = None,
) -> Iterator[None]:
    """Within the context, every UNet call has its h guided (``mode`` "distribution" or "h-sample").

    Works inside any sampling run over the timesteps the ADPs were trained for: ``denoise``, a
    ``DDPMPipeline`` or a ``StableDiffusionPipeline`` call. With ``scale == 0`` the UNet is untouched.

    Args:
        unet: the UNet the ADPs were trained on (``UNet2DModel`` or ``UNet2DConditionModel``).
        adps: attribute -> its trained predictor.
        config: targets and settings.
        assignments: "h-sample" only: per target, the class index (into the target's classes) of each
            image of a group (from :func:`assign_classes`); the same in every group.
    """
    if config.mode not in ("distribution", "h-sample"):
        raise ValueError(f"config.mode must be 'distribution' or 'h-sample' for h_guidance, got {config.mode!r}")
    mid_block(unet)
    resolved = _targets_and_heads(config, adps)
    if config.mode == "h-sample" and (assignments is None or len(assignments) != len(resolved)):
        raise ValueError("assignments: 'h-sample' needs one class-index tensor per target (see assign_classes)")

    def edit(h: torch.Tensor, timestep: int) -> torch.Tensor | None:
        if not config.active(timestep):
            return None
        size = _group_size(len(h), config.batch_groups)
        if config.mode == "distribution" and size < 2:
            raise ValueError("batch size must be >= 2 for distribution guidance (a batch of one has no distribution)")
        with torch.enable_grad():
            x = h.detach().float().requires_grad_(True)
            total = x.new_zeros(())
            for index, (weight, heads, target) in enumerate(resolved):
                probs = [(head(x, timestep).float() / config.temperature).softmax(-1) for head in heads]
                joint = batch_distribution(probs).view(config.batch_groups, size, -1)
                if config.mode == "distribution":
                    loss = sum(distribution_loss(group.mean(0), target, config.loss) for group in joint)
                    if config.scale_normalization == "batch":
                        loss = loss * size
                else:
                    labels = torch.as_tensor(assignments[index], dtype=torch.long)
                    if labels.shape != (size,):
                        raise ValueError(f"assignments[{index}] must have {size} entries, got {tuple(labels.shape)}")
                    picked = joint.gather(2, labels.expand(config.batch_groups, size)[..., None])
                    loss = -picked.clamp_min(1e-12).log().sum()
                total = total + weight * loss
            (grad,) = torch.autograd.grad(total, x)
        return (x - config.scale * grad).detach()

    with hspace_edit(unet, edit):
        yield


# classifier(images in [0, 1], (B, 3, H, W)) -> attribute -> log-probabilities (B, K), differentiable.
ImageClassifier = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


@dataclass
class _Call:
    sample: torch.Tensor | None = None
    timestep: int = 0


@contextlib.contextmanager
def x0_guidance(
    unet: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    classifier: ImageClassifier,
    values: Mapping[str, Sequence[str]],
    config: GuidanceConfig,
    *,
    assignments: Sequence[torch.Tensor],
) -> Iterator[None]:
    """Image-space per-sample guidance on the predicted x0 (the "x0-sample" baseline), for pixel-space UNets.

    The UNet's output eps is replaced by ``eps + scale * sqrt(1 - a_t) * d/dx_t [-sum log p(assigned | x0_hat)]``
    with eps held constant in x0_hat (as the official baseline). The UNet's input must be x_t itself
    (DDPM, DDIM, DPM-Solver, UniPC: schedulers whose ``scale_model_input`` is the identity).

    Args:
        alphas_cumprod: the scheduler's a_t (``scheduler.alphas_cumprod``).
        classifier: differentiable log-probabilities per attribute of images in [0, 1].
        values: attribute -> the classifier's class names (to resolve the targets).
        assignments: per target, the class index of each image in a group.
    """
    if config.mode != "x0-sample":
        raise ValueError(f"config.mode must be 'x0-sample' for x0_guidance, got {config.mode!r}")
    resolved = []
    for target, labels in zip(config.targets, assignments, strict=True):
        missing = [a for a in target.attributes if a not in values]
        if missing:
            raise ValueError(f"values: the classifier has no attribute(s) {missing}; it has {sorted(values)}")
        resolved.append((target, target.probabilities([values[a] for a in target.attributes]), labels))
    alphas = alphas_cumprod.double()
    call = _Call()

    def read_input(module, args, kwargs):
        call.sample = kwargs["sample"] if "sample" in kwargs else args[0]
        call.timestep = timestep_value(kwargs["timestep"] if "timestep" in kwargs else args[1])

    def guide(module, args, kwargs, output):
        if not config.active(call.timestep):
            return None
        eps = output[0] if isinstance(output, tuple) else output.sample
        a = alphas[call.timestep].to(eps.device)
        size = _group_size(len(eps), config.batch_groups)
        with torch.enable_grad():
            x = call.sample.detach().double().requires_grad_(True)
            x0 = (x - (1 - a).sqrt() * eps.detach().double()) / a.sqrt()
            log_probs = classifier(((x0.float() + 1) / 2).clamp(0, 1))
            total = x.new_zeros(())
            for target, _, labels in resolved:
                joint = batch_distribution([log_probs[a].exp() for a in target.attributes]).view(
                    config.batch_groups, size, -1
                )
                picked = joint.gather(2, torch.as_tensor(labels).expand(config.batch_groups, size)[..., None])
                total = total - target.weight * picked.clamp_min(1e-12).log().sum()
            (grad,) = torch.autograd.grad(total, x)
        guided = (eps.double() + config.scale * (1 - a).sqrt() * grad).to(eps.dtype)
        if isinstance(output, tuple):
            return (guided, *output[1:])
        return type(output)(sample=guided)

    handles = [
        unet.register_forward_pre_hook(read_input, with_kwargs=True),
        unet.register_forward_hook(guide, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
