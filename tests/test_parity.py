"""Toy-to-real parity: the papers' methods ride the stock Stable Diffusion and SDXL pipelines.

Paper 1 (optimized time steps) goes through the pipelines' own ``timesteps=`` argument with both solvers;
paper 2 (DistriFusion) wraps the pipeline call in a context manager; the raw loop
(:func:`workbench.sampling.denoise`) takes SDXL's added conditioning. All on tiny random pipelines built
from configs and loaded back with ``from_pretrained`` (``tests/conftest.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.distrifusion import PatchParallelConfig, simulate_patch_parallel
from workbench.sampling import denoise
from workbench.timesteps import NoiseSchedule, UniPCCustomTimestepsScheduler, optimize_timesteps, solver_scheduler
from workbench.timesteps.experiment import compare_schedules, pipeline_samples

SOLVERS = [("dpmsolver++", 2), ("unipc", 3)]
PROMPT = "a red circle"


@pytest.fixture(params=["tiny_sd_pipeline", "tiny_sdxl_pipeline"], ids=["sd", "sdxl"])
def pipe(request):
    """The session's tiny SD or SDXL pipeline; its scheduler is put back after the test."""
    pipe = request.getfixturevalue(request.param)
    scheduler = pipe.scheduler
    yield pipe
    pipe.scheduler = scheduler


def _record_unet_timesteps(unet: torch.nn.Module, seen: list[int]) -> torch.utils.hooks.RemovableHandle:
    def record(_module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append(int(torch.as_tensor(timestep).flatten()[0]))

    return unet.register_forward_pre_hook(record, with_kwargs=True)


def _is_xl(pipe) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


# --- paper 1: optimized time steps through pipe(..., timesteps=...) ----------------------------------


@pytest.mark.parametrize(("solver", "order"), SOLVERS)
def test_optimized_timesteps_ride_the_pipelines_timesteps_argument(pipe, solver: str, order: int) -> None:
    # The README's three lines, on the stock pipeline.
    steps = optimize_timesteps(NoiseSchedule.from_scheduler(pipe.scheduler), 5, solver=solver, order=order)
    pipe.scheduler = solver_scheduler(solver, order, pipe.scheduler)
    seen: list[int] = []
    handle = _record_unet_timesteps(pipe.unet, seen)
    try:
        images = pipe(
            PROMPT,
            timesteps=steps.timesteps(),
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
    finally:
        handle.remove()
    assert seen == steps.timesteps().tolist() == pipe.scheduler.timesteps.tolist()
    # The last step ends at sigma(t_0), timestep 0, where the bound ends it (not a jump to x_0).
    alphas_cumprod = pipe.scheduler.alphas_cumprod.double()
    table = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), table[[*seen, 0]].numpy(), rtol=1e-6)
    if solver == "unipc":
        assert isinstance(pipe.scheduler, UniPCCustomTimestepsScheduler)
        assert pipe.scheduler.this_order == 1  # lower-order final step, as in the bound's step orders
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_a_pipeline_saved_with_the_unipc_scheduler_loads_back_with_it(pipe, tmp_path) -> None:
    pipe.scheduler = solver_scheduler("unipc", 3, pipe.scheduler)
    pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    loaded = type(pipe).from_pretrained(tmp_path / "saved", use_safetensors=True)
    assert type(loaded.scheduler) is UniPCCustomTimestepsScheduler
    assert loaded.scheduler.config.final_sigmas_type == "sigma_min" and loaded.scheduler.config.solver_order == 3


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
def test_unipc_in_the_pipeline_equals_the_raw_loop(pipe, guidance_rescale: float) -> None:
    # One scheduler serves both: the stock pipeline and workbench.sampling.denoise (with SDXL's added
    # conditioning and the pipelines' guidance_rescale) compute the same latents from the same noise.
    steps = optimize_timesteps(NoiseSchedule.from_scheduler(pipe.scheduler), 4, solver="unipc", order=3)
    pipe.scheduler = solver_scheduler("unipc", 3, pipe.scheduler)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    from_pipeline = pipe(
        PROMPT,
        timesteps=steps.timesteps(),
        guidance_scale=3.0,
        guidance_rescale=guidance_rescale,
        latents=noise,
        output_type="latent",
    ).images
    conditioning = {}
    if _is_xl(pipe):
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, device="cpu")
        time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])  # original size, crop corner, target size
        conditioning = {
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
            "negative_added_cond_kwargs": {"text_embeds": negative_pooled, "time_ids": time_ids},
        }
    else:
        embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    from_loop = denoise(
        pipe.unet,
        pipe.scheduler,
        noise,
        timesteps=steps.timesteps(),
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        guidance_scale=3.0,
        guidance_rescale=guidance_rescale,
        progress=False,
        **conditioning,
    )
    torch.testing.assert_close(from_loop, from_pipeline)
    if guidance_rescale:
        unrescaled = pipe(PROMPT, timesteps=steps.timesteps(), guidance_scale=3.0, latents=noise, output_type="latent")
        assert not torch.allclose(from_pipeline, unrescaled.images)


def test_the_raw_loop_refuses_an_sdxl_unet_without_its_added_conditioning(tiny_sdxl_pipeline, tiny_sd_pipeline):
    unet, noise = tiny_sdxl_pipeline.unet, torch.zeros(1, 4, 16, 16)
    embeds = torch.zeros(1, 16, 64)
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline"):
        denoise(unet, tiny_sdxl_pipeline.scheduler, noise, num_inference_steps=2, prompt_embeds=embeds, progress=False)
    added = {"text_embeds": torch.zeros(1, 32), "time_ids": torch.zeros(1, 6)}
    with pytest.raises(ValueError, match="negative_added_cond_kwargs"):
        denoise(
            unet,
            tiny_sdxl_pipeline.scheduler,
            noise,
            num_inference_steps=2,
            prompt_embeds=embeds,
            negative_prompt_embeds=embeds,
            guidance_scale=2.0,
            added_cond_kwargs=added,
            progress=False,
        )
    with pytest.raises(ValueError, match="no addition_embed_type"):
        denoise(
            tiny_sd_pipeline.unet,
            tiny_sd_pipeline.scheduler,
            noise,
            num_inference_steps=2,
            prompt_embeds=torch.zeros(1, 16, 32),
            added_cond_kwargs=added,
            progress=False,
        )


def test_pipeline_samples_compares_schedules_on_the_stock_pipeline(pipe) -> None:
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    schedules = compare_schedules(schedule, solver="unipc", order=3, num_steps=4, baselines=["uniform_time"])
    original = pipe.scheduler
    samples = pipeline_samples(pipe, schedules, solver="unipc", order=3, prompt=PROMPT, guidance_scale=3.0)
    again = pipeline_samples(pipe, schedules, solver="unipc", order=3, prompt=PROMPT, guidance_scale=3.0)
    assert pipe.scheduler is original  # put back
    assert list(samples) == ["optimized", "uniform_time"] and samples["optimized"].shape == (1, 3, 32, 32)
    assert 0 <= float(samples["optimized"].min()) <= float(samples["optimized"].max()) <= 1
    assert not torch.equal(samples["optimized"], samples["uniform_time"])  # the steps matter
    torch.testing.assert_close(samples["optimized"], again["optimized"], rtol=0, atol=0)  # same seed


# --- paper 2: patch parallelism around the stock pipeline call ---------------------------------------


@pytest.mark.parametrize(("num_devices", "split_batch"), [(2, False), (4, True)])
def test_full_sync_patch_parallelism_equals_one_device(pipe, num_devices: int, split_batch: bool) -> None:
    arguments = dict(num_inference_steps=4, guidance_scale=3.0, output_type="latent")
    reference = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **arguments).images
    config = PatchParallelConfig(mode="full_sync", split_batch=split_batch)
    with simulate_patch_parallel(pipe.unet, config, num_devices=num_devices) as run:
        output = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **arguments).images
    assert run.layout.num_patches == 2  # the latent really was split into row patches
    # Equal up to float32 summation order (GroupNorm statistics and attention gathered across patches).
    scale = max(1.0, float(reference.abs().max()))
    assert float((output - reference).abs().max()) <= 1e-4 * scale
