"""SingDiffusion: the module trains, only the first step changes, the Euler scale, CFG, SD, bad input."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from workbench import singdiffusion as sing
from workbench import zoo
from workbench.pipelines import ToyTextToImagePipeline
from workbench.testing import SD_SCHEDULE
from workbench.toyworld import ToyWorld
from workbench.training import DiffusionTrainConfig

SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**SD_SCHEDULE, steps_offset=1, clip_sample=False, set_alpha_to_one=False),
    "dpm": lambda: DPMSolverMultistepScheduler(**SD_SCHEDULE),
    "unipc": lambda: UniPCMultistepScheduler(**SD_SCHEDULE),
    "pndm": lambda: PNDMScheduler(**SD_SCHEDULE, steps_offset=1, skip_prk_steps=True),  # as SD 1.5 ships it
    "euler": lambda: EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="leading"),
}


@pytest.fixture(scope="module")
def toyclip():
    return zoo.load("toyclip")


@pytest.fixture(scope="module")
def toy_pipe(toyclip):
    """A toy text-to-image pipeline with a small random UNet (fast) and the shipped toy CLIP."""
    unet = sing.build_mean_predictor(sample_size=32, in_channels=3, cross_attention_dim=128, seed=5).eval()
    pipe = ToyTextToImagePipeline(unet=unet, scheduler=SCHEDULERS["ddim"](), text_encoder=toyclip)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, prompt, latents, steps=4, guidance_scale=1.0):
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        latents=latents,
        output_type="pt",
        progress=False,
    ).images


def _first_unet_input(pipe, run):
    """The sample the UNet sees at the first step (the conditional half under guidance)."""
    seen = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append(args[0].detach().clone())

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def test_module_trains_on_a_tiny_set_in_the_sd_latent_space(tiny_sd_pipeline, tmp_path):
    pipe = tiny_sd_pipeline
    black, white = np.zeros((3, 32, 32), np.float32), np.ones((3, 32, 32), np.float32)
    data = sing.CaptionedImages(np.stack([black, white]), ["black", "white"])
    module = sing.build_mean_predictor(
        sample_size=16, in_channels=4, cross_attention_dim=32, block_out_channels=(16, 32)
    )
    targets = sing._encode_images(pipe)(data.images)  # (2, 4, 16, 16) latents of the two images
    embeds = pipe.encode_prompt(data.captions, "cpu", 1, False)[0]
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def error(model):
        return torch.mean((sing.predict_mean(model.eval(), noise, embeds) - targets) ** 2).item()

    before = error(module)
    config = DiffusionTrainConfig(
        steps=40, batch_size=8, learning_rate=2e-3, warmup_steps=2, caption_dropout=0.0, prompt_dropout=0.0, seed=1
    )
    trained = sing.train_mean_predictor(module, pipe, data, config=config, state_path=tmp_path / "state.safetensors")
    assert error(trained) < 0.5 * before


def test_module_trains_on_the_toy_world(toy_pipe, tmp_path):
    module = sing.build_mean_predictor(
        sample_size=32, in_channels=3, cross_attention_dim=128, block_out_channels=(8, 16)
    )
    prompts = ["a circle on a black background", "a circle on a white background"]
    oracle = sing.ToyWorldOracle(num_images=200).mean_images(prompts)
    embeds = toy_pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def error(model):
        return torch.mean((sing.predict_mean(model.eval(), noise, embeds) - oracle) ** 2).item()

    before = error(module)
    config = DiffusionTrainConfig(steps=30, batch_size=16, learning_rate=2e-3, warmup_steps=2, seed=1)
    trained = sing.train_mean_predictor(module, toy_pipe, ToyWorld(), config=config, state_path=tmp_path / "s")
    assert error(trained) < before


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_module_off_equals_the_base_sampler(toy_pipe, name):
    """With x_bar set to the base model's own x_0 estimate at t0 (and its noise estimate), the first step
    gives back x_T, so the whole trajectory is the base sampler's."""
    toy_pipe.scheduler = SCHEDULERS[name]()
    prompt = ["a red circle"] * 2
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    base = _run(toy_pipe, prompt, noise)
    scheduler = toy_pipe.scheduler
    scheduler.set_timesteps(4)
    t0 = scheduler.timesteps[0]
    model_input = scheduler.scale_model_input(noise * scheduler.init_noise_sigma, t0)
    embeds = toy_pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    eps = toy_pipe.unet(model_input, t0, encoder_hidden_states=embeds).sample
    abar = sing.first_step_alpha_cumprod(scheduler)
    x0 = (model_input - (1 - abar) ** 0.5 * eps) / abar**0.5
    latents = sing.first_step_latents(scheduler, x0, eps)
    torch.testing.assert_close(latents, noise, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(_run(toy_pipe, prompt, latents), base, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_first_model_input_is_the_vp_first_step(toy_pipe, name):
    """Every sampler, Euler included, feeds the UNet sqrt(abar) x_bar + sqrt(1 - abar) x_T at t0."""
    toy_pipe.scheduler = SCHEDULERS[name]()
    prompt = ["a red circle on a black background", "a blue square on a white background"]
    oracle = sing.ToyWorldOracle(num_images=50)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    latents = sing.singular_latents(toy_pipe, prompt, oracle, num_inference_steps=4, guidance_scale=1.0, noise=noise)
    seen = _first_unet_input(toy_pipe, lambda: _run(toy_pipe, prompt, latents))
    abar = sing.first_step_alpha_cumprod(toy_pipe.scheduler)
    expected = abar**0.5 * oracle.mean_images(prompt) + (1 - abar) ** 0.5 * noise
    torch.testing.assert_close(seen, expected, atol=1e-5, rtol=1e-4)


def test_euler_and_ddim_agree_on_the_start_at_the_same_noise_level(toy_pipe):
    prompt = ["a circle on a white background"]
    oracle = sing.ToyWorldOracle(num_images=50)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    starts = {}
    for name in ("ddim", "euler"):
        toy_pipe.scheduler = SCHEDULERS[name]()
        latents = sing.singular_latents(toy_pipe, prompt, oracle, num_inference_steps=4, guidance_scale=1, noise=noise)
        starts[name] = _first_unet_input(toy_pipe, lambda latents=latents: _run(toy_pipe, prompt, latents))
    ddim, euler = SCHEDULERS["ddim"](), SCHEDULERS["euler"]()
    ddim.set_timesteps(4)
    euler.set_timesteps(4)
    assert ddim.timesteps[0] == euler.timesteps[0]  # same leading spacing: the same t0
    torch.testing.assert_close(starts["euler"], starts["ddim"], atol=1e-5, rtol=1e-4)
    # The official rule (add_noise, then the pipeline's init_noise_sigma) would be ~sigma_max times too large.
    toy_pipe.scheduler = SCHEDULERS["euler"]()
    toy_pipe.scheduler.set_timesteps(4)
    official = toy_pipe.scheduler.add_noise(oracle.mean_images(prompt), noise, toy_pipe.scheduler.timesteps[:1])
    assert official.std() > 3 * starts["euler"].std()


def test_pipeline_runs_the_base_loop_from_the_new_start(tiny_sd_pipeline):
    """Stable Diffusion with latents=: the steps after the first are exactly the stock loop's."""
    pipe = tiny_sd_pipeline
    module = sing.build_mean_predictor(
        sample_size=16, in_channels=4, cross_attention_dim=32, block_out_channels=(16, 32)
    )
    generator = torch.Generator().manual_seed(0)
    latents = sing.singular_latents(pipe, "a red circle", module, num_inference_steps=3, generator=generator)
    out = pipe("a red circle", num_inference_steps=3, guidance_scale=4.0, latents=latents, output_type="latent")
    # The same loop by hand.
    cond, uncond = pipe.encode_prompt("a red circle", "cpu", 1, True)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(3)
    x = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_u, eps_c = pipe.unet(
                torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])
            ).sample.chunk(2)
            x = scheduler.step(eps_u + 4.0 * (eps_c - eps_u), t, x).prev_sample
    torch.testing.assert_close(out.images, x, atol=1e-5, rtol=1e-4)


def test_sdxl_pipeline_accepts_the_module(tmp_path):
    testing = pytest.importorskip("workbench.testing")
    if not hasattr(testing, "tiny_stable_diffusion_xl_pipeline"):
        pytest.skip("no tiny SDXL pipeline in workbench.testing")
    pipe = testing.tiny_stable_diffusion_xl_pipeline(tmp_path)
    channels, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    width = pipe.unet.config.cross_attention_dim
    module = sing.build_mean_predictor(sample_size=size, in_channels=channels, cross_attention_dim=width)
    generator = torch.Generator().manual_seed(0)
    latents = sing.singular_latents(pipe, "a red circle", module, num_inference_steps=2, generator=generator)
    out = pipe("a red circle", num_inference_steps=2, latents=latents, output_type="latent")
    assert out.images.shape == latents.shape and torch.isfinite(out.images).all()


def test_cfg_rule_at_the_first_step():
    cond, uncond = torch.full((1, 3, 2, 2), 0.6), torch.full((1, 3, 2, 2), 0.2)
    torch.testing.assert_close(sing.guided_mean(cond, uncond, 4.0), cond - 0.75 * uncond)
    # It is the usual guided combination divided by g.
    torch.testing.assert_close(sing.guided_mean(cond, uncond, 4.0), (uncond + 4.0 * (cond - uncond)) / 4.0)
    torch.testing.assert_close(sing.guided_mean(cond, uncond, 1.0), cond)
    with pytest.raises(ValueError, match="unconditional"):
        sing.guided_mean(cond, None, 2.0)


def test_singular_latents_guides_with_the_negative_prompt(toy_pipe):
    toy_pipe.scheduler = SCHEDULERS["ddim"]()
    oracle = sing.ToyWorldOracle(num_images=50)
    noise = torch.zeros(1, 3, 32, 32)
    prompt, negative = "a circle on a black background", "a circle on a white background"
    latents = sing.singular_latents(
        toy_pipe, prompt, oracle, num_inference_steps=4, guidance_scale=2.0, negative_prompt=negative, noise=noise
    )
    abar = sing.first_step_alpha_cumprod(toy_pipe.scheduler)
    expected = oracle.mean_images([prompt]) - 0.5 * oracle.mean_images([negative])
    torch.testing.assert_close(latents, abar**0.5 * expected)


def test_oracle_is_the_per_prompt_mean_image():
    oracle = sing.ToyWorldOracle(num_images=400)
    black, white, anything = oracle.mean_images(["a shape on a black background", "a white background", ""])
    corner = (slice(None), 0, 0)  # no shape reaches the corner pixel
    assert torch.allclose(black[corner], torch.tensor(-1.0)) and torch.allclose(white[corner], torch.tensor(1.0))
    assert -0.5 < anything[corner].mean() < 0.5  # the five backgrounds averaged
    assert sing.parse_toy_prompt("a small red circle on a dark background") == {
        "size": "small",
        "colour": "red",
        "shape": "circle",
        "background": "dark",
    }


def test_shipped_module_moves_black_and_white_prompts_toward_their_targets():
    pipe, module = zoo.load("toy-t2i"), zoo.load("toy-t2i-sing")
    pipe.set_progress_bar_config(disable=True)
    for background, sign in (("black", -1), ("white", 1)):
        prompt = [f"a red circle on a {background} background"] * 8
        noise = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
        latents = sing.singular_latents(pipe, prompt, module, num_inference_steps=10, noise=noise)
        with_module = _run(pipe, prompt, latents, steps=10, guidance_scale=4.0).mean().item()
        base = _run(pipe, prompt, noise, steps=10, guidance_scale=4.0).mean().item()
        assert sign * (with_module - base) > 0.05, (background, base, with_module)


def test_bad_input_is_refused(toy_pipe, tiny_sd_pipeline, tmp_path):
    toy_pipe.scheduler = SCHEDULERS["ddim"]()
    toy_module = sing.build_mean_predictor(
        sample_size=32, in_channels=3, cross_attention_dim=128, block_out_channels=(8, 16)
    )
    with pytest.raises(ValueError, match="latents"):  # module for another latent shape
        sing.singular_latents(tiny_sd_pipeline, "a circle", toy_module)
    narrow = sing.build_mean_predictor(
        sample_size=32, in_channels=3, cross_attention_dim=32, block_out_channels=(8, 16)
    )
    with pytest.raises(ValueError, match="cross_attention_dim"):
        sing.singular_latents(toy_pipe, "a circle", narrow)
    toy_pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="scheduler"):
        sing.singular_latents(toy_pipe, "a circle", toy_module)
    toy_pipe.scheduler = DDIMScheduler(**SD_SCHEDULE, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="zero terminal SNR"):
        sing.singular_latents(toy_pipe, "a circle", toy_module)
    toy_pipe.scheduler = SCHEDULERS["ddim"]()
    with pytest.raises(ValueError, match="tokens"):
        sing.singular_latents(tiny_sd_pipeline, "a red circle on a black background", toy_module)
    with pytest.raises(ValueError, match="tokens"):
        sing.singular_latents(toy_pipe, " ".join(["red"] * 40), toy_module)
    with pytest.raises(ValueError, match="word 'purple'"):
        sing.ToyWorldOracle(num_images=4).mean_images(["a purple circle"])
    with pytest.raises(TypeError, match="mean_source"):
        sing.singular_latents(toy_pipe, "a circle", "oracle")
    with pytest.raises(ValueError, match="noise"):
        sing.singular_latents(toy_pipe, "a circle", toy_module, noise=torch.zeros(1, 3, 16, 16))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    toy_module.save_pretrained(corrupt)
    (corrupt / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="could not be loaded"):
        zoo.load("toy-t2i-sing", path=corrupt)


def test_background_brightness_reads_the_real_backgrounds():
    from workbench.singdiffusion.experiment import background_brightness
    from workbench.toyworld import BACKGROUND_LEVELS

    for name, level in BACKGROUND_LEVELS.items():
        images = ToyWorld().sample(32, 0, fixed={"background": name, "size": "large"}).images
        np.testing.assert_allclose(background_brightness(images), level, atol=1e-6)


def test_comparison_runs_every_method_from_the_same_noise(toy_pipe, toyclip):
    from workbench.singdiffusion import experiment

    toy_pipe.scheduler = SCHEDULERS["dpm"]()
    module = sing.build_mean_predictor(
        sample_size=32, in_channels=3, cross_attention_dim=128, block_out_channels=(8, 16)
    )
    groups = [experiment.prompt_groups()[0], experiment.prompt_groups()[-1]]
    methods = ["base", "singdiffusion", "oracle", "trailing", "guidance rescale", "signal leak", "offset noise"]
    comparison = experiment.run_comparison(
        toy_pipe,
        module=module,
        methods=methods,
        groups=groups,
        num_per_group=3,
        num_inference_steps=2,
        offset_pipe=toy_pipe,  # the same weights stand in for the fine-tune: it must then equal the base
        oracle=sing.ToyWorldOracle(num_images=20),
    )
    from workbench.attribute_classifier import AttributeClassifier
    from workbench.toyworld import ATTRIBUTES

    judge = AttributeClassifier(attributes={a: list(ATTRIBUTES[a]) for a in ("shape", "colour")}).eval()
    rows = experiment.summarise(comparison, toyclip, judge)
    every = [experiment.REAL_IMAGES, *methods]
    assert [(r["group"], r["method"]) for r in rows] == [(g.name, m) for g in groups for m in every]
    assert rows[0]["target"] == 0.0 and rows[0]["within 0.1 of target"] != ""
    assert rows[0]["background mean"] == 0.0 and rows[0]["retraining"] == ""  # the real black images
    with pytest.raises(ValueError, match="judge"):
        experiment.summarise(comparison, toyclip, AttributeClassifier())  # two shapes, two colours only
    # Paired change against the base: none for the identical offset stand-in, a real interval for the oracle.
    assert experiment.accuracy_change(comparison, judge, "offset noise") == (0.0, 0.0)
    change, half = experiment.accuracy_change(comparison, judge, "oracle", attribute="colour")
    assert -1.0 <= change <= 1.0 and half >= 0.0
    with pytest.raises(ValueError, match="attribute"):
        experiment.accuracy_change(comparison, judge, "oracle", attribute="size")
    # The oracle's first step puts a black background under a random model: its border is darker.
    black = {r["method"]: r["background mean"] for r in rows if r["group"] == "black"}
    assert black["oracle"] < black["base"]
    np.testing.assert_array_equal(comparison.images[("offset noise", "black")], comparison.images[("base", "black")])
    assert not np.array_equal(comparison.images[("guidance rescale", "black")], comparison.images[("base", "black")])
    with pytest.raises(ValueError, match="offset_pipe"):
        experiment.sample_method(toy_pipe, ["a circle"], "offset noise", torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="method"):
        experiment.sample_method(toy_pipe, ["a circle"], "zero snr", torch.zeros(1, 3, 32, 32))


def test_toy_pipeline_refuses_a_guidance_rescale_outside_zero_to_one(toy_pipe):
    with pytest.raises(ValueError, match="guidance_rescale"):
        toy_pipe("a red circle", num_inference_steps=1, guidance_rescale=1.5, progress=False)


def test_training_objectives_for_the_module_and_offset_noise():
    from workbench.training import conditional_mean_objective, offset_noise_objective

    clean, noise = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    timesteps = torch.tensor([10, 500])
    model_input, model_t, target = conditional_mean_objective(1)(clean, noise, timesteps, torch.Generator())
    assert model_input is noise and target is clean and model_t.tolist() == [1, 1]
    scheduler = SCHEDULERS["ddim"]()
    noisy, _, target = offset_noise_objective(scheduler, 0.1)(clean, noise, timesteps, torch.Generator().manual_seed(0))
    shift = target - noise  # one offset per image and channel
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))
    assert shift.abs().max() > 0
    torch.testing.assert_close(noisy, scheduler.add_noise(clean, target, timesteps))
    with pytest.raises(ValueError, match="offset"):
        offset_noise_objective(scheduler, -1.0)
