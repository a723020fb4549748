"""TiF learner: few-shot classification by diffusion time steps, and the Diffusion Classifier it builds on.

Papers:
    Z. Yue, P. Zhou, R. Hong, H. Zhang, Q. Sun, "Few-shot Learner Parameterization by Diffusion Time-steps",
    CVPR 2024, arXiv:2403.02649 (TiF).
    A. C. Li, M. Prabhudesai, S. Duggal, E. Brown, D. Pathak, "Your Diffusion Model is Secretly a Zero-Shot
    Classifier", ICCV 2023, arXiv:2303.16203 (Diffusion Classifier, DC).

The idea. The forward process erases a small, low-contrast detail (the class's nuanced attribute) at a
smaller noise level than a large, salient one (a background, a colour). Fit one low-rank adapter per class
so that the text-conditioned model, given one prompt shared by all classes, reconstructs that class's few
shots. At small t the salient attributes are still visible in x_t, so an adapter can only help by
supplying the nuanced ones; at large t it mostly helps by guessing the salient ones, which in a few shots
are often spuriously tied to the label. So classify a test image x_0 by the class whose adapter predicts
the noise best, weighting the errors toward small t:

    x_t          = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_t
    score_c(x_0) = mean_{t in grid} w_t || eps_t - eps_theta,c(x_t, t, prompt) ||^2
    prediction   = argmin_c score_c(x_0)

with the same eps_t for every class (a paired comparison, from DC) and TiF's weight

    P(d, t) = erfc(sqrt(abar_t) d / (2 sqrt(2) sqrt(1 - abar_t)))      (two images at distance d confusable)
    w_t     = P(d, t) / (P(d, t) + sum_{j=0}^{499} P(d + 1 + j, t))

where d is the distance between the closest training images of different classes. DC is the same rule
with w_t = 1, class prompts instead of adapters, and no training; its adaptive pruning scores all classes
on a coarse grid, keeps the best few, and refines only those.

Symbols -> code: abar_t -> ``scheduler.alphas_cumprod``; w_t -> :func:`tif_weights` /
:func:`timestep_weights`; d -> :func:`class_distance`; eps_theta,c -> the UNet with adapter ``c`` active
(:func:`workbench.adapters.use_adapter`); the grid and pruning -> :class:`ClassifyConfig`; score_c ->
:attr:`ClassificationResult.scores`.

Modules: :mod:`.classify` (weights, errors, pruning), :mod:`.learner` (adapters), :mod:`.task` (the toy
few-shot task), :mod:`.experiment` (accuracy and cost against baselines, the reproduction section).
"""

from workbench.tif.classify import (
    ClassCondition,
    ClassificationResult,
    ClassifyConfig,
    class_distance,
    classify,
    grid_indices,
    noise_prediction_errors,
    select_classes,
    simulate_pruning,
    tif_weights,
    timestep_grid,
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
from workbench.tif.task import CUSTOM_TOKENS, MarkTask

__all__ = [
    "CUSTOM_TOKENS",
    "AdapterTrainConfig",
    "ClassCondition",
    "ClassificationResult",
    "ClassifyConfig",
    "FewShotSet",
    "MarkTask",
    "class_distance",
    "classify",
    "encode_prompt_states",
    "grid_indices",
    "levels_for_shots",
    "load_class_adapters",
    "model_space",
    "noise_prediction_errors",
    "save_class_adapters",
    "select_classes",
    "simulate_pruning",
    "tif_weights",
    "timestep_grid",
    "timestep_weights",
    "train_class_adapters",
    "weight_knee",
]
