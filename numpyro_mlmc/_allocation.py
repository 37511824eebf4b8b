"""Sample allocation, rates and the bias test of adaptive MLMC (pure numpy, no JAX).

References: Giles, "Multilevel Monte Carlo path simulation" (Oper. Res. 2008) and "Multilevel
Monte Carlo methods" (Acta Numerica 2015, Algorithm 1 and the `mlmc.m` driver); Haji-Ali,
Pereyra, Shaw and Zygalakis (arXiv 2409.15511) for the diffusion specifics and the
coarsest-level criterion.

Conventions. Levels are absolute (`l = l0 .. L`); arrays indexed by position `j = l - l0`.
`V_l` is the element-averaged variance of the correction `Y_l = P_l - P_{l-1}` (`Y_l0 = P_l0`),
`m_l` the element-RMS of `E Y_l`, `C_l` the cost of one draw at level `l` (the coupled pair).
The total variance budget is `theta eps^2`; the bias budget `(1 - theta) eps^2`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = [
    "Allocation",
    "bias_remainder",
    "coarse_level_pays",
    "corrected_norm",
    "decay_start",
    "fit_rate",
    "floor_decay",
    "optimal_samples",
    "plan",
]

# Giles' lower bounds on fitted rates (mlmc.m): they keep `M^alpha - 1` and the extrapolated
# variance of a new level away from degenerate values while the fit is still noisy.
MIN_RATE = 0.5


def corrected_norm(sample_mean, sample_variance, count):
    """Element-RMS of `E Y` from a noisy sample mean, with the noise removed.

    `E mean(Ybar^2) = mean((E Y)^2) + mean(Var Y) / N` (mean over elements), so
    `sqrt(max(0, mean(Ybar^2) - mean(Var Y) / N))` is the estimate with the noisy norm's
    upward bias taken out (DESIGN.md section 4). Returns 0.0 for `count < 2`.
    """
    sample_mean = np.asarray(sample_mean, np.float64)
    if count < 2:
        return float(np.sqrt(np.mean(sample_mean**2))) if count == 1 else 0.0
    raw = float(np.mean(sample_mean**2))
    noise = float(np.mean(np.asarray(sample_variance, np.float64))) / count
    return math.sqrt(max(0.0, raw - noise))


def fit_rate(levels, values, refinement: int) -> float:
    """`-slope` of the least-squares line through `(l, log_M values_l)`: the rate `r` in
    `values_l ~ M^{-r l}`. Needs at least two levels; zero or negative values are clipped to
    the smallest positive one (or 1e-300)."""
    levels = np.asarray(levels, np.float64)
    values = np.asarray(values, np.float64)
    if levels.size < 2:
        raise ValueError("fitting a rate needs at least two levels.")
    positive = values[values > 0]
    tiny = positive.min() if positive.size else 1e-300
    logs = np.log(np.maximum(values, tiny)) / math.log(refinement)
    slope = np.polyfit(levels, logs, 1)[0]
    return float(-slope)


def decay_start(values, noise=None) -> int:
    """First position `k` such that `values[k:]` decays: for every consecutive pair either
    `values[j+1] <= values[j]`, or both are at the noise level (`<= 2 noise`). Returns
    `len(values) - 1` when the last pair does not decay.

    This is the guard against the pre-asymptotic regime (DESIGN.md section 4): rates are fitted,
    and the bias test trusted, only where geometric decay is visible in the data.
    """
    values = np.asarray(values, np.float64)
    noise = np.zeros_like(values) if noise is None else np.asarray(noise, np.float64)
    k = values.size - 1
    while k > 0:
        a, b = values[k - 1], values[k]
        both_noise = a <= 2 * noise[k - 1] and b <= 2 * noise[k]
        if b <= a or both_noise:
            k -= 1
        else:
            break
    return k


def floor_decay(values, rate: float, refinement: int):
    """Giles' fix for near-zero estimates: `v_j = max(v_j, v_{j-1} / (2 M^rate))` for `j >= 2`
    (the first correction level, `j = 1`, is left alone). Applied in order, so the floor
    propagates."""
    out = np.array(values, np.float64)
    for j in range(2, out.size):
        out[j] = max(out[j], 0.5 * out[j - 1] / refinement**rate)
    return out


def optimal_samples(variances, costs, variance_budget: float):
    """Lagrange-optimal sample counts `N_l = ceil(sqrt(V_l / C_l) sum_k sqrt(V_k C_k) / budget)`
    that minimise `sum N_l C_l` subject to `sum V_l / N_l <= budget` (Giles 2015, eq. 1.7)."""
    v = np.maximum(np.asarray(variances, np.float64), 0.0)
    c = np.asarray(costs, np.float64)
    if not np.all(np.isfinite(v)):
        bad = [int(i) for i in np.flatnonzero(~np.isfinite(v))]
        raise FloatingPointError(
            f"level variances at positions {bad} are not finite (overflow in the draws); the "
            "sampler is unstable at those levels: use more steps at the coarsest level "
            "(min_level), another sampler, or a stabler guidance."
        )
    if np.any(c <= 0):
        raise ValueError("costs must be positive.")
    if variance_budget <= 0:
        raise ValueError("variance budget must be positive.")
    total = np.sum(np.sqrt(v * c))
    with np.errstate(over="ignore"):
        counts = np.ceil(np.sqrt(v / c) * total / variance_budget)
    if not np.all(counts <= 2**62):
        raise FloatingPointError(
            f"the allocation asks for {counts.max():.3g} samples on one level: the level "
            "variances are too large for this rmse (an unstable sampler, or an rmse far too "
            "small for the problem's scale)."
        )
    return counts.astype(np.int64)


def bias_remainder(magnitudes, alpha: float, refinement: int) -> float:
    """Estimate of the remaining bias `|E[P - P_L]|`:
    `max(m_{L-1} / M^alpha, m_L) / (M^alpha - 1)` (Giles 2015, `mlmc.m`), from the last two
    correction magnitudes `m` (element-RMS)."""
    m = np.asarray(magnitudes, np.float64)
    factor = refinement**alpha
    if m.size >= 2:
        return float(max(m[-2] / factor, m[-1]) / (factor - 1.0))
    return float(m[-1] / (factor - 1.0))


def coarse_level_pays(correction_variance: float, fine_variance: float, refinement: int) -> bool:
    """Whether a base level one coarser pays (the paper's pilot criterion): with `V_l` the
    correction variance at level `l` and `V[P_l]` the variance of `P_l`, a base at `l - 1` with
    the correction at `l` costs less than a base at `l` when

        V_l < (sqrt(M) - 1)^2 V[P_l] / (M + 1),

    which follows from `(sqrt(V C / M) + sqrt(V_l C (1 + 1/M)))^2 < V C` with `C_{l-1} = C_l/M`.
    """
    m = refinement
    return correction_variance < (math.sqrt(m) - 1.0) ** 2 * fine_variance / (m + 1.0)


class QuantityLevels(NamedTuple):
    """Per-level statistics of one estimated quantity, positions `j = l - l0`."""

    variances: np.ndarray  # V_l: element-averaged Var[Y_l]
    magnitudes: np.ndarray  # m_l: element-RMS of E[Y_l], noise-corrected
    noise: np.ndarray  # sqrt(V_l / N_l): the noise level of the magnitude estimate


class Allocation(NamedTuple):
    """What `plan` decides, per quantity and overall."""

    samples: np.ndarray  # N_l needed (max over quantities)
    alpha: dict  # name -> fitted alpha (nan when fewer than two established levels)
    beta: dict  # name -> fitted beta
    bias: dict  # name -> remainder estimate (nan when not available)
    established: dict  # name -> bool: decay seen over >= `decay_levels` correction levels
    bias_ok: dict  # name -> bool: established and remainder <= sqrt(1 - theta) eps
    variances: dict  # name -> floored V_l used for the allocation
    governing: str  # the quantity with the largest cost requirement


def _rates(levels, q: QuantityLevels, refinement, alpha_prev, beta_prev):
    """Floored magnitudes/variances and the rates fitted over the established decay range of
    the correction levels (positions >= 1)."""
    m = floor_decay(q.magnitudes, alpha_prev, refinement)
    v = floor_decay(q.variances, beta_prev, refinement)
    alpha = beta = float("nan")
    k_alpha = k_beta = None
    if levels.size >= 3:
        corr = slice(1, None)
        # decay is judged on the raw estimates: the floors would hide a rise
        k_alpha = 1 + decay_start(q.magnitudes[corr], q.noise[corr])
        if levels.size - k_alpha >= 2:
            alpha = max(MIN_RATE, fit_rate(levels[k_alpha:], m[k_alpha:], refinement))
        k_beta = 1 + decay_start(q.variances[corr])
        if levels.size - k_beta >= 2:
            beta = max(MIN_RATE, fit_rate(levels[k_beta:], v[k_beta:], refinement))
    return m, v, alpha, beta, k_alpha


def plan(
    levels,
    quantities: dict,
    costs,
    *,
    rmse: float,
    theta: float,
    refinement: int,
    decay_levels: int = 3,
    alpha_prev: float = 0.0,
    beta_prev: float = 0.0,
) -> Allocation:
    """One allocation step of the adaptive driver.

    Args:
        levels: absolute levels `l0 .. L` (consecutive).
        quantities: name -> `QuantityLevels`.
        costs: cost per draw at each level (coupled pair above `l0`).
        rmse: the target `eps`.
        theta: the variance share of `eps^2`.
        refinement: `M`.
        decay_levels: how many trailing correction levels must show decay before the bias test
            is trusted (the pre-asymptotic guard).
        alpha_prev, beta_prev: rates of the previous step, for the floors (0 at first).

    For each quantity: Giles' floors, alpha and beta by regression over the trailing range where
    decay is established (at least two levels, rates floored at 0.5), `N_l` by the Lagrange
    rule with budget `theta eps^2`, and the bias test
    `max(m_{L-1}/M^alpha, m_L)/(M^alpha - 1) <= sqrt(1 - theta) eps`, which passes only if decay
    is established over at least `decay_levels` correction levels. `N_l` is the largest over
    quantities, so every estimate meets its variance budget.
    """
    levels = np.asarray(levels)
    costs = np.asarray(costs, np.float64)
    budget = theta * rmse**2
    samples = np.zeros(levels.size, np.int64)
    alphas, betas, biases, established, ok, used = {}, {}, {}, {}, {}, {}
    worst_cost, governing = -1.0, next(iter(quantities))
    for name, q in quantities.items():
        m, v, alpha, beta, k_alpha = _rates(
            levels, q, refinement, max(alpha_prev, 0.0), max(beta_prev, 0.0)
        )
        n = optimal_samples(v, costs, budget)
        samples = np.maximum(samples, n)
        total = float(np.sum(n * costs))
        if total > worst_cost:
            worst_cost, governing = total, name
        num_corr = 0 if k_alpha is None else levels.size - k_alpha
        est = num_corr >= decay_levels and not math.isnan(alpha)
        bias = bias_remainder(m[1:], alpha, refinement) if not math.isnan(alpha) else float("nan")
        alphas[name], betas[name], biases[name] = alpha, beta, bias
        established[name] = bool(est)
        ok[name] = bool(est and bias <= math.sqrt(1.0 - theta) * rmse)
        used[name] = v
    return Allocation(samples, alphas, betas, biases, established, ok, used, governing)
