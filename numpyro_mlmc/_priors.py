"""Diffusion priors as NumPyro distributions.

`numpyro.sample("x", prior)` puts an image latent with a diffusion prior into any NumPyro model.
Sampling runs unconditional reverse diffusion; a diffusion prior has no tractable density
(`log_prob` raises and says what to use instead). `GaussianMixturePrior` (in `_gmm.py`) is the
analytic member of the family: exact diffused score, exact density, exact samples.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr
from numpyro.distributions import Distribution, constraints

from ._diffusion import ReverseDiffusion, check_num_steps
from ._schedules import AbstractSchedule, VPSchedule
from ._score_models import PARAMETRIZATIONS, AbstractScoreModel, NetworkScoreModel
from ._solvers import get_sampler

__all__ = ["AbstractDiffusionPrior", "DiffusionPrior"]


def _check_event_shape(event_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in event_shape)
    except (TypeError, ValueError):
        raise TypeError(
            f"event_shape must be a tuple of ints such as (8, 8), got {event_shape!r}."
        ) from None
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"event_shape must be a non-empty tuple of positive ints, got {shape}.")
    return shape


class AbstractDiffusionPrior(Distribution):
    """A distribution over images defined by a diffusion model.

    Subclasses give `score_model()`, the per-sample `AbstractScoreModel` used by every sampler.
    Sampling settings (`num_steps`, `sampler`, `spacing`) are those of `.sample`; posterior
    kernels and MLMC choose their own.
    """

    support = constraints.real_vector
    arg_constraints: dict = {}
    pytree_data_fields = ()
    pytree_aux_fields = (
        "schedule",
        "num_steps",
        "sampler",
        "spacing",
        "batch_size",
    )

    def __init__(
        self,
        *,
        schedule: AbstractSchedule,
        event_shape,
        num_steps: int = 256,
        sampler="ancestral",
        spacing: str = "uniform",
        batch_size: int = 512,
    ):
        if not isinstance(schedule, AbstractSchedule):
            raise TypeError(
                f"schedule must be a schedule object such as nm.VPSchedule(), got {schedule!r}."
            )
        self.schedule = schedule
        self.num_steps = check_num_steps(num_steps)
        self.sampler = get_sampler(sampler)
        self.spacing = spacing
        self.batch_size = check_num_steps(batch_size, "batch_size")
        super().__init__(batch_shape=(), event_shape=_check_event_shape(event_shape))

    @abc.abstractmethod
    def score_model(self) -> AbstractScoreModel:
        """The per-sample score model `(x, t) -> score / x0_hat` of this prior."""

    def reverse_diffusion(self, sampler=None, spacing: str | None = None) -> ReverseDiffusion:
        """Unconditional reverse diffusion from `t_max` to 0 with this prior's score, started
        from `N(0, (alpha_T^2 + sigma_T^2) I)`, or exactly from the diffused prior when the
        score model can draw it (`sample_marginal`, Gaussian mixtures)."""
        model = self.score_model()
        return ReverseDiffusion(
            model=model,
            exact_start=hasattr(model, "sample_marginal"),
            sampler=get_sampler(self.sampler if sampler is None else sampler),
            x_start_mean=jnp.zeros(self.event_shape),
            x_start_std=self.schedule.prior_std(),
            event_shape=self.event_shape,
            t_start=self.schedule.t_max,
            t_end=0.0,
            spacing=self.spacing if spacing is None else spacing,
        )

    def sample_reverse(self, key, sample_shape=(), *, num_steps=None, sampler=None):
        """Draws by unconditional reverse diffusion, shape `sample_shape + event_shape`.

        Work is done in batches of `batch_size` paths (one compilation per shape); each path
        depends only on its own key, `fold_in(key, i)`.
        """
        num_steps = self.num_steps if num_steps is None else check_num_steps(num_steps)
        diffusion = self.reverse_diffusion(sampler)
        total = math.prod(sample_shape)
        keys = jax.vmap(lambda i: jr.fold_in(key, i))(jnp.arange(total))
        if isinstance(key, jax.core.Tracer):
            out = diffusion.sample(keys, num_steps)
        else:
            chunks = []
            b = self.batch_size
            for i in range(0, total, b):
                chunk = keys[i : i + b]
                n = chunk.shape[0]
                if n < b and total > b:  # pad to keep one compiled shape
                    chunk = jnp.concatenate([chunk, jnp.repeat(chunk[-1:], b - n, 0)])
                chunks.append(diffusion.sample(chunk, num_steps)[:n])
            out = jnp.concatenate(chunks) if chunks else jnp.zeros((0, *self.event_shape))
        return out.reshape(tuple(sample_shape) + self.event_shape)

    def sample(self, key, sample_shape=()):
        return self.sample_reverse(key, sample_shape)

    def log_prob(self, value):
        raise NotImplementedError(
            f"{type(self).__name__} has no tractable density: a diffusion model defines its "
            "law through a reverse SDE, and log p(x) would need a probability-flow ODE solve "
            "with a trace estimator. To condition on data, keep the prior site latent and "
            "sample the posterior with nm.DiffusionPosterior (an MCMCKernel) or estimate "
            "posterior expectations with nm.MLMC; for an exact density use "
            "nm.GaussianMixturePrior."
        )


class DiffusionPrior(AbstractDiffusionPrior):
    """A diffusion model as a NumPyro distribution over images.

    Args:
        denoiser: a JAX callable `denoiser(x, t) -> out` on **one** sample, `x` of shape
            `event_shape` and scalar time `t` in `[0, schedule.t_max]`; `out` has the shape of
            `x`. An `equinox.Module` is best: its weights are traced, not baked into the
            compiled code.
        schedule: the noise schedule the network was trained with (default `VPSchedule()`).
        event_shape: shape of one image, e.g. `(8, 8)` or `(16, 16, 1)`.
        parametrization: what the network returns: `"eps"`, `"x0"`, `"score"` or `"v"`.
        num_steps, sampler, spacing, batch_size: settings of `.sample`.

    Raises `ValueError` when the parametrization is unknown or the denoiser's output shape does
    not match `event_shape` (checked by `jax.eval_shape`, without running the network).
    """

    pytree_aux_fields = ("denoiser", "parametrization")

    def __init__(
        self,
        denoiser: Callable,
        *,
        schedule: AbstractSchedule | None = None,
        event_shape,
        parametrization: str = "eps",
        num_steps: int = 256,
        sampler="ancestral",
        spacing: str = "uniform",
        batch_size: int = 512,
    ):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable as denoiser(x, t), got {denoiser!r}.")
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"unknown parametrization {parametrization!r}; choose one of {PARAMETRIZATIONS} "
                "(what the network returns: noise, clean image, score or velocity)."
            )
        super().__init__(
            schedule=VPSchedule() if schedule is None else schedule,
            event_shape=event_shape,
            num_steps=num_steps,
            sampler=sampler,
            spacing=spacing,
            batch_size=batch_size,
        )
        self.denoiser = denoiser
        self.parametrization = parametrization
        self._check_denoiser()

    def _check_denoiser(self):
        x = jax.ShapeDtypeStruct(self.event_shape, jnp.float32)
        t = jax.ShapeDtypeStruct((), jnp.float32)
        try:
            out = jax.eval_shape(self.denoiser, x, t)
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise ValueError(
                f"calling denoiser(x, t) with x of shape {self.event_shape} and a scalar t "
                f"failed: {err}. The denoiser must act on one sample; check event_shape."
            ) from err
        shape = getattr(out, "shape", None)
        if shape != self.event_shape:
            raise ValueError(
                f"denoiser output shape {shape} does not match event_shape {self.event_shape}; "
                "the network must return an array of the sample's shape (set event_shape to "
                "the shape the network works on)."
            )

    def score_model(self) -> NetworkScoreModel:
        return NetworkScoreModel(
            denoiser=self.denoiser, schedule=self.schedule, parametrization=self.parametrization
        )

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        """A shipped prior by name (`nm.list_pretrained()`: `"digits"`, `"patches16"`, and the
        Gaussian-mixture references `"digits-gmm"`, `"patches16-gmm"`) or a checkpoint
        directory (`config.json` + `weights.safetensors`, e.g. from `numpyro-mlmc train`).

        Returns a `DiffusionPrior`, or a `GaussianMixturePrior` for mixture checkpoints.
        Keyword arguments (`num_steps`, `sampler`, `spacing`, `batch_size`) go to the
        constructor. Nothing is downloaded and nothing is unpickled; the weights' sha256 is
        checked. Raises `FileNotFoundError` for unknown names and `CheckpointError` (a
        `ValueError`) listing what is wrong with a corrupt or mismatched checkpoint.
        See `docs/model_cards/`.
        """
        from ._pretrained import load_pretrained

        return load_pretrained(name_or_path, **kwargs)

    @classmethod
    def from_diffusers(
        cls, path, *, scheduler_config=None, event_shape=None, dtype=jnp.float32, **kwargs
    ) -> DiffusionPrior:
        """A prior from a local Hugging Face diffusers `UNet2DModel` checkpoint directory.

        Reads `config.json`, `diffusion_pytorch_model.safetensors` and the DDPM/DDIM
        `scheduler_config.json` (in `scheduler/` or beside the weights; a pipeline directory
        with `unet/` and `scheduler/` works too) with no PyTorch. The event shape is
        `(C, H, W)` from the config's `sample_size`, the schedule a `DiscreteVPSchedule` (timestep
        `k` at `t = (k + 1) / N`), the parametrization from `prediction_type` (`epsilon` ->
        `"eps"`, `sample` -> `"x0"`, `v_prediction` -> `"v"`). Samples live on the model's data
        scale, usually `[-1, 1]`.

        Args:
            path: the checkpoint directory.
            scheduler_config: override: a dict, a `scheduler_config.json` file or its directory.
            event_shape: override `(C, H, W)` (H, W multiples of `2**(levels - 1)`).
            dtype: weight dtype in JAX (default float32).
            **kwargs: further `DiffusionPrior` arguments (`num_steps`, `sampler`, ...).

        Raises `FileNotFoundError` for missing files and `ValueError` naming unsupported block
        types or options and weights that do not match the config. See
        `docs/how-to/diffusers.md`.
        """
        from ._diffusers import prior_from_diffusers

        return prior_from_diffusers(
            cls,
            path,
            scheduler_config=scheduler_config,
            event_shape=event_shape,
            dtype=dtype,
            **kwargs,
        )

    def __repr__(self):
        name = getattr(self, "name", None) or type(self.denoiser).__name__
        return (
            f"DiffusionPrior({name}, event_shape={self.event_shape}, "
            f"parametrization={self.parametrization!r}, schedule={self.schedule})"
        )
