"""Balancing Act: distribution guidance in h-space (paper 3).

Parihar, Bhat, Basu, Mallick, Kundu, Babu, "Balancing Act: Distribution-Guided Debiasing in Diffusion
Models", CVPR 2024, arXiv 2402.18206.

The idea. A diffusion model trained on biased data reproduces the bias. Guiding each sample toward a
class fixes every image's attribute in advance; the paper instead guides the *batch* toward a target
distribution. The UNet's bottleneck features h (the ``mid_block`` output, "h-space") carry the attributes
early in sampling, so a small per-timestep classifier on h, the Attribute Distribution Predictor (ADP),
predicts each sample's attribute; the batch mean of its probabilities estimates the batch's attribute
distribution p_hat. At each step h takes one gradient step that lowers a divergence between p_hat and
the target p_ref (Pearson chi-square in the official code), and the decoder continues from the edited h:

    h_t <- h_t - s * grad_h L(p_hat(h_t), p_ref),   p_hat = (1/N) sum_i softmax(ADP_t(h_t^i) / tau).

Only the small ADP head is differentiated: no backpropagation through the UNet.

Symbols and code names: h ``mid_block`` output (:mod:`~workbench.debias.hspace`); ADP_t
:class:`AttributeDistributionPredictor` (one head per step); p_hat :func:`batch_distribution` (batch
mean); L :func:`distribution_loss`; s ``GuidanceConfig.scale`` (times ``AttributeTarget.weight``);
tau ``GuidanceConfig.temperature``.

Layers: :mod:`.hspace` (hooks), :mod:`.adp` (heads, data collection, training), :mod:`.guidance` (the
method and the per-sample baselines), :mod:`.experiment` (the toy-world runner, measurements and the
reproduction section). The evaluation CNN on true labels is shared plumbing
(:mod:`workbench.attribute_classifier`), re-exported here.
"""

from workbench.attribute_classifier import AttributeClassifier, classify, train_attribute_classifier
from workbench.debias.adp import (
    HEADS,
    ADPTrainConfig,
    AttributeDistributionPredictor,
    check_compatible,
    collect_generated,
    collect_inverted,
    per_step_accuracy,
    train_adp,
    train_prompt_adp,
    unet_fingerprint,
)
from workbench.debias.guidance import (
    AttributeTarget,
    GuidanceConfig,
    assign_classes,
    batch_distribution,
    distribution_loss,
    h_guidance,
    x0_guidance,
)
from workbench.debias.hspace import HSpaceRecord, hspace_edit, mid_block, record_hspace

__all__ = [
    "HEADS",
    "ADPTrainConfig",
    "AttributeClassifier",
    "AttributeDistributionPredictor",
    "AttributeTarget",
    "GuidanceConfig",
    "HSpaceRecord",
    "assign_classes",
    "batch_distribution",
    "check_compatible",
    "classify",
    "collect_generated",
    "collect_inverted",
    "distribution_loss",
    "h_guidance",
    "hspace_edit",
    "mid_block",
    "per_step_accuracy",
    "record_hspace",
    "train_adp",
    "train_attribute_classifier",
    "train_prompt_adp",
    "unet_fingerprint",
    "x0_guidance",
]
