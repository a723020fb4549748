"""Balancing Act (paper 3): h-space hooks, ADP training, distribution guidance, baselines and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from workbench.debias import (
    HEADS,
    ADPTrainConfig,
    AttributeDistributionPredictor,
    AttributeTarget,
    GuidanceConfig,
    assign_classes,
    batch_distribution,
    check_compatible,
    classify,
    collect_inverted,
    distribution_loss,
    h_guidance,
    hspace_edit,
    per_step_accuracy,
    record_hspace,
    train_adp,
    train_prompt_adp,
    unet_fingerprint,
)
from workbench.sampling import denoise, initial_noise
from workbench.testing import SD_SCHEDULE, tiny_unet2d


def _scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**SD_SCHEDULE)


def _run(unet, scheduler, *, seed: int = 0, batch: int = 4, steps: int = 4) -> torch.Tensor:
    noise = initial_noise((batch, 3, 32, 32), torch.Generator().manual_seed(seed))
    return denoise(unet, scheduler, noise, num_inference_steps=steps, progress=False)


def _toy_adp(
    unet, timesteps, *, attribute="shape", values=("circle", "square"), scheduler_class="DPMSolverMultistepScheduler"
):
    """An untrained (random) ADP wired to ``unet``: enough to exercise the guidance code path."""
    with torch.no_grad(), record_hspace(unet) as record:
        unet(torch.zeros(1, 3, 32, 32), timesteps[0])
    h_shape = list(record.h[0].shape[1:])
    adp = AttributeDistributionPredictor(
        attribute=attribute,
        values=list(values),
        h_shape=h_shape,
        timesteps=[int(t) for t in timesteps],
        unet_fingerprint=unet_fingerprint(unet),
        scheduler_class=scheduler_class,
        num_inference_steps=len(timesteps),
    )
    return adp.eval()


# ----------------------------------------------------------------------------------------------- hooks


def test_edit_that_returns_none_is_bit_identical_and_hooks_are_removed():
    unet, scheduler = tiny_unet2d(), _scheduler()
    plain = _run(unet, scheduler)
    seen = []
    with hspace_edit(unet, lambda h, t: seen.append((t, tuple(h.shape)))):
        hooked = _run(unet, scheduler)
    assert torch.equal(plain, hooked)
    assert [t for t, _ in seen] == scheduler.timesteps.tolist()
    assert not unet._forward_pre_hooks and not unet.mid_block._forward_hooks
    assert torch.equal(_run(unet, scheduler), plain)


def test_modifying_h_changes_the_output():
    unet, scheduler = tiny_unet2d(), _scheduler()
    plain = _run(unet, scheduler)
    with hspace_edit(unet, lambda h, t: h + 1.0):
        edited = _run(unet, scheduler)
    assert not torch.allclose(plain, edited)


def test_record_keeps_h_per_step_without_changing_the_run():
    unet, scheduler = tiny_unet2d(), _scheduler()
    plain = _run(unet, scheduler, batch=3, steps=5)
    with record_hspace(unet) as record:
        recorded = _run(unet, scheduler, batch=3, steps=5)
    assert torch.equal(plain, recorded)
    stacked = record.stacked()
    assert stacked.shape[:2] == (3, 5) and len(record.timesteps) == 5


def test_guidance_with_scale_zero_is_bit_identical():
    unet, scheduler = tiny_unet2d(), _scheduler()
    plain = _run(unet, scheduler)
    adp = _toy_adp(unet, scheduler.timesteps.tolist())
    config = GuidanceConfig(AttributeTarget("shape", {"circle": 0.5, "square": 0.5}), scale=0.0)
    with h_guidance(unet, {"shape": adp}, config):
        guided = _run(unet, scheduler)
    assert torch.equal(plain, guided)
    config = GuidanceConfig(AttributeTarget("shape", {"circle": 0.5, "square": 0.5}), scale=50.0)
    with h_guidance(unet, {"shape": adp}, config):
        guided = _run(unet, scheduler)
    assert not torch.equal(plain, guided)


def test_guidance_outside_its_window_is_bit_identical():
    unet, scheduler = tiny_unet2d(), _scheduler()
    plain = _run(unet, scheduler)
    adp = _toy_adp(unet, scheduler.timesteps.tolist())
    target = AttributeTarget("shape", [0.5, 0.5])
    with h_guidance(unet, {"shape": adp}, GuidanceConfig(target, scale=50.0, window=(0, 10))):
        assert torch.equal(_run(unet, scheduler), plain)  # 4 steps: 999 ... 250, none <= 10
    with h_guidance(unet, {"shape": adp}, GuidanceConfig(target, scale=50.0, window=(900, 999))):
        assert not torch.equal(_run(unet, scheduler), plain)


def test_tiny_stable_diffusion_pipeline_path(tiny_sd_pipeline):
    """h-space of UNet2DConditionModel inside an ordinary pipeline call, both CFG halves guided on their own."""
    pipe = tiny_sd_pipeline
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, height=32, width=32, output_type="np")

    def call(**extra):
        return pipe(["a red circle"] * 2, generator=torch.Generator().manual_seed(0), **kwargs, **extra).images

    with record_hspace(pipe.unet) as record:
        plain = call()
    assert len(record.h) == 3 and record.h[0].shape[0] == 4  # [unconditional; conditional] x 2 images
    adp, _ = train_prompt_adp(
        pipe,
        "colour",
        {"red": "a red circle", "blue": "a blue circle"},
        num_images_per_class=4,
        num_inference_steps=3,
        guidance_scale=4.0,
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        height=32,
        width=32,
        output_type="latent",
        progress=False,
    )
    assert adp.config.timesteps == record.timesteps and adp.values == ("red", "blue")
    target = AttributeTarget("colour", [0.9, 0.1])
    with h_guidance(pipe.unet, {"colour": adp}, GuidanceConfig(target, scale=0.0, batch_groups=2)):
        assert np.array_equal(call(), plain)
    with h_guidance(pipe.unet, {"colour": adp}, GuidanceConfig(target, scale=100.0, batch_groups=2)):
        guided = call()
    assert guided.shape == plain.shape and not np.allclose(guided, plain)
    with (
        h_guidance(pipe.unet, {"colour": adp}, GuidanceConfig(target, scale=1.0, batch_groups=3)),
        pytest.raises(ValueError, match="batch_groups"),
    ):
        call()


# ------------------------------------------------------------------------------------------------ math


def test_batch_distribution_is_the_per_sample_outer_product():
    shape = torch.tensor([[1.0, 0.0], [0.2, 0.8]])
    colour = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    joint = batch_distribution([shape, colour])
    assert torch.allclose(joint, torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.2, 0.0, 0.8]]))
    assert torch.allclose(joint.sum(1), torch.ones(2))


@pytest.mark.parametrize("kind", ["chi2", "kl"])
def test_distribution_loss_is_zero_at_the_target_and_positive_elsewhere(kind):
    target = torch.tensor([0.3, 0.7])
    assert distribution_loss(target, target, kind).item() == pytest.approx(0.0, abs=1e-7)
    assert distribution_loss(torch.tensor([0.8, 0.2]), target, kind).item() > 0.1


def test_assign_classes_meets_the_proportions_exactly():
    labels = assign_classes(torch.tensor([0.3, 0.7]), 10, torch.Generator().manual_seed(0))
    assert sorted(labels.tolist()) == [0] * 3 + [1] * 7
    odd = assign_classes(torch.tensor([0.25, 0.25, 0.5]), 7, torch.Generator().manual_seed(1))
    assert np.bincount(odd.numpy(), minlength=3).tolist() == [2, 2, 3]  # 1.75, 1.75, 3.5: largest remainders first


# ------------------------------------------------------------------------------------------------- ADP


@pytest.fixture(scope="module")
def inverted_colour_set():
    """256 labelled real images DDIM-inverted through the zoo model's 4-step schedule."""
    from workbench import zoo
    from workbench.toyworld import ToyWorld

    pipe = zoo.load("toy-uncond")
    batch = ToyWorld(bias={"colour": {"red": 0.5, "blue": 0.5}}).sample(256, np.random.default_rng(0))
    labels = torch.tensor([("red", "blue").index(v) for v in batch.values("colour")])
    h, timesteps = collect_inverted(pipe.unet, pipe.scheduler, batch.images, num_inference_steps=4, progress=False)
    assert h.shape[:2] == (256, 4) and timesteps == pipe.scheduler.timesteps.tolist()
    return pipe, h, labels, timesteps


@pytest.mark.parametrize("head", HEADS)
def test_adp_learns_above_chance_on_a_small_set(inverted_colour_set, head, tmp_path):
    pipe, h, labels, timesteps = inverted_colour_set
    adp, held_out = train_adp(
        h,
        labels,
        attribute="colour",
        values=("red", "blue"),
        timesteps=timesteps,
        unet_fingerprint=unet_fingerprint(pipe.unet),
        scheduler_class=type(pipe.scheduler).__name__,
        generator=torch.Generator().manual_seed(0),
        config=ADPTrainConfig(head=head),
        progress=False,
    )
    accuracy = per_step_accuracy(adp, h[held_out], labels[held_out])
    assert accuracy.shape == (4,)
    assert accuracy[-1] > 0.75  # chance is 0.5
    adp.save_pretrained(tmp_path / "adp", safe_serialization=True)
    loaded = AttributeDistributionPredictor.from_pretrained(tmp_path / "adp", use_safetensors=True)
    assert np.array_equal(per_step_accuracy(loaded, h[held_out], labels[held_out]), accuracy)


def test_distribution_guidance_lowers_the_discrepancy_with_the_shipped_heads():
    """Seeded, 32 images in one batch, read by the evaluation CNN (never seen by guidance)."""
    from workbench import zoo
    from workbench.debias.experiment import default_config, load_adps, load_classifier, sample
    from workbench.metrics import fairness_discrepancy

    pipe, adps, evaluator = zoo.load("toy-uncond"), load_adps(), load_classifier()
    target = AttributeTarget("colour", {"red": 0.3, "blue": 0.7})
    discrepancy = {}
    for name, config in (("unguided", None), ("guided", default_config(target))):
        images = sample(
            pipe,
            32,
            config=config,
            adps=adps,
            batch_size=32,
            generator=torch.Generator().manual_seed(0),
            progress=False,
        )
        discrepancy[name] = fairness_discrepancy([0.3, 0.7], classify(evaluator, images)["colour"])
    assert discrepancy["guided"] < discrepancy["unguided"] - 0.1, discrepancy


def test_fingerprint_tells_unets_apart_and_survives_fp16_round_trip():
    unet = tiny_unet2d()
    assert unet_fingerprint(unet) == unet_fingerprint(unet.half().float())
    assert unet_fingerprint(tiny_unet2d()) != unet_fingerprint(tiny_unet2d(seed=1))


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(attributes="shape", distribution={"circle": 0.6, "square": 0.6}), "sum to 1"),
        (dict(attributes="shape", distribution={"hexagon": 1.0}), "unknown shape value 'hexagon'"),
        (dict(attributes="", distribution=[0.5, 0.5]), "non-empty names"),
        (dict(attributes="shape", distribution=[1.5, -0.5]), ">= 0"),
        (dict(attributes=("shape", "colour"), distribution={"circle": 1.0}), "one value of each"),
    ],
)
def test_bad_targets_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttributeTarget(**kwargs)


def test_target_of_wrong_length_or_values_the_adp_lacks_is_refused():
    with pytest.raises(ValueError, match="3 probabilities"):
        AttributeTarget("shape", [0.2, 0.3, 0.5]).probabilities([("circle", "square")])
    with pytest.raises(ValueError, match="not among the ADP classes"):
        AttributeTarget("shape", {"triangle": 1.0}).probabilities([("circle", "square")])


def test_bad_config_fields_are_named():
    target = AttributeTarget("shape", [0.5, 0.5])
    for field, value in [
        ("mode", "both"),
        ("loss", "l2"),
        ("scale", -1.0),
        ("temperature", 0.0),
        ("batch_groups", 0),
        ("window", (500, 100)),
    ]:
        with pytest.raises(ValueError, match=field):
            GuidanceConfig(target, **{field: value})
    with pytest.raises(ValueError, match="one target only"):
        GuidanceConfig((target, AttributeTarget(("shape", "colour"), [0.25] * 4)))


def test_missing_adp_mismatched_heads_batch_of_one_and_no_mid_block():
    unet, scheduler = tiny_unet2d(), _scheduler()
    scheduler.set_timesteps(4)
    adp = _toy_adp(unet, scheduler.timesteps.tolist())
    target = AttributeTarget("colour", [0.5, 0.5])
    with (
        pytest.raises(ValueError, match="no trained ADP for attribute"),
        h_guidance(unet, {"shape": adp}, GuidanceConfig(target)),
    ):
        pass
    with pytest.raises(ValueError, match="trained for UNet"):
        check_compatible([adp], tiny_unet2d(seed=3))
    with pytest.raises(ValueError, match="num_inference_steps"):
        check_compatible([adp], unet, scheduler, num_inference_steps=8)
    with pytest.raises(ValueError, match="DDPMScheduler"):
        check_compatible([adp], unet, DDPMScheduler(**SD_SCHEDULE))
    shape_target = GuidanceConfig(AttributeTarget("shape", [0.5, 0.5]))
    with h_guidance(unet, {"shape": adp}, shape_target), pytest.raises(ValueError, match="trained for"):
        _run(unet, scheduler, steps=6)  # another schedule: a timestep without a head
    with h_guidance(unet, {"shape": adp}, shape_target), pytest.raises(ValueError, match="batch size must be >= 2"):
        _run(unet, scheduler, batch=1)
    flat = UNet2DModel(
        sample_size=16,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        mid_block_type=None,
    )
    with pytest.raises(TypeError, match="no mid_block"), hspace_edit(flat, lambda h, t: None):
        pass


# --------------------------------------------------------------------------------------------------- plots


def test_plots_return_figures_and_refuse_mismatched_data():
    import matplotlib.pyplot as plt

    from workbench.plots.debias import adp_accuracy_figure, batch_size_figure, distribution_bars_figure

    figure = distribution_bars_figure({"unguided": [0.8, 0.2], "target": [0.5, 0.5]}, ["circle", "square"])
    assert figure.axes
    with pytest.raises(ValueError, match="3 entries for 2 classes"):
        distribution_bars_figure({"unguided": [0.8, 0.1, 0.1]}, ["circle", "square"])
    assert len(batch_size_figure(_fake_sweep()).axes) == 2
    with pytest.raises(ValueError, match="curves"):
        batch_size_figure(_fake_sweep() | {"curves": {}})
    assert adp_accuracy_figure({"shape": {"pseudo": [0.5, 0.7, 0.9]}}, [999, 500, 1]).axes
    plt.close("all")


def _fake_sweep(shares=None) -> dict:
    """A batch_size_sweep result with the given pooled shares of the first class per setting and batch size."""
    shares = shares or {"unguided": {4: 0.7, 16: 0.7}, "batch": {4: 0.32, 16: 0.3}, "none": {4: 0.1, 16: 0.3}}
    point = lambda share: {  # noqa: E731
        "share": [share, 1 - share],
        "share_se": 0.02,
        "pooled_fd": abs(share - 0.3) * 2**0.5,
        "batch_fd": 0.1,
        "batch_fd_std": 0.05,
    }
    return {
        "target": [0.3, 0.7],
        "class_names": ["red", "blue"],
        "num_images": 512,
        "scale": 1.0,
        "reference_batch_size": 16,
        "iid_batch_fd": {4: 0.3, 16: 0.15},
        "curves": {name: {size: point(v) for size, v in points.items()} for name, points in shares.items()},
    }


def test_flatness_reads_the_range_of_the_pooled_share_against_its_sampling_error():
    from workbench.debias.experiment import flatness

    summary = flatness(_fake_sweep())
    assert summary["batch"]["range"] == pytest.approx(0.02)
    assert summary["none"]["range"] == pytest.approx(0.2)
    assert summary["batch"]["two_se"] == pytest.approx(0.04)
    assert summary["batch"]["range"] <= summary["batch"]["two_se"] < summary["none"]["range"]


@pytest.mark.parametrize("normalization", ["batch", "none"])
def test_batch_normalisation_makes_each_samples_push_independent_of_batch_size(normalization):
    """A batch of N copies of one image: p_hat equals each sample's prediction at every N, so only the 1/N of
    the batch mean differs. With "batch" each sample's edit of h is the same at N = 2 and 8; without, 4x."""
    unet, scheduler = tiny_unet2d(), _scheduler()
    scheduler.set_timesteps(4)
    timestep = int(scheduler.timesteps[1])
    adp = _toy_adp(unet, scheduler.timesteps.tolist())
    config = GuidanceConfig(AttributeTarget("shape", [0.9, 0.1]), scale=50.0, scale_normalization=normalization)
    image = initial_noise((1, 3, 32, 32), torch.Generator().manual_seed(0))
    edits = {}
    for size in (2, 8):
        batch = image.expand(size, -1, -1, -1)
        with torch.no_grad(), record_hspace(unet, dtype=torch.float32) as plain:
            unet(batch, timestep)
        with (
            torch.no_grad(),
            h_guidance(unet, {"shape": adp}, config),
            record_hspace(unet, dtype=torch.float32) as edited,
        ):
            unet(batch, timestep)
        edits[size] = (edited.h[0] - plain.h[0])[0]
    assert edits[2].abs().max() > 0
    ratio = 1.0 if normalization == "batch" else 4.0
    torch.testing.assert_close(edits[2], ratio * edits[8], rtol=1e-3, atol=1e-6)


def test_target_weight_and_tuning_refuse_bad_input():
    from workbench.debias.experiment import TARGET_WEIGHTS, batch_size_sweep, target_weight, tune_weights

    assert target_weight("shape") == TARGET_WEIGHTS["distribution"][("shape",)]
    assert target_weight(("shape", "colour"), "x0-sample") == TARGET_WEIGHTS["x0-sample"][("shape", "colour")]
    with pytest.raises(ValueError, match="no tuned weight"):
        target_weight("gender")
    with pytest.raises(ValueError, match="mode must be one of"):
        target_weight("shape", "pixel")
    with pytest.raises(ValueError, match="weights must be finite"):
        tune_weights(weights=(1.0, -2.0))
    with pytest.raises(ValueError, match="held-out seeds"):
        tune_weights(seeds=(100, 1))
    with pytest.raises(ValueError, match="mode must be one of"):
        tune_weights("pixel")
    with pytest.raises(ValueError, match="divide num_images"):
        batch_size_sweep(batch_sizes=(4, 6), num_images=16)
