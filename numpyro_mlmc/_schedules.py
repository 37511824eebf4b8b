"""Noise schedules of the forward diffusion and the nested time grids of the reverse samplers.

Every schedule is written in one form,

    x_t = alpha(t) x_0 + sigma(t) e,      e ~ N(0, I),      t in [0, t_max],

with `alpha` the signal scale and `sigma` the noise scale. The forward SDE that has these
marginals is `dx = f(t) x dt + g(t) dW` with

    f(t) = d log alpha / dt,        g(t)^2 = d sigma^2 / dt - 2 f(t) sigma(t)^2.

Variance-preserving (VP) schedules have `alpha^2 + sigma^2 = 1`, `alpha_bar = alpha^2` and
`beta = g^2`; the variance-exploding (VE) schedule has `alpha = 1`.

References: Ho et al., "Denoising diffusion probabilistic models" (NeurIPS 2020); Song et al.,
"Score-based generative modeling through stochastic differential equations" (ICLR 2021);
Nichol and Dhariwal, "Improved denoising diffusion probabilistic models" (ICML 2021).
"""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AbstractSchedule",
    "VPSchedule",
    "CosineVPSchedule",
    "VESchedule",
    "time_grid",
]


class AbstractSchedule(eqx.Module):
    """A forward noising process `x_t = alpha(t) x_0 + sigma(t) e` on `t in [0, t_max]`.

    Subclasses give `log_alpha`, `sigma`, `drift`, `diffusion_squared` and
    `time_at_noise_ratio`; everything else follows. All methods accept scalars or arrays of
    times and work under `jit`, `vmap` and `grad`.
    """

    t_max: eqx.AbstractVar[float]

    @abc.abstractmethod
    def log_alpha(self, t):
        """`log alpha(t)`, the log of the signal scale."""

    @abc.abstractmethod
    def sigma(self, t):
        """`sigma(t)`, the noise scale."""

    @abc.abstractmethod
    def drift(self, t):
        """`f(t) = d log alpha / dt` of the forward SDE `dx = f x dt + g dW`."""

    @abc.abstractmethod
    def diffusion_squared(self, t):
        """`g(t)^2` of the forward SDE."""

    @abc.abstractmethod
    def time_at_noise_ratio(self, ratio):
        """The time `t` at which `sigma(t) / alpha(t) = ratio` (host-side, float)."""

    def alpha(self, t):
        """`alpha(t)`, the signal scale."""
        return jnp.exp(self.log_alpha(t))

    def noise_ratio(self, t):
        """`sigma(t) / alpha(t)`: the standard deviation of the equivalent additive noise."""
        return self.sigma(t) / self.alpha(t)

    def transition(self, t, s):
        """The law of `x_t` given `x_s` for `s < t`: returns `(r, v)` with
        `x_t | x_s ~ N(r x_s, v I)`, `r = alpha_t / alpha_s`, `v = sigma_t^2 - r^2 sigma_s^2`."""
        r = jnp.exp(self.log_alpha(t) - self.log_alpha(s))
        v = self.sigma(t) ** 2 - r**2 * self.sigma(s) ** 2
        return r, v

    def prior_std(self):
        """Standard deviation of the reference law `N(0, (alpha_T^2 + sigma_T^2) I)` from which
        unconditional reverse diffusion starts (unit data scale assumed)."""
        t = self.t_max
        with jax.ensure_compile_time_eval():  # host-side constant, also when called under jit
            return float(jnp.sqrt(self.alpha(t) ** 2 + self.sigma(t) ** 2))

    def check_time(self, name: str, t: float) -> float:
        t = float(t)
        if not (0.0 <= t <= self.t_max) or not math.isfinite(t):
            raise ValueError(
                f"{name}={t} is outside this schedule's time range [0, {self.t_max}]; "
                f"pass a time in that range."
            )
        return t


class _AbstractVPSchedule(AbstractSchedule):
    """Variance preserving: `alpha^2 + sigma^2 = 1`, `alpha_bar = alpha^2`."""

    @abc.abstractmethod
    def log_alpha_bar(self, t):
        """`log alpha_bar(t) = -int_0^t beta`."""

    @abc.abstractmethod
    def beta(self, t):
        """`beta(t) = -d log alpha_bar / dt`."""

    @abc.abstractmethod
    def time_at_alpha_bar(self, alpha_bar):
        """The time at which `alpha_bar(t)` equals the given value (host-side)."""

    def alpha_bar(self, t):
        return jnp.exp(self.log_alpha_bar(t))

    def log_alpha(self, t):
        return 0.5 * self.log_alpha_bar(t)

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(self.log_alpha_bar(t)))

    def drift(self, t):
        return -0.5 * self.beta(t)

    def diffusion_squared(self, t):
        return self.beta(t)

    def transition(self, t, s):
        # v = 1 - alpha_bar_t / alpha_bar_s, computed without cancellation.
        log_ratio = self.log_alpha_bar(t) - self.log_alpha_bar(s)
        return jnp.exp(0.5 * log_ratio), -jnp.expm1(log_ratio)

    def time_at_noise_ratio(self, ratio):
        ratio = float(ratio)
        if not ratio > 0 or not math.isfinite(ratio):
            raise ValueError(f"noise ratio must be positive and finite, got {ratio}.")
        return self.time_at_alpha_bar(1.0 / (1.0 + ratio**2))


class VPSchedule(_AbstractVPSchedule):
    """VP schedule with linear `beta(t) = beta_min + t (beta_max - beta_min)` on `t in [0, 1]`.

    `alpha_bar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2)`. The defaults (0.1, 20)
    are those of DDPM in continuous time (Song et al. 2021); `alpha_bar(1) ~ 4.5e-5`.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_max: float = 1.0

    def __check_init__(self):
        if not (0 < self.beta_min <= self.beta_max):
            raise ValueError(
                f"VPSchedule needs 0 < beta_min <= beta_max, got beta_min={self.beta_min}, "
                f"beta_max={self.beta_max}."
            )
        if not (0 < self.t_max < float("inf")):
            raise ValueError(f"VPSchedule needs a positive finite t_max, got {self.t_max}.")

    def log_alpha_bar(self, t):
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def time_at_alpha_bar(self, alpha_bar):
        # Solve 0.5 (b1 - b0) t^2 + b0 t + log(alpha_bar) = 0 for t >= 0.
        c = -math.log(alpha_bar)
        a = 0.5 * (self.beta_max - self.beta_min)
        b = self.beta_min
        if a == 0:
            t = c / b
        else:
            t = (-b + math.sqrt(b * b + 4 * a * c)) / (2 * a)
        if t > self.t_max:
            raise ValueError(
                f"alpha_bar={alpha_bar:.3g} is below alpha_bar(t_max); the noise is too large "
                "for this schedule: use a schedule with a larger beta_max."
            )
        return t


class CosineVPSchedule(_AbstractVPSchedule):
    """VP cosine schedule of Nichol and Dhariwal (2021):
    `alpha_bar(t) = cos^2(pi/2 (t + s)/(1 + s)) / cos^2(pi/2 s/(1 + s))`.

    `alpha_bar(1) = 0` exactly, so `t_max` defaults to 0.9946, where `alpha_bar ~ 7e-5`
    (close to the linear schedule's end point) and `beta` stays finite.
    """

    offset: float = 0.008
    t_max: float = 0.9946

    def __check_init__(self):
        if not (0 < self.t_max < 1) or self.offset <= 0:
            raise ValueError(
                "CosineVPSchedule needs 0 < t_max < 1 and offset > 0, got "
                f"t_max={self.t_max}, offset={self.offset}."
            )

    def _angle(self, t):
        return 0.5 * jnp.pi * (t + self.offset) / (1.0 + self.offset)

    def log_alpha_bar(self, t):
        return 2.0 * (jnp.log(jnp.cos(self._angle(t))) - jnp.log(jnp.cos(self._angle(0.0))))

    def beta(self, t):
        return jnp.pi / (1.0 + self.offset) * jnp.tan(self._angle(t))

    def time_at_alpha_bar(self, alpha_bar):
        c0 = math.cos(0.5 * math.pi * self.offset / (1.0 + self.offset))
        t = (1.0 + self.offset) * 2.0 / math.pi * math.acos(math.sqrt(alpha_bar) * c0)
        t -= self.offset
        if t > self.t_max:
            raise ValueError(
                f"alpha_bar={alpha_bar:.3g} is below alpha_bar(t_max); the noise is too large "
                "for this schedule."
            )
        return max(t, 0.0)


class VESchedule(AbstractSchedule):
    """Variance exploding: `alpha = 1`, `sigma(t) = sigma_min (sigma_max / sigma_min)^t`.

    Song et al. (2021), the continuous NCSN. Note `sigma(0) = sigma_min > 0`: a reverse run that
    ends at `t = 0` returns the data law convolved with `N(0, sigma_min^2 I)`.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_max: float = 1.0

    def __check_init__(self):
        if not (0 < self.sigma_min < self.sigma_max):
            raise ValueError(
                "VESchedule needs 0 < sigma_min < sigma_max, got "
                f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}."
            )

    def log_alpha(self, t):
        return jnp.zeros_like(jnp.asarray(t, dtype=float))

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift(self, t):
        return jnp.zeros_like(jnp.asarray(t, dtype=float))

    def diffusion_squared(self, t):
        return 2.0 * self.sigma(t) ** 2 * math.log(self.sigma_max / self.sigma_min)

    def time_at_noise_ratio(self, ratio):
        ratio = float(ratio)
        if not (self.sigma_min <= ratio <= self.sigma_max):
            raise ValueError(
                f"noise level {ratio:.3g} is outside this VE schedule's range "
                f"[{self.sigma_min}, {self.sigma_max}]; widen sigma_min/sigma_max."
            )
        return math.log(ratio / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)


_SPACINGS = ("uniform", "polynomial")


def time_grid(
    num_steps: int,
    *,
    t_start: float,
    t_end: float = 0.0,
    spacing: str = "uniform",
    exponent: float = 2.0,
) -> np.ndarray:
    """Decreasing reverse-time grid `t_0 = t_start > t_1 > ... > t_N = t_end`.

    With `u_k = 1 - k / N`, the grid is `t_k = t_end + (t_start - t_end) u_k^rho` where
    `rho = 1` for `spacing="uniform"` and `rho = exponent` for `spacing="polynomial"` (steps
    concentrate near `t_end`, where sharp priors need them; Karras et al. 2022 use a
    polynomial in sigma for the same reason).

    Grids nest: the grid with `N` steps is every `M`-th point of the grid with `M N` steps,
    for any integer `M >= 2`, which is what the MLMC coupling needs.

    Returns a float64 numpy array of shape `(num_steps + 1,)`.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"num_steps must be a positive int, got {num_steps!r}.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}; use at least one step.")
    if spacing not in _SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {_SPACINGS}.")
    if not t_start > t_end:
        raise ValueError(f"t_start ({t_start}) must be larger than t_end ({t_end}).")
    rho = 1.0 if spacing == "uniform" else float(exponent)
    if rho <= 0:
        raise ValueError(f"exponent must be positive, got {exponent}.")
    u = 1.0 - np.arange(num_steps + 1, dtype=np.float64) / num_steps
    grid = t_end + (t_start - t_end) * u**rho
    grid[0], grid[-1] = t_start, t_end
    return grid
