"""DistriFusion in one process: config, layout, the simulator against the single-device UNet, bad input,
the notebook's functions and figures. (Real gloo ranks: ``test_distrifusion_distributed.py``.)"""

from __future__ import annotations

import math
import os

import ipywidgets
import matplotlib
import pytest
import torch
import torch.distributed as dist
from diffusers import DDPMPipeline
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, SlicedAttnProcessor
from torch import nn

from workbench import zoo
from workbench.distrifusion import (
    MODES,
    PatchLayout,
    PatchParallelConfig,
    check_supported,
    generate,
    measure_staleness,
    resolve_layout,
    simulate_patch_parallel,
)
from workbench.distrifusion.comm import CommStats, SimulatedComm
from workbench.distrifusion.config import check_patch_geometry
from workbench.metrics import psnr
from workbench.sampling import denoise
from workbench.testing import tiny_unet2d_condition

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def uncond():
    """The toy-uncond architecture, random-init (mechanics only: exactness, communication)."""
    return zoo.build_toy_uncond_unet().eval(), zoo.sampling_scheduler()


@pytest.fixture(scope="module")
def uncond_pipe(uncond):
    return DDPMPipeline(unet=uncond[0], scheduler=uncond[1])


def _noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _sample(unet, scheduler, latents, steps=6, **kwargs):
    return denoise(unet, scheduler, latents, num_inference_steps=steps, progress=False, **kwargs)


def _processors(unet):
    return {name: type(module.processor) for name, module in unet.named_modules() if isinstance(module, Attention)}


def _close(a, b):
    return float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max()))


# ----------------------------------------------------------------------------------------------------
# Config and layout.


def test_config_defaults_are_the_papers_and_validated():
    config = PatchParallelConfig()
    assert (config.mode, config.warmup_steps, config.split_batch) == ("corrected_async_gn", 4, True)
    with pytest.raises(ValueError, match="mode must be one of"):
        PatchParallelConfig(mode="async")
    with pytest.raises(ValueError, match="warmup_steps"):
        PatchParallelConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="warmup_steps"):
        PatchParallelConfig(warmup_steps=True)
    with pytest.raises(TypeError, match="split_batch"):
        PatchParallelConfig(split_batch=1)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="async_bucket_size must be an int >= 1"):
            PatchParallelConfig(async_bucket_size=bad)
    assert not (dist.is_available() and dist.is_initialized())  # building a config starts nothing


def test_comm_stats_summary_separates_the_warm_up():
    stats = CommStats()
    for nbytes, blocked in [(100, 0.004), (100, 0.002), (60, 0.001), (60, 0.003)]:
        stats.start_call()
        stats.add("halo", nbytes)
        stats.add_blocked(blocked)
        stats.add_blocked(blocked / 2, output=True)
    summary = stats.summary(steady_from=2)
    assert summary["bytes_per_step"] == summary["halo_bytes_per_step"] == 80
    assert summary["blocked_ms_per_step"] == pytest.approx(3.75)
    assert summary["blocked_ms_per_steady_step"] == pytest.approx(3.0)
    assert summary["output_blocked_ms_per_steady_step"] == pytest.approx(1.0)
    assert stats.summary(steady_from=9)["blocked_ms_per_steady_step"] == pytest.approx(3.75)  # no steady calls


@pytest.mark.parametrize(
    ("world", "batch", "split", "expected"),
    [(4, 2, True, (2, 2)), (4, 1, True, (1, 4)), (2, 2, False, (1, 2)), (3, 2, True, (1, 3)), (1, 2, True, (1, 1))],
)
def test_resolve_layout(world, batch, split, expected):
    layout = resolve_layout(world, batch, PatchParallelConfig(split_batch=split))
    assert (layout.num_batch_groups, layout.num_patches) == expected
    # ranks [0, N/2) take the first (unconditional) half
    assert [layout.batch_group(r) for r in range(world)] == [r // layout.num_patches for r in range(world)]


def test_patch_geometry_errors_name_the_constraint():
    check_patch_geometry(32, 4, 2)
    with pytest.raises(ValueError, match="height must be a multiple of num_patches \\* 2\\^2 = 8"):
        check_patch_geometry(36, 2, 2)
    with pytest.raises(ValueError, match="num_patches=16 is larger than the 8 rows"):
        check_patch_geometry(32, 16, 2)


# ----------------------------------------------------------------------------------------------------
# The simulator against the single-device UNet.


@pytest.mark.parametrize(("num_devices", "size"), [(2, 32), (4, 32), (2, 64), (4, 64)])
def test_full_sync_equals_single_device_uncond(uncond, num_devices, size):
    unet, scheduler = uncond
    noise = _noise((1, 3, size, size))
    reference = _sample(unet, scheduler, noise)
    with simulate_patch_parallel(unet, PatchParallelConfig(mode="full_sync"), num_devices=num_devices) as run:
        output = _sample(unet, scheduler, noise)
    assert run.layout == PatchLayout(num_devices, 1, num_devices)
    assert _close(output, reference)


@pytest.mark.parametrize(("num_devices", "split"), [(2, True), (2, False), (4, True), (4, False)])
def test_full_sync_equals_single_device_sd_layout_with_guidance(num_devices, split):
    unet, scheduler = tiny_unet2d_condition(sample_size=32), zoo.sampling_scheduler()
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 32, 32, generator=generator)
    text, negative = torch.randn(2, 7, 32, generator=generator), torch.randn(2, 7, 32, generator=generator)
    kwargs = dict(prompt_embeds=text, negative_prompt_embeds=negative, guidance_scale=5.0)
    reference = _sample(unet, scheduler, latents, steps=4, **kwargs)
    config = PatchParallelConfig(mode="full_sync", split_batch=split)
    with simulate_patch_parallel(unet, config, num_devices=num_devices) as run:
        output = _sample(unet, scheduler, latents, steps=4, **kwargs)
    groups = 2 if split else 1
    assert run.layout == PatchLayout(num_devices, groups, num_devices // groups)
    assert _close(output, reference)


def test_async_is_close_and_much_closer_than_naive(uncond):
    unet, scheduler = uncond
    noise = _noise((1, 3, 64, 64))
    reference = _sample(unet, scheduler, noise, steps=10)
    scores, bytes_per_step = {}, {}
    for mode in MODES:
        with simulate_patch_parallel(unet, PatchParallelConfig(mode=mode, warmup_steps=2), num_devices=4) as run:
            scores[mode] = psnr(
                (_sample(unet, scheduler, noise, steps=10).clamp(-1, 1) + 1) / 2, (reference.clamp(-1, 1) + 1) / 2
            )
            bytes_per_step[mode] = run.stats.summary()["bytes_per_step"]
    print(
        "PSNR vs one device (random-init toy-uncond, 64x64, 4 simulated devices, warm-up 2):",
        {k: round(v, 1) for k, v in scores.items()},
    )
    assert scores["full_sync"] > 80
    for mode in ("sync_gn", "corrected_async_gn", "stale_gn", "separate_gn", "no_sync"):
        assert scores[mode] > scores["naive_patch"] + 10, mode
    # asynchronous modes defer the gathers, they do not shrink them
    assert bytes_per_step["corrected_async_gn"] == bytes_per_step["full_sync"]
    assert bytes_per_step["no_sync"] < bytes_per_step["full_sync"]
    assert bytes_per_step["naive_patch"] < bytes_per_step["full_sync"] / 10


def test_warmup_steps_are_exact_and_later_steps_are_displaced(uncond):
    unet, scheduler = uncond
    noise = _noise((1, 3, 32, 32))

    def trajectory(context):
        latents = []
        with context:
            _sample(unet, scheduler, noise, steps=6, callback=lambda info: latents.append(info.latents.clone()))
        return latents

    exact = trajectory(simulate_patch_parallel(unet, PatchParallelConfig(mode="full_sync"), num_devices=2))
    displaced = trajectory(simulate_patch_parallel(unet, PatchParallelConfig(warmup_steps=2), num_devices=2))
    assert all(_close(displaced[i], exact[i]) for i in range(3))  # steps 0, 1, 2 are synchronous
    assert not _close(displaced[3], exact[3])


def test_same_seed_same_result(uncond_pipe):
    config = PatchParallelConfig(warmup_steps=1)
    first, second = (
        generate(
            uncond_pipe, config, height=32, width=32, num_inference_steps=4, seed=3, simulate_devices=2, progress=False
        )
        for _ in range(2)
    )
    assert torch.equal(first.images, second.images)
    other = generate(
        uncond_pipe, config, height=32, width=32, num_inference_steps=4, seed=4, simulate_devices=2, progress=False
    )
    assert not torch.equal(first.images, other.images)


def test_a_new_generation_restarts_the_warmup(uncond):
    unet, scheduler = uncond
    noise = _noise((1, 3, 32, 32))
    with simulate_patch_parallel(unet, PatchParallelConfig(warmup_steps=1), num_devices=2) as run:
        first = _sample(unet, scheduler, noise)
        assert run.step == 6
        second = _sample(unet, scheduler, noise)  # timesteps go up again: a new run
    assert run.step == 6 and torch.equal(first, second)


# ----------------------------------------------------------------------------------------------------
# The context manager leaves the stock UNet behind.


def test_context_restores_modules_processors_and_output(uncond):
    unet, scheduler = uncond
    before = {name: type(module) for name, module in unet.named_modules()}
    processors = _processors(unet)
    noise = _noise((1, 3, 32, 32))
    reference = _sample(unet, scheduler, noise, steps=2)
    with simulate_patch_parallel(unet, PatchParallelConfig(), num_devices=2):
        _sample(unet, scheduler, noise, steps=2)
        assert "HaloConv2d" in {type(m).__name__ for m in unet.modules()}
    assert {name: type(module) for name, module in unet.named_modules()} == before
    assert _processors(unet) == processors
    assert "forward" not in vars(unet)
    assert torch.equal(_sample(unet, scheduler, noise, steps=2), reference)


def test_context_restores_after_an_error_and_refuses_nesting(uncond):
    unet, scheduler = uncond
    before = {name: type(module) for name, module in unet.named_modules()}
    with (
        pytest.raises(ValueError, match="height must be a multiple"),
        simulate_patch_parallel(unet, PatchParallelConfig(), num_devices=2),
    ):
        _sample(unet, scheduler, _noise((1, 3, 36, 36)), steps=2)
    assert {name: type(module) for name, module in unet.named_modules()} == before
    with (
        simulate_patch_parallel(unet, PatchParallelConfig(), num_devices=2),
        pytest.raises(RuntimeError, match="already"),
        simulate_patch_parallel(unet, PatchParallelConfig(), num_devices=2),
    ):
        pass


# ----------------------------------------------------------------------------------------------------
# Bad input.


def test_more_devices_than_rows_is_a_clear_error(uncond):
    unet, scheduler = uncond
    with (
        pytest.raises(ValueError, match="num_patches=16 is larger than the 8 rows"),
        simulate_patch_parallel(unet, PatchParallelConfig(), num_devices=16),
    ):
        _sample(unet, scheduler, _noise((1, 3, 32, 32)), steps=1)


def test_bad_arguments():
    unet = tiny_unet2d_condition()
    with pytest.raises(ValueError, match="num_devices"):
        simulate_patch_parallel(unet, PatchParallelConfig(), num_devices=0).__enter__()
    with pytest.raises(TypeError, match="PatchParallelConfig"):
        simulate_patch_parallel(unet, {"mode": "full_sync"}, num_devices=2).__enter__()
    with pytest.raises(RuntimeError, match=r"initialised torch\.distributed"):
        from workbench.distrifusion import patch_parallel

        patch_parallel(unet, PatchParallelConfig()).__enter__()


def test_unsupported_layers_are_named():
    unet = tiny_unet2d_condition()
    assert check_supported(unet) == []
    unet.set_attn_processor(SlicedAttnProcessor(slice_size=1))
    problems = check_supported(unet)
    assert problems and all("SlicedAttnProcessor" in p for p in problems if "attn1" in p)
    with (
        pytest.raises(TypeError, match="SlicedAttnProcessor"),
        simulate_patch_parallel(unet, PatchParallelConfig(), num_devices=2),
    ):
        pass
    unet.set_attn_processor(AttnProcessor2_0())
    unet.conv_out = nn.ConvTranspose2d(16, 4, 3, padding=1)
    with (
        pytest.raises(TypeError, match="conv_out \\(ConvTranspose2d\\)"),
        simulate_patch_parallel(unet, PatchParallelConfig(), num_devices=2),
    ):
        pass
    # naive patches need no exchange, so nothing is unsupported
    with simulate_patch_parallel(unet, PatchParallelConfig(mode="naive_patch"), num_devices=2):
        pass


# ----------------------------------------------------------------------------------------------------
# Staleness, experiments, figures, widget, command line.


def test_measure_staleness(uncond):
    unet, scheduler = uncond
    record = measure_staleness(unet, scheduler, _noise((1, 3, 32, 32)), num_inference_steps=5)
    assert record.change.shape == (len(record.layer_names), 4)
    assert set(record.layer_kinds) == {"conv", "attention"}
    assert (record.change > 0).all() and len(record.timesteps) == 5
    assert {32, 16, 8} <= set(record.resolutions)


def test_compare_modes_and_figures(uncond_pipe):
    from workbench.distrifusion.compare import compare_modes, mode_table
    from workbench.distrifusion.experiment import staleness
    from workbench.plots.distrifusion import comparison_figure, patch_diagram, psnr_figure, staleness_figure

    comparison = compare_modes(
        uncond_pipe,
        num_devices=2,
        modes=("full_sync", "naive_patch"),
        warmup_steps=1,
        height=32,
        width=32,
        num_inference_steps=3,
    )
    assert comparison.reference.shape == comparison.images["naive_patch"].shape == (1, 3, 32, 32)
    assert comparison.psnr["full_sync"] > 60 > comparison.psnr["naive_patch"]
    rows, comparisons = mode_table(
        uncond_pipe,
        devices=(2,),
        modes=("full_sync", "naive_patch"),
        height=32,
        width=32,
        num_inference_steps=3,
        seeds=(0, 1),
    )
    assert [(row.devices, row.mode) for row in rows] == [(2, "full_sync"), (2, "naive_patch")]
    assert set(comparisons) == {2}
    assert math.isinf(rows[0].psnr_db) or rows[0].psnr_db > 60
    assert rows[1].psnr_db < 60 and rows[1].psnr_min_db <= rows[1].psnr_db  # the mean over the two seeds
    assert rows[0].mb_per_step > 10 * rows[1].mb_per_step
    for figure in (
        comparison_figure(comparison),
        patch_diagram(2),
        psnr_figure(rows),
        staleness_figure(staleness(uncond_pipe, height=32, width=32, num_inference_steps=3)),
    ):
        assert isinstance(figure, matplotlib.figure.Figure)
    with pytest.raises(ValueError, match="num_patches"):
        patch_diagram(3, rows=16)


def test_widget_panel_runs(uncond_pipe, monkeypatch):
    import workbench.widgets
    from workbench.widgets import distrifusion as panel_module

    shown = []
    monkeypatch.setattr(workbench.widgets, "display", shown.append)
    panel = panel_module.patch_parallel_panel(uncond_pipe, height=32, width=32, num_inference_steps=3, run_now=False)
    assert isinstance(panel, ipywidgets.VBox) and not shown
    buttons = [child for box in panel.children if hasattr(box, "children") for child in box.children]
    next(child for child in buttons if getattr(child, "description", "") == "Run").click()
    assert len(shown) == 1 and isinstance(shown[0], matplotlib.figure.Figure)


def test_command_line_simulated(capsys):
    from workbench.distrifusion.cli import main

    main(
        [
            "--model",
            "random:toy-uncond",
            "--height",
            "32",
            "--width",
            "32",
            "--steps",
            "3",
            "--simulate",
            "2",
            "--compare",
        ]
    )
    out = capsys.readouterr().out
    assert "random-init" in out and "2 row patch(es)" in out and "PSNR" in out


def test_reproduce_section(tmp_path):
    """On the shipped toy-uncond (a missing model fails here: the section never falls back to random weights)."""
    from workbench.distrifusion.experiment import reproduce

    section = reproduce(quick=True, out_dir=tmp_path)
    assert {row["mode"] for row in section.rows} >= {"full_sync", "corrected_async_gn", "naive_patch"}
    assert all(path.exists() for path in section.figures)
    assert "async" in section.verdict


def test_untrained_pipelines_come_from_the_zoo_seeded_without_the_global_generator():
    from workbench.distrifusion.runner import load_generation_pipeline

    state = torch.random.get_rng_state()
    first, label = load_generation_pipeline("random:toy-t2i")
    second, _ = load_generation_pipeline("random:toy-t2i")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert "random-init" in label
    for a, b in zip(first.components.values(), second.components.values(), strict=True):
        if isinstance(a, nn.Module):
            assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match="random:toy-uncond and random:toy-t2i"):
        load_generation_pipeline("random:toyclip")


def test_generate_on_one_device_has_no_communication(uncond_pipe):
    result = generate(uncond_pipe, None, height=32, width=32, num_inference_steps=2, progress=False)
    assert result.layout is None and result.stats == {} and result.images.shape == (1, 3, 32, 32)
    assert float(result.images.min()) >= 0 and float(result.images.max()) <= 1
    assert len(result.step_seconds) == 2 and all(seconds > 0 for seconds in result.step_seconds)


# ----------------------------------------------------------------------------------------------------
# Real layouts: SDXL's added conditioning, and a Stable Diffusion pipeline loaded with from_pretrained.


def test_full_sync_equals_single_device_sdxl_layout():
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(  # SDXL in miniature: linear projections, deeper transformers, text_time
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
            norm_num_groups=8,
        ).eval()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 32, 32, generator=generator)
    kwargs = dict(
        encoder_hidden_states=torch.randn(2, 5, 64, generator=generator),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, 32, generator=generator),
            "time_ids": torch.rand(2, 6, generator=generator) * 64,
        },
    )
    with torch.no_grad():
        reference = unet(sample, 500, **kwargs).sample
        for num_devices in (2, 4):
            with simulate_patch_parallel(unet, PatchParallelConfig(mode="full_sync"), num_devices=num_devices) as run:
                output = unet(sample, 500, return_dict=False, **kwargs)[0]
            assert run.layout.num_batch_groups == 2
            assert _close(output, reference), num_devices


def test_stable_diffusion_pipeline_runs_unchanged_inside_the_block(tiny_sd_pipeline):
    pipe = tiny_sd_pipeline

    def images():
        return pipe(
            "a red circle",
            height=32,
            width=32,
            num_inference_steps=3,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    reference = images()
    with simulate_patch_parallel(pipe.unet, PatchParallelConfig(mode="full_sync", split_batch=False), num_devices=2):
        output = images()
    assert _close(output, reference)


@pytest.mark.parametrize(("device", "message"), [("tpu", "--device must be cpu or cuda"), ("cuda", "sees no GPU")])
def test_bench_refuses_a_device_it_cannot_use(device, message, capsys):
    from workbench.benchmarks.distrifusion import main

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(SystemExit):
        main(["--device", device])
    assert message in capsys.readouterr().err


def test_bench_refuses_an_empty_scaling_batch(capsys):
    from workbench.benchmarks.distrifusion import main

    with pytest.raises(SystemExit):
        main(["--scaling-batch", "0"])
    assert "--scaling-batch must be >= 1" in capsys.readouterr().err


def test_scaling_rows_model_the_speedup_and_its_bound():
    from workbench.benchmarks.distrifusion_compute import ScalingRow

    row = ScalingRow(size=64, num_devices=4, one_device_ms=100.0, rank_ms=30.0, fixed_ms=4.0)
    assert row.speedup == pytest.approx(100 / 30) and row.of_ideal == pytest.approx(100 / 120)
    assert row.bound == pytest.approx(100 / (4 + 96 / 4) / 4)
    perfect = ScalingRow(size=64, num_devices=4, one_device_ms=100.0, rank_ms=25.0, fixed_ms=0.0)
    assert perfect.of_ideal == pytest.approx(1.0) and perfect.bound == pytest.approx(1.0)


def test_compute_scaling_times_every_setting_and_refuses_thin_patches(uncond):
    from workbench.benchmarks.distrifusion_compute import compute_scaling
    from workbench.plots.distrifusion import scaling_figure

    unet, _ = uncond
    threads, environment = torch.get_num_threads(), dict(os.environ)
    rows = compute_scaling(unet, [32], [2, 32], repeats=1, progress=False)
    # library code leaves the process as it was: threads restored, no allocator switch through the environment
    assert torch.get_num_threads() == threads and dict(os.environ) == environment
    assert [(row.size, row.num_devices) for row in rows] == [(32, 2), (32, 32)]
    timed, refused = rows
    assert timed.refused is None and min(timed.one_device_ms, timed.rank_ms, timed.fixed_ms) > 0
    assert refused.refused and math.isnan(refused.rank_ms)  # 32 patches of one row: thinner than the UNet allows
    assert isinstance(scaling_figure(rows), matplotlib.figure.Figure)
    with pytest.raises(ValueError, match="sizes must be positive multiples of 4"):
        compute_scaling(unet, [30], [2], repeats=1)
    with pytest.raises(ValueError, match="devices must all be >= 2"):
        compute_scaling(unet, [32], [1], repeats=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        compute_scaling(unet, [32], [2], repeats=1, batch_size=0)


def test_compute_scaling_with_a_guidance_batch_splits_it_over_the_ranks(uncond):
    from workbench.benchmarks.distrifusion_compute import compute_scaling

    unet, _ = uncond
    rows = compute_scaling(unet, [32], [2, 16], repeats=1, batch_size=2, progress=False)
    # 16 ranks split the batch first: 8 row patches of 4 rows per half, which the UNet's levels allow ...
    assert [(row.num_devices, row.batch_size, row.refused) for row in rows] == [(2, 2, None), (16, 2, None)]
    # ... where one image over 16 ranks would be 16 patches of 2 rows, too thin
    (single,) = compute_scaling(unet, [32], [16], repeats=1, progress=False)
    assert single.batch_size == 1 and single.refused


def test_rank_breakdown_times_each_patch_layer_once(uncond):
    from workbench.benchmarks.distrifusion_compute import KINDS, layer_kind, rank_breakdown
    from workbench.plots.distrifusion import breakdown_figure

    unet, _ = uncond
    stock = {kind: sum(layer_kind(m) == kind for m in unet.modules()) for kind in KINDS[:-1]}
    assert min(stock.values()) > 0
    threads = torch.get_num_threads()
    rows = rank_breakdown(unet, height=32, width=32, num_devices=2, repeats=1)
    assert torch.get_num_threads() == threads
    assert [row.kind for row in rows] == list(KINDS)
    # every stock layer of a kind is timed once on the rank, as its patch layer (not also as the wrapped one)
    assert {row.kind: row.layers for row in rows[:-1]} == stock
    assert all(row.ideal_ms > 0 and row.rank_ms > 0 for row in rows)
    assert all("forward" not in vars(module) for module in unet.modules())  # every layer's label removed
    assert "HaloConv2d" not in {type(module).__name__ for module in unet.modules()}
    assert isinstance(breakdown_figure(rows), matplotlib.figure.Figure)
    with pytest.raises(ValueError, match="num_devices must be >= 2"):
        rank_breakdown(unet, height=32, width=32, num_devices=1)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        rank_breakdown(unet, height=32, width=32, num_devices=2, repeats=0)


def test_corrected_group_norm_statistics_are_the_papers_estimate():
    """Sec. 4.2: E[A_t] ~ E[A_{t+1}] + (E[A_t^(i)] - E[A_{t+1}^(i)]) for E[x] and E[x^2], from raw activations."""
    from workbench.distrifusion.layers import _combine, _corrected

    generator = torch.Generator().manual_seed(0)
    patches, own, groups, size = 4, 2, 3, 50
    stale_x = torch.randn(patches, groups, size, generator=generator, dtype=torch.float64) * 2 + 1
    fresh_x = stale_x[own] + 0.3 * torch.randn(groups, size, generator=generator, dtype=torch.float64)

    def stats(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:  # (..., size) -> (..., 3) as the layer sends
        return torch.stack([x.mean(-1), x.var(-1, correction=0) + eps, (x**2).mean(-1) + eps], dim=-1)

    comm = SimulatedComm(PatchLayout(world_size=patches, num_batch_groups=1, num_patches=patches), CommStats())
    stale = stats(stale_x).reshape(1, patches, 1, groups, 3).expand(patches, -1, -1, -1, -1)
    fresh = stats(stale_x).reshape(patches, 1, groups, 3).clone()
    fresh[own] = stats(fresh_x).reshape(1, groups, 3)
    mean, var = (value[own, 0] for value in _corrected(stale, fresh, comm, eps=0.0))  # as patch `own` sees it

    first = stale_x.mean(dim=(0, 2)) + fresh_x.mean(-1) - stale_x[own].mean(-1)
    second = (stale_x**2).mean(dim=(0, 2)) + (fresh_x**2).mean(-1) - (stale_x[own] ** 2).mean(-1)
    assert torch.allclose(mean, first) and torch.allclose(var, second - first**2)
    # every other patch sees its own fresh statistics (here equal to the stale): the whole-image ones, which
    # a synchronous step combines without the moments' cancellation
    whole = stats(stale_x.transpose(0, 1).reshape(groups, -1))
    for estimate in (_corrected(stale, fresh, comm, eps=0.0), _combine(stale)):
        assert torch.allclose(estimate[0][0, 0], whole[:, 0]) and torch.allclose(estimate[1][0, 0], whole[:, 1])

    # a negative variance estimate falls back to the patch's own fresh variance: the top patch's mean drops
    for eps in (0.0, 0.25):  # the layer sends variances and E[x^2] with GroupNorm's eps added
        stale = torch.tensor([[10.0, 1.0, 101.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
        stale = (stale + torch.tensor([0.0, eps, eps])).reshape(1, patches, 1, 1, 3)
        fresh = stale[0].clone()  # every patch unchanged ...
        fresh[0] = torch.tensor([0.0, 0.5 + eps, 0.5 + eps])  # ... but the top one: E[x^2] 26 + 0.5 - 101 < E[x]^2
        mean, var = _corrected(stale.expand(patches, -1, -1, -1, -1), fresh, comm, eps=eps)
        assert (mean[0, 0, 0].item(), var[0, 0, 0].item()) == (2.5 + 0.0 - 10.0, 0.5 + eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [4, 8])  # one and two channels per group
def test_patch_group_norm_uses_whole_image_statistics(dtype, channels):
    """A synchronous PatchGroupNorm on stacked row patches equals nn.GroupNorm on the whole image (batch 2)."""
    from workbench.distrifusion.layers import LayerContext, PatchGroupNorm

    patches, batch, height, width = 2, 2, 6, 5
    norm = nn.GroupNorm(4, channels)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(1))
        norm.bias.normal_(generator=torch.Generator().manual_seed(2))
    norm = norm.to(dtype)
    image = torch.randn(batch, channels, patches * height, width, generator=torch.Generator().manual_seed(0))
    image = (image * 3 + torch.arange(patches * height).view(-1, 1)).to(dtype)  # patches differ in mean
    stacked = torch.cat(image.split(height, dim=2))  # (P * b, C, h, W), patch-major as the simulator stacks
    comm = SimulatedComm(PatchLayout(world_size=patches, num_batch_groups=1, num_patches=patches), CommStats())
    layer = PatchGroupNorm(norm, LayerContext(mode="full_sync", warmup_steps=0, comm=comm))
    with torch.no_grad():
        out = layer(stacked)
        expected = torch.cat(norm(image).split(height, dim=2))
    assert out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"),
    [(3, 1, 1), (3, 2, 1), ((3, 1), 1, (1, 0)), (5, 1, 2)],
)
def test_halo_convolution_equals_the_whole_image_convolution(kernel, stride, padding):
    """A synchronous HaloConv2d on stacked row patches (top, middle, bottom) equals nn.Conv2d on the whole image."""
    from workbench.distrifusion.layers import HaloConv2d, LayerContext

    patches, batch, height, width = 4, 2, 4, 6
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding)
    image = torch.randn(batch, 3, patches * height, width, generator=torch.Generator().manual_seed(0))
    comm = SimulatedComm(PatchLayout(world_size=patches, num_batch_groups=1, num_patches=patches), CommStats())
    layer = HaloConv2d(conv, LayerContext(mode="full_sync", warmup_steps=0, comm=comm))
    with torch.no_grad():
        out = layer(torch.cat(image.split(height, dim=2)))
        expected = torch.cat(conv(image).split(height // stride, dim=2))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_compute_only_rank_has_neighbours_on_both_sides():
    """The timed rank does the most work any rank does: with four patches, halo rows above and below."""
    from workbench.benchmarks.distrifusion_compute import ComputeOnlyComm
    from workbench.distrifusion.layers import HaloConv2d, LayerContext

    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    comm = ComputeOnlyComm(PatchLayout(world_size=4, num_batch_groups=1, num_patches=4), CommStats())
    layer = HaloConv2d(conv, LayerContext(mode="full_sync", warmup_steps=0, comm=comm))
    with torch.no_grad():  # every "gather" repeats this patch: its bottom row above it, its top row below
        expected = nn.functional.conv2d(
            torch.cat([x[:, :, -1:], x, x[:, :, :1]], dim=2), conv.weight, conv.bias, padding=(0, 1)
        )
        torch.testing.assert_close(layer(x), expected)
