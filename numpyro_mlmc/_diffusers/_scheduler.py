"""Discrete-time diffusers noise schedules in continuous time.

A diffusers `DDPMScheduler`/`DDIMScheduler` trains on timesteps `k = 0, ..., N - 1` with
`x_k = sqrt(alphas_cumprod[k]) x_0 + sqrt(1 - alphas_cumprod[k]) e`. `DiscreteVPSchedule`
places timestep `k` at continuous time

    t_k = (k + 1) / N,        so   alpha_bar(t_k) = alphas_cumprod[k]   exactly,

with `alpha_bar(0) = 1`, and interpolates `log alpha_bar` linearly between these knots; `beta` is
then piecewise constant, `beta(t) = -N (log alphas_cumprod[k] - log alphas_cumprod[k - 1])` on
`[k / N, (k + 1) / N)`. The network of a checkpoint is evaluated at the fractional timestep
`k(t) = N t - 1` (clipped to `[0, N - 1]`, see `DiscreteVPSchedule.timestep`).

The beta schedules follow diffusers: `linear` (Ho et al. 2020), `scaled_linear` (latent
diffusion), `squaredcos_cap_v2` (Nichol and Dhariwal 2021, betas capped at 0.999), `sigmoid`
(GeoDiff) and explicit `trained_betas`.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._schedules import _AbstractVPSchedule

__all__ = ["DiscreteVPSchedule", "schedule_from_diffusers"]


class DiscreteVPSchedule(_AbstractVPSchedule):
    """The VP schedule of a discrete-time model with `alphas_cumprod[k]`, `k = 0..N-1`.

    Continuous time `t in [0, 1]`; timestep `k` sits at `t = (k + 1) / N`, where
    `alpha_bar(t) = alphas_cumprod[k]` (up to float32 rounding under `jit`); `log alpha_bar` is
    piecewise linear in `t` between the knots, starting from `alpha_bar(0) = 1`.

    Args:
        alphas_cumprod: the decreasing cumulative products `prod_{j <= k} (1 - beta_j)`, all in
            `(0, 1]`. Build one from a diffusers scheduler config with
            `DiscreteVPSchedule.from_diffusers_config(config)`.
    """

    log_alphas_cumprod: tuple[float, ...] = eqx.field(static=True)
    t_max: float = 1.0

    def __init__(self, alphas_cumprod):
        acp = np.asarray(alphas_cumprod, dtype=np.float64).reshape(-1)
        if acp.size < 1:
            raise ValueError("alphas_cumprod must hold at least one value.")
        if not np.all(np.isfinite(acp)) or np.any(acp <= 0) or np.any(acp > 1):
            raise ValueError(
                "alphas_cumprod must lie in (0, 1]; a zero value (zero terminal SNR, e.g. "
                "rescale_betas_zero_snr=True) has infinite noise and no VP time."
            )
        if np.any(np.diff(acp) > 0):
            raise ValueError("alphas_cumprod must be non-increasing.")
        self.log_alphas_cumprod = tuple(float(v) for v in np.log(acp))
        self.t_max = 1.0

    @property
    def num_train_timesteps(self) -> int:
        """`N`, the number of discrete training timesteps."""
        return len(self.log_alphas_cumprod)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """The discrete `alphas_cumprod` (float64 numpy, shape `(N,)`)."""
        return np.exp(np.asarray(self.log_alphas_cumprod))

    def _knots(self):
        # log alpha_bar at t = k / N for k = 0..N (value 0 at t = 0).
        return jnp.asarray((0.0, *self.log_alphas_cumprod))

    def _segment(self, t):
        n = self.num_train_timesteps
        u = jnp.asarray(t) * n
        k = jnp.clip(jnp.floor(u), 0, n - 1)
        return k.astype(jnp.int32), u - k

    def log_alpha_bar(self, t):
        knots = self._knots()
        k, frac = self._segment(t)
        return knots[k] + frac * (knots[k + 1] - knots[k])

    def beta(self, t):
        knots = self._knots()
        k, _ = self._segment(t)
        return -self.num_train_timesteps * (knots[k + 1] - knots[k])

    def time_at_alpha_bar(self, alpha_bar):
        alpha_bar = float(alpha_bar)
        if not 0 < alpha_bar <= 1:
            raise ValueError(f"alpha_bar must lie in (0, 1], got {alpha_bar}.")
        knots = np.asarray((0.0, *self.log_alphas_cumprod))
        target = math.log(alpha_bar)
        if target < knots[-1] - 1e-5:  # a float32 round-off below the end point is the end
            raise ValueError(
                f"alpha_bar={alpha_bar:.3g} is below alphas_cumprod[N-1]="
                f"{math.exp(knots[-1]):.3g}; the noise is larger than the model was trained on."
            )
        times = np.arange(knots.size, dtype=np.float64) / self.num_train_timesteps
        # np.interp needs increasing abscissae: use -log alpha_bar, non-decreasing.
        return float(np.clip(np.interp(-target, -knots, times), 0.0, self.t_max))

    def timestep(self, t):
        """The fractional diffusers timestep `k(t) = N t - 1`, clipped to `[0, N - 1]`, at which
        the network is evaluated. Times below `1 / N` (less noise than the first training
        timestep) use timestep 0 rather than extrapolating the time embedding."""
        n = self.num_train_timesteps
        return jnp.clip(jnp.asarray(t) * n - 1.0, 0.0, n - 1.0)

    def time_at_timestep(self, timestep):
        """The continuous time `(k + 1) / N` of diffusers timestep `k` (host-side float)."""
        return (float(timestep) + 1.0) / self.num_train_timesteps

    @classmethod
    def from_diffusers_config(cls, config: dict) -> DiscreteVPSchedule:
        """The schedule of a diffusers `DDPMScheduler` or `DDIMScheduler` config dict."""
        return cls(diffusers_alphas_cumprod(config))

    def __repr__(self):
        return (
            f"DiscreteVPSchedule(num_train_timesteps={self.num_train_timesteps}, "
            f"alphas_cumprod[-1]={math.exp(self.log_alphas_cumprod[-1]):.3g})"
        )


_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    )


def diffusers_alphas_cumprod(config: dict) -> np.ndarray:
    """`alphas_cumprod` of a diffusers DDPM/DDIM scheduler config, computed as diffusers does
    (float32 betas, cumulative product in float32); float64 numpy array of shape `(N,)`."""
    name = config.get("_class_name")
    if name is not None and name not in _SCHEDULERS:
        raise ValueError(
            f"scheduler {name!r} is not supported; the importer reads {_SCHEDULERS} configs "
            "(discrete-time VP schedules). Pass a DDPM/DDIM scheduler config instead."
        )
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError(
            "rescale_betas_zero_snr=True is not supported: it sets alphas_cumprod[-1] = 0, an "
            "infinite-noise end point that has no variance-preserving time."
        )
    n = int(config.get("num_train_timesteps", 1000))
    beta_start = float(config.get("beta_start", 0.0001))
    beta_end = float(config.get("beta_end", 0.02))
    trained = config.get("trained_betas")
    schedule = config.get("beta_schedule", "linear")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
    elif schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n)
    elif schedule == "scaled_linear":
        # squared in float32, as diffusers does
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n).astype(np.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    elif schedule == "sigmoid":
        betas = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, n))) * (beta_end - beta_start)
        betas = betas + beta_start
    else:
        raise ValueError(
            f"beta_schedule={schedule!r} is not supported; choose one of {_BETA_SCHEDULES} or "
            "give trained_betas."
        )
    alphas = (1.0 - betas.astype(np.float32)).astype(np.float32)
    return np.cumprod(alphas, dtype=np.float32).astype(np.float64)


def schedule_from_diffusers(config: dict) -> tuple[DiscreteVPSchedule, str]:
    """Map a diffusers DDPM/DDIM scheduler config to `(schedule, parametrization)`.

    `prediction_type` maps as `epsilon -> "eps"`, `sample -> "x0"`, `v_prediction -> "v"`.
    Sampling options of the scheduler (`clip_sample`, `thresholding`, `timestep_spacing`,
    `steps_offset`, `variance_type` except learned variances, see the loader) do not change the
    trained model and are not carried over: the library's own samplers replace them.
    """
    if not isinstance(config, dict):
        raise TypeError(f"scheduler config must be a dict, got {type(config).__name__}.")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise ValueError(
            f"prediction_type={prediction!r} is not supported; choose one of {tuple(_PREDICTIONS)}."
        )
    return DiscreteVPSchedule.from_diffusers_config(config), _PREDICTIONS[prediction]
