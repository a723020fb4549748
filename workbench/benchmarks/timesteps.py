"""``python -m workbench bench timesteps``: time to optimise the steps, per (solver, order, N).

The paper reports under 15 s per schedule; our target is under 1 s for N <= 10 on a 2-core CPU. The
schedule is Stable Diffusion's (the zoo's), the settings the defaults of ``StepOptimConfig``. With
``--official`` each row also times the official code's procedure on the same bound (scipy ``trust-constr``
with its default 2-point finite-difference gradient, from the same start) and gives the bound it reaches.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
from scipy.optimize import LinearConstraint, minimize

from workbench.runtime import describe_machine
from workbench.timesteps import (
    SOLVERS,
    NoiseSchedule,
    StepOptimConfig,
    StepSchedule,
    baseline_schedule,
    bound,
    optimize_timesteps,
    order_template,
)


def _official_procedure(steps: StepSchedule, schedule: NoiseSchedule, solver: str, order: int) -> tuple[float, float]:
    """Seconds and bound of trust-constr + finite differences (step_optim.py's call) on our bound."""
    start = baseline_schedule("uniform_lambda", schedule, steps.num_steps).lambdas
    n = steps.num_steps
    matrix = np.zeros((n, n - 1))
    matrix[np.arange(n - 1), np.arange(n - 1)] = 1.0
    matrix[np.arange(1, n), np.arange(n - 1)] = -1.0
    lower = np.zeros(n)
    lower[0], lower[-1] = start[0], -start[-1]

    # The raw bound, evaluated wherever trust-constr probes as in step_optim.py (schedule_bound refuses
    # grids that are not increasing); step orders as optimize_timesteps models the diffusers solvers.
    config = StepOptimConfig()
    orders = order_template(n, order, lower_order_final=solver == "unipc" or n < 15)
    truncation = config.truncation_for(n)

    def objective(x: np.ndarray) -> float:
        grid = np.concatenate([start[:1], x, start[-1:]])
        return float(bound(grid, orders, power=config.power, truncation=truncation))

    began = time.perf_counter()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        result = minimize(
            objective, start[1:-1], method="trust-constr", constraints=[LinearConstraint(matrix, lower, np.inf)]
        )
    return time.perf_counter() - began, float(result.fun)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench bench timesteps")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 5, 6, 8, 10, 15, 20], help="the N values")
    parser.add_argument("--orders", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--official", action="store_true", help="also time the official trust-constr procedure")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    print(f"machine: {describe_machine()}")
    from workbench import zoo

    schedule = NoiseSchedule.from_scheduler(zoo.noise_scheduler())
    optimize_timesteps(schedule, 4)  # warm-up (imports, first calls)
    header = f"{'solver':>12s} {'order':>5s} {'N':>3s} {'median s':>9s} {'max s':>7s} {'iters':>5s} "
    header += f"{'bound start':>11s} {'bound':>9s}"
    print(header + (f" {'official s':>10s} {'official bound':>14s}" if args.official else ""))
    for solver in args.solvers:
        for order in args.orders:
            for num_steps in args.steps:
                if num_steps < order:
                    continue
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    steps = optimize_timesteps(schedule, num_steps, solver=solver, order=order)
                    times.append(time.perf_counter() - start)
                info = steps.info
                line = f"{solver:>12s} {order:>5d} {num_steps:>3d} {statistics.median(times):>9.3f} "
                line += (
                    f"{max(times):>7.3f} {info['iterations']:>5d} {info['bound_start']:>11.4g} {info['bound']:>9.4g}"
                )
                if args.official and num_steps >= 2:
                    seconds, value = _official_procedure(steps, schedule, solver, order)
                    line += f" {seconds:>10.2f} {value:>14.4g}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
