"""Noise schedules as the step optimiser sees them, and step schedules as values.

:class:`NoiseSchedule` is the half log-SNR lambda(t) = log(alpha_t / sigma_t) of a diffusion process on
t in (0, T], with its inverse. It is built from any diffusers scheduler with ``alphas_cumprod`` (DDPM,
DDIM, DPM-Solver, UniPC, Euler, ...) or from its config, or from alpha/sigma functions of a continuous
time (for example EDM's alpha = 1, sigma = t). Discrete 1000-step schedules follow DPM-Solver's
``NoiseScheduleVP("discrete")``: the diffusers timestep n of N training timesteps sits at t = (n + 1) / N
and log alpha is piecewise linear in t, so t = 1/N is timestep 0 and t = 1 is timestep N - 1; a discrete
schedule is defined on [1/N, 1] (below timestep 0 log alpha would be extrapolated past 0).

:class:`StepSchedule` is one choice of N sampling steps: N + 1 points from the noise end to t_0, as
half log-SNR ``lambdas`` and times ``times``; :meth:`StepSchedule.timesteps` turns it into the integer
``timesteps`` that diffusers' ``set_timesteps(timesteps=...)`` takes. The baselines
(:func:`baseline_schedule`) and the optimised steps (:func:`workbench.timesteps.optimize_timesteps`)
return this same value, so any schedule fits any solver.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch

__all__ = ["BASELINES", "Baseline", "NoiseSchedule", "StepSchedule", "baseline_schedule"]

Baseline = Literal["uniform_lambda", "uniform_time", "time_quadratic", "karras", "ays"]
BASELINES: tuple[str, ...] = get_args(Baseline)

_KARRAS_RHO = 7.0  # EDM (Karras et al. 2022) time discretisation; also the official code's "edm" init
_BISECTION_ITERATIONS = 200  # halves [0, T] to below float64 resolution
_CONTINUOUS_EPS = 1e-3  # DPM-Solver's and UniPC's default t_end for continuous VP schedules


class NoiseSchedule:
    """Half log-SNR lambda(t) of a diffusion process on t in (0, ``t_max``], and its inverse.

    Build one with :meth:`from_scheduler`, :meth:`from_alphas_cumprod` or :meth:`from_alpha_sigma`.

    Attributes:
        t_max: T, where sampling starts (1 for discrete schedules).
        num_train_timesteps: for a discrete schedule, the number of training timesteps (timestep
            n <-> t = (n + 1) / num_train_timesteps); None for a continuous one.

    Raises:
        ValueError: lambda(t) is not finite, or does not decrease strictly, on the schedule's domain
            ([1 / num_train_timesteps, T] for a discrete schedule, [T / 1000, T] checked for a
            continuous one).
    """

    def __init__(
        self,
        lambda_fn: Callable[[np.ndarray], np.ndarray],
        inverse_fn: Callable[[np.ndarray], np.ndarray],
        *,
        t_max: float,
        num_train_timesteps: int | None = None,
    ):
        self._lambda_fn = lambda_fn
        self._inverse_fn = inverse_fn
        self.t_max = float(t_max)
        self.num_train_timesteps = num_train_timesteps
        low = self.t_min if self.is_discrete else self.t_max * 1e-3
        times = np.linspace(self.t_max, low, 257)
        with np.errstate(all="ignore"):
            probe = self.lambda_(times)
        if not np.isfinite(probe[0]):
            raise ValueError(
                f"schedule: lambda(T) = {probe[0]} at T = {self.t_max:g}: a zero terminal SNR (alpha_T = 0) leaves "
                "the bound undefined; use a schedule with alpha_T > 0"
            )
        if not np.all(np.isfinite(probe)):
            bad = times[~np.isfinite(probe)]
            raise ValueError(
                f"schedule: lambda(t) is not finite at t = {bad[0]:g} (of [{low:g}, {self.t_max:g}], the schedule's "
                "domain); alpha_t and sigma_t must be positive there"
            )
        if np.any(np.diff(probe) <= 0):
            raise ValueError("schedule: lambda(t) must decrease strictly in t (the signal-to-noise ratio must fall)")

    def __repr__(self) -> str:
        kind = f"discrete, {self.num_train_timesteps} steps" if self.is_discrete else "continuous"
        return f"NoiseSchedule({kind}, T={self.t_max:g}, lambda(T)={float(self.lambda_(self.t_max)):.3f})"

    @property
    def is_discrete(self) -> bool:
        return self.num_train_timesteps is not None

    @property
    def t_min(self) -> float:
        """The smallest t of the domain: timestep 0, 1 / num_train_timesteps, for a discrete schedule; 0
        (excluded) for a continuous one."""
        return 1.0 / self.num_train_timesteps if self.is_discrete else 0.0

    def resolve_eps(self, eps: float | None = None) -> float:
        """t_0, where sampling ends: ``eps`` checked against the domain, or by default timestep 0 of a
        discrete schedule (1 / num_train_timesteps: 1e-3 for 1000 steps, DPM-Solver's and UniPC's
        ``t_end``) and 1e-3 for a continuous one.

        Raises:
            ValueError: ``eps`` outside (0, T), or below timestep 0 of a discrete schedule (where lambda
                would be extrapolated).
        """
        if eps is None:
            eps = self.t_min if self.is_discrete else _CONTINUOUS_EPS
        if self.is_discrete and not self.t_min <= eps < self.t_max:
            raise ValueError(
                f"eps must lie in [1/{self.num_train_timesteps}, T) = [{self.t_min:g}, {self.t_max:g}) for a "
                f"discrete schedule of {self.num_train_timesteps} timesteps (t = 1/N is timestep 0), got {eps}"
            )
        if not 0 < eps < self.t_max:
            raise ValueError(f"eps must lie in (0, T) = (0, {self.t_max:g}), got {eps}")
        return float(eps)

    def lambda_(self, t: np.ndarray | float) -> np.ndarray:
        """lambda(t) = log(alpha_t / sigma_t), elementwise (float64)."""
        return self._lambda_fn(np.asarray(t, dtype=np.float64))

    def time(self, lambdas: np.ndarray | float) -> np.ndarray:
        """The inverse t(lambda), elementwise (float64)."""
        return self._inverse_fn(np.asarray(lambdas, dtype=np.float64))

    def time_of_timestep(self, timesteps: np.ndarray | float) -> np.ndarray:
        """Continuous t of diffusers timesteps n: t = (n + 1) / num_train_timesteps (discrete schedules)."""
        return (np.asarray(timesteps, dtype=np.float64) + 1) / self._require_discrete()

    def timestep_of_time(self, t: np.ndarray | float) -> np.ndarray:
        """Diffusers timestep n = num_train_timesteps * t - 1 as a float (round it yourself)."""
        return np.asarray(t, dtype=np.float64) * self._require_discrete() - 1

    def _require_discrete(self) -> int:
        if self.num_train_timesteps is None:
            raise ValueError("schedule: a continuous schedule has no diffusers timesteps; use lambdas or times")
        return self.num_train_timesteps

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: np.ndarray | torch.Tensor) -> NoiseSchedule:
        """A discrete schedule from its cumulative products alpha-bar_n, n = 0..N-1 (DDPM's notation).

        log alpha at t_n = (n + 1) / N is 0.5 log alpha-bar_n, linear in between (DPM-Solver's
        ``NoiseScheduleVP("discrete")``), so lambda(t) and its inverse are exact at the timesteps. The
        domain is [1/N, 1]; any N >= 2 works (a 10-step DDPM schedule as well as SD's 1000 steps).
        """
        if isinstance(alphas_cumprod, torch.Tensor):
            alphas_cumprod = alphas_cumprod.detach().double().cpu().numpy()
        alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        if alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D array of >= 2 values, got shape {alphas_cumprod.shape}")
        if not np.all((alphas_cumprod > 0) & (alphas_cumprod < 1)):
            raise ValueError(
                "alphas_cumprod must lie in (0, 1); a last value of 0 is a zero terminal SNR "
                "(rescale_betas_zero_snr=True), where lambda(T) = -inf and the bound is undefined"
            )
        if np.any(np.diff(alphas_cumprod) >= 0):
            raise ValueError("alphas_cumprod must decrease strictly")
        num = len(alphas_cumprod)
        grid_t = np.arange(1, num + 1, dtype=np.float64) / num
        log_alpha = 0.5 * np.log(alphas_cumprod)

        def lambda_fn(t: np.ndarray) -> np.ndarray:
            la = _interp_extrapolate(t, grid_t, log_alpha)
            return la - 0.5 * np.log(-np.expm1(2 * la))

        def inverse_fn(lambdas: np.ndarray) -> np.ndarray:
            la = -0.5 * np.logaddexp(0.0, -2 * lambdas)  # log alpha = -1/2 log(1 + e^{-2 lambda})
            return _interp_extrapolate(la, log_alpha[::-1], grid_t[::-1])

        return cls(lambda_fn, inverse_fn, t_max=1.0, num_train_timesteps=num)

    @classmethod
    def from_scheduler(cls, scheduler: object) -> NoiseSchedule:
        """The schedule of a diffusers scheduler (or of its config) with ``alphas_cumprod``.

        Raises:
            TypeError: the scheduler has no ``alphas_cumprod`` (flow matching, EDM/VE schedulers): build
                the schedule with :meth:`from_alpha_sigma` instead.
        """
        if isinstance(scheduler, Mapping):
            from diffusers import DDPMScheduler

            if "num_train_timesteps" not in scheduler:
                raise TypeError("scheduler: a config mapping needs num_train_timesteps and its betas")
            # DDPMScheduler computes alphas_cumprod from betas / beta_schedule / trained_betas /
            # rescale_betas_zero_snr exactly as every other discrete diffusers scheduler does.
            keys = (
                "num_train_timesteps",
                "beta_start",
                "beta_end",
                "beta_schedule",
                "trained_betas",
                "rescale_betas_zero_snr",
            )
            scheduler = DDPMScheduler(**{k: scheduler[k] for k in keys if k in scheduler})
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise TypeError(
                f"scheduler: {type(scheduler).__name__} has no alphas_cumprod; the optimiser needs a VP schedule "
                "(a diffusers scheduler with betas) or NoiseSchedule.from_alpha_sigma(alpha_fn, sigma_fn)"
            )
        return cls.from_alphas_cumprod(alphas_cumprod)

    @classmethod
    def from_alpha_sigma(
        cls,
        alpha_fn: Callable[[np.ndarray], np.ndarray],
        sigma_fn: Callable[[np.ndarray], np.ndarray],
        *,
        t_max: float = 1.0,
    ) -> NoiseSchedule:
        """A continuous schedule from x_t = alpha(t) x_0 + sigma(t) eps on t in (0, t_max].

        alpha and sigma need not satisfy alpha^2 + sigma^2 = 1: EDM is ``alpha_fn=lambda t: 1``,
        ``sigma_fn=lambda t: t`` with ``t_max=80`` (lambda = -log t). The inverse is found by bisection.
        """
        if not t_max > 0:
            raise ValueError(f"t_max must be > 0, got {t_max}")

        def lambda_fn(t: np.ndarray) -> np.ndarray:
            with np.errstate(divide="ignore"):
                alpha = np.broadcast_to(np.asarray(alpha_fn(t), dtype=np.float64), t.shape)
                sigma = np.broadcast_to(np.asarray(sigma_fn(t), dtype=np.float64), t.shape)
                return np.log(alpha) - np.log(sigma)

        def inverse_fn(lambdas: np.ndarray) -> np.ndarray:
            # lambda decreases in t: move the lower end up while lambda(mid) is above the target.
            low, high = np.zeros_like(lambdas), np.full_like(lambdas, t_max)
            for _ in range(_BISECTION_ITERATIONS):
                mid = 0.5 * (low + high)
                above = lambda_fn(mid) > lambdas
                low, high = np.where(above, mid, low), np.where(above, high, mid)
            return 0.5 * (low + high)

        return cls(lambda_fn, inverse_fn, t_max=t_max)


def _interp_extrapolate(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation on increasing ``xp``, extrapolated linearly beyond both ends."""
    y = np.interp(x, xp, fp)
    below, above = x < xp[0], x > xp[-1]
    y = np.where(below, fp[0] + (x - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0]), y)
    return np.where(above, fp[-1] + (x - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2]), y)


@dataclass(frozen=True, eq=False)
class StepSchedule:
    """N sampling steps as N + 1 points, noise end first: the model is evaluated at points 0..N-1 and
    point N (t_0 = eps) is where the last step ends.

    Attributes:
        name: "optimized" or a baseline name.
        lambdas: (N + 1,) increasing half log-SNR, lambda_0 = lambda(T), lambda_N = lambda(eps).
        times: (N + 1,) decreasing times t(lambda).
        num_train_timesteps: copied from the :class:`NoiseSchedule` (None if continuous).
        info: how the schedule was made (objective values, solver, order, seconds, ...).
    """

    name: str
    lambdas: np.ndarray
    times: np.ndarray
    num_train_timesteps: int | None = None
    info: Mapping[str, object] = field(default_factory=dict)

    @classmethod
    def from_lambdas(
        cls,
        name: str,
        lambdas: np.ndarray,
        schedule: NoiseSchedule,
        *,
        eps: float,
        info: Mapping[str, object] | None = None,
        times: np.ndarray | None = None,
    ) -> StepSchedule:
        """The schedule of the (N + 1,) increasing ``lambdas`` on ``schedule``, from T to ``eps``.

        ``times`` defaults to t(lambda); either way its ends are set exactly to T and ``eps``.
        """
        times = schedule.time(lambdas) if times is None else np.array(times, dtype=np.float64)
        times[0], times[-1] = schedule.t_max, eps
        return cls(name, np.asarray(lambdas, dtype=np.float64), times, schedule.num_train_timesteps, dict(info or {}))

    @property
    def num_steps(self) -> int:
        """N, the number of model evaluations."""
        return len(self.lambdas) - 1

    @property
    def sigmas(self) -> np.ndarray:
        """(N + 1,) diffusers/EDM sigmas sigma_t / alpha_t = e^{-lambda}, for samplers that take ``sigmas=``."""
        return np.exp(-self.lambdas)

    def timesteps(self) -> np.ndarray:
        """The N integer diffusers timesteps of the evaluation points (the t_0 end dropped), descending.

        Timestep n = round(num_train_timesteps * t - 1): rounded here, because diffusers truncates. Pass
        them as ``set_timesteps(timesteps=...)`` to a scheduler whose final sigma is sigma at timestep 0
        (``final_sigmas_type="sigma_min"``), so that the last step ends at t_0 as the bound assumes.

        Raises:
            ValueError: the schedule is continuous, or two points round to the same integer timestep
                (too many steps for the 1000 training timesteps, or steps crowded at one end).
        """
        if self.num_train_timesteps is None:
            raise ValueError("timesteps: a continuous schedule has no diffusers timesteps; use lambdas or sigmas")
        points = np.rint(self.times * self.num_train_timesteps - 1).astype(np.int64)
        if points[0] > self.num_train_timesteps - 1 or points[-1] < 0:
            raise ValueError(
                f"timesteps: the schedule spans timesteps {points[0]}..{points[-1]}, outside "
                f"[0, {self.num_train_timesteps - 1}]"
            )
        if np.any(np.diff(points) >= 0):
            raise ValueError(
                f"timesteps: {self.name} with {self.num_steps} steps rounds to repeated integer timesteps "
                f"{points.tolist()} (the last one is the end, t_0); use fewer steps or a coarser grid"
            )
        return points[:-1]


def baseline_schedule(
    kind: Baseline, schedule: NoiseSchedule, num_steps: int, *, eps: float | None = None
) -> StepSchedule:
    """One of the hand-made schedules the paper compares against, from T to ``eps`` in ``num_steps`` steps.

    Args:
        kind: "uniform_lambda" (uniform half log-SNR, DPM-Solver's ``logSNR``; the official init "unif"),
            "uniform_time" (DPM-Solver's ``time_uniform``, "unif_t"), "time_quadratic"
            (t = linspace(sqrt T, sqrt eps)^2, "quad"), "karras" (EDM's rho = 7 ramp in sigma/alpha
            between its values at eps and T, "edm"), or "ays" (Align Your Steps' 10 Stable Diffusion
            timesteps from ``diffusers.schedulers.AysSchedules``; only for 10 steps on a 1000-step
            discrete schedule, and made for SD 1.5, not for the model at hand).
        schedule: the noise schedule.
        num_steps: N >= 1.
        eps: t_0, where sampling ends; None: timestep 0 of a discrete schedule (1e-3 for 1000 steps), 1e-3
            for a continuous one.
    """
    _check_num_steps(num_steps)
    t_max = schedule.t_max
    eps = schedule.resolve_eps(eps)
    lambda_t, lambda_eps = float(schedule.lambda_(t_max)), float(schedule.lambda_(eps))
    times = None  # grids made in time keep their exact times
    if kind == "uniform_lambda":
        lambdas = np.linspace(lambda_t, lambda_eps, num_steps + 1)
    elif kind == "karras":
        ramp = np.linspace(np.exp(-lambda_t / _KARRAS_RHO), np.exp(-lambda_eps / _KARRAS_RHO), num_steps + 1)
        lambdas = -_KARRAS_RHO * np.log(ramp)
    elif kind == "uniform_time":
        times = np.linspace(t_max, eps, num_steps + 1)
    elif kind == "time_quadratic":
        times = np.linspace(np.sqrt(t_max), np.sqrt(eps), num_steps + 1) ** 2
    elif kind == "ays":
        times = _ays_times(schedule, num_steps, eps)
    else:
        raise ValueError(f"kind must be one of {BASELINES}, got {kind!r}")
    if times is not None:
        lambdas = schedule.lambda_(times)
    lambdas = np.asarray(lambdas, dtype=np.float64)
    lambdas[0], lambdas[-1] = lambda_t, lambda_eps  # exact endpoints (the maps above round-trip to ~1e-15)
    return StepSchedule.from_lambdas(kind, lambdas, schedule, eps=eps, times=times)


def _ays_times(schedule: NoiseSchedule, num_steps: int, eps: float) -> np.ndarray:
    from diffusers.schedulers import AysSchedules

    timesteps = np.asarray(AysSchedules["StableDiffusionTimesteps"], dtype=np.float64)
    if num_steps != len(timesteps):
        raise ValueError(f"num_steps must be {len(timesteps)} for the Align Your Steps baseline, got {num_steps}")
    if schedule.num_train_timesteps != 1000:
        raise ValueError("schedule: Align Your Steps' timesteps are for a discrete 1000-step schedule")
    return np.append(schedule.time_of_timestep(timesteps), eps)


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
