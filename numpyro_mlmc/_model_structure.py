"""Reading a NumPyro model: its diffusion-prior site, its observed sites, its likelihood.

The model is traced with NumPyro's handlers (`seed`, `substitute`, `trace`) with the prior site
fixed to a given image. From the trace we take the observed sites and their distributions, so
`log p(y | x)` is whatever the user wrote: any forward function, any likelihood, plates and
`.to_event` included. Structure used by the guidance methods (a Normal likelihood whose mean is
affine in `x`) is *detected* numerically, by differentiating the model, and checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers

from ._priors import AbstractDiffusionPrior

__all__ = ["ModelStructure", "inspect_model", "trace_with_latent", "log_likelihood"]


class ModelError(ValueError):
    """The model does not have the structure a diffusion posterior needs."""


def trace_with_latent(model, site: str, x, model_args, model_kwargs):
    """The model's trace with the prior site `site` set to `x` (no randomness is drawn)."""
    seeded = handlers.seed(model, rng_seed=0)
    return handlers.trace(handlers.substitute(seeded, data={site: x})).get_trace(
        *model_args, **model_kwargs
    )


def _observed_sites(trace):
    return {
        name: s
        for name, s in trace.items()
        if s["type"] == "sample" and s.get("is_observed", False)
    }


def log_likelihood(model, site: str, x, model_args, model_kwargs):
    """`log p(y | x)`: the summed log-density of every observed site, with the prior site at `x`
    (one image, no batch axis). Scales from `numpyro.handlers.scale` are applied."""
    trace = trace_with_latent(model, site, x, model_args, model_kwargs)
    total = jnp.zeros((), x.dtype)
    for s in _observed_sites(trace).values():
        lp = s["fn"].log_prob(s["value"])
        if s.get("scale") is not None:
            lp = lp * s["scale"]
        total = total + jnp.sum(lp)
    return total


def standardized_residual_sq(model, site: str, x, model_args, model_kwargs):
    """`(sum_i (y_i - E[y_i | x])^2 / Var[y_i | x], m)`: the Pearson chi-square of the
    observation under the model at `x`, and the number of observed elements. Returns
    `(None, m)` if a likelihood does not expose its mean and variance."""
    trace = trace_with_latent(model, site, x, model_args, model_kwargs)
    chi2 = jnp.zeros((), x.dtype)
    m = 0
    for s in _observed_sites(trace).values():
        fn, value = s["fn"], s["value"]
        m += int(np.prod(jnp.shape(value)))
        try:
            mean, var = fn.mean, fn.variance
        except (NotImplementedError, AttributeError):
            return None, m
        chi2 = chi2 + jnp.sum((value - mean) ** 2 / jnp.maximum(var, 1e-12))
    return chi2, m


def _unwrap(fn):
    """The base distribution under `.to_event` / `.expand`; None if masked or unknown."""
    while True:
        if isinstance(fn, dist.Independent):
            fn = fn.base_dist
        elif isinstance(fn, dist.ExpandedDistribution):
            fn = fn.base_dist
        else:
            return fn


@dataclass(frozen=True)
class LinearGaussian:
    """`y = A x + b + std * n` over all observed elements (flattened, concatenated)."""

    matrix: np.ndarray  # (m, D)
    offset: np.ndarray  # (m,)
    observation: np.ndarray  # (m,)
    noise_std: np.ndarray  # (m,)

    @property
    def is_identity(self) -> bool:
        m, d = self.matrix.shape
        return (
            m == d
            and np.allclose(self.matrix, np.eye(d), atol=1e-6)
            and np.allclose(self.offset, 0.0, atol=1e-6)
            and np.allclose(self.noise_std, self.noise_std[0], rtol=1e-6)
        )


@dataclass(frozen=True)
class ModelStructure:
    """What a diffusion posterior needs to know about a model.

    Attributes:
        site: name of the diffusion-prior site.
        prior: its distribution.
        observed: names of the observed sites.
        linear_gaussian: the linear-Gaussian form of the likelihood if it has one (detected by
            differentiating the model and checked at random points), else None.
    """

    site: str
    prior: AbstractDiffusionPrior
    observed: tuple[str, ...]
    linear_gaussian: LinearGaussian | None


# Dense Jacobians above this many elements are not formed (structure detection falls back to
# the general likelihood); 2**26 float32 elements = 256 MiB.
_MAX_DENSE_ELEMENTS = 2**26


def inspect_model(model, model_args=(), model_kwargs=None) -> ModelStructure:
    """Trace `model` once and check it: exactly one diffusion-prior site, no other latent
    sites, finite observations of the right shape, and a likelihood that depends on `x`.

    Raises `ModelError` (a `ValueError`) with a message that names the fix.
    """
    model_kwargs = dict(model_kwargs or {})
    trace = handlers.trace(handlers.seed(_NoPriorSampling(model), rng_seed=0)).get_trace(
        *model_args, **model_kwargs
    )
    priors = [
        name
        for name, s in trace.items()
        if s["type"] == "sample" and isinstance(s["fn"], AbstractDiffusionPrior)
    ]
    if not priors:
        raise ModelError(
            "the model has no sample site with a diffusion prior; write "
            "`x = numpyro.sample('x', prior)` with prior an nm.DiffusionPrior or "
            "nm.GaussianMixturePrior."
        )
    if len(priors) > 1:
        raise ModelError(
            f"the model has {len(priors)} diffusion-prior sites {priors}; a DiffusionPosterior "
            "samples one image latent: keep one diffusion prior per model."
        )
    site = priors[0]
    prior = trace[site]["fn"]
    if trace[site].get("is_observed", False):
        raise ModelError(
            f"the diffusion-prior site {site!r} is observed; it must be the latent image."
        )
    others = [
        name
        for name, s in trace.items()
        if s["type"] == "sample" and not s.get("is_observed", False) and name != site
    ]
    if others:
        raise ModelError(
            f"the model has latent sites other than the diffusion prior: {others}. "
            "DiffusionPosterior samples the image latent only (Gibbs updates for "
            "hyperparameters are not supported yet): fix those sites to values, pass them "
            "as observed data, or condition on them with numpyro.handlers.condition."
        )
    observed = _observed_sites(trace)
    if not observed:
        raise ModelError(
            "the model has no observed site: pass the observation (e.g. y=y_obs) so that "
            "`numpyro.sample('y', ..., obs=y)` has data; to sample the prior use prior.sample."
        )
    for name, s in observed.items():
        value = np.asarray(s["value"])
        if not np.all(np.isfinite(value)):
            bad = int(np.sum(~np.isfinite(value)))
            raise ModelError(
                f"observed site {name!r} holds {bad} NaN or inf values; mask them out "
                "(e.g. observe only finite pixels with nm.operators.Inpaint) or fill them."
            )
        expected = tuple(s["fn"].batch_shape) + tuple(s["fn"].event_shape)
        if value.shape != expected:
            raise ModelError(
                f"observed site {name!r} has shape {value.shape}, but its distribution has "
                f"shape {expected} (batch {tuple(s['fn'].batch_shape)} + event "
                f"{tuple(s['fn'].event_shape)}); pass an observation of shape {expected}."
            )
    _check_depends_on_latent(model, site, prior, model_args, model_kwargs)
    linear = _detect_linear_gaussian(model, site, prior, model_args, model_kwargs)
    return ModelStructure(site, prior, tuple(observed), linear)


class _NoPriorSampling(handlers.Messenger):
    """Replace draws from diffusion priors by zeros while tracing: structure only."""

    def process_message(self, msg):
        if (
            msg["type"] == "sample"
            and isinstance(msg["fn"], AbstractDiffusionPrior)
            and msg.get("value") is None
        ):
            msg["value"] = jnp.zeros(msg["fn"].event_shape)


def _probe_points(prior, num: int = 2):
    keys = jr.split(jr.key(20260), num)
    return [0.5 * jr.normal(k, prior.event_shape) for k in keys]


def _check_depends_on_latent(model, site, prior, model_args, model_kwargs):
    def ll(x):
        return log_likelihood(model, site, x, model_args, model_kwargs)

    grads = []
    for x in _probe_points(prior):
        try:
            g = jax.grad(ll)(x)
        except Exception as err:  # noqa: BLE001 - re-raised with the fix
            raise ModelError(
                f"log p(y | x) could not be differentiated with respect to {site!r}: {err}. "
                "Write the forward model with differentiable jax.numpy operations."
            ) from err
        grads.append(np.asarray(g))
    if not all(np.all(np.isfinite(g)) for g in grads):
        raise ModelError(
            f"the gradient of log p(y | x) with respect to {site!r} is NaN or inf at test "
            "points; check the likelihood's support (e.g. Poisson rates must stay positive: "
            "use jnp.exp or jax.nn.softplus in the forward model)."
        )
    if all(np.all(g == 0) for g in grads):
        raise ModelError(
            f"the observations do not depend differentiably on {site!r} (the gradient of "
            "log p(y | x) is zero): make the observed sites' distributions functions of x "
            "through differentiable operations (no rounding, thresholds or stop_gradient)."
        )


def _detect_linear_gaussian(model, site, prior, model_args, model_kwargs):
    """`A, b, std, y` if every observed site is Normal with a mean affine in `x` and a scale
    that does not depend on `x`; else None. Checked at two random points."""
    d = math.prod(prior.event_shape)

    def normal_params(x):
        trace = trace_with_latent(model, site, x, model_args, model_kwargs)
        locs, scales, values = [], [], []
        for s in _observed_sites(trace).values():
            if s.get("scale") is not None:
                return None
            base = _unwrap(s["fn"])
            if type(base) is not dist.Normal:
                return None
            shape = jnp.shape(s["value"])
            locs.append(jnp.broadcast_to(base.loc, shape).reshape(-1))
            scales.append(jnp.broadcast_to(base.scale, shape).reshape(-1))
            values.append(jnp.reshape(s["value"], (-1,)))
        return jnp.concatenate(locs), jnp.concatenate(scales), jnp.concatenate(values)

    x0 = jnp.zeros(prior.event_shape)
    first = normal_params(x0)
    if first is None:
        return None
    m = first[0].shape[0]
    if m * d > _MAX_DENSE_ELEMENTS:
        return None

    def mean_flat(xflat):
        return normal_params(xflat.reshape(prior.event_shape))[0]

    matrix = np.asarray(jax.jacfwd(mean_flat)(jnp.zeros(d)), np.float64)
    offset = np.asarray(first[0], np.float64)
    scale0 = np.asarray(first[1], np.float64)
    for x in _probe_points(prior):
        loc, scale, _ = (np.asarray(v, np.float64) for v in normal_params(x))
        predicted = matrix @ np.asarray(x, np.float64).reshape(-1) + offset
        tol = 1e-4 * (1.0 + np.abs(predicted).max())
        if np.abs(loc - predicted).max() > tol or not np.allclose(scale, scale0, rtol=1e-5):
            return None
    if np.any(scale0 <= 0):
        return None
    return LinearGaussian(matrix, offset, np.asarray(first[2], np.float64), scale0)
