"""Guidance: turning a prior score and a likelihood into a posterior score.

The posterior score at diffusion time `t` is `grad log p_t(x_t) + grad log p(y | x_t)`; the
second term is intractable for a learned prior and each method approximates it.

* `exact` - Gaussian-mixture prior and a Normal likelihood with a mean affine in `x`: the
  posterior is a Gaussian mixture in closed form (`GaussianMixturePrior.posterior`) and its
  diffused score is exact. The ground truth of the test suite.
* `denoise` - `y = x + sigma n` with any prior: `p(x | y) = p(x_0 | x_{t*} = alpha(t*) y)` with
  `sigma(t*) / alpha(t*) = sigma`, so unconditional reverse diffusion started at `t*` from
  `alpha(t*) y` samples the posterior exactly, up to score and discretisation error (the
  paper's denoising experiment).
* `pigdm` - Song et al., "Pseudoinverse-guided diffusion models for inverse problems" (ICLR
  2023), noisy linear-Gaussian form: `p(y | x_t) ~ N(A x0_hat(x_t) + b, r_t^2 A A^T + R)` with
  `r_t^2 = s^2 / (1 + s^2)`, `s = sigma_t / alpha_t` (unit data variance), differentiated
  through the denoiser. Exact for a Gaussian prior with unit variance.
* `dps` - Chung et al., "Diffusion posterior sampling for general noisy inverse problems" (ICLR
  2023): `grad_{x_t} log p(y | x0_hat(x_t))` for any differentiable likelihood read from the
  model, weighted per sample by `w = scale * min(1, sqrt(m) / ||r||)` with `r` the Pearson
  residual of the `m` observed elements at `x0_hat`. Near the data (`||r||^2 ~ m`) the weight is
  `scale`; far from it the step is normalised by the residual norm, as in DPS. The
  normalisation is per sample, never across a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._model_structure import LinearGaussian, log_likelihood, standardized_residual_sq
from ._schedules import AbstractSchedule
from ._score_models import AbstractScoreModel

__all__ = ["GUIDANCES", "DPSScoreModel", "PiGDMScoreModel"]

GUIDANCES = ("auto", "exact", "denoise", "pigdm", "dps")


class PiGDMScoreModel(AbstractScoreModel):
    """Pseudoinverse-guided posterior score for `y = A x + b + R^{1/2} n`.

    The observation is whitened once (`A_w = R^{-1/2} A`), and `A_w A_w^T = U diag(lam) U^T`
    is factorised once, so `(r_t^2 A_w A_w^T + I)^{-1}` costs two `(m, m)` products per step.
    One network evaluation and one vector-Jacobian product per call.
    """

    prior: AbstractScoreModel
    matrix: jax.Array  # (m, D), whitened
    offset: jax.Array  # (m,), whitened
    observation: jax.Array  # (m,), whitened
    eigenvectors: jax.Array  # (m, m)
    eigenvalues: jax.Array  # (m,)
    schedule: AbstractSchedule
    network_jacobian: bool = eqx.field(static=True, default=True)

    @staticmethod
    def build(
        prior: AbstractScoreModel, linear: LinearGaussian, network_jacobian: bool = True
    ) -> PiGDMScoreModel:
        std = linear.noise_std
        a = linear.matrix / std[:, None]
        lam, vec = np.linalg.eigh(a @ a.T)
        dtype = jnp.zeros(()).dtype
        return PiGDMScoreModel(
            prior=prior,
            matrix=jnp.asarray(a, dtype),
            offset=jnp.asarray(linear.offset / std, dtype),
            observation=jnp.asarray(linear.observation / std, dtype),
            eigenvectors=jnp.asarray(vec, dtype),
            eigenvalues=jnp.asarray(np.maximum(lam, 0.0), dtype),
            schedule=prior.schedule,
            network_jacobian=network_jacobian,
        )

    def score(self, x, t):
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        if self.network_jacobian:
            x0, vjp = jax.vjp(lambda z: self.prior.denoise(z, t), x)
        else:
            x0 = self.prior.denoise(x, t)
        prior_score = (alpha * x0 - x) / sigma**2
        s2 = (sigma / alpha) ** 2
        r2 = s2 / (1.0 + s2)
        resid = self.observation - self.matrix @ x0.reshape(-1) - self.offset
        coef = self.eigenvectors.T @ resid / (r2 * self.eigenvalues + 1.0)
        v = (self.matrix.T @ (self.eigenvectors @ coef)).reshape(x.shape)
        if self.network_jacobian:
            (guide,) = vjp(v)
        else:
            # d x0_hat / d x_t of a unit-variance Gaussian prior: alpha / (alpha^2 + sigma^2) I.
            guide = alpha / (alpha**2 + sigma**2) * v
        return prior_score + guide


class DPSScoreModel(AbstractScoreModel):
    """Diffusion posterior sampling for any differentiable likelihood written in the model.

    `model_args` / `model_kwargs` hold the observation; their arrays are traced, so one
    compilation serves every observation of one shape.
    """

    prior: AbstractScoreModel
    model: Callable = eqx.field(static=True)
    site: str = eqx.field(static=True)
    model_args: tuple
    model_kwargs: dict[str, Any]
    scale: float
    schedule: AbstractSchedule

    def _log_likelihood(self, x0):
        return log_likelihood(self.model, self.site, x0, self.model_args, self.model_kwargs)

    def weight(self, x0):
        chi2, m = standardized_residual_sq(
            self.model, self.site, x0, self.model_args, self.model_kwargs
        )
        if chi2 is None:
            return jnp.asarray(self.scale, x0.dtype)
        norm = jnp.sqrt(jnp.maximum(chi2, 0.0))
        return self.scale * jnp.minimum(1.0, np.sqrt(m) / jnp.maximum(norm, 1e-12))

    def score(self, x, t):
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        x0, vjp = jax.vjp(lambda z: self.prior.denoise(z, t), x)
        prior_score = (alpha * x0 - x) / sigma**2
        grad_x0 = jax.grad(self._log_likelihood)(x0)
        (guide,) = vjp(grad_x0)
        w = jax.lax.stop_gradient(self.weight(x0))
        return prior_score + w * guide
