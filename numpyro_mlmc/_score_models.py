"""Score models: a denoiser and a schedule, seen through the quantities the samplers need.

A score model is an `equinox.Module` evaluated on **one** sample (`x` of the event shape, `t`
a scalar); samplers `vmap` it over a batch. It gives the score `grad_x log p_t(x)` and the
Tweedie denoiser `x0_hat(x, t) = E[x_0 | x_t = x]`, related by

    x0_hat = (x + sigma_t^2 score) / alpha_t,      score = (alpha_t x0_hat - x) / sigma_t^2.

Networks declare one of four parametrisations:

| name    | the network returns                      |
|---------|------------------------------------------|
| `eps`   | `eps_hat`, with `score = -eps_hat / sigma_t`          |
| `x0`    | `x0_hat`                                   |
| `score` | the score itself                           |
| `v`     | `v = alpha_t eps - sigma_t x_0` (VP schedules only; Salimans and Ho 2022) |
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp

from ._schedules import AbstractSchedule, VESchedule

PARAMETRIZATIONS = ("eps", "x0", "score", "v")


class AbstractScoreModel(eqx.Module):
    """Per-sample score and denoiser of a diffused law. Subclasses implement at least one of
    `score` and `denoise`; the other follows from Tweedie's formula."""

    schedule: eqx.AbstractVar[AbstractSchedule]

    def score(self, x, t):
        """`grad_x log p_t(x)` for one sample `x` (event shape) at scalar time `t`."""
        x0 = self.denoise(x, t)
        return (self.schedule.alpha(t) * x0 - x) / self.schedule.sigma(t) ** 2

    def denoise(self, x, t):
        """`E[x_0 | x_t = x]` for one sample `x` at scalar time `t`."""
        sigma = self.schedule.sigma(t)
        return (x + sigma**2 * self.score(x, t)) / self.schedule.alpha(t)

    def __check_init__(self):
        cls = type(self)
        if cls.score is AbstractScoreModel.score and cls.denoise is AbstractScoreModel.denoise:
            raise TypeError(f"{cls.__name__} must implement `score` or `denoise`.")


class NetworkScoreModel(AbstractScoreModel):
    """A network `denoiser(x, t)` with a declared parametrisation, evaluated per sample."""

    denoiser: Callable
    schedule: AbstractSchedule
    parametrization: str = eqx.field(static=True)

    def __check_init__(self):
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"unknown parametrization {self.parametrization!r}; choose one of "
                f"{PARAMETRIZATIONS} (what the network returns: noise, clean image, score or "
                "velocity)."
            )
        if self.parametrization == "v" and isinstance(self.schedule, VESchedule):
            raise ValueError(
                "parametrization='v' is defined for variance-preserving schedules only; use "
                "a VPSchedule/CosineVPSchedule or another parametrization."
            )

    def _output(self, x, t):
        return self.denoiser(x, jnp.asarray(t, dtype=x.dtype))

    def denoise(self, x, t):
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        out = self._output(x, t)
        if self.parametrization == "x0":
            return out
        if self.parametrization == "eps":
            return (x - s * out) / a
        if self.parametrization == "score":
            return (x + s**2 * out) / a
        return a * x - s * out  # v

    def score(self, x, t):
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        out = self._output(x, t)
        if self.parametrization == "score":
            return out
        if self.parametrization == "eps":
            return -out / s
        if self.parametrization == "x0":
            return (a * out - x) / s**2
        return -(s * x + a * out) / s  # v: eps = sigma x + alpha v
