"""Tests of paper 1, optimized time steps (workbench.timesteps)."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from scipy.integrate import quad

from workbench.sampling import denoise, initial_noise, set_timesteps
from workbench.testing import SD_SCHEDULE, tiny_unet2d
from workbench.timesteps import (
    BASELINES,
    SOLVERS,
    NoiseSchedule,
    StepOptimConfig,
    StepSchedule,
    UniPCCustomTimestepsScheduler,
    baseline_schedule,
    bound,
    bound_gradient,
    make_schedule,
    optimize_timesteps,
    order_template,
    schedule_bound,
    solver_scheduler,
    step_weights,
)
from workbench.timesteps.experiment import (
    ExperimentConfig,
    compare_samples,
    compare_schedules,
    reference_timesteps,
    run_experiment,
)


@pytest.fixture(scope="module")
def sd_schedule() -> NoiseSchedule:
    return NoiseSchedule.from_scheduler(DDPMScheduler(**SD_SCHEDULE))


# --- the bound, re-derived independently ------------------------------------------------------------


def _quadrature_bound(lambdas: np.ndarray, orders: np.ndarray, power: float, truncation: int) -> float:
    """F from its definition: Lagrange basis polynomials integrated against e^lambda by adaptive quadrature,
    then the three kinds of terms summed with explicit loops."""
    n = len(lambdas) - 1
    alpha = 1 / np.sqrt(1 + np.exp(-2 * lambdas))
    sigma = 1 / np.sqrt(1 + np.exp(2 * lambdas))
    w = sigma**power / alpha
    total, per_node = 0.0, np.zeros(n)
    for s in range(n):
        nodes = list(range(s - orders[s] + 1, s + 1))

        def basis(x: float, j: int, nodes: list[int] = nodes) -> float:
            return np.prod([(x - lambdas[i]) / (lambdas[j] - lambdas[i]) for i in nodes if i != j])

        weights = {
            j: quad(lambda x, j=j: np.exp(x) * basis(x, j), lambdas[s], lambdas[s + 1], epsabs=0, epsrel=1e-13)[0]
            for j in nodes
        }
        if orders[s] == 1:
            total += abs(w[s] * weights[s])
        elif s < truncation:
            total += np.sqrt(sum((w[j] * weights[j]) ** 2 for j in nodes))
        else:
            for j in nodes:
                per_node[j] += w[j] * weights[j]
    return total + np.abs(per_node).sum()


@pytest.mark.parametrize("num_steps", [3, 4, 5, 7, 9, 12])
def test_bound_agrees_with_quadrature_on_random_grids(num_steps: int) -> None:
    rng = np.random.default_rng(num_steps)
    for order, power, truncation in [(3, 2.0, 3), (2, 1.0, 0), (3, 1.5, 0), (1, 2.0, 3)]:
        lambdas = np.sort(rng.uniform(-5, 5, num_steps + 1))
        orders = order_template(num_steps, order)
        expected = _quadrature_bound(lambdas, orders, power, truncation)
        got = bound(lambdas, orders, power=power, truncation=truncation)
        assert got == pytest.approx(expected, rel=1e-9)


def test_bound_is_batched_and_weights_integrate_constants_exactly() -> None:
    rng = np.random.default_rng(0)
    grids = np.sort(rng.uniform(-3, 3, (4, 8)), axis=-1)
    orders = order_template(7, 3)
    batched = bound(grids, orders)
    assert batched.shape == (4,)
    np.testing.assert_allclose(batched, [bound(g, orders) for g in grids], rtol=1e-13)
    # sum_j J_{s,j} = e^{lambda_{s+1}} - e^{lambda_s}: a constant data prediction is integrated exactly.
    weights = step_weights(grids, orders)
    np.testing.assert_allclose(weights.sum(-1), np.diff(np.exp(grids), axis=-1), rtol=1e-10)


def test_gradient_matches_central_differences() -> None:
    rng = np.random.default_rng(1)
    lambdas = np.sort(rng.uniform(-2.5, 3.5, 9))
    orders = order_template(8, 3)
    grad = bound_gradient(lambdas, orders, truncation=3)
    eye = np.eye(9)[1:-1]
    fd = [(bound(lambdas + 1e-6 * e, orders) - bound(lambdas - 1e-6 * e, orders)) / 2e-6 for e in eye]
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)


def test_order_template() -> None:
    assert order_template(6, 3).tolist() == [1, 2, 3, 3, 2, 1]
    assert order_template(6, 3, lower_order_final=False).tolist() == [1, 2, 3, 3, 3, 3]
    assert order_template(3, 3).tolist() == [1, 2, 1]
    assert order_template(4, 1).tolist() == [1, 1, 1, 1]


# --- the bound's weights are the solvers' (diffusers, run step by step) ------------------------------


def _end_point_coefficients(scheduler, timesteps: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Run ``scheduler`` with x_T = 0 and the data prediction of node j = e_j: the end point is
    sigma_N * C (C_j = sum_s J_{s,j}). Returns the end point and the lambda grid of the scheduler."""
    set_timesteps(scheduler, timesteps=timesteps)
    n = len(timesteps)
    x = torch.zeros(1, n, dtype=torch.float64)
    for j, t in enumerate(scheduler.timesteps):
        x = scheduler.step(torch.eye(n, dtype=torch.float64)[j : j + 1], t, x).prev_sample
    return x[0].numpy(), -np.log(scheduler.sigmas.double().numpy())


def _coefficients(weights: np.ndarray) -> np.ndarray:
    n = weights.shape[0]
    c = np.zeros(n)
    for s, m in itertools.product(range(n), range(3)):
        if s - m >= 0:
            c[s - m] += weights[s, m]
    return c


@pytest.mark.parametrize(("solver", "order"), [("dpmsolver++", 1), ("dpmsolver++", 2), ("unipc", 1), ("unipc", 3)])
def test_bound_weights_are_the_diffusers_solver_weights(solver: str, order: int) -> None:
    config = dict(SD_SCHEDULE, prediction_type="sample")  # the model output is the data prediction itself
    scheduler = solver_scheduler(solver, order, config)
    if solver == "unipc":  # the bound models UniPC's predictor; its corrector is an extra
        scheduler = type(scheduler).from_config(scheduler.config, disable_corrector=list(range(20)))
    timesteps = [999, 700, 520, 350, 200, 90, 30]
    end, lambdas = _end_point_coefficients(scheduler, timesteps)
    orders = order_template(len(timesteps), order)
    weights = step_weights(lambdas, orders)
    if solver == "unipc" and order == 3:
        # UniPC's order-2 steps (warm-up and final) use the midpoint rule, x_theta ~ m_s + (m_s - m_{s-1}) h/(2a);
        # only its order-3 steps use the bound's Lagrange weights.
        h, e = np.diff(lambdas), np.exp(lambdas)
        for s in np.flatnonzero(orders == 2):
            slope = np.expm1(h[s]) * h[s] / (2 * h[s - 1])
            weights[s, :2] = e[s] * np.array([np.expm1(h[s]) + slope, -slope])
    sigma_end = 1 / np.sqrt(1 + np.exp(2 * lambdas[-1]))
    np.testing.assert_allclose(end, sigma_end * _coefficients(weights), rtol=2e-5, atol=1e-7)


# --- the optimiser ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solver", "order", "num_steps"),
    [("unipc", 3, 5), ("unipc", 3, 8), ("dpmsolver++", 2, 6), ("dpmsolver++", 1, 4), ("unipc", 2, 10)],
)
def test_optimizer_is_monotone_keeps_endpoints_is_deterministic_and_lowers_the_bound(
    sd_schedule: NoiseSchedule, solver: str, order: int, num_steps: int
) -> None:
    steps = optimize_timesteps(sd_schedule, num_steps, solver=solver, order=order)
    again = optimize_timesteps(sd_schedule, num_steps, solver=solver, order=order)
    start = baseline_schedule("uniform_lambda", sd_schedule, num_steps)
    assert steps.lambdas.shape == (num_steps + 1,)
    assert np.all(np.diff(steps.lambdas) > 0) and np.all(np.diff(steps.times) < 0)
    assert steps.lambdas[0] == start.lambdas[0] and steps.lambdas[-1] == start.lambdas[-1]
    assert steps.times[0] == 1.0 and steps.times[-1] == pytest.approx(1e-3)
    np.testing.assert_array_equal(steps.lambdas, again.lambdas)
    assert steps.info["bound"] < schedule_bound(start, solver=solver, order=order)
    assert steps.info["bound"] == pytest.approx(schedule_bound(steps, solver=solver, order=order))
    timesteps = steps.timesteps()
    assert timesteps.dtype == np.int64 and len(timesteps) == num_steps
    assert timesteps[0] == 999 and timesteps[-1] >= 1 and np.all(np.diff(timesteps) < 0)


def test_optimizer_on_a_continuous_edm_schedule() -> None:
    edm = NoiseSchedule.from_alpha_sigma(lambda t: np.ones_like(t), lambda t: t, t_max=80.0)
    steps = optimize_timesteps(edm, 6, config=StepOptimConfig(eps=2e-3, power=1.0))
    assert steps.times[0] == 80.0 and steps.times[-1] == 2e-3
    np.testing.assert_allclose(steps.sigmas, steps.times, rtol=1e-9)  # EDM: sigma = t
    with pytest.raises(ValueError, match="continuous"):
        steps.timesteps()


def test_noise_schedule_round_trips(sd_schedule: NoiseSchedule) -> None:
    alphas_cumprod = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod.double().numpy()
    n = np.arange(1000)
    lambdas = sd_schedule.lambda_(sd_schedule.time_of_timestep(n))
    np.testing.assert_allclose(lambdas, 0.5 * np.log(alphas_cumprod / (1 - alphas_cumprod)), rtol=1e-10, atol=1e-12)
    t = np.linspace(1.0, 1e-3, 37)
    np.testing.assert_allclose(sd_schedule.time(sd_schedule.lambda_(t)), t, rtol=1e-10)
    vp = NoiseSchedule.from_alpha_sigma(lambda t: np.exp(-t), lambda t: np.sqrt(-np.expm1(-2 * t)), t_max=3.0)
    t = np.linspace(3.0, 1e-3, 11)
    np.testing.assert_allclose(vp.time(vp.lambda_(t)), t, rtol=1e-10)


# --- baselines --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BASELINES)
def test_baselines_share_endpoints_and_are_monotone(sd_schedule: NoiseSchedule, kind: str) -> None:
    steps = baseline_schedule(kind, sd_schedule, 10)
    start = baseline_schedule("uniform_lambda", sd_schedule, 10)
    assert isinstance(steps, StepSchedule) and steps.name == kind
    assert steps.lambdas[0] == start.lambdas[0] and steps.lambdas[-1] == start.lambdas[-1]
    assert np.all(np.diff(steps.lambdas) > 0)
    assert len(steps.timesteps()) == 10


def test_named_baselines_are_the_known_grids(sd_schedule: NoiseSchedule) -> None:
    from diffusers.schedulers import AysSchedules

    assert baseline_schedule("ays", sd_schedule, 10).timesteps().tolist() == AysSchedules["StableDiffusionTimesteps"]
    uniform = baseline_schedule("uniform_time", sd_schedule, 10).timesteps()
    assert np.abs(uniform - np.linspace(999, 0, 11)[:-1]).max() <= 0.5 + 1e-9  # diffusers' "linspace" spacing
    quadratic = baseline_schedule("time_quadratic", sd_schedule, 4).times
    np.testing.assert_allclose(np.sqrt(quadratic), np.linspace(1, np.sqrt(1e-3), 5), rtol=1e-9)
    karras = baseline_schedule("karras", sd_schedule, 6).sigmas ** (1 / 7)
    np.testing.assert_allclose(np.diff(karras), np.diff(karras)[0], rtol=1e-9)


def test_any_schedule_fits_any_solver(sd_schedule: NoiseSchedule) -> None:
    found = compare_schedules(sd_schedule, solver="dpmsolver++", order=2, num_steps=10, baselines=BASELINES)
    assert list(found) == ["optimized", *BASELINES]
    assert all(found["optimized"].info["bound"] <= s.info["bound"] for s in found.values())
    assert "ays" not in compare_schedules(sd_schedule, num_steps=6, baselines=["ays"])


# --- diffusers round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_custom_timesteps_round_trip_through_diffusers(sd_schedule: NoiseSchedule, solver: str) -> None:
    order = 3 if solver == "unipc" else 2
    steps = optimize_timesteps(sd_schedule, 5, solver=solver, order=order)
    scheduler = solver_scheduler(solver, order, DPMSolverMultistepScheduler(**SD_SCHEDULE))
    assert scheduler.config.final_sigmas_type == "sigma_min" and scheduler.config.solver_order == order
    unet = tiny_unet2d(sample_size=8)
    latents = initial_noise((2, 3, 8, 8), torch.Generator().manual_seed(0))
    seen = []
    out = denoise(
        unet,
        scheduler,
        latents,
        timesteps=steps.timesteps(),
        callback=lambda i: seen.append(int(i.timestep)),
        progress=False,
    )
    assert seen == steps.timesteps().tolist() == scheduler.timesteps.tolist()
    # sigmas: the table at the requested timesteps, then sigma(t_0) (the bound's end point).
    table = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5
    np.testing.assert_allclose(scheduler.sigmas.numpy(), table[[*seen, 0]].numpy(), rtol=1e-6)
    assert torch.isfinite(out).all()
    again = denoise(
        unet,
        scheduler,
        initial_noise((2, 3, 8, 8), torch.Generator().manual_seed(0)),
        timesteps=steps.timesteps(),
        progress=False,
    )
    torch.testing.assert_close(out, again, rtol=0, atol=0)  # same seed, same samples


@pytest.mark.parametrize("final_sigmas_type", ["sigma_min", "zero"])
def test_unipc_custom_timesteps_match_its_own_set_timesteps(final_sigmas_type: str) -> None:
    # Custom timesteps must give the arrays UniPC builds itself for the same points.
    own = UniPCMultistepScheduler(**SD_SCHEDULE, final_sigmas_type=final_sigmas_type)
    own.set_timesteps(8)
    custom = UniPCCustomTimestepsScheduler.from_config(own.config)
    custom.set_timesteps(timesteps=own.timesteps.numpy())
    torch.testing.assert_close(custom.timesteps, own.timesteps)
    torch.testing.assert_close(custom.sigmas, own.sigmas)
    assert custom.num_inference_steps == 8


def test_unipc_custom_timesteps_scheduler_is_a_diffusers_scheduler(tmp_path) -> None:
    scheduler = solver_scheduler("unipc", 3, EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading"))
    assert type(scheduler) is UniPCCustomTimestepsScheduler and isinstance(scheduler, UniPCMultistepScheduler)
    assert "timesteps" in inspect.signature(scheduler.set_timesteps).parameters  # what retrieve_timesteps checks

    # from_config round-trips, in both directions, and through a saved config.
    def settings(scheduler) -> dict:  # the constructor arguments, without diffusers' private bookkeeping
        return {key: value for key, value in scheduler.config.items() if not key.startswith("_")}

    again = UniPCCustomTimestepsScheduler.from_config(scheduler.config)
    assert settings(again) == settings(scheduler)
    stock = UniPCMultistepScheduler.from_config(scheduler.config)
    assert settings(UniPCCustomTimestepsScheduler.from_config(stock.config)) == settings(scheduler)
    assert DPMSolverMultistepScheduler.from_config(scheduler.config).config.solver_order == 3
    scheduler.save_pretrained(tmp_path)
    loaded = UniPCCustomTimestepsScheduler.from_pretrained(tmp_path)
    assert settings(loaded) == settings(scheduler) and loaded.config._class_name == "UniPCCustomTimestepsScheduler"
    # A run over custom timesteps, then a plain one: each set_timesteps starts afresh.
    scheduler.set_timesteps(timesteps=[999, 600, 300, 50])
    assert scheduler.timesteps.tolist() == [999, 600, 300, 50] and len(scheduler.sigmas) == 5
    scheduler.set_timesteps(6)
    assert len(scheduler.timesteps) == 6 and scheduler.step_index is None and scheduler.lower_order_nums == 0


def test_stock_unipc_takes_no_custom_timesteps_here_as_in_the_pipelines() -> None:
    stock = UniPCMultistepScheduler(**SD_SCHEDULE)
    with pytest.raises(TypeError, match="UniPCCustomTimestepsScheduler"):
        set_timesteps(stock, timesteps=[999, 500, 10])
    custom = UniPCCustomTimestepsScheduler(**SD_SCHEDULE)
    with pytest.raises(ValueError, match="only one of num_inference_steps"):
        custom.set_timesteps(3, timesteps=[999, 500, 10])
    with pytest.raises(ValueError, match="strictly decreasing"):
        custom.set_timesteps(timesteps=[10, 500, 999])
    flow = UniPCCustomTimestepsScheduler(**SD_SCHEDULE, use_flow_sigmas=True, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        flow.set_timesteps(timesteps=[999, 500, 10])


def test_experiment_measures_every_cell() -> None:
    class Pipe:  # an unconditional pipeline: unet + scheduler
        unet = tiny_unet2d(sample_size=16)
        scheduler = DPMSolverMultistepScheduler(**SD_SCHEDULE)

    config = ExperimentConfig(
        num_steps=(4, 10),
        schedules=("optimized", "uniform_lambda", "ays"),
        num_images=3,
        num_error_images=2,
        reference_steps=20,
        batch_size=2,
    )
    result = run_experiment(Pipe(), config=config, progress=False)
    assert len(result.rows) == 2 * (2 * 2 + 1)  # ays only at N = 10
    assert all(np.isfinite(r["ode_error"]) and r["fd"] is None for r in result.rows)
    assert result.reference["self_error"] >= 0 and result.reference["steps"] > result.reference["half_steps"]
    table = result.table("ode_error")
    assert len(table) == 4 and table[0]["ays"] == "n/a"
    assert "low-N cases" in result.verdict()
    samples = compare_samples(Pipe(), {"a": [999, 500, 100], "b": [999, 300, 50]}, num_images=2, order=2)
    assert samples["a"].shape == (2, 3, 16, 16) and 0 <= float(samples["a"].min()) <= float(samples["a"].max()) <= 1


def test_reference_timesteps_are_distinct_and_dense_at_the_end(sd_schedule: NoiseSchedule) -> None:
    points = reference_timesteps(sd_schedule, 400)
    assert points[0] == 999 and points[-1] == 1 and np.all(np.diff(points) < 0)
    assert points[-5:].tolist() == [5, 4, 3, 2, 1]


# --- bad input --------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error(sd_schedule: NoiseSchedule) -> None:
    with pytest.raises(ValueError, match="num_steps must be >= order"):
        optimize_timesteps(sd_schedule, 2, order=3)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        optimize_timesteps(sd_schedule, 6, order=4)
    with pytest.raises(ValueError, match="solver must be one of"):
        optimize_timesteps(sd_schedule, 6, solver="ddim")
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        optimize_timesteps(sd_schedule, 0, order=1)
    with pytest.raises(ValueError, match="eps must lie in"):
        optimize_timesteps(sd_schedule, 6, config=StepOptimConfig(eps=2.0))
    with pytest.raises(ValueError, match="name must be one of"):
        make_schedule("linear", sd_schedule, 6)
    with pytest.raises(ValueError, match="num_steps must be 10"):
        baseline_schedule("ays", sd_schedule, 6)


@pytest.mark.parametrize(
    ("field", "value"), [("power", -1.0), ("truncation", -1), ("init", "edm"), ("eps", 0.0), ("max_iter", 0)]
)
def test_config_validates_every_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        StepOptimConfig(**{field: value})


def test_schedules_the_optimiser_cannot_handle() -> None:
    with pytest.raises(ValueError, match="zero terminal SNR"):
        NoiseSchedule.from_scheduler(DDPMScheduler(**SD_SCHEDULE, rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="zero terminal SNR"):  # continuous: alpha(T) = 0
        NoiseSchedule.from_alpha_sigma(lambda t: 1 - t, lambda t: t, t_max=1.0)
    with pytest.raises(TypeError, match="no alphas_cumprod"):
        NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="decrease strictly"):
        NoiseSchedule.from_alpha_sigma(lambda t: np.ones_like(t), lambda t: 2.0 - t, t_max=1.0)


@pytest.mark.parametrize("num_train_timesteps", [10, 50, 300])
def test_short_discrete_schedules_build_and_optimise(num_train_timesteps: int) -> None:
    ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps)
    schedule = NoiseSchedule.from_scheduler(ddpm)
    assert schedule.t_min == 1 / num_train_timesteps
    alphas_cumprod = ddpm.alphas_cumprod.double().numpy()
    n = np.arange(num_train_timesteps)
    np.testing.assert_allclose(
        schedule.lambda_(schedule.time_of_timestep(n)), 0.5 * np.log(alphas_cumprod / (1 - alphas_cumprod)), rtol=1e-10
    )
    steps = optimize_timesteps(schedule, 4, solver="unipc", order=3)
    assert steps.times[-1] == schedule.t_min  # eps defaults to timestep 0 of the schedule
    timesteps = steps.timesteps()
    assert timesteps[0] == num_train_timesteps - 1 and timesteps[-1] >= 1 and np.all(np.diff(timesteps) < 0)
    assert steps.info["bound"] < steps.info["bound_start"]
    uniform = baseline_schedule("uniform_time", schedule, 4)
    assert uniform.timesteps()[0] == num_train_timesteps - 1
    # A run of the stock solver over those timesteps, on the 10-step schedule too.
    scheduler = solver_scheduler("unipc", 3, ddpm)
    scheduler.set_timesteps(timesteps=timesteps)
    assert scheduler.timesteps.tolist() == timesteps.tolist()


def test_a_ten_entry_alphas_cumprod_table_builds() -> None:
    table = np.cumprod(1 - np.linspace(0.05, 0.5, 10))
    schedule = NoiseSchedule.from_alphas_cumprod(table)
    assert schedule.num_train_timesteps == 10
    np.testing.assert_allclose(schedule.lambda_(1.0), 0.5 * np.log(table[-1] / (1 - table[-1])))
    np.testing.assert_allclose(schedule.lambda_(0.1), 0.5 * np.log(table[0] / (1 - table[0])))


def test_eps_below_timestep_zero_of_a_discrete_schedule_is_refused() -> None:
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=50))
    with pytest.raises(ValueError, match=r"eps must lie in \[1/50, T\)"):
        optimize_timesteps(schedule, 4, config=StepOptimConfig(eps=1e-3))
    with pytest.raises(ValueError, match="eps must lie in"):
        baseline_schedule("uniform_lambda", schedule, 4, eps=0.01)


@pytest.mark.parametrize(
    "grid",
    [
        [-2.0, 0.5, 0.1, 3.0],  # not monotone
        [3.0, 1.0, 0.0, -2.0],  # reversed
        [-2.0, 0.0, 0.0, 3.0],  # a repeated node
        [-2.0, np.nan, 3.0],
        [[-2.0, 0.0, 3.0]],  # not 1-D
        [1.0],
    ],
)
def test_schedule_bound_refuses_a_grid_that_is_not_increasing(grid: list) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        schedule_bound(np.array(grid), solver="unipc", order=1)


def test_steps_that_round_to_duplicate_timesteps_are_rejected(sd_schedule: NoiseSchedule) -> None:
    crowded = StepSchedule(
        "crowded", np.array([-2.682, -2.6815, 0.0, 3.5347]), np.array([1.0, 0.9996, 0.3, 1e-3]), 1000
    )
    with pytest.raises(ValueError, match="repeated integer timesteps"):
        crowded.timesteps()
    scheduler = solver_scheduler("unipc", 2, SD_SCHEDULE)
    with pytest.raises(ValueError, match="strictly decreasing"):
        set_timesteps(scheduler, timesteps=[999, 500, 500, 10])
    with pytest.raises(ValueError, match="integers"):
        set_timesteps(scheduler, timesteps=[999.0, 500.5, 10.0])
    karras = type(scheduler).from_config(scheduler.config, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        set_timesteps(karras, timesteps=[999, 500, 10])


def test_reproduce_writes_a_section_with_table_and_figures(tmp_path, monkeypatch) -> None:
    from workbench import zoo
    from workbench.timesteps import reproduce

    class Pipe:
        unet = tiny_unet2d(sample_size=16)
        scheduler = DPMSolverMultistepScheduler(**SD_SCHEDULE)

    class Features(torch.nn.Module):  # stands in for the toy CLIP: any image -> feature map
        def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
            return torch.nn.functional.avg_pool2d(images, 8).flatten(1)

    tiny = ExperimentConfig(
        num_steps=(4,),
        schedules=("optimized", "uniform_lambda"),
        num_images=4,
        num_error_images=2,
        reference_steps=20,
    )
    monkeypatch.setattr(ExperimentConfig, "quick", classmethod(lambda cls: tiny))
    monkeypatch.setattr(zoo, "load", lambda name: Pipe() if name == "toy-t2i" else Features())
    section = reproduce(quick=True, out_dir=tmp_path / "timesteps")
    assert len(section.rows) == 4 and {r["metric"] for r in section.rows} == {"ode_error", "fd"}
    assert all(path.is_file() for path in section.figures) and len(section.figures) == 5
    text = section.to_markdown(tmp_path)
    assert "uniform_lambda" in text and "low-N cases" in section.verdict


def test_panel_reoptimises_and_samples_the_toy_text_to_image_pipeline(sd_schedule: NoiseSchedule, capsys) -> None:
    import ipywidgets

    from workbench import zoo
    from workbench.pipelines import ToyTextToImagePipeline
    from workbench.toyclip import ToyCLIPModel
    from workbench.widgets.timesteps import schedule_panel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = ToyCLIPModel(vision_layers=1, text_layers=1).eval()
    pipe = ToyTextToImagePipeline(zoo.build_toy_t2i_unet().eval(), zoo.sampling_scheduler(), text_encoder)
    schedules = compare_schedules(sd_schedule, solver="dpmsolver++", order=2, num_steps=3)
    samples = compare_samples(pipe, schedules, solver="dpmsolver++", order=2, num_images=2, prompt="a red circle")
    assert list(samples) == ["optimized", "uniform_lambda"] and samples["optimized"].shape == (2, 3, 32, 32)
    assert not torch.equal(samples["optimized"], samples["uniform_lambda"])
    assert pipe.scheduler.config.solver_type == "midpoint"  # the pipeline's own scheduler is left alone

    # Outside a kernel the panel's outputs print to stdout: figures as their repr, bad knobs as a message.
    panel = schedule_panel(sd_schedule, pipe, num_steps=3, num_images=1)
    assert isinstance(panel, ipywidgets.VBox)
    controls = {c.description: c for box in panel.children[:2] for c in box.children}
    controls["order"].value = 2
    controls["Run"].click()
    shown = capsys.readouterr().out
    assert shown.count("Figure") == 3 and "error" not in shown
    controls["N (NFE)"].value = 1  # below the order: a message, not an exception
    assert "error: num_steps must be >= order" in capsys.readouterr().out


def test_verdict_counts_wins_against_uniform_logsnr_and_against_the_best_other_schedule():
    from workbench.timesteps.experiment import ExperimentConfig, ExperimentResult

    errors = {  # N -> schedule -> ODE error: optimized beats uniform_lambda at N = 4 and 5, uniform_time beats both
        4: {"optimized": 0.18, "uniform_lambda": 0.25, "uniform_time": 0.14},
        5: {"optimized": 0.10, "uniform_lambda": 0.16, "uniform_time": 0.12},
        6: {"optimized": 0.12, "uniform_lambda": 0.11, "uniform_time": 0.06},
    }
    rows = [
        {"solver": "dpmsolver++", "order": 2, "num_steps": n, "schedule": name, "ode_error": value, "fd": None}
        for n, values in errors.items()
        for name, value in values.items()
    ]
    result = ExperimentResult(rows=rows, reference={}, previews={}, config=ExperimentConfig.quick())
    assert [(n, name) for _, n, _, name, _ in result.best_other("ode_error")] == [
        (4, "uniform_time"),
        (5, "uniform_time"),
        (6, "uniform_time"),
    ]
    verdict = result.verdict()
    assert "optimized beats uniform-logSNR in 2 of 3 low-N cases" in verdict
    assert "Against the best other schedule at each N it wins 1 of 3" in verdict
    assert "dpmsolver++ (2) N=4 (0.18 vs uniform_time 0.14)" in verdict
