"""The paper's model-free error bound F(lambda) as vectorised numpy, and its exact gradient.

Everything here is pure math on a grid of half log-SNR values ``lambdas`` (lambda_0 < ... < lambda_N,
noise end first). A grid may carry leading batch dimensions (..., N + 1): the objective is evaluated for
all of them in one call, which is how :func:`bound_gradient` gets the whole gradient from one call
(complex-step differentiation). The bound is the objective of the official code of arXiv 2402.17376
(scxue/DM-NonUniform ``step_optim.py``, ``sel_lambdas_lof_obj``), written from its definition. Symbols:

=========================  ===================================================================
symbol                     code
=========================  ===================================================================
lambda_i                   ``lambdas[..., i]``
h_i = lambda_{i+1}-lambda_i ``h[..., i]``
E_i = e^{lambda_i}          ``exp_lambda[..., i]``
k_s                        ``orders[s]`` (:func:`order_template`)
J_{s,j}                    ``weights[..., s, m]`` with j = s - m (:func:`step_weights`)
w_j = sigma_j^p / alpha_j   ``node_error[..., j]`` with p = ``power``
tau                        ``truncation``
=========================  ===================================================================
"""

from __future__ import annotations

import numpy as np

__all__ = ["bound", "bound_gradient", "order_template", "phi", "step_weights"]

# Below this |h| the closed forms of phi_1, phi_2 lose digits to cancellation; the series is exact there.
_SERIES_BELOW = 0.5
_SERIES_TERMS = 14  # enough for |h| <= 0.5 to full double precision (0.5^14 / 14! ~ 1e-15)


def order_template(num_steps: int, order: int, *, lower_order_final: bool = True) -> np.ndarray:
    """Order k_s of each step s = 0..N-1 of a multistep solver with warm-up (and lower-order final steps).

    k_s = min(order, s + 1, N - s) with ``lower_order_final``, else min(order, s + 1). The official code
    hard-codes order 3 with lower-order final steps (``step_optim.py``).
    """
    steps = np.arange(num_steps)
    orders = np.minimum(order, steps + 1)
    if lower_order_final:
        orders = np.minimum(orders, num_steps - steps)
    return orders


def phi(m: int, h: np.ndarray) -> np.ndarray:
    """H_m(h) = integral_0^h e^u u^m du for m = 0, 1, 2 (elementwise; real or complex ``h``).

    Closed forms H_0 = e^h - 1, H_1 = h e^h - H_0, H_2 = h^2 e^h - 2 H_1 cancel badly for small h, where
    the power series sum_k h^(m+k+1) / (k! (m+k+1)) is used instead.
    """
    if m not in (0, 1, 2):
        raise ValueError(f"m must be 0, 1 or 2, got {m}")
    h = np.asarray(h)
    closed = np.expm1(h)
    for i in range(1, m + 1):
        closed = h**i * np.exp(h) - i * closed
    if m == 0:
        return closed
    series = np.zeros_like(h)
    term = h ** (m + 1)  # h^(m+k+1) / k! at k = 0
    for k in range(_SERIES_TERMS):
        series = series + term / (m + k + 1)
        term = term * h / (k + 1)
    return np.where(np.abs(h) < _SERIES_BELOW, series, closed)


def step_weights(lambdas: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Lagrange weights J_{s,j} = integral_{lambda_s}^{lambda_{s+1}} e^lambda l_{s,j}(lambda) d lambda.

    Step s of order k_s integrates the polynomial through nodes s-k_s+1..s; ``weights[..., s, m]`` is
    the weight of node j = s - m (zero for m >= k_s). Closed forms, with E_s = e^{lambda_s}, h = h_s,
    b = h_{s-1}, a = h_{s-2} and H_m of :func:`phi`: k = 1: J_s = E_s H_0; k = 2: J_{s-1} = -E_s H_1 / b,
    J_s = E_s (H_1 + b H_0) / b; k = 3: J_{s-2} = E_s (H_2 + b H_1) / (a (a + b)),
    J_{s-1} = -E_s (H_2 + (a + b) H_1) / (a b), J_s = E_s (H_2 + (a + 2b) H_1 + b (a + b) H_0) / (b (a + b)).

    Args:
        lambdas: (..., N + 1) increasing half log-SNR grid.
        orders: (N,) step orders, each in 1..3 and at most s + 1.

    Returns:
        (..., N, 3) weights.
    """
    lambdas = np.asarray(lambdas)
    num_steps = lambdas.shape[-1] - 1
    h = np.diff(lambdas, axis=-1)  # (..., N)
    exp_s = np.exp(lambdas[..., :-1])  # E_s, (..., N)
    h0, h1, h2 = phi(0, h), phi(1, h), phi(2, h)
    # Previous step lengths b = h_{s-1}, a = h_{s-2}; padded with ones where they do not exist (masked out).
    ones = np.ones_like(h[..., :1])
    b = np.concatenate([ones, h[..., :-1]], axis=-1)
    a = np.concatenate([ones, ones, h[..., :-2]], axis=-1)[..., :num_steps]

    weights = np.zeros((*h.shape, 3), dtype=h.dtype)
    first = exp_s * h0  # = E_{s+1} - E_s
    second = (exp_s * (h1 + b * h0) / b, -exp_s * h1 / b)
    third = (
        exp_s * (h2 + (a + 2 * b) * h1 + b * (a + b) * h0) / (b * (a + b)),
        -exp_s * (h2 + (a + b) * h1) / (a * b),
        exp_s * (h2 + b * h1) / (a * (a + b)),
    )
    k = np.asarray(orders)
    weights[..., 0] = np.where(k == 1, first, np.where(k == 2, second[0], third[0]))
    weights[..., 1] = np.where(k == 2, second[1], np.where(k == 3, third[1], 0.0))
    weights[..., 2] = np.where(k == 3, third[2], 0.0)
    return weights


def _abs(x: np.ndarray) -> np.ndarray:
    # |x| written as x * sign(Re x) so that complex-step differentiation sees its (sub)gradient.
    return x * np.sign(x.real)


def _node_error(lambdas: np.ndarray, power: float) -> np.ndarray:
    # w = sigma^p / alpha with the VP alpha = (1 + e^{-2 lambda})^{-1/2}, sigma = (1 + e^{2 lambda})^{-1/2}.
    return (1 + np.exp(2 * lambdas)) ** (-power / 2) * (1 + np.exp(-2 * lambdas)) ** 0.5


def bound(lambdas: np.ndarray, orders: np.ndarray, *, power: float = 2.0, truncation: int = 3) -> np.ndarray:
    """The paper's error bound F(lambda), as the official ``step_optim.py`` computes it.

    F = sum_{s: k_s = 1} w_s |J_{s,s}|
        + sum_{s < tau, k_s >= 2} ||(w_j J_{s,j})_j||_2
        + sum_j |sum_{s >= tau, k_s >= 2} w_j J_{s,j}|

    First-order steps are separate terms; early higher-order steps are bounded one by one (Euclidean
    norm); later steps are summed per node with sign before the absolute value, so their errors may
    cancel.

    Args:
        lambdas: (..., N + 1) increasing half log-SNR grid, noise end first.
        orders: (N,) step orders (:func:`order_template`).
        power: p in w_j = sigma_j^p / alpha_j (official code: 2).
        truncation: tau, the first step whose errors are summed per node.

    Returns:
        (...) objective values.
    """
    lambdas = np.asarray(lambdas)
    orders = np.asarray(orders)
    num_steps = lambdas.shape[-1] - 1
    if orders.shape != (num_steps,):
        raise ValueError(f"orders must have shape ({num_steps},) for {num_steps + 1} lambdas, got {orders.shape}")
    weights = step_weights(lambdas, orders)  # (..., N, 3)
    w = _node_error(lambdas[..., :-1], power)  # (..., N): nodes 0..N-1 (node N is never evaluated)
    # terms[..., s, m] = w_{s-m} J_{s, s-m}; w_{s-m} is w shifted right by m (zeros where s-m < 0).
    shifted = np.stack(
        [np.concatenate([np.ones_like(w[..., :m]), w[..., : num_steps - m]], axis=-1) for m in range(3)], -1
    )
    terms = weights * shifted

    steps = np.arange(num_steps)
    single = orders == 1
    early = (orders >= 2) & (steps < truncation)
    late = (orders >= 2) & (steps >= truncation)
    total = _abs(terms[..., single, 0]).sum(-1)
    total = total + np.sqrt((terms[..., early, :] ** 2).sum(-1)).sum(-1)
    late_terms = np.where(late[:, None], terms, 0.0)
    per_node = np.zeros_like(w)
    for m in range(3):
        per_node[..., : num_steps - m] += late_terms[..., m:, m]
    return total + _abs(per_node).sum(-1)


def bound_gradient(lambdas: np.ndarray, orders: np.ndarray, *, power: float = 2.0, truncation: int = 3) -> np.ndarray:
    """Gradient of :func:`bound` with respect to the interior nodes lambda_1..lambda_{N-1}.

    Complex-step differentiation (Squire and Trapp 1998): dF/dx_i = Im F(x + i h e_i) / h with h = 1e-30
    has no subtraction, so it is exact to rounding, unlike finite differences; all N - 1 directions go
    through one batched call of :func:`bound`. Where F has a kink (a per-node sum crossing zero) it gives
    the one-sided derivative on the side of the real part, a subgradient.

    Args:
        lambdas: (N + 1,) increasing grid (the endpoints are held fixed).

    Returns:
        (N - 1,) gradient.
    """
    lambdas = np.asarray(lambdas, dtype=np.float64)
    interior = lambdas.shape[-1] - 2
    step = 1e-30
    probes = np.tile(lambdas.astype(np.complex128), (interior, 1))  # (N - 1, N + 1)
    probes[np.arange(interior), np.arange(1, interior + 1)] += 1j * step
    return bound(probes, orders, power=power, truncation=truncation).imag / step
