"""Patch-parallel layers and UNets against the single-device computation: simulated and on 2 gloo ranks.

The per-layer checks (:func:`_layer_errors`) run on any communicator: the simulator plays all ranks in
one process; :func:`_distributed_checks` runs them, and whole-UNet checks, on real ranks started by
``workbench.launch.run`` (one launch for the whole module: start-up costs seconds per process).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from workbench.distrifusion.comm import CommStats, DistributedComm, PatchComm, SimulatedComm
from workbench.distrifusion.config import PatchLayout
from workbench.distrifusion.layers import LayerContext, install

_SEED = 0


def _rows(x: torch.Tensor, comm: PatchComm) -> torch.Tensor:
    """The local patches of a full (B, C, H, W) tensor, stacked: (P * B, C, H / N, W)."""
    h = x.shape[-2] // comm.num_patches
    return torch.cat([x[..., i * h : (i + 1) * h, :] for i in comm.patch_index.tolist()])


def _tokens(x: torch.Tensor, comm: PatchComm) -> torch.Tensor:
    """The local tokens of a full (B, C, L) row-major token tensor, stacked: (P * B, C, L / N)."""
    n = x.shape[-1] // comm.num_patches
    return torch.cat([x[..., i * n : (i + 1) * n] for i in comm.patch_index.tolist()])


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        module = build()
        for parameter in module.parameters():
            if parameter.ndim == 1:  # non-trivial biases and GroupNorm affine parameters
                parameter.data.normal_(0, 0.5)
        return module.eval()


def _run(module: nn.Module, inputs: list[torch.Tensor], context: LayerContext) -> list[torch.Tensor]:
    """``module`` with the patch layers installed, called once per step on ``inputs`` (already local)."""
    _layers, restore = install(module, context)
    try:
        outputs = []
        for step, x in enumerate(inputs):
            context.step = step
            outputs.append(module(x))
        return outputs
    finally:
        restore()


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@torch.no_grad()
def _layer_errors(comm: PatchComm) -> dict[str, float]:
    """Max |patch layer - full layer| over this process's patches, for each layer kind and mode."""
    from diffusers.models.attention_processor import Attention

    generator = torch.Generator().manual_seed(_SEED)
    errors: dict[str, float] = {}
    x1 = torch.randn(2, 8, 16, 12, generator=generator)
    x2 = x1 + 0.3 * torch.randn(x1.shape, generator=generator)
    sync = LayerContext(mode="full_sync", warmup_steps=0, comm=comm)

    convs = {
        "conv3x3": lambda: nn.Conv2d(8, 6, 3, padding=1),
        "conv3x3_stride2": lambda: nn.Conv2d(8, 6, 3, stride=2, padding=1),
        "conv5x5": lambda: nn.Conv2d(8, 6, 5, padding=2),
    }
    for name, build in convs.items():
        conv = _seeded(lambda build=build: nn.Sequential(build()))
        (out,) = _run(conv, [_rows(x1, comm)], sync)
        errors[name] = _max_error(out, _rows(conv(x1), comm))
        # Displaced: step 1 reads the neighbours' rows of step 0 and its own rows of step 1.
        async_context = LayerContext(mode="corrected_async_gn", warmup_steps=0, comm=comm)
        _, displaced = _run(conv, [_rows(x1, comm), _rows(x2, comm)], async_context)
        h = x1.shape[-2] // comm.num_patches
        expected = []
        for i in comm.patch_index.tolist():
            mixed = x1.clone()
            mixed[..., i * h : (i + 1) * h, :] = x2[..., i * h : (i + 1) * h, :]
            out_h = conv(mixed).shape[-2] // comm.num_patches
            expected.append(conv(mixed)[..., i * out_h : (i + 1) * out_h, :])
        errors[f"{name}_displaced"] = _max_error(displaced, torch.cat(expected))

    shifted = 5.0 + 0.1 * x1  # a large mean: E[x^2] - E[x]^2 would lose digits here
    norm = _seeded(lambda: nn.Sequential(nn.GroupNorm(4, 8)))
    for name, x in {"groupnorm": x1, "groupnorm_shifted": shifted}.items():
        (out,) = _run(norm, [_rows(x, comm)], sync)
        errors[name] = _max_error(out, _rows(norm(x), comm))
    tokens = x1.flatten(2)  # (B, C, L), row-major: a row patch is a contiguous token range
    (out,) = _run(norm, [_tokens(tokens, comm)], sync)
    errors["groupnorm_tokens"] = _max_error(out, _tokens(norm(tokens), comm))
    for mode in ("corrected_async_gn", "stale_gn"):  # unchanged input: the stale statistics are exact
        context = LayerContext(mode=mode, warmup_steps=0, comm=comm)
        _, out = _run(norm, [_rows(x1, comm), _rows(x1, comm)], context)
        errors[f"groupnorm_{mode}_unchanged"] = _max_error(out, _rows(norm(x1), comm))

    attention = _seeded(
        lambda: nn.Sequential(
            Attention(
                8,
                heads=2,
                dim_head=4,
                norm_num_groups=4,
                residual_connection=True,
                bias=True,
                rescale_output_factor=2.0,
            )
        )
    )
    (out,) = _run(attention, [_rows(x1, comm)], sync)
    errors["self_attention"] = _max_error(out, _rows(attention(x1), comm))
    context = LayerContext(mode="corrected_async_gn", warmup_steps=0, comm=comm)
    _, out = _run(attention, [_rows(x1, comm), _rows(x1, comm)], context)
    errors["self_attention_async_unchanged"] = _max_error(out, _rows(attention(x1), comm))
    return errors


# ----------------------------------------------------------------------------------------------------
# Simulated ranks (one process).


@pytest.mark.parametrize("num_patches", [2, 4])
def test_layers_match_full_layers_in_simulator(num_patches):
    comm = SimulatedComm(PatchLayout(num_patches, 1, num_patches), CommStats())
    errors = _layer_errors(comm)
    print({k: f"{v:.1e}" for k, v in errors.items()})
    bad = {name: error for name, error in errors.items() if error > 2e-5}  # nn.GroupNorm itself is ~3e-6 off in fp32
    assert not bad, bad


def test_simulated_comm_with_batch_split_gathers_within_each_half():
    comm = SimulatedComm(PatchLayout(4, 2, 2), CommStats())
    fresh = torch.arange(4.0).reshape(4, 1)  # rank r holds r
    gathered = comm.all_gather(fresh, kind="test").wait()  # (4 ranks, 2 patches, 1)
    assert gathered.squeeze(-1).tolist() == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert comm.patch_index.tolist() == [0, 1, 0, 1] and comm.batch_group.tolist() == [0, 0, 1, 1]
    assert comm.stats.bytes_by_kind["test"] == 4  # one float from the one other rank of the half


# ----------------------------------------------------------------------------------------------------
# Real ranks: gloo, 2 processes.


def _distributed_checks() -> dict[str, object]:
    """Launch target: every check on 2 gloo ranks; rank 0 also returns the images for the simulator test."""
    import torch.distributed as dist

    from workbench import zoo
    from workbench.distrifusion import PatchParallelConfig, patch_parallel
    from workbench.sampling import denoise
    from workbench.testing import tiny_unet2d_condition

    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict[str, object] = {}
    comm = DistributedComm(PatchLayout(world, 1, world), rank, None, CommStats(), timeout_s=30)
    out["layers"] = _layer_errors(comm)

    unet, scheduler = zoo.build_toy_uncond_unet().eval(), zoo.sampling_scheduler()
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def sample(latents=noise, steps=6):
        return denoise(unet, scheduler, latents, num_inference_steps=steps, progress=False)

    reference = sample()
    images = {}
    for mode in ("full_sync", "corrected_async_gn", "naive_patch"):
        with patch_parallel(unet, PatchParallelConfig(mode=mode, warmup_steps=2), timeout_s=30) as run:
            images[mode] = sample()
            out[f"bytes_{mode}"] = run.stats.summary()["bytes_per_step"]
            out[f"blocked_{mode}"] = list(run.stats.blocked_per_call)
            out[f"output_blocked_{mode}"] = list(run.stats.output_blocked_per_call)
    with patch_parallel(unet, PatchParallelConfig(warmup_steps=2), timeout_s=30):
        out["same_seed_same_result"] = bool(torch.equal(sample(), images["corrected_async_gn"]))
    assert PatchParallelConfig().async_bucket_size > 1  # the images above used bucketed gathers
    with patch_parallel(unet, PatchParallelConfig(warmup_steps=2, async_bucket_size=1), timeout_s=30) as run:
        out["unbucketed_same_result"] = bool(torch.equal(sample(), images["corrected_async_gn"]))
        out["bytes_unbucketed"] = run.stats.summary()["bytes_per_step"]
    out["bucket_mixed_dtypes"] = _bucket_mixed_dtypes(rank, world)
    out["uncond_full_sync_error"] = _max_error(images["full_sync"], reference)
    out["uncond_scale"] = float(reference.abs().max())
    out["psnr"] = {mode: _psnr(image, reference) for mode, image in images.items()}

    cond = tiny_unet2d_condition(sample_size=32)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 32, 32, generator=generator)
    text, negative = torch.randn(1, 7, 32, generator=generator), torch.randn(1, 7, 32, generator=generator)

    def guided():
        return denoise(
            cond,
            scheduler,
            latents,
            num_inference_steps=4,
            prompt_embeds=text,
            negative_prompt_embeds=negative,
            guidance_scale=5.0,
            progress=False,
        )

    cond_reference = guided()
    for split in (True, False):  # 2 ranks: the guidance halves, or 2 row patches of both halves
        with patch_parallel(cond, PatchParallelConfig(mode="full_sync", split_batch=split), timeout_s=30) as run:
            out[f"cond_split_{split}_error"] = _max_error(guided(), cond_reference)
            out[f"cond_split_{split}_layout"] = [run.layout.num_batch_groups, run.layout.num_patches]
    out["cond_scale"] = float(cond_reference.abs().max())

    out["errors"] = _mismatch_errors(rank, unet, scheduler, cond)
    if rank == 0:
        out |= {f"images/{mode}": image for mode, image in images.items()}
    return out


def _mismatch_errors(rank: int, unet: nn.Module, scheduler, cond: nn.Module) -> dict[str, object]:
    """Each rank brings something different; every refusal is caught and returned with what this rank sent.

    Every case ends in the same ``ValueError`` on every rank, after the same collectives, so the group
    stays usable for the next one.
    """
    from workbench.distrifusion import PatchParallelConfig, patch_parallel
    from workbench.sampling import denoise

    errors: dict[str, object] = {}

    def refusal(name: str, config: PatchParallelConfig, work) -> None:
        try:
            with patch_parallel(unet if name != "prompt" else cond, config, timeout_s=30):
                work()
        except ValueError as error:
            errors[name] = str(error)

    def sample(latents: torch.Tensor, steps: int = 3) -> None:
        denoise(unet, scheduler, latents, num_inference_steps=steps, progress=False)

    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    refusal("config", PatchParallelConfig(warmup_steps=rank), lambda: sample(noise))
    refusal(
        "bad_height",
        PatchParallelConfig(),
        lambda: sample(torch.randn(1, 3, 36, 36, generator=torch.Generator().manual_seed(0))),
    )

    own_noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    errors["latents_sent"] = _summary(own_noise)
    refusal("latents", PatchParallelConfig(), lambda: sample(own_noise))

    # A different prompt per rank: the guidance batch's embeddings (negative, then the rank's prompt) differ.
    generator = torch.Generator().manual_seed(1)
    latents, negative = torch.randn(2, 4, 32, 32, generator=generator)[:1], torch.randn(1, 7, 32, generator=generator)
    prompt = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(10 + rank))
    errors["prompt_sent"] = _summary(torch.cat([negative, prompt]))
    refusal(
        "prompt",
        PatchParallelConfig(),
        lambda: denoise(
            cond,
            scheduler,
            latents,
            num_inference_steps=2,
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            guidance_scale=5.0,
            progress=False,
        ),
    )

    # 3 steps on rank 0, 4 on rank 1: the second UNet call's timesteps differ.
    scheduler.set_timesteps(3 + rank)
    errors["second_timestep"] = int(scheduler.timesteps[1])
    refusal("steps", PatchParallelConfig(), lambda: sample(noise, steps=3 + rank))

    # The same timesteps, but rank 1 makes one call more: rank 0 leaves the block while rank 1 calls the UNet.
    def calls() -> None:
        with torch.no_grad():
            for t in (900, 800, 700)[: 2 + rank]:
                unet(noise, t)

    refusal("calls", PatchParallelConfig(), calls)
    return errors


def _summary(values: torch.Tensor) -> str:
    """How an error message shows a tensor argument."""
    values = values.double()
    return f"{values.numel()} values, sum {float(values.sum()):.6g}, sum of |x| {float(values.abs().sum()):.6g}"


def _bucket_mixed_dtypes(rank: int, world: int) -> bool:
    """Asynchronous gathers of two dtypes in one bucket (launched when full, or by a wait) arrive intact."""
    comm = DistributedComm(PatchLayout(world, 1, world), rank, None, CommStats(), timeout_s=30, bucket_size=3)
    comm.stats.start_call()
    builders = [  # what each rank r sends; the fourth opens a second bucket, launched by its wait
        lambda r: torch.full((1, 2, 3), float(r)),
        lambda r: torch.full((1, 4), r + 0.5, dtype=torch.float64),
        lambda r: torch.arange(5.0).reshape(1, 5) * (r + 1),
        lambda r: torch.full((1, 1), -float(r)),
    ]
    slots = [comm.all_gather(build(rank), kind="test", async_op=True) for build in builders]
    for slot, build in zip(slots, builders, strict=True):
        gathered = slot.wait()[0]  # (world, ...)
        expected = torch.stack([build(r)[0] for r in range(world)])
        if gathered.dtype != expected.dtype or not torch.equal(gathered, expected):
            return False
    return True


def _psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    a, b = ((image.clamp(-1, 1) + 1) / 2).double(), ((reference.clamp(-1, 1) + 1) / 2).double()
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


@pytest.fixture(scope="module")
def distributed_results():
    from workbench import launch

    result = launch.run(
        f"{Path(__file__).resolve()}:_distributed_checks",
        nproc=2,
        timeout_s=240,
        init_timeout_s=60,
        threads_per_process=1,
    )
    return result.results


@pytest.mark.distributed
def test_distributed_layers_match_full_layers(distributed_results):
    for rank, result in enumerate(distributed_results):
        print(rank, {k: f"{v:.1e}" for k, v in result["layers"].items()})
        bad = {name: error for name, error in result["layers"].items() if error > 2e-5}
        assert not bad, (rank, bad)


@pytest.mark.distributed
def test_distributed_full_sync_equals_single_device(distributed_results):
    for result in distributed_results:
        assert result["uncond_full_sync_error"] <= 1e-4 * max(1.0, result["uncond_scale"])
        assert result["cond_split_True_layout"] == [2, 1] and result["cond_split_False_layout"] == [1, 2]
        for split in (True, False):
            assert result[f"cond_split_{split}_error"] <= 1e-4 * max(1.0, result["cond_scale"])


@pytest.mark.distributed
def test_distributed_async_is_close_and_beats_naive(distributed_results):
    psnr = distributed_results[0]["psnr"]
    print("PSNR against one device (random-init toy-uncond, 32x32, 6 steps, warm-up 2):", psnr)
    assert psnr["full_sync"] > 80
    assert psnr["corrected_async_gn"] > psnr["naive_patch"] + 10
    bytes_ = distributed_results[0]
    assert bytes_["bytes_corrected_async_gn"] == bytes_["bytes_full_sync"] > 10 * bytes_["bytes_naive_patch"]


@pytest.mark.distributed
def test_distributed_time_blocked_in_communication_is_counted_per_call(distributed_results):
    for result in distributed_results:
        for mode in ("full_sync", "corrected_async_gn", "naive_patch"):
            blocked = result[f"blocked_{mode}"]
            output = result[f"output_blocked_{mode}"]
            # one entry per UNet call; every call ends with a synchronous gather of the output
            assert len(blocked) == len(output) == 6 and all(seconds > 0 for seconds in output), (mode, output)
            assert all(part <= whole for part, whole in zip(output, blocked, strict=True)), (mode, blocked, output)
        # naive patches exchange nothing but the output
        assert result["blocked_naive_patch"] == result["output_blocked_naive_patch"]


@pytest.mark.distributed
def test_distributed_same_seed_same_result(distributed_results):
    assert all(result["same_seed_same_result"] for result in distributed_results)


@pytest.mark.distributed
def test_distributed_bucketed_gathers_change_nothing_but_the_collectives(distributed_results):
    for result in distributed_results:
        assert result["unbucketed_same_result"]
        assert result["bytes_unbucketed"] == result["bytes_corrected_async_gn"]
        assert result["bucket_mixed_dtypes"]


@pytest.mark.distributed
def test_simulator_equals_the_ranks(distributed_results):
    from workbench import zoo
    from workbench.distrifusion import PatchParallelConfig, simulate_patch_parallel
    from workbench.sampling import denoise

    unet, scheduler = zoo.build_toy_uncond_unet().eval(), zoo.sampling_scheduler()
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for mode in ("full_sync", "corrected_async_gn", "naive_patch"):
        with simulate_patch_parallel(unet, PatchParallelConfig(mode=mode, warmup_steps=2), num_devices=2):
            simulated = denoise(unet, scheduler, noise, num_inference_steps=6, progress=False)
        real = distributed_results[0][f"images/{mode}"]
        assert _max_error(simulated, real) <= 1e-4 * max(1.0, float(real.abs().max())), mode


@pytest.mark.distributed
def test_distributed_bad_input_is_refused_on_every_rank(distributed_results):
    for result in distributed_results:
        errors = result["errors"]
        assert "warmup_steps differs across ranks (rank 0: 0; rank 1: 1)" in errors["config"], errors["config"]
        assert "height must be a multiple of" in errors["bad_height"]


def _differs(message: str, field: str, values: list[str]) -> bool:
    """Whether ``message`` names ``field`` as differing with each rank's value (rank r: values[r])."""
    shown = "; ".join(f"rank {rank}: {value}" for rank, value in enumerate(values))
    return f"{field} differs across ranks ({shown})" in message


@pytest.mark.distributed
def test_distributed_mismatched_inputs_name_the_field_and_each_ranks_value(distributed_results):
    errors = [result["errors"] for result in distributed_results]
    first = errors[0]
    for case in ("config", "latents", "prompt", "steps"):
        assert all(e[case] == first[case] for e in errors), case  # the same message on every rank
    latents = [e["latents_sent"] for e in errors]
    assert "before UNet call 1" in first["latents"]
    assert _differs(first["latents"], "the input latents (sample)", latents), first["latents"]
    prompts = [e["prompt_sent"] for e in errors]
    assert _differs(first["prompt"], "the prompt embeddings (encoder_hidden_states)", prompts), first["prompt"]
    assert "input latents" not in first["prompt"]  # the same seed: only the prompt differs
    timesteps = [str(e["second_timestep"]) for e in errors]
    assert timesteps[0] != timesteps[1]
    assert "before UNet call 2" in first["steps"] and _differs(first["steps"], "the timestep", timesteps), first[
        "steps"
    ]
    # each rank says where it stopped: rank 0 on leaving the block, rank 1 before its third call
    positions = ["left the block after 2 UNet calls", "at UNet call 3"]
    assert "on leaving the block" in first["calls"] and "before UNet call 3" in errors[1]["calls"]
    assert all(_differs(e["calls"], "position in the block", positions) for e in errors), first["calls"]


@pytest.mark.distributed
def test_torchrun_command_line(tmp_path):
    """The documented entry point: torchrun --nproc_per_node=2 -m workbench distrifusion ..."""
    from workbench.launch import free_port

    output = tmp_path / "image.png"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "workbench",
        "distrifusion",
        "--model",
        "random:toy-uncond",
        "--height",
        "32",
        "--width",
        "32",
        "--steps",
        "3",
        "--warmup-steps",
        "1",
        "--compare",
        "--timeout",
        "30",
        "--output",
        str(output),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=180, env=env, cwd=Path(__file__).resolve().parent.parent
    )
    print(completed.stdout[-2000:])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "ranks: 2 = 1 batch group(s) x 2 row patch(es)" in completed.stdout
    assert "PSNR of the patch-parallel image" in completed.stdout
    assert output.is_file()


def _stalls_in_step_two(**kwargs) -> dict[str, object]:
    """A :func:`workbench.launch.run` target: :func:`generation_worker`, whose rank 1 hangs in its 2nd UNet call."""
    import time

    import torch.distributed as dist
    from diffusers import UNet2DModel

    from workbench.distrifusion.runner import generation_worker

    calls = [0]

    def hang_on_second_call(module, args):
        calls[0] += 1
        if dist.get_rank() == 1 and calls[0] == 2:
            time.sleep(600)

    hook = UNet2DModel.register_forward_pre_hook  # every UNet2DModel built in this process
    original_init = UNet2DModel.__init__

    def init_with_hook(self, *args, **kw):
        original_init(self, *args, **kw)
        hook(self, hang_on_second_call)

    UNet2DModel.__init__ = init_with_hook
    return generation_worker(**kwargs)


@pytest.mark.distributed
def test_launch_names_the_rank_that_stalls_mid_generation_and_its_step():
    from workbench.distrifusion import PatchParallelConfig
    from workbench.launch import LaunchError, run

    kwargs = dict(
        model="random:toy-uncond",
        config={"mode": "corrected_async_gn", "warmup_steps": 1},
        height=32,
        width=32,
        num_inference_steps=3,
        timeout_s=5.0,
    )
    assert PatchParallelConfig(**kwargs["config"])  # a valid config: the failure is the stall
    with pytest.raises(LaunchError) as caught:
        run(f"{__file__}:_stalls_in_step_two", nproc=2, kwargs=kwargs, timeout_s=120, init_timeout_s=5)
    assert caught.value.rank == 1, str(caught.value)
    assert caught.value.faulty[0].state == "stalled"
    assert caught.value.faulty[0].phase == "denoising: 1/3 steps done", str(caught.value)
