"""SADM (paper 5): the relation matrix, the game's gradients, training on UNets and a DiT, resume, bad input."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from workbench import checkpoint
from workbench.metrics import mean_interval
from workbench.sadm import (
    SADMConfig,
    StructureCritic,
    StructureGame,
    critic_loss,
    predicted_clean,
    relation_matrix,
    structure_distance,
    train_sadm,
)
from workbench.sadm.experiment import batch_structure_distance
from workbench.sadm.toy2d import (
    PointDenoiser,
    PointWorld,
    energy_distance,
    point_metrics,
    prediction_spread,
    train_points,
)
from workbench.testing import tiny_ddpm_scheduler, tiny_dit, tiny_unet2d, tiny_unet2d_condition
from workbench.toyworld import ToyWorld
from workbench.training import DiffusionStep, DiffusionTrainConfig

WORLD = ToyWorld(image_size=16)
GAME = SADMConfig(structure_weight=0.5, weight_warmup_steps=0, max_timestep=999, critic_width=4, feature_dim=4)


def _config(steps, batch_size=4):
    return DiffusionTrainConfig(
        steps=steps, batch_size=batch_size, warmup_steps=2, checkpoint_every=2, seed=3, bf16_autocast=False
    )


def test_relation_matrix_is_the_cosine_affinity_off_the_diagonal():
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[0.0, 0.0, r], [0.0, 0.0, r], [r, r, 0.0]])
    torch.testing.assert_close(relation_matrix(features), expected)
    # Scale-free: the critic cannot win by inflating its features.
    torch.testing.assert_close(relation_matrix(features * 7.0), expected)
    # Centred: the batch mean (4/3, 5/3) is removed first; a = (-1/3, -5/3), b = (-4/3, 1/3), c = (5/3, 4/3).
    ab, ac, bc = -1 / math.sqrt(26 * 17), -25 / math.sqrt(26 * 41), -16 / math.sqrt(17 * 41)
    centred = torch.tensor([[0.0, ab, ac], [ab, 0.0, bc], [ac, bc, 0.0]])
    torch.testing.assert_close(relation_matrix(features, "centred_cosine"), centred)
    # A component every sample shares moves the plain cosine, not the centred one.
    shifted = features + torch.tensor([100.0, 0.0])
    assert relation_matrix(shifted)[~torch.eye(3, dtype=torch.bool)].min() > 0.99
    torch.testing.assert_close(relation_matrix(shifted, "centred_cosine"), centred)
    with pytest.raises(ValueError, match="kind"):
        relation_matrix(features, "euclidean")


def test_structure_distance_averages_over_the_off_diagonal_pairs():
    real = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.5], [0.0, 0.5, 0.0]])
    generated = torch.zeros(3, 3)
    # (1 + 1 + 0.25 + 0.25) / (3 * 2)
    assert structure_distance(real, generated).item() == pytest.approx(2.5 / 6)
    assert structure_distance(real, real).item() == 0.0


def test_predicted_clean_inverts_the_forward_process():
    scheduler = tiny_ddpm_scheduler()
    clean, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 400, 900])
    noisy = scheduler.add_noise(clean, noise, t)
    torch.testing.assert_close(predicted_clean(scheduler, noisy, t, noise), clean, atol=1e-4, rtol=1e-4)
    v_scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    v = scheduler.get_velocity(clean, noise, t)
    torch.testing.assert_close(predicted_clean(v_scheduler, noisy, t, v), clean, atol=1e-4, rtol=1e-4)


def _step_info(unet, scheduler, step=0):
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(clean.shape, generator=generator)
    t = torch.tensor([10, 200, 500, 800])
    noisy = scheduler.add_noise(clean, noise, t)
    output = unet(noisy, t).sample
    return DiffusionStep(step, unet, clean, noise, noisy, t, output, None, None, noise)


def test_critic_loss_reaches_only_the_critic_and_structure_loss_only_the_denoiser():
    scheduler = tiny_ddpm_scheduler()
    unet = tiny_unet2d(sample_size=16)
    game = StructureGame(scheduler, (3, 16, 16), GAME, seed=0)
    info = _step_info(unet, scheduler)

    game.term(info).backward()
    assert all(p.grad is None for p in game.critic.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
    assert all(p.requires_grad for p in game.critic.parameters())  # the freeze is undone

    unet.zero_grad(set_to_none=True)
    info = _step_info(unet, scheduler)
    prediction = predicted_clean(scheduler, info.noisy, info.timesteps, info.model_output)
    critic_loss(game.critic, info.clean, prediction).backward()
    assert all(p.grad is None for p in unet.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in game.critic.parameters())


def test_the_critic_step_raises_the_distance_it_maximises():
    scheduler = tiny_ddpm_scheduler()
    unet = tiny_unet2d(sample_size=16)
    game = StructureGame(scheduler, (3, 16, 16), SADMConfig(critic_width=4, critic_learning_rate=1e-2), seed=0)
    with torch.no_grad():
        info = _step_info(unet, scheduler)
    before = game.update(info)["distance"]
    for _ in range(5):
        game.update(info)
    assert game.update(info)["distance"] > before


def test_the_time_window_keeps_only_small_t_and_needs_two_samples():
    scheduler = tiny_ddpm_scheduler()
    unet = tiny_unet2d(sample_size=16)
    game = StructureGame(scheduler, (3, 16, 16), SADMConfig(max_timestep=100, critic_width=4), seed=0)
    info = _step_info(unet, scheduler)  # only t = 10 is <= 100: no pair
    assert game.term(info).item() == 0.0
    assert game.update(info) == {"distance": 0.0}


@pytest.mark.parametrize("model", ["unet2d", "unet2d_condition", "dit"])
def test_plain_and_sadm_train_any_diffusers_denoiser(tmp_path, model):
    kwargs = {}
    if model == "unet2d":
        build = lambda: tiny_unet2d(sample_size=16)  # noqa: E731
    elif model == "unet2d_condition":
        build = lambda: tiny_unet2d_condition(sample_size=16, in_channels=3)  # noqa: E731
        kwargs["encode_prompts"] = lambda captions: torch.ones(len(captions), 4, 32)
    else:
        build = lambda: tiny_dit(sample_size=16)  # noqa: E731
        kwargs["model_kwargs"] = lambda batch: {"class_labels": torch.from_numpy(batch.labels["shape"])}
    for sadm in (None, GAME):
        logs = []
        _, critic = train_sadm(
            build().train(),
            tiny_ddpm_scheduler(),
            WORLD,
            config=_config(3),
            state_path=tmp_path / f"{sadm is None}.safetensors",
            sadm=sadm,
            callback=lambda step, values, logs=logs: logs.append(dict(values)),
            **kwargs,
        )
        assert len(logs) == 3
        assert all(math.isfinite(v) for entry in logs for v in entry.values())
        if sadm is None:
            assert critic is None and set(logs[-1]) == {"mse"}
        else:
            assert isinstance(critic, StructureCritic)
            assert set(logs[-1]) == {"mse", "structure", "critic.distance"}
            assert logs[-1]["structure"] > 0


def test_resumed_sadm_training_equals_unbroken_training(tmp_path):
    def run(steps, folder, seed=0):
        return train_sadm(
            tiny_unet2d(sample_size=16, seed=seed),
            tiny_ddpm_scheduler(),
            WORLD,
            config=_config(steps),
            state_path=tmp_path / folder / "state.safetensors",
            sadm=GAME,
        )

    unbroken, unbroken_critic = run(4, "a")
    run(2, "b")
    resumed, resumed_critic = run(4, "b", seed=99)  # a fresh process: other weights, restored from the state
    for (name, a), (_, b) in zip(unbroken.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    for (name, a), (_, b) in zip(
        unbroken_critic.state_dict().items(), resumed_critic.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_a_plain_state_does_not_resume_as_sadm(tmp_path):
    state = tmp_path / "state.safetensors"
    train_sadm(
        tiny_unet2d(sample_size=16), tiny_ddpm_scheduler(), WORLD, config=_config(2), state_path=state, sadm=None
    )
    with pytest.raises(ValueError, match="does not match"):
        train_sadm(tiny_unet2d(sample_size=16), tiny_ddpm_scheduler(), WORLD, config=_config(4), state_path=state)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("structure_weight", -0.1),
        ("structure_weight", float("nan")),
        ("structure_weight", float("inf")),
        ("critic_learning_rate", 0.0),
        ("max_timestep", -1),
        ("critic_width", 0),
        ("clip_prediction", -1.0),
        ("relation", "euclidean"),
    ],
)
def test_bad_game_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SADMConfig(**{field: value})


def test_bad_input_is_refused(tmp_path):
    state = tmp_path / "state.safetensors"
    with pytest.raises(ValueError, match="batch_size"):
        train_sadm(tiny_unet2d(sample_size=16), tiny_ddpm_scheduler(), WORLD, config=_config(2, 1), state_path=state)
    with pytest.raises(ValueError, match="B >= 2"):
        relation_matrix(torch.ones(1, 4))
    with pytest.raises(ValueError, match="same B"):
        structure_distance(torch.zeros(3, 3), torch.zeros(4, 4))
    # A denoiser whose output does not have its input's shape (4 channels out for 3 in).
    from diffusers import UNet2DModel

    mismatched = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
    )
    with pytest.raises(ValueError, match="output shape"):
        train_sadm(mismatched, tiny_ddpm_scheduler(), WORLD, config=_config(2), state_path=state)
    with pytest.raises(TypeError, match="sadm"):
        train_sadm(
            tiny_unet2d(sample_size=16), tiny_ddpm_scheduler(), WORLD, config=_config(2), state_path=state, sadm={}
        )
    assert not state.exists()


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    state = tmp_path / "state.safetensors"
    from workbench.training import train_diffusion

    def poisoned(info):
        return info.model_output.sum() * (float("nan") if info.step == 3 else 0.0)

    with pytest.raises(FloatingPointError, match="step 3"):
        train_diffusion(
            tiny_unet2d(sample_size=16),
            tiny_ddpm_scheduler(),
            WORLD,
            config=_config(6),
            state_path=state,
            extra_losses={"poison": poisoned},
        )
    assert checkpoint.read_segments(state) == [{"from_step": 0, "steps": 6}]
    from safetensors import safe_open

    with safe_open(state, framework="pt") as f:
        assert f.metadata()["step"] == "2"


# The 2-D tier.


def test_point_world_and_measures():
    world = PointWorld("ring")
    real = world.sample(800, 0).images
    other = world.sample(800, 1).images
    assert real.shape == (800, 2) and real.dtype == np.float32
    assert energy_distance(real, real) == pytest.approx(0.0, abs=1e-12)
    assert energy_distance(real, other) < energy_distance(real, other * 0.5)
    figures = point_metrics(other, real, world)
    assert figures["modes covered"] == 8.0
    assert figures["precision"] > 0.9 and figures["recall"] > 0.9
    collapsed = np.repeat(other[:1], 800, axis=0)  # every sample on one mode
    assert point_metrics(collapsed, real, world)["modes covered"] == 1.0
    for kind in ("moons", "swissroll"):
        assert PointWorld(kind).sample(5, 0).images.shape == (5, 2)
    with pytest.raises(ValueError, match="kind"):
        PointWorld("spiral")


def test_point_training_runs_plain_and_sadm_and_is_seeded():
    world = PointWorld("ring")
    game = SADMConfig(structure_weight=0.1, max_timestep=300, critic_width=8, weight_warmup_steps=0)
    first = train_points(world, sadm=game, steps=5, batch_size=16, seed=1)
    again = train_points(world, sadm=game, steps=5, batch_size=16, seed=1)
    assert [h["mse"] for h in first.history] == [h["mse"] for h in again.history]
    assert "critic.distance" in first.history[-1]
    plain = train_points(world, sadm=None, steps=5, batch_size=16, seed=1)
    assert plain.critic is None and isinstance(plain.denoiser, PointDenoiser)


def test_batch_structure_distance_is_zero_for_the_same_images_and_grows_with_a_collapse():
    class Features:  # a stand-in encoder: images -> flattened pixels
        def encode_image(self, images, normalize=False):
            return images.flatten(1)

    rng = np.random.default_rng(0)
    images = rng.random((32, 3, 4, 4)).astype(np.float32)
    assert batch_structure_distance(Features(), images, images, batch_size=8) == 0.0
    collapsed = np.repeat(images[:1], 32, axis=0)
    assert batch_structure_distance(Features(), collapsed, images, batch_size=8) > 0.05
    with pytest.raises(ValueError, match="batch_size"):
        batch_structure_distance(Features(), images, images, batch_size=1)


def test_mean_interval():
    mean, half = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1 / math.sqrt(3), rel=1e-3)
    assert mean_interval([5.0]) == (5.0, 0.0)


def test_figures_draw_and_refuse_bad_input():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from workbench.plots.sadm import (
        loss_curves_figure,
        measures_figure,
        points_figure,
        relation_heatmaps_figure,
        spread_figure,
    )

    matrix = relation_matrix(torch.randn(6, 4)).numpy()
    assert isinstance(relation_heatmaps_figure({"real": matrix, "generated": matrix * 0.5}), Figure)
    with pytest.raises(ValueError, match="square"):
        relation_heatmaps_figure({"real": np.zeros((3, 4))})
    world = PointWorld("ring")
    assert isinstance(points_figure({"real": world.sample(50, 0).images, "model": world.sample(50, 1).images}), Figure)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        points_figure({"real": np.zeros((5, 3))})
    history = [{"step": i, "mse": 1.0 / (i + 1), "structure": 0.1, "critic.distance": 1.0} for i in range(40)]
    assert isinstance(loss_curves_figure(history), Figure)
    results = {"plain": {"energy distance": [0.1, 0.2]}, "sadm": {"energy distance": [0.3, 0.2]}}
    assert isinstance(measures_figure(results, "energy distance"), Figure)
    with pytest.raises(ValueError, match="precision"):
        measures_figure(results, "precision")
    spread = {"t": [0.0, 100.0], "spread ratio": [1.0, 0.8], "mse": [0.01, 0.1]}
    assert isinstance(spread_figure({"plain": spread}), Figure)
    with pytest.raises(ValueError, match="mse"):
        spread_figure({"plain": {"t": [0.0], "spread ratio": [1.0]}})


def test_prediction_spread_is_the_data_spread_at_t_0():
    figures = prediction_spread(PointDenoiser(), PointWorld("ring"), timesteps=(0, 500), n=200)
    assert figures["t"] == [0.0, 500.0]
    # At t = 0, x̂_0 = (x_t - 0.01 eps_hat) / 0.99995: any bounded denoiser predicts almost x_0.
    assert figures["spread ratio"][0] == pytest.approx(1.0, abs=0.02)
    assert figures["mse"][0] < 1e-3


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
def test_sadm_fine_tunes_a_stable_diffusion_unet_in_latent_space(tmp_path, layout):
    from workbench import testing
    from workbench.sadm.experiment import train_pipeline_unet

    build = testing.tiny_stable_diffusion_pipeline if layout == "sd" else testing.tiny_stable_diffusion_xl_pipeline
    pipe = build(tmp_path / "pipe")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    config = DiffusionTrainConfig(
        steps=2, batch_size=3, warmup_steps=1, checkpoint_every=2, seed=0, prompt_dropout=0.0, bf16_autocast=False
    )
    game = SADMConfig(structure_weight=0.5, weight_warmup_steps=0, max_timestep=999, critic_width=4, feature_dim=4)
    _, critic = train_pipeline_unet(
        pipe, ToyWorld(image_size=32), config=config, state_path=tmp_path / "state.safetensors", sadm=game
    )
    assert critic.sample_shape == (4, 16, 16)  # the critic reads the VAE's latents
    assert any(not torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    if layout == "sdxl":
        with pytest.raises(ValueError, match="prompt_dropout"):
            train_pipeline_unet(
                pipe, ToyWorld(image_size=32), config=_config(2), state_path=tmp_path / "other.safetensors"
            )


def test_paired_difference_reads_the_interval():
    from workbench.sadm.experiment import paired_difference

    worse = {"d": [1.0, 2.0, 3.0]}
    better = {"d": [0.5, 1.4, 2.6]}
    assert paired_difference(worse, better, "d").endswith("(higher)")
    assert paired_difference(better, worse, "d").endswith("(lower)")
    assert paired_difference({"d": [1.0, 0.0, 2.0]}, {"d": [0.0, 1.0, 2.0]}, "d").endswith("(no clear difference)")
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference({"d": [1.0]}, better, "d")


def test_the_command_line_runs_the_2d_comparison(tmp_path, capsys):
    import json

    from workbench.sadm.cli import main

    out = tmp_path / "points.json"
    main(["points", "--seeds", "0", "--steps", "4", "--weight", "0.5", "--batch-size", "8", "--out", str(out)])
    results = json.loads(out.read_text())
    assert set(results) == {"plain", "sadm", "plain, equal time"}
    assert results["sadm"]["steps"] == [4.0]
    assert "energy distance" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["finetune", "nothing"])


# The investigation: the exact posterior mean of the ring as the game's real side.


def test_ring_posterior_mean_is_the_mse_optimal_prediction():
    from workbench.sadm.toy2d import point_scheduler, ring_posterior_mean

    scheduler = point_scheduler()
    world = PointWorld("ring")
    # Hand case: x_t = √ᾱ_t μ_k at small t is nearest mode k by far, so E[x_0 | x_t] = μ_k.
    t = torch.full((8,), 50)
    a = scheduler.alphas_cumprod[50].sqrt()
    modes = torch.from_numpy(world.modes()).float()
    torch.testing.assert_close(ring_posterior_mean(scheduler, a * modes, t), modes, atol=1e-4, rtol=0)
    # Any other predictor of x_0 from x_t has a larger squared error (checked against two perturbations).
    clean = torch.from_numpy(world.sample(20_000, 0).images)
    t = torch.full((len(clean),), 200)
    noisy = scheduler.add_noise(clean, torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)), t)
    mean = ring_posterior_mean(scheduler, noisy, t)

    def error(prediction):
        return (prediction - clean).pow(2).sum(1).mean().item()

    assert error(mean) < error(mean * 1.1) and error(mean) < error(mean * 0.9)
    assert error(mean) < error(mean + torch.tensor([0.05, 0.0]))
    with pytest.raises(ValueError, match="noisy"):
        ring_posterior_mean(scheduler, torch.zeros(3, 3), torch.zeros(3, dtype=torch.long))


def test_the_exact_denoiser_samples_the_ring_and_its_predictions_are_shrunk():
    from workbench.sadm.toy2d import RingPosteriorDenoiser, sample_points

    world = PointWorld("ring")
    oracle = RingPosteriorDenoiser()
    figures = point_metrics(sample_points(oracle, 500, seed=0), world.sample(2000, 1).images, world)
    assert figures["modes covered"] == 8.0 and figures["precision"] > 0.9
    spread = prediction_spread(oracle, world, timesteps=(100, 300), n=500)
    # The posterior mean lacks the data's spread, and more so as t grows: what a critic can find.
    assert spread["spread ratio"][1] < spread["spread ratio"][0] < 1.0


def test_a_reference_replaces_the_real_side_of_the_game(tmp_path):
    from workbench.sadm.toy2d import RingPosteriorDenoiser, point_scheduler, ring_posterior_mean

    scheduler = point_scheduler()
    world = PointWorld("ring")
    clean = torch.from_numpy(world.sample(16, 0).images)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    t = torch.arange(16) * 15
    noisy = scheduler.add_noise(clean, noise, t)
    output = RingPosteriorDenoiser()(noisy, t).sample
    info = DiffusionStep(0, None, clean, noise, noisy, t, output, None, None, noise)
    config = SADMConfig(structure_weight=1.0, weight_warmup_steps=0, max_timestep=300, critic_width=8)

    def exact(step: DiffusionStep) -> torch.Tensor:
        return ring_posterior_mean(scheduler, step.noisy, step.timesteps)

    # The exact denoiser's x̂_0 is the reference: with the same critic, the term is float32 rounding only,
    # while against x_0 the same predictions are found wanting (they are shrunk toward the mean).
    against_mean = StructureGame(scheduler, (2,), config, seed=0, reference=exact).term(info).item()
    against_data = StructureGame(scheduler, (2,), config, seed=0).term(info).item()
    assert against_mean < 0.02 * against_data
    wrong = StructureGame(scheduler, (2,), config, seed=0, reference=lambda step: step.clean[:3])
    with pytest.raises(ValueError, match="reference"):
        wrong.term(info)
    with pytest.raises(ValueError, match="reference"):
        train_sadm(
            PointDenoiser(),
            scheduler,
            world,
            config=_config(2, batch_size=4),
            state_path=tmp_path / "state.safetensors",
            sadm=None,
            encode_images=torch.from_numpy,
            reference=exact,
        )
    with pytest.raises(ValueError, match="ring"):
        train_points(PointWorld("moons"), sadm=config, steps=2, batch_size=4, reference="posterior mean")
    with pytest.raises(ValueError, match="reference"):
        train_points(world, sadm=config, steps=2, batch_size=4, reference="oracle")


def test_the_2d_comparison_has_the_posterior_mean_arm():
    from workbench.sadm.experiment import compare_points

    game = SADMConfig(structure_weight=0.1, max_timestep=300, critic_width=8, weight_warmup_steps=0)
    results = compare_points(seeds=(0,), steps=4, sadm=game, num_samples=50, batch_size=8, posterior_mean_arm=True)
    assert set(results) == {"plain", "sadm", "plain, equal time", "sadm, posterior-mean reference"}
    assert "critic distance" in results["sadm, posterior-mean reference"]
    assert "critic distance" not in results["plain"]
    assert results["plain, equal time"]["steps"][0] >= 4
    with pytest.raises(ValueError, match="ring"):
        compare_points(kind="moons", posterior_mean_arm=True)


def test_the_image_tier_over_training_seeds_runs_three_arms():
    from workbench.sadm.experiment import compare_finetunes

    results = compare_finetunes(
        seeds=(0,), steps=3, num_samples=8, num_inference_steps=2, structure_batch=4, cost_steps=1
    )
    assert set(results) == {"plain", "sadm", "plain, equal time"}
    assert results["sadm"]["steps"] == [3.0]
    # the equal-time arm's budget is steps x the cost ratio measured before the seeds
    (ratio,) = results["plain, equal time"]["cost ratio"]
    assert results["plain, equal time"]["steps"] == [float(max(3, round(3 * ratio)))]
    assert all(len(values) == 1 for figures in results.values() for values in figures.values())
    with pytest.raises(ValueError, match="steps"):
        compare_finetunes(steps=2)
    with pytest.raises(ValueError, match="cost_steps"):
        compare_finetunes(cost_steps=0)
