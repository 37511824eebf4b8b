"""`DiffusionPosterior`: a NumPyro `MCMCKernel` whose every step is one guided reverse diffusion.

A thin adapter: the model is read once (`inspect_model`), the guidance turns prior and
likelihood into a posterior score (`_guidance.py`), and `ReverseDiffusion` runs the paths. Each
`sample` call returns an *independent* posterior draw, so "chains" are just parallel streams of
i.i.d. draws: there is no warm-up to do and no autocorrelation to diagnose.
"""

from __future__ import annotations

import math
from collections import namedtuple
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from numpyro import handlers
from numpyro.infer.mcmc import MCMCKernel
from numpyro.util import is_prng_key

from ._diffusion import DiffusionLevelSampler, ReverseDiffusion, check_num_steps
from ._gmm import GaussianMixturePrior
from ._guidance import GUIDANCES, DPSScoreModel, PiGDMScoreModel
from ._model_structure import ModelError, ModelStructure, inspect_model
from ._sharding import DEFAULT_CHUNK_SIZE, BatchRunner
from ._solvers import get_sampler

__all__ = ["DiffusionPosterior", "DiffusionPosteriorState", "sample_posterior"]

DiffusionPosteriorState = namedtuple("DiffusionPosteriorState", ["i", "z", "rng_key"])
"""Kernel state: draw counter `i`, the current draw `z = {site: image}`, and the PRNG key."""


class DiffusionPosterior(MCMCKernel):
    """Posterior sampling for a NumPyro model whose image latent has a diffusion prior.

    Args:
        model: a NumPyro model with one `numpyro.sample(name, prior)` site where `prior` is an
            `nm.DiffusionPrior` or `nm.GaussianMixturePrior`, and observed sites with any
            differentiable likelihood.
        num_steps: reverse-diffusion steps per draw (MCMC and `sample_posterior`). MLMC chooses
            its own step counts per level.
        sampler: `"ancestral"` (default), `"euler_maruyama"`, `"ddim"`, `"heun"` or a sampler
            object.
        guidance: `"auto"`, `"exact"`, `"denoise"`, `"pigdm"` or `"dps"` (see `_guidance.py`).
            `"auto"` picks `exact` for a Gaussian-mixture prior with a linear-Gaussian
            likelihood, else `denoise` for `y = x + sigma n`, else `pigdm` for a linear-Gaussian
            likelihood, else `dps`. `kernel.guidance` reports the choice after `init`.
        guidance_scale: the DPS weight `scale` (default 1).
        pigdm_jacobian: how `pigdm` differentiates the denoiser: `"network"` (a vector-Jacobian
            product through the network, as published), `"isotropic"` (the Jacobian of a
            unit-variance Gaussian prior's denoiser, `alpha / (alpha^2 + sigma^2) I`: one NFE
            per step and no backpropagation), or `"auto"` (default): `"network"` for analytic
            priors, `"isotropic"` for network priors. Learned denoisers are inaccurate in
            their Jacobian at high noise, where `x0_hat = (x - sigma eps) / alpha` amplifies it
            by `1 / alpha` (150 at `t = 1` for the default schedule): with the shipped digits
            prior the published form diverged (1e6 after 2 steps, NaN from 16 steps on).
        spacing, exponent: time spacing of the reverse grids (`"uniform"` or `"polynomial"`).

    The kernel works with `numpyro.infer.MCMC` (chain methods sequential, vectorized and
    parallel; use `num_warmup=0`: there is nothing to adapt), `arviz.from_numpyro`, and
    `numpyro.infer.Predictive(model, posterior_samples)`. Cost: one path costs
    `num_steps` network evaluations (ancestral); `dps` and `pigdm` add one vector-Jacobian
    product of the network per step.
    """

    sample_field = "z"

    def __init__(
        self,
        model,
        *,
        num_steps: int = 256,
        sampler="ancestral",
        guidance: str = "auto",
        guidance_scale: float = 1.0,
        pigdm_jacobian: str = "auto",
        spacing: str = "uniform",
        exponent: float = 2.0,
    ):
        if not callable(model):
            raise TypeError(f"model must be a NumPyro model (a callable), got {model!r}.")
        if guidance not in GUIDANCES:
            raise ValueError(f"unknown guidance {guidance!r}; choose one of {GUIDANCES}.")
        if spacing not in ("uniform", "polynomial"):
            raise ValueError(f"spacing must be 'uniform' or 'polynomial', got {spacing!r}.")
        scale = float(guidance_scale)
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"guidance_scale must be positive and finite, got {guidance_scale}.")
        self._model = model
        self.num_steps = check_num_steps(num_steps)
        self.sampler = get_sampler(sampler)
        self.requested_guidance = guidance
        self.guidance_scale = scale
        if pigdm_jacobian not in ("auto", "network", "isotropic"):
            raise ValueError(
                f"pigdm_jacobian must be 'auto', 'network' or 'isotropic', got {pigdm_jacobian!r}."
            )
        self.pigdm_jacobian = pigdm_jacobian
        self.spacing = spacing
        self.exponent = float(exponent)
        if not (0 < self.exponent < math.inf):
            raise ValueError(f"exponent must be positive and finite, got {exponent}.")
        self.guidance: str | None = None
        self._diffusion: ReverseDiffusion | None = None
        self._structure: ModelStructure | None = None

    # ----- building the posterior -----------------------------------------------------------
    @property
    def model(self):
        return self._model

    def build(self, model_args=(), model_kwargs=None) -> ReverseDiffusion:
        """Read the model with this observation and return the posterior's reverse diffusion.
        Sets `self.guidance` to the method used. Raises `ValueError` with the fix when the
        model or the requested guidance does not fit."""
        model_kwargs = dict(model_kwargs or {})
        structure = inspect_model(self._model, tuple(model_args), model_kwargs)
        guidance = self._choose_guidance(structure)
        prior = structure.prior
        linear = structure.linear_gaussian
        schedule = prior.schedule
        event_shape = prior.event_shape
        common = dict(
            sampler=self.sampler,
            event_shape=event_shape,
            spacing=self.spacing,
            exponent=self.exponent,
        )
        zeros = jnp.zeros(event_shape)
        if guidance == "exact":
            post = prior.posterior(
                linear.matrix, linear.observation, linear.noise_std, linear.offset
            )
            diffusion = ReverseDiffusion(
                model=post.score_model(),
                x_start_mean=zeros,
                x_start_std=schedule.prior_std(),
                t_start=schedule.t_max,
                exact_start=True,  # the diffused posterior at t_max, exactly
                **common,
            )
        elif guidance == "denoise":
            noise = float(linear.noise_std[0])
            t_star = schedule.time_at_noise_ratio(noise)
            y = jnp.asarray(linear.observation.reshape(event_shape), zeros.dtype)
            diffusion = ReverseDiffusion(
                model=prior.score_model(),
                x_start_mean=schedule.alpha(t_star) * y,
                x_start_std=0.0,
                t_start=t_star,
                **common,
            )
        elif guidance == "pigdm":
            diffusion = ReverseDiffusion(
                model=PiGDMScoreModel.build(
                    prior.score_model(),
                    linear,
                    network_jacobian=self.pigdm_jacobian == "network"
                    or (self.pigdm_jacobian == "auto" and isinstance(prior, GaussianMixturePrior)),
                ),
                x_start_mean=zeros,
                x_start_std=schedule.prior_std(),
                t_start=schedule.t_max,
                **common,
            )
        else:
            diffusion = ReverseDiffusion(
                model=DPSScoreModel(
                    prior=prior.score_model(),
                    model=self._model,
                    site=structure.site,
                    model_args=tuple(model_args),
                    model_kwargs=model_kwargs,
                    scale=self.guidance_scale,
                    schedule=schedule,
                ),
                x_start_mean=zeros,
                x_start_std=schedule.prior_std(),
                t_start=schedule.t_max,
                **common,
            )
        self.guidance = guidance
        self._structure = structure
        self._diffusion = diffusion
        return diffusion

    def _choose_guidance(self, structure: ModelStructure) -> str:
        linear = structure.linear_gaussian
        is_gmm = isinstance(structure.prior, GaussianMixturePrior)
        requested = self.requested_guidance
        if requested == "auto":
            if linear is not None and is_gmm:
                return "exact"
            if linear is not None and linear.is_identity:
                return "denoise"
            if linear is not None:
                return "pigdm"
            return "dps"
        if requested == "exact":
            if not is_gmm:
                raise ModelError(
                    "guidance='exact' needs an nm.GaussianMixturePrior (its posterior is known in "
                    f"closed form); the prior here is {type(structure.prior).__name__}. Use "
                    "'denoise', 'pigdm' or 'dps' for network priors."
                )
            if linear is None:
                raise ModelError(
                    "guidance='exact' needs Normal observations whose mean is affine in the "
                    "latent (y ~ Normal(A x + b, sigma)); this model's likelihood is not. Use "
                    "guidance='dps'."
                )
        if requested in ("pigdm", "denoise") and linear is None:
            raise ModelError(
                f"guidance={requested!r} needs Normal observations whose mean is affine in the "
                "latent with a fixed scale; this model's likelihood is not. Use guidance='dps'."
            )
        if requested == "denoise" and not linear.is_identity:
            raise ModelError(
                "guidance='denoise' needs y = x + sigma * noise (identity forward map, one "
                "noise level for every pixel); this model's forward map is not the identity. "
                "Use 'pigdm' or 'dps'."
            )
        return requested

    # ----- MCMCKernel -----------------------------------------------------------------------
    @property
    def default_fields(self):
        return (self.sample_field,)

    def init(self, rng_key, num_warmup, init_params, model_args, model_kwargs):
        self.build(model_args, model_kwargs)
        site = self._structure.site
        if is_prng_key(rng_key):
            key, draw_key = jr.split(rng_key)
            z = {site: self._draw(draw_key)}
            return DiffusionPosteriorState(jnp.zeros((), jnp.int32), z, key)
        # A batch of keys: vectorized chains.
        keys = jax.vmap(jr.split)(rng_key)
        z = {site: self._draw_batch(keys[:, 1])}
        return DiffusionPosteriorState(jnp.zeros(rng_key.shape[0], jnp.int32), z, keys[:, 0])

    def _draw(self, key):
        return self._diffusion.sample(key[None], self.num_steps)[0]

    def _draw_batch(self, keys):
        return self._diffusion.sample(keys, self.num_steps)

    def sample(self, state, model_args, model_kwargs):
        if self._diffusion is None:
            raise RuntimeError("call init before sample (numpyro.infer.MCMC does this).")
        site = self._structure.site
        if jnp.ndim(state.i) == 0:
            key, draw_key = jr.split(state.rng_key)
            return DiffusionPosteriorState(state.i + 1, {site: self._draw(draw_key)}, key)
        keys = jax.vmap(jr.split)(state.rng_key)
        x = self._draw_batch(keys[:, 1])
        return DiffusionPosteriorState(state.i + 1, {site: x}, keys[:, 0])

    def postprocess_fn(self, model_args, model_kwargs):
        """Adds the model's deterministic sites to each draw."""
        model = self._model

        def fn(z):
            seeded = handlers.seed(model, rng_seed=0)
            trace = handlers.trace(handlers.substitute(seeded, data=z)).get_trace(
                *model_args, **model_kwargs
            )
            out = dict(z)
            for name, s in trace.items():
                if s["type"] == "deterministic":
                    out[name] = s["value"]
            return out

        return fn

    def get_diagnostics_str(self, state):
        return f"{self.guidance} guidance, {self.num_steps} steps"

    # ----- multilevel ------------------------------------------------------------------------
    def level_sampler(self, model_args=(), model_kwargs=None, *, refinement: int = 2):
        """The MLMC `LevelSampler` of this posterior: level `l` runs `refinement**l` steps."""
        diffusion = self.build(model_args, model_kwargs)
        return DiffusionLevelSampler(diffusion, refinement=refinement, site=self._structure.site)

    @property
    def structure(self) -> ModelStructure | None:
        """What `init`/`build` read from the model (site, prior, observed sites)."""
        return self._structure


def sample_posterior(
    key,
    model,
    num_samples: int,
    *,
    batch_size: int = 256,
    num_steps: int = 256,
    sampler="ancestral",
    guidance: str = "auto",
    guidance_scale: float = 1.0,
    pigdm_jacobian: str = "auto",
    spacing: str = "uniform",
    model_args: tuple = (),
    num_chains: int = 1,
    return_inference_data: bool = False,
    progress_bar: bool = False,
    devices=None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    **model_kwargs: Any,
):
    """`num_samples` independent posterior draws, computed `batch_size` paths at a time.

    Args:
        key: a PRNG key; draw `i` uses `fold_in(key, i)`, so results do not depend on
            `batch_size`.
        model: a NumPyro model (or a `DiffusionPosterior`, whose settings are then used).
        num_samples: number of draws.
        batch_size: paths per compiled batch; memory is bounded by it (the last batch is
            padded, so one compilation serves the whole run).
        num_steps, sampler, guidance, guidance_scale, pigdm_jacobian, spacing: as in
            `DiffusionPosterior`.
        model_args: positional arguments of the model.
        num_chains: only shapes the InferenceData: draws are split into `(chain, draw)`.
        return_inference_data: also return `arviz.InferenceData` (posterior group).
        devices: `None` (default) spreads each batch over every local device; an int `n`
            for the first `n`, or a list of devices (see `nm.MLMC`).
        chunk_size: most paths per device call (default 64); as in `nm.MLMC`, draws are then
            bit-identical whatever the number of devices.
        **model_kwargs: keyword arguments of the model (e.g. `y=y_obs`).

    Returns `{site: array (num_samples, *event_shape)}` plus deterministic sites, or
    `(samples, idata)` when `return_inference_data`.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise TypeError(f"num_samples must be a positive int, got {num_samples!r}.")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    batch_size = check_num_steps(batch_size, "batch_size")
    num_chains = check_num_steps(num_chains, "num_chains")
    if not is_prng_key(key):
        raise TypeError(
            f"key must be a JAX PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)), got {key!r}."
        )
    if not isinstance(model_args, (tuple, list)):
        raise TypeError(
            f"model_args must be a tuple of the model's positional arguments, got "
            f"{type(model_args).__name__}; write model_args=(a,) or pass keywords (y=...)."
        )
    if num_samples % num_chains:
        raise ValueError(f"num_samples={num_samples} is not a multiple of num_chains={num_chains}.")
    if isinstance(model, DiffusionPosterior):
        kernel = model
    else:
        kernel = DiffusionPosterior(
            model,
            num_steps=num_steps,
            sampler=sampler,
            guidance=guidance,
            guidance_scale=guidance_scale,
            pigdm_jacobian=pigdm_jacobian,
            spacing=spacing,
        )
    diffusion = kernel.build(model_args, model_kwargs)
    site = kernel.structure.site
    keys = jax.vmap(lambda i: jr.fold_in(key, i))(jnp.arange(num_samples))
    # each batch in fixed-size chunks spread over the local devices (`_sharding.py`)
    runner = BatchRunner(devices, chunk_size)
    size = min(batch_size, num_samples)
    batches = []
    starts = range(0, num_samples, size)
    if progress_bar:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="posterior draws", unit="batch")
    for start in starts:
        batch = keys[start : start + size]
        n = batch.shape[0]
        if n < size:  # the last batch: padded, so it shares the others' compiled shape
            batch = jnp.concatenate([batch, jnp.repeat(batch[-1:], size - n, axis=0)])
        outputs = [diffusion.sample(k, kernel.num_steps) for k in runner.split(batch)]
        batches.append(runner.gather(outputs)[:n])
    draws = np.concatenate(batches)
    post = kernel.postprocess_fn(model_args, model_kwargs)
    samples = {k: np.asarray(v) for k, v in jax.vmap(post)({site: jnp.asarray(draws)}).items()}
    if not return_inference_data:
        return samples
    import arviz as az

    grouped = {
        k: v.reshape(num_chains, num_samples // num_chains, *v.shape[1:])
        for k, v in samples.items()
    }
    return samples, az.from_dict(posterior=grouped)
