"""Optimized time steps for fast diffusion sampling (paper 1).

Shuchen Xue, Zhaoqiang Liu, Fei Chen, Shifeng Zhang, Tianyang Hu, Enze Xie, Zhenguo Li, "Accelerating
Diffusion Sampling with Optimized Time Steps", CVPR 2024, arXiv:2402.17376. Official code:
scxue/DM-NonUniform (``step_optim.py``), whose objective is the one implemented here.

The idea, in our words: a multistep ODE solver (DPM-Solver++, UniPC) integrates the probability-flow ODE
in the half log-SNR lambda, replacing the unknown data prediction x_theta by a polynomial through the
last few model outputs. With N model evaluations the end point is a fixed linear combination of those
outputs, whose coefficients depend only on where the N steps sit. If each output carries an error that
scales like sigma^p / alpha at its node, the end-point error is bounded by a function F of the grid
alone, with no model and no data. Minimising F over the N - 1 interior nodes (endpoints fixed, steps
monotone) is a tiny constrained problem: the paper solves it in under 15 s, we in well under a second.

Key equations. In lambda the probability-flow ODE of the data prediction is linear, so its exact
solution from lambda_s to lambda_{s+1} has one integral left (the exponential-integrator form of
DPM-Solver++, on which the paper builds):

    x_{s+1} = (sigma_{s+1} / sigma_s) x_s + sigma_{s+1} int_{lambda_s}^{lambda_{s+1}} e^lambda x_theta(lambda) d lambda;

step s of order k_s replaces x_theta by the Lagrange polynomial through nodes s-k_s+1..s, with weights
J_{s,j} = int e^lambda l_{s,j}(lambda) d lambda, and the bound is

    F(lambda) = sum_{k_s = 1} w_s |J_{s,s}| + sum_{s < tau, k_s >= 2} ||(w_j J_{s,j})_j||_2
                + sum_j |sum_{s >= tau, k_s >= 2} w_j J_{s,j}|,    w_j = sigma_j^p / alpha_j,

with k_s = min(order, s + 1, N - s). This is the objective of the official ``step_optim.py``
(``sel_lambdas_lof_obj``: first-order steps alone, per-step Euclidean norms for the first tau steps,
signed per-node sums after them); the paper states its idea, a model-free distance between the exact and
the numerical end point, minimised over the interior nodes by a constrained trust-region method.

=====================  ==========================================  =====================================
symbol                 meaning                                     code
=====================  ==========================================  =====================================
lambda_t               log(alpha_t / sigma_t), half log-SNR        ``NoiseSchedule.lambda_``, ``.lambdas``
t, T, eps (t_0)        time, start, end                            ``.times``, ``t_max``, ``config.eps``
N                      number of model evaluations (NFE)           ``num_steps``
k_s, order             order of step s, the solver's order         ``order_template``, ``order``
J_{s,j}                Lagrange weights                            ``objective.step_weights``
w_j, p                 node error scale, its power                 ``config.power``
tau                    truncation                                  ``config.truncation``
F                      the bound                                   ``objective.bound``, ``schedule_bound``
=====================  ==========================================  =====================================

Layers: :mod:`.objective` (pure math), :mod:`.schedule` (noise schedules, step schedules, baselines),
:mod:`.scheduler` (UniPC with custom timesteps), :mod:`.optimize` (the optimiser and the diffusers
scheduler it pairs with), :mod:`.experiment` (the toy world measurement and the reproduction section).
Figures are in :mod:`workbench.plots.timesteps`, the notebook panel in :mod:`workbench.widgets.timesteps`.

The steps reach any pipeline through its own ``timesteps=`` argument, the same on the toy pipeline,
``StableDiffusionPipeline`` and ``StableDiffusionXLPipeline``::

    steps = optimize_timesteps(NoiseSchedule.from_scheduler(pipe.scheduler), 5, solver="unipc", order=3)
    pipe.scheduler = solver_scheduler("unipc", 3, pipe.scheduler)
    images = pipe("a red circle", timesteps=steps.timesteps()).images
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from workbench.timesteps.objective import bound, bound_gradient, order_template, step_weights
from workbench.timesteps.optimize import (
    SCHEDULE_NAMES,
    SOLVERS,
    Solver,
    StepOptimConfig,
    make_schedule,
    optimize_timesteps,
    schedule_bound,
    solver_scheduler,
)
from workbench.timesteps.schedule import BASELINES, Baseline, NoiseSchedule, StepSchedule, baseline_schedule
from workbench.timesteps.scheduler import UniPCCustomTimestepsScheduler

if TYPE_CHECKING:
    from workbench.reproduce import ReproSection

__all__ = [
    "BASELINES",
    "SCHEDULE_NAMES",
    "SOLVERS",
    "Baseline",
    "NoiseSchedule",
    "Solver",
    "StepOptimConfig",
    "StepSchedule",
    "UniPCCustomTimestepsScheduler",
    "baseline_schedule",
    "bound",
    "bound_gradient",
    "make_schedule",
    "optimize_timesteps",
    "order_template",
    "reproduce",
    "schedule_bound",
    "solver_scheduler",
    "step_weights",
]


def reproduce(*, quick: bool, out_dir: Path) -> ReproSection:
    """The reproduction section (``python -m workbench reproduce``): see :func:`.experiment.reproduce`."""
    from workbench.timesteps.experiment import reproduce as _reproduce

    return _reproduce(quick=quick, out_dir=out_dir)
