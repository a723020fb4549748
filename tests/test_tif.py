"""TiF learner: adapter training, switching by name, the shared-noise rule, pruning, weights, bad input."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workbench import tif
from workbench.adapters import adapter_names, add_lora, use_adapter
from workbench.testing import tiny_ddpm_scheduler, tiny_stable_diffusion_pipeline, tiny_unet2d_condition
from workbench.tif import experiment


@pytest.fixture
def pipe(tmp_path):
    return tiny_stable_diffusion_pipeline(tmp_path)


def _perturbed_adapters(unet, names, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        for p in add_lora(unet, rank=2, adapter_name=name, generator=generator):
            with torch.no_grad():
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    unet.requires_grad_(False)


def _states(unet, batch=1):
    return torch.randn(batch, 5, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(7))


def _call(unet, states):
    sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), encoder_hidden_states=states.expand(2, -1, -1)).sample


def test_adapter_training_lowers_the_loss_and_leaves_base_weights_bit_identical(pipe):
    scheduler = tiny_ddpm_scheduler()
    shots = tif.MarkTask(shapes=("circle",)).shots(1, 0)
    latents = tif.model_space(pipe, shots.images)
    states = tif.encode_prompt_states(pipe, shots.prompt)
    timesteps = torch.arange(50, 1000, 100)
    noise = torch.randn((len(timesteps), *latents.shape[1:]), generator=torch.Generator().manual_seed(0))
    before = tif.noise_prediction_errors(
        pipe.unet, scheduler, latents[0], timesteps, noise, tif.ClassCondition("a", states)
    )
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    config = tif.AdapterTrainConfig(rank=4, steps=30, batch_size=4, learning_rate=1e-2, bf16_autocast=False)
    names = tif.train_class_adapters(pipe, scheduler, shots, config=config, progress=False)

    assert names == list(shots.class_names)
    after_state = pipe.unet.state_dict()
    lora_keys = [k for k in after_state if "lora_" in k]
    base_after = {k.replace(".base_layer", ""): v for k, v in after_state.items() if "lora_" not in k}
    assert lora_keys and set(base_after) == set(base)
    for key, value in base.items():
        assert torch.equal(base_after[key], value), key  # bit-identical
    for name in names:
        trained_b = [after_state[k] for k in lora_keys if "lora_B" in k and f".{name}." in k]
        assert trained_b and any(b.abs().sum() > 0 for b in trained_b)
    after = tif.noise_prediction_errors(
        pipe.unet, scheduler, latents[0], timesteps, noise, tif.ClassCondition("plain", states, "plain")
    )
    assert after.mean() < before.mean()


def test_adapters_switch_by_name_and_round_trip(tmp_path):
    unet = tiny_unet2d_condition(sample_size=16)
    states = _states(unet)
    base_output = _call(unet, states)
    _perturbed_adapters(unet, ["dotted", "plain"])
    use_adapter(unet, "dotted")
    dotted = _call(unet, states)
    use_adapter(unet, "plain")
    plain = _call(unet, states)
    use_adapter(unet, None)
    torch.testing.assert_close(_call(unet, states), base_output)
    assert not torch.allclose(dotted, plain) and not torch.allclose(dotted, base_output)

    tif.save_class_adapters(unet, tmp_path / "adapters", ["dotted", "plain"], metadata={"prompt": "a circle"})
    fresh = tiny_unet2d_condition(sample_size=16)
    record = tif.load_class_adapters(fresh, tmp_path / "adapters")
    assert record["class_names"] == ["dotted", "plain"] and record["prompt"] == "a circle"
    use_adapter(fresh, "plain")
    torch.testing.assert_close(_call(fresh, states), plain)
    use_adapter(fresh, "dotted")
    torch.testing.assert_close(_call(fresh, states), dotted)

    # Stored in half precision, loaded back into the float32 model at fp16 accuracy.
    tif.save_class_adapters(unet, tmp_path / "half", ["dotted", "plain"], dtype=torch.float16)
    stored = load_file(tmp_path / "half" / "plain" / "pytorch_lora_weights.safetensors")
    assert stored and all(v.dtype == torch.float16 for v in stored.values())
    half = tiny_unet2d_condition(sample_size=16)
    tif.load_class_adapters(half, tmp_path / "half")
    use_adapter(half, "plain")
    assert next(p for n, p in half.named_parameters() if "lora_A.plain" in n).dtype == torch.float32
    torch.testing.assert_close(_call(half, states), plain, rtol=1e-2, atol=1e-2)


def test_every_class_sees_the_same_noise_and_the_batch_equals_single_calls():
    unet = tiny_unet2d_condition(sample_size=16)
    _perturbed_adapters(unet, ["a", "b", "c"])
    scheduler = tiny_ddpm_scheduler()
    states = _states(unet)
    conditions = [tif.ClassCondition(n, states, n) for n in "abc"]
    inputs = []
    hook = unet.register_forward_pre_hook(lambda m, args: inputs.append((args[0].clone(), args[1].clone())))
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    weights = torch.ones(1000, dtype=torch.float64)
    result = tif.classify(
        unet,
        scheduler,
        latents,
        conditions,
        weights,
        config=tif.ClassifyConfig((6,), (1,)),
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    hook.remove()
    assert len(inputs) == 2 * 3  # one batched forward per image and class
    for image in range(2):
        calls = inputs[3 * image : 3 * image + 3]
        for sample, timesteps in calls[1:]:
            torch.testing.assert_close(sample, calls[0][0])  # the same noisy inputs for every class
            torch.testing.assert_close(timesteps, calls[0][1])
    assert result.unet_calls.tolist() == [18, 18]
    assert not torch.allclose(result.errors[:, 0], result.errors[:, 1])
    # One step at a time gives the same errors as the batched pass.
    single = torch.stack(
        [
            tif.noise_prediction_errors(
                unet, scheduler, latents[0], result.timesteps[i : i + 1], noise[None], conditions[1]
            )[0]
            for i, noise in enumerate(torch.randn((2, 6, 4, 16, 16), generator=torch.Generator().manual_seed(0))[0])
        ]
    )
    torch.testing.assert_close(single, result.errors[0, 1], rtol=1e-4, atol=1e-6)


def _four_classes(*, adapter_seed: int, latent_seed: int, noise_seed: int, grid: int):
    """A tiny UNet with four perturbed class adapters, three latents, TiF weights and shared noise for a grid."""
    unet = tiny_unet2d_condition(sample_size=16)
    names = ["a", "b", "c", "d"]
    _perturbed_adapters(unet, names, seed=adapter_seed)
    scheduler = tiny_ddpm_scheduler()
    conditions = [tif.ClassCondition(n, _states(unet), n) for n in names]
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(latent_seed))
    weights = tif.tif_weights(scheduler.alphas_cumprod, 4.0)
    noise = torch.randn((3, grid, 4, 16, 16), generator=torch.Generator().manual_seed(noise_seed))
    return unet, scheduler, conditions, latents, weights, noise


def test_pruning_keeps_the_top_classes_and_a_real_pruned_run_equals_its_replay():
    errors = torch.tensor([[3.0, 3.0], [1.0, 1.0], [2.0, 2.0], [0.5, math.nan]])
    kept, scores = tif.select_classes(errors, torch.ones(2), [0, 1, 2], keep=2)
    assert kept == [1, 2] and math.isinf(scores[3])

    unet, scheduler, conditions, latents, weights, noise = _four_classes(
        adapter_seed=5, latent_seed=4, noise_seed=2, grid=8
    )
    full = tif.classify(
        unet,
        scheduler,
        latents,
        conditions,
        weights,
        config=tif.ClassifyConfig((8,), (1,)),
        noise=noise,
        progress=False,
    )
    pruning = tif.ClassifyConfig((2, 4, 8), (2, 2, 1))
    pruned = tif.classify(unet, scheduler, latents, conditions, weights, config=pruning, noise=noise, progress=False)
    replay, calls = tif.simulate_pruning(full.errors, weights[full.timesteps], pruning)
    assert torch.equal(pruned.predictions, replay)
    assert torch.equal(pruned.unet_calls, calls)
    assert (calls == 4 * 2 + 2 * 2 + 2 * 4).all() and (calls < full.unet_calls).all()
    # The survivors of stage 1 are the two best classes on the first two steps.
    grid, stages = pruning.stage_slots(1000)
    first = (full.errors[..., stages[0]].double() * weights[grid][stages[0]]).mean(-1)
    for i in range(3):
        survivors = set(torch.topk(-first[i], 2).indices.tolist())
        evaluated = set(torch.nonzero(~torch.isnan(pruned.errors[i, :, stages[1]]).any(-1)).flatten().tolist())
        assert evaluated == survivors


def test_a_truncated_pruned_run_equals_its_replay_on_the_full_grid():
    unet, scheduler, conditions, latents, weights, noise = _four_classes(
        adapter_seed=6, latent_seed=8, noise_seed=9, grid=10
    )
    full_config = tif.ClassifyConfig((10,), (1,))
    full = tif.classify(unet, scheduler, latents, conditions, weights, config=full_config, noise=noise, progress=False)

    schedule = tif.ClassifyConfig((1, 4), (2, 1), max_timestep=400)
    sub_grid, stages = schedule.stage_slots(1000)
    assert sub_grid.tolist() == [50, 150, 250, 350] and sub_grid.tolist() == full.timesteps[:4].tolist()
    assert [s.tolist() for s in stages] == [[2], [0, 1, 3]]
    slots = tif.grid_indices(full.timesteps, sub_grid)
    pruned = tif.classify(
        unet, scheduler, latents, conditions, weights, config=schedule, noise=noise[:, slots], progress=False
    )
    assert pruned.timesteps.tolist() == sub_grid.tolist()
    replay, calls = tif.simulate_pruning(full.errors[..., slots], weights[sub_grid], schedule)
    assert torch.equal(pruned.predictions, replay) and torch.equal(pruned.unet_calls, calls)
    assert (calls == 4 * 1 + 2 * 3).all()
    torch.testing.assert_close(pruned.errors[:, :, 2], full.errors[:, :, 2])  # stage one: every class, t = 250

    # The truncated grid keeps the steps whose weight is at least the threshold's share of the largest.
    at_grid = weights[full.timesteps]
    schedules = experiment.truncated_schedules(at_grid, 1000, threshold=0.01, keeps=(2,))
    m = int((at_grid >= 0.01 * at_grid.max()).sum())
    assert schedules["TiF truncated"].timesteps_per_stage == (m,)
    assert schedules["TiF truncated"].max_timestep == 100 * m
    assert schedules["TiF pruned (keep 2)"].keep_per_stage == ((2, 1) if m > 1 else (1,))


def test_tif_weights_favour_small_t_and_the_knee_follows_the_distance():
    abar = tiny_ddpm_scheduler().alphas_cumprod
    weights = tif.tif_weights(abar, 5.0)
    assert torch.all(torch.isfinite(weights)) and weights[0] == pytest.approx(1.0)
    assert torch.all(weights[1:] <= weights[:-1] + 1e-12)
    assert weights[-1] < 0.1
    assert (
        tif.weight_knee(tif.tif_weights(abar, 2.0))
        < tif.weight_knee(weights)
        < tif.weight_knee(tif.tif_weights(abar, 20.0))
    )


def test_class_distance_takes_the_closest_pair_of_different_classes():
    latents = torch.zeros(3, 1, 1, 2)
    latents[1, 0, 0, 0] = 3.0  # class 1, distance 3 from image 0
    latents[2, 0, 0, 0] = 10.0  # class 1, distance 10 from image 0
    labels = torch.tensor([0, 1, 1])
    assert tif.class_distance(latents, labels, quantile=0.0) == pytest.approx(3.0)


def test_mark_task_ties_the_cue_to_the_class_in_shots_only():
    task = tif.MarkTask()
    assert len(task.class_names) == 9 and task.class_names[4] == "dotted-square"
    shots, test = task.shots(2, 0), task.test_set(6, 1)
    assert np.array_equal(shots.spurious, shots.labels)
    assert (test.spurious != test.labels).mean() == pytest.approx(2 / 3)
    assert np.array_equal(test.spurious // 3, test.labels // 3)  # the cue points within the same shape
    for word in ("dotted", "red", "circle", "square"):
        assert word not in task.prompt
    names = task.class_prompts("names")
    assert names["dotted-square"] == "a large dotted square on a grey background"
    tokens = task.class_prompts("tokens")
    assert len(set(tokens.values())) == 9
    for prompt in tokens.values():
        assert not any(w in prompt.split() for w in ("plain", "dotted", "striped", "circle", "square", "triangle"))
    one_shape = tif.MarkTask(shapes=("circle",))
    assert one_shape.class_names == ("plain", "dotted", "striped") and "circle" in one_shape.prompt
    assert one_shape.class_prompts("tokens")["plain"] == "a large hta circle on a grey background"


def test_bad_input_is_a_clear_error(pipe, tmp_path):
    scheduler = tiny_ddpm_scheduler()
    shots = tif.MarkTask(shapes=("circle",)).shots(1, 0)
    no_dotted = tif.FewShotSet(shots.images[[0, 2]], np.array([0, 2]), shots.class_names, shots.prompt)
    with pytest.raises(ValueError, match=r"shots: class\(es\) \['dotted'\] have no images"):
        tif.train_class_adapters(pipe, scheduler, no_dotted, config=tif.AdapterTrainConfig(steps=1))
    with pytest.raises(ValueError, match="images must be 32x32"):
        tif.model_space(pipe, np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"images must be \(N, 3, H, W\)"):
        tif.model_space(pipe, np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="labels must index class_names"):
        tif.FewShotSet(shots.images, np.array([0, 1, 5]), shots.class_names, shots.prompt)

    unet = tiny_unet2d_condition(sample_size=16)
    _perturbed_adapters(unet, ["a", "b"])
    states = _states(unet)
    weights = torch.ones(1000, dtype=torch.float64)
    with pytest.raises(ValueError, match="adapter_name 'zzz' is not attached"):
        use_adapter(unet, "zzz")
    with pytest.raises(ValueError, match="adapter_name 'c' of class 'c' is not attached"):
        tif.classify(
            unet, scheduler, torch.zeros(1, 4, 16, 16), [tif.ClassCondition("c", states, "c")], weights, progress=False
        )
    with pytest.raises(ValueError, match=r"images must be \(N, 4, H, W\)"):
        tif.classify(unet, scheduler, torch.zeros(1, 3, 16, 16), [tif.ClassCondition("a", states, "a")], weights)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        tif.noise_prediction_errors(
            unet,
            scheduler,
            torch.zeros(4, 16, 16),
            torch.tensor([5, 1000]),
            torch.zeros(2, 4, 16, 16),
            tif.ClassCondition("a", states, "a"),
        )
    with pytest.raises(ValueError, match="class_names: no adapter attached for"):
        tif.save_class_adapters(unet, tmp_path / "x", ["a", "plain"])
    with pytest.raises(ValueError, match="keep_per_stage must end with 1"):
        tif.ClassifyConfig((2, 4), (2, 2))
    with pytest.raises(ValueError, match="each size must divide the last"):
        tif.ClassifyConfig((3, 4), (2, 1))
    with pytest.raises(ValueError, match="distance must be a finite number > 0"):
        tif.tif_weights(scheduler.alphas_cumprod, 0.0)
    with pytest.raises(ValueError, match="spurious_values must be 3 values"):
        tif.MarkTask(spurious_values=("red", "green"))
    with pytest.raises(ValueError, match="shapes must be distinct values from"):
        tif.MarkTask(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="naming must be 'names' or 'tokens', got 'ids'"):
        tif.MarkTask().class_prompts("ids")
    with pytest.raises(ValueError, match="max_timestep must be None or an integer >= the largest grid"):
        tif.ClassifyConfig((2, 4), (2, 1), max_timestep=3)
    with pytest.raises(ValueError, match="max_timestep must be <= num_train_timesteps=1000"):
        tif.ClassifyConfig((4,), (1,), max_timestep=2000).stage_slots(1000)
    with pytest.raises(ValueError, match=r"sub_grid: steps \[75\] are not on the grid"):
        tif.grid_indices(torch.tensor([50, 150]), torch.tensor([50, 75]))
    with pytest.raises(FileNotFoundError, match=r"folder: no tif\.json"):
        tif.load_class_adapters(unet, tmp_path / "missing")


def test_the_experiment_runs_end_to_end_on_a_tiny_pipeline(pipe, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from workbench.plots.tif import accuracy_calls_figure, per_step_figure

    config = experiment.ExperimentConfig.quick()
    rows = experiment.run_fewshot_experiment(
        pipe,
        tiny_ddpm_scheduler(),
        None,
        config=config,
        results_path=tmp_path / "r.json",
        save_adapters=tmp_path / "adapters",
        progress=False,
    )
    assert len(rows) == len(config.shots) * config.draws and (tmp_path / "r.json").is_file()
    row = rows[0]
    assert row["pruning replay matches"]
    assert row["unet_calls"]["TiF pruned (keep 2)"] <= row["unet_calls"]["TiF truncated"]
    assert row["unet_calls"]["TiF truncated"] <= row["unet_calls"]["TiF"] == 3 * config.num_timesteps
    assert set(row["accuracy"]) >= {
        "TiF",
        "uniform t",
        "large t only",
        "DC class prompts [names]",
        "DC class prompts [tokens]",
        "TiF pruned (keep 2)",
        "uniform t pruned, full grid",
    }
    assert adapter_names(pipe.unet) == []  # the draw's adapters are deleted afterwards
    saved = tif.load_class_adapters(pipe.unet, tmp_path / "adapters")
    assert saved["class_names"] == list(config.task.class_names)
    assert "| TiF |" in experiment.summary_markdown(rows)
    customised = experiment.setting_methods(rows, "customised")
    assert "DC class prompts [tokens]" in customised and not any("[names]" in m for m in customised)
    assert "| DC class prompts [names] |" not in experiment.summary_markdown(rows, customised)
    with pytest.raises(ValueError, match=r"methods: \['nope'\] are not in the rows"):
        experiment.summarise(rows, ["TiF", "nope"])
    with pytest.raises(ValueError, match="setting must be 'customised', 'named' or 'cost'"):
        experiment.setting_methods(rows, "other")
    accuracy_calls_figure(rows)
    per_step_figure(rows)
