"""Find the N time steps that minimise the bound, and hand them to diffusers.

:func:`optimize_timesteps` minimises :func:`~workbench.timesteps.objective.bound` over the interior
half log-SNR nodes lambda_1..lambda_{N-1}, endpoints fixed, steps monotone. The official code uses
``trust-constr`` with finite-difference gradients (up to ~7 s here, and for N >= 8 its result moves by up
to 0.4 in lambda when the start moves by 1e-7). We use SLSQP with the exact complex-step gradient and the
same linear constraints: it reaches equal or lower objective values in ~0.01-0.2 s for N <= 10
(``python -m workbench bench timesteps``) and is stable under such perturbations.

:func:`solver_scheduler` builds the diffusers scheduler whose update weights are the ones the bound
models, and :func:`make_schedule` builds any schedule (optimised or baseline) by name.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from diffusers import DPMSolverMultistepScheduler, SchedulerMixin
from scipy.optimize import LinearConstraint, minimize

from workbench.timesteps.objective import bound, bound_gradient, order_template
from workbench.timesteps.schedule import BASELINES, NoiseSchedule, StepSchedule, baseline_schedule
from workbench.timesteps.scheduler import UniPCCustomTimestepsScheduler

__all__ = [
    "SCHEDULE_NAMES",
    "SOLVERS",
    "Solver",
    "StepOptimConfig",
    "make_schedule",
    "optimize_timesteps",
    "schedule_bound",
    "solver_scheduler",
]

logger = logging.getLogger(__name__)

Solver = Literal["dpmsolver++", "unipc"]
SOLVERS: tuple[str, ...] = get_args(Solver)
SCHEDULE_NAMES: tuple[str, ...] = ("optimized", *BASELINES)
Init = Literal["uniform_lambda", "uniform_time", "time_quadratic", "karras"]

# Smallest step allowed to the optimiser, as a fraction of the mean step: the Lagrange weights divide by
# the previous step lengths, so a collapsed step is a pole of the bound, never an optimum.
_MIN_STEP_FRACTION = 1e-3


@dataclass(frozen=True)
class StepOptimConfig:
    """Settings of the optimisation (defaults: the official code, scxue/DM-NonUniform ``step_optim.py``).

    Attributes:
        power: p in the node error scale w_j = sigma_j^p / alpha_j. The code uses 2; its comment says 1
            (the eps-to-x_0 error factor sigma/alpha) is better for pixel space.
        truncation: tau, the first step whose errors are summed per node with sign; None picks the code
            comment's rule, 3 for N <= 7 and 0 beyond (also what LD3's reimplementation uses).
        eps: t_0, where sampling ends. None: timestep 0 of a discrete schedule (t = 1 / num_train_timesteps,
            1e-3 for 1000 steps: DPM-Solver's and UniPC's default ``t_end``), 1e-3 for a continuous one.
            A discrete schedule takes no eps below timestep 0.
        init: the starting grid: "uniform_lambda" (official "unif", recommended for pixel space),
            "uniform_time" ("unif_t", latent space), "time_quadratic" ("quad") or "karras" ("edm").
        max_iter: SLSQP iterations (ours; the official trust-constr stops at 1000).
        tolerance: SLSQP's ``ftol`` (ours).
    """

    power: float = 2.0  # step_optim.py: data_err_vec = sigma**2 / alpha
    truncation: int | None = 3  # step_optim.py: truncNum = 3 (its comment: "0 for NFE > 7"; that is None)
    eps: float | None = None  # DPM-Solver / UniPC default t_end = 1 / N_train
    init: Init = "uniform_lambda"  # step_optim.py README: "unif" for pixel-space models
    max_iter: int = 500
    tolerance: float = 1e-12

    def __post_init__(self) -> None:
        if not (isinstance(self.power, int | float) and 0 <= self.power <= 4):
            raise ValueError(f"power must be a number in [0, 4], got {self.power!r}")
        if self.truncation is not None and (
            isinstance(self.truncation, bool) or not isinstance(self.truncation, int) or self.truncation < 0
        ):
            raise ValueError(f"truncation must be None or an integer >= 0, got {self.truncation!r}")
        if self.eps is not None and not (isinstance(self.eps, int | float) and self.eps > 0):
            raise ValueError(f"eps must be None or a positive number, got {self.eps!r}")
        if self.init not in get_args(Init):
            raise ValueError(f"init must be one of {get_args(Init)}, got {self.init!r}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if not (isinstance(self.tolerance, int | float) and self.tolerance > 0):
            raise ValueError(f"tolerance must be a positive number, got {self.tolerance!r}")

    def truncation_for(self, num_steps: int) -> int:
        """tau for N steps."""
        if self.truncation is not None:
            return self.truncation
        return 3 if num_steps <= 7 else 0


def _check_solver(solver: str, order: int) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if isinstance(order, bool) or not isinstance(order, int | np.integer) or not 1 <= order <= 3:
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")


def _template(solver: str, order: int, num_steps: int) -> np.ndarray:
    # diffusers' DPMSolverMultistep lowers the order of its last steps only below 15 steps (with
    # final_sigmas_type="sigma_min"); UniPC always does.
    return order_template(num_steps, order, lower_order_final=solver == "unipc" or num_steps < 15)


def schedule_bound(
    steps: StepSchedule | np.ndarray,
    *,
    solver: Solver = "unipc",
    order: int = 3,
    config: StepOptimConfig | None = None,
) -> float:
    """The bound F of any schedule (or (N + 1,) lambda grid) for ``solver`` of ``order``: compare schedules.

    Raises:
        ValueError: the grid is not a finite, strictly increasing 1-D lambda grid of >= 2 points (noise
            end first), where the bound is undefined.
    """
    _check_solver(solver, order)
    config = config or StepOptimConfig()
    lambdas = np.asarray(steps.lambdas if isinstance(steps, StepSchedule) else steps, dtype=np.float64)
    if lambdas.ndim != 1 or len(lambdas) < 2 or not np.all(np.isfinite(lambdas)) or np.any(np.diff(lambdas) <= 0):
        raise ValueError(
            "steps: the bound needs a finite, strictly increasing 1-D half log-SNR grid of >= 2 points "
            f"(noise end first), got {np.array2string(lambdas, precision=4)}"
        )
    num_steps = len(lambdas) - 1
    orders = _template(solver, order, num_steps)
    return float(bound(lambdas, orders, power=config.power, truncation=config.truncation_for(num_steps)))


def optimize_timesteps(
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    solver: Solver = "unipc",
    order: int = 3,
    config: StepOptimConfig | None = None,
) -> StepSchedule:
    """The N steps that minimise the paper's bound for a multistep ``solver`` of ``order``.

    The paper (arXiv 2402.17376) poses the choice of steps as a constrained problem over the interior
    nodes and solves it with a trust-region method. Here the objective is the bound F(lambda) of
    :func:`~workbench.timesteps.objective.bound` with the step orders k_s of the solver as diffusers runs it
    (warm-up, and lower-order final steps), the node scale w_j = sigma_j^p / alpha_j and the truncation
    tau of ``config``. The endpoints lambda(T) and lambda(eps) stay fixed, the steps stay monotone.

    Args:
        schedule: the model's noise schedule (:meth:`NoiseSchedule.from_scheduler`).
        num_steps: N, the number of model evaluations (>= ``order``).
        solver: "dpmsolver++" or "unipc" (multistep, data prediction).
        order: 1, 2 or 3.
        config: optimisation settings (defaults: the official code's).

    Returns:
        A :class:`StepSchedule` named "optimized"; ``info`` holds the bound at the start and at the
        result, the iterations and the seconds taken.

    Example (toy-t2i, ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` alike):
        >>> steps = optimize_timesteps(NoiseSchedule.from_scheduler(pipe.scheduler), 6, solver="unipc")
        >>> pipe.scheduler = solver_scheduler("unipc", 3, pipe.scheduler)
        >>> images = pipe("a red circle", timesteps=steps.timesteps()).images
    """
    _check_solver(solver, order)
    start_time = time.perf_counter()
    config = config or StepOptimConfig()
    eps = schedule.resolve_eps(config.eps)
    start = baseline_schedule(config.init, schedule, num_steps, eps=eps).lambdas  # also checks num_steps
    if num_steps < order:
        raise ValueError(f"num_steps must be >= order ({order}) for a multistep solver, got {num_steps}")
    orders = _template(solver, order, num_steps)
    truncation = config.truncation_for(num_steps)

    def objective(interior: np.ndarray) -> float:
        return float(bound(_with_ends(interior, start), orders, power=config.power, truncation=truncation))

    def gradient(interior: np.ndarray) -> np.ndarray:
        return bound_gradient(_with_ends(interior, start), orders, power=config.power, truncation=truncation)

    start_value = objective(start[1:-1])
    # On a discrete schedule the model only knows integer timesteps, and diffusers rounds to them: keep
    # the evaluation points at least one timestep above the end t_0, so that none rounds onto it.
    cap = start[-1]
    if schedule.is_discrete:
        end = np.rint(schedule.timestep_of_time(eps))
        cap = min(cap, float(schedule.lambda_(schedule.time_of_timestep(end + 1))))
    first = start[1:-1]
    if num_steps >= 2 and first.max() > cap:  # many steps: squeeze the start into the allowed range
        first = start[0] + (first - start[0]) * (cap - start[0]) / (start[-1] - start[0])
    lambdas, iterations, message = _with_ends(first, start), 0, "nothing to optimise (one step)"
    if num_steps >= 2:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            # SLSQP's line search may probe outside the box; those points are rejected, not used.
            warnings.simplefilter("ignore", RuntimeWarning)
            result = minimize(
                objective,
                first,
                jac=gradient,
                method="SLSQP",
                bounds=[(start[0], cap)] * (num_steps - 1),
                constraints=[_monotone_constraint(start, num_steps)],
                options={"maxiter": config.max_iter, "ftol": config.tolerance},
            )
        lambdas, iterations, message = _with_ends(result.x, start), int(result.nit), str(result.message)
        if not result.success:
            logger.info("optimize_timesteps: SLSQP stopped (%s); the bound still fell", message)
    value = objective(lambdas[1:-1])
    if not (np.all(np.isfinite(lambdas)) and np.all(np.diff(lambdas) > 0) and value <= objective(first)):
        raise RuntimeError(
            f"optimize_timesteps: the optimiser returned an invalid grid ({message}); bound {value} vs start "
            f"{objective(first)}, lambdas {lambdas.tolist()}"
        )
    info = {
        "solver": solver,
        "order": order,
        "power": config.power,
        "truncation": truncation,
        "init": config.init,
        "eps": eps,
        "bound_start": start_value,
        "bound": value,
        "iterations": iterations,
        "seconds": time.perf_counter() - start_time,
        "message": message,
    }
    return StepSchedule.from_lambdas("optimized", lambdas, schedule, eps=eps, info=info)


def _with_ends(interior: np.ndarray, start: np.ndarray) -> np.ndarray:
    return np.concatenate([start[:1], interior, start[-1:]])


def _monotone_constraint(start: np.ndarray, num_steps: int) -> LinearConstraint:
    # Rows: lambda_1 - lambda_T, lambda_{i+1} - lambda_i, lambda_eps - lambda_{N-1}, each >= the minimum step.
    matrix = np.zeros((num_steps, num_steps - 1))
    matrix[np.arange(num_steps - 1), np.arange(num_steps - 1)] = 1.0
    matrix[np.arange(1, num_steps), np.arange(num_steps - 1)] = -1.0
    min_step = _MIN_STEP_FRACTION * (start[-1] - start[0]) / num_steps
    lower = np.full(num_steps, min_step)
    lower[0] += start[0]
    lower[-1] -= start[-1]
    return LinearConstraint(matrix, lower, np.inf)


def make_schedule(
    name: str,
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    solver: Solver = "unipc",
    order: int = 3,
    config: StepOptimConfig | None = None,
) -> StepSchedule:
    """Any schedule by name: "optimized" (for ``solver``/``order``) or a baseline of :data:`BASELINES`.

    Every schedule carries ``info["bound"]``, the bound for ``solver``/``order``, so they compare directly.
    """
    config = config or StepOptimConfig()
    if name == "optimized":
        return optimize_timesteps(schedule, num_steps, solver=solver, order=order, config=config)
    if name not in BASELINES:
        raise ValueError(f"name must be one of {SCHEDULE_NAMES}, got {name!r}")
    steps = baseline_schedule(name, schedule, num_steps, eps=config.eps)
    value = schedule_bound(steps, solver=solver, order=order, config=config)
    return StepSchedule(steps.name, steps.lambdas, steps.times, steps.num_train_timesteps, {"bound": value})


def solver_scheduler(solver: Solver, order: int, base: object) -> SchedulerMixin:
    """A diffusers scheduler that runs ``solver`` of ``order`` the way the bound models it.

    It keeps the betas, ``prediction_type`` and other settings of ``base`` (a scheduler or its config)
    and sets what the bound assumes: data prediction, lower-order final steps, a last step that ends at
    sigma(t_0) (``final_sigmas_type="sigma_min"``; the default "zero" replaces it by a jump to x_0), no
    built-in sigma spacing. DPM-Solver++ gets ``solver_type="heun"``, whose second-order weights are
    the bound's (the default "midpoint" differs); its third order uses other weights than the bound's
    Lagrange ones. UniPC keeps diffusers' default "bh2"; its third-order predictor matches the bound,
    and its corrector (not modelled by the bound) runs after every step but the last.

    Both take custom ``timesteps`` in ``set_timesteps``, so the optimised steps go through a stock
    pipeline's ``pipe(..., timesteps=steps.timesteps())``: DPM-Solver++ is diffusers'
    ``DPMSolverMultistepScheduler``, UniPC is :class:`~workbench.timesteps.UniPCCustomTimestepsScheduler`
    (diffusers' ``UniPCMultistepScheduler`` takes no custom timesteps for VP models).
    """
    _check_solver(solver, order)
    config = dict(base.config if hasattr(base, "config") else base)
    common = dict(
        solver_order=order,
        lower_order_final=True,
        final_sigmas_type="sigma_min",
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
    )
    if solver == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(
            config,
            **common,
            algorithm_type="dpmsolver++",
            solver_type="heun",
            use_lu_lambdas=False,
            euler_at_final=False,
        )
    unipc = dict(config)
    if unipc.get("solver_type") not in ("bh1", "bh2"):
        unipc.pop("solver_type", None)  # e.g. DPM's "midpoint": not a UniPC variant
    return UniPCCustomTimestepsScheduler.from_config(unipc, **common, predict_x0=True, use_flow_sigmas=False)
