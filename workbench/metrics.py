"""Metrics shared by the papers' experiments.

- :func:`frechet_distance`: Frechet distance between Gaussians fitted to two feature sets (the FID
  formula, Heusel et al. 2017, eq. 6), here in the toy CLIP's image-feature space (:func:`clip_features`)
  instead of Inception's, so it runs offline.
- :func:`fairness_discrepancy`: L2 distance between a target attribute distribution and the one a
  classifier predicts for a batch (Balancing Act, Parihar et al., CVPR 2024, arXiv 2402.18206, section 5).
- :func:`psnr`: peak signal-to-noise ratio in dB.
- :func:`brightness_statistics`: mean brightness per image and its spread (SingDiffusion's "average
  brightness" problem).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import linalg, stats

__all__ = [
    "brightness_statistics",
    "clip_features",
    "fairness_discrepancy",
    "frechet_distance",
    "mean_interval",
    "psnr",
]


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between two (N, D) feature sets."""
    a = np.asarray(torch.as_tensor(features_a).double().cpu())
    b = np.asarray(torch.as_tensor(features_b).double().cpu())
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"features need at least 2 rows each, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product: regularise, as the reference FID code does
        offset = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


@torch.no_grad()
def clip_features(model, images: np.ndarray | torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Un-normalised toy-CLIP image embeddings (N, D) of float images (N, 3, H, W) in [0, 1]."""
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    return torch.cat([model.encode_image(chunk, normalize=False).float() for chunk in images.split(batch_size)])


def fairness_discrepancy(target: Sequence[float] | np.ndarray, predicted_labels: Sequence[int] | np.ndarray) -> float:
    """``|| p_target - p_batch ||_2`` where ``p_batch`` is the label histogram of the batch.

    Args:
        target: a distribution over K classes (non-negative, sums to 1).
        predicted_labels: (N,) class indices in [0, K).
    """
    target = np.asarray(target, dtype=np.float64)
    if target.ndim != 1 or (target < 0).any() or not np.isclose(target.sum(), 1.0):
        raise ValueError(f"target must be a 1-D distribution that sums to 1, got {target}")
    labels = np.asarray(predicted_labels, dtype=np.int64)
    if labels.size == 0 or labels.min() < 0 or labels.max() >= len(target):
        raise ValueError(f"predicted_labels must be non-empty class indices in [0, {len(target)})")
    observed = np.bincount(labels, minlength=len(target)) / labels.size
    return float(np.linalg.norm(target - observed))


def psnr(images: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, *, data_range: float = 1.0) -> float:
    """``10 log10(data_range^2 / MSE)`` over all pixels, in dB (inf when identical)."""
    a = torch.as_tensor(images, dtype=torch.float64)
    b = torch.as_tensor(reference, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"images and reference must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    mse = torch.mean((a - b) ** 2).item()
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def brightness_statistics(images: np.ndarray | torch.Tensor) -> dict[str, float | np.ndarray]:
    """Per-image mean brightness of (N, C, H, W) images in [0, 1], and its summary.

    Returns:
        ``{"per_image": (N,), "mean", "std", "min", "max"}``: SingDiffusion's effect is a wider range.
    """
    x = np.asarray(torch.as_tensor(images, dtype=torch.float64))
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {x.shape}")
    per_image = x.mean(axis=(1, 2, 3))
    return {
        "per_image": per_image,
        "mean": float(per_image.mean()),
        "std": float(per_image.std()),
        "min": float(per_image.min()),
        "max": float(per_image.max()),
    }


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its Student-t confidence interval (0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("values must not be empty")
    if values.size == 1:
        return float(values[0]), 0.0
    half = stats.t.ppf(0.5 + confidence / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
    return float(values.mean()), float(half)
