"""Batched, jitted reverse diffusion for one problem: a score model, a sampler, a start.

`ReverseDiffusion` bundles what a batch of reverse paths needs. Its arrays (network weights,
observations) are traced, its configuration is static, so one compilation serves every batch of
one shape and every observation of one shape. Keys are per path: path `i` of a batch is a pure
function of `keys[i]`, so results do not depend on how paths are grouped into batches.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ._schedules import time_grid
from ._score_models import AbstractScoreModel
from ._solvers import (
    AbstractReverseSampler,
    coupled_block,
    coupled_reverse_paths,
    path_step,
    reverse_path,
)

__all__ = ["ReverseDiffusion", "DiffusionLevelSampler", "check_num_steps", "check_refinement"]

# Reverse grids up to this many steps share one compiled function (per batch shape).
_GRID_BUCKET = 4096
LOOPS = ("auto", "device", "host")


def resolve_loop(loop: str, model=None) -> str:
    """`"auto"` -> `"host"` for a score model with a neural network on the CPU backend,
    `"device"` otherwise (see `ReverseDiffusion`)."""
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}.")
    if loop == "auto":
        if jax.default_backend() != "cpu" or model is None:
            return "device"
        return "host" if _has_network(model) else "device"
    return loop


def _has_network(model) -> bool:
    from ._score_models import NetworkScoreModel

    def is_net(node):
        return isinstance(node, NetworkScoreModel)

    return any(is_net(n) for n in jax.tree_util.tree_leaves(model, is_leaf=is_net))


def check_num_steps(num_steps, name: str = "num_steps") -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {num_steps!r}.")
    if num_steps < 1:
        raise ValueError(f"{name} must be >= 1, got {num_steps}; use at least one step.")
    return int(num_steps)


def check_refinement(refinement) -> int:
    if isinstance(refinement, bool) or not isinstance(refinement, (int, np.integer)):
        raise TypeError(f"refinement must be an int >= 2, got {refinement!r}.")
    if refinement < 2:
        raise ValueError(
            f"refinement must be >= 2 (each level refines every step of the previous one into "
            f"`refinement` steps), got {refinement}."
        )
    return int(refinement)


class ReverseDiffusion(eqx.Module):
    """Reverse diffusion from `t_start` down to `t_end` for one problem.

    The start state is `x_start_mean + x_start_std * z` with `z ~ N(0, I)`: for unconditional
    sampling `(0, sqrt(alpha_T^2 + sigma_T^2))`; for the start-time denoising sampler
    `(alpha(t*) y, 0)`. With `exact_start=True` it is instead an exact draw of the model's own
    marginal at `t_start` (`model.sample_marginal(key, t_start)`, e.g. a Gaussian mixture's):
    the reference law `N(0, I)` misses the mean `alpha_T E[x_0]` (`alpha_T ~ 0.0066` for the
    default VP schedule), a bias of order `alpha_T sqrt(lambda) |mu|` that no number of steps
    removes (measured: 7e-4 RMS in the second moment of a digits-GMM inpainting posterior).

    Attributes:
        model: per-sample score model (prior, or a guided posterior score).
        sampler: the reverse step.
        event_shape: shape of one sample.
        t_start, t_end: the time interval (`t_start > t_end`).
        x_start_mean: array broadcastable to `event_shape`.
        x_start_std: scalar.
        exact_start: start from `model.sample_marginal(key, t_start)` (ignores the two above).
        spacing, exponent: time spacing of the grids (see `time_grid`).
        loop: where the loop over steps runs. `"device"`: one compiled program per batch
            (a `lax.fori_loop` over the steps); `"host"`: a Python loop calling one compiled
            step (or, for coupled paths, one coarse step and its fine steps) per iteration;
            `"auto"` (default): `"host"` for a network score model on CPU, else `"device"`.
            XLA's CPU backend runs a network inside a while loop several times slower than
            the same network called at top level (the shipped digits UNet, 64 coupled paths
            of 32 steps: 92 NFE/s in a `fori_loop`, 824 NFE/s stepped from Python), while for
            cheap analytic scores the per-step dispatch costs more than it saves (a digits GMM:
            63k NFE/s on device, 46k stepped from Python). Both loops take the same steps with
            the same noise, so they agree to float32 rounding.
    """

    model: AbstractScoreModel
    sampler: AbstractReverseSampler
    x_start_mean: jax.Array
    x_start_std: float
    event_shape: tuple[int, ...] = eqx.field(static=True)
    t_start: float = eqx.field(static=True)
    t_end: float = eqx.field(static=True, default=0.0)
    spacing: str = eqx.field(static=True, default="uniform")
    exponent: float = eqx.field(static=True, default=2.0)
    loop: str = eqx.field(static=True, default="auto")
    exact_start: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        resolve_loop(self.loop)
        if self.exact_start and not hasattr(self.model, "sample_marginal"):
            raise TypeError(
                f"exact_start=True needs a score model with sample_marginal(key, t) (a "
                f"GaussianMixtureScoreModel); {type(self.model).__name__} has none."
            )
        fixed_start = (
            not self.exact_start
            and isinstance(self.x_start_std, (int, float, np.floating, np.integer))
            and float(self.x_start_std) == 0.0
        )
        if fixed_start and not self.sampler.stochastic:
            raise ValueError(
                f"every path starts from the same state (x_start_std=0, as guidance='denoise' "
                f"starts at alpha(t*) y) and {self.sampler!r} is deterministic, so every draw "
                f"would be the same image and the posterior variance zero. Use a stochastic "
                f"sampler: Ancestral(), EulerMaruyama() or DDIM(eta > 0)."
            )

    def times(self, num_steps: int) -> np.ndarray:
        """The decreasing grid of `num_steps` steps (float64 numpy, shape `(num_steps + 1,)`)."""
        return time_grid(
            check_num_steps(num_steps),
            t_start=self.t_start,
            t_end=self.t_end,
            spacing=self.spacing,
            exponent=self.exponent,
        )

    def nfe(self, num_steps: int) -> int:
        """Network evaluations of one path with `num_steps` steps."""
        with jax.ensure_compile_time_eval():
            final_sigma = float(self.model.schedule.sigma(self.t_end))
        return self.sampler.num_function_evaluations(check_num_steps(num_steps), final_sigma)

    def start(self, key, dtype=jnp.float32):
        if self.exact_start:
            return self.model.sample_marginal(key, self.t_start, dtype)
        z = jr.normal(key, self.event_shape, dtype)
        return jnp.asarray(self.x_start_mean, dtype) + self.x_start_std * z

    def _padded_times(self, num_steps: int):
        return _padded_grid(
            check_num_steps(num_steps),
            float(self.t_start),
            float(self.t_end),
            self.spacing,
            float(self.exponent),
        )

    def sample(self, keys, num_steps: int):
        """End states of `keys.shape[0]` independent paths; shape `(B, *event_shape)`."""
        times, n = self._padded_times(check_num_steps(num_steps))
        if resolve_loop(self.loop, self.model) == "device":
            return _sample_batch(self, times, n, keys)
        x, path_keys = _start_batch(self, keys)
        for k in range(check_num_steps(num_steps)):
            x = _step_batch(self, x, times, jnp.asarray(k, jnp.int32), path_keys)
        return x

    def sample_coupled(self, keys, num_steps: int, refinement: int):
        """Coupled (fine, coarse) end states, `num_steps` fine steps and `num_steps //
        refinement` coarse steps; each of shape `(B, *event_shape)`. The fine states equal
        `sample(keys, num_steps)`."""
        m = check_refinement(refinement)
        if check_num_steps(num_steps) % m:
            raise ValueError(f"num_steps={num_steps} is not a multiple of refinement={m}.")
        times, n = self._padded_times(num_steps)
        if resolve_loop(self.loop, self.model) == "device":
            return _sample_coupled_batch(self, times, n, m, keys)
        x, path_keys = _start_batch(self, keys)
        fine, coarse = x, x
        for j in range(num_steps // m):
            fine, coarse = _coupled_block_batch(
                self, fine, coarse, times, jnp.asarray(j, jnp.int32), m, path_keys
            )
        return fine, coarse


@functools.lru_cache(maxsize=256)
def _padded_grid(num_steps, t_start, t_end, spacing, exponent):
    """The `num_steps` grid padded to a bucket of `_GRID_BUCKET` steps (or the next power of
    two above it), with the step count as a traced scalar, so one compilation serves every
    level; cached, as every batch of a level asks for the same grid."""
    times = time_grid(num_steps, t_start=t_start, t_end=t_end, spacing=spacing, exponent=exponent)
    capacity = max(_GRID_BUCKET, 1 << (num_steps - 1).bit_length())
    padded = np.full(capacity + 1, times[-1])
    padded[: num_steps + 1] = times
    return jnp.asarray(padded, dtype=jnp.float32), jnp.asarray(num_steps, jnp.int32)


def _split_path_key(key):
    start_key, path_key = jr.split(key)
    return start_key, path_key


class _ArraySlot:
    """Marks where an array leaf goes in `_async_jit`'s static leaves."""


_ARRAY = _ArraySlot()


def _async_jit(fn):
    """`jax.jit` of `fn(*args)` with every non-array leaf of `args` static (as
    `eqx.filter_jit`), but returning as soon as the call is dispatched: `eqx.filter_jit` waits
    for each call to finish (to report `eqx.error_if` errors, which these functions do not
    use), which would keep the host idle while a batch runs and the device idle while the host
    merges the previous one (`_mlmc._Engine.draw` overlaps the two)."""

    @functools.partial(jax.jit, static_argnums=0)
    def compiled(static, dynamic):
        treedef, static_leaves = static
        arrays = iter(dynamic)
        leaves = [next(arrays) if leaf is _ARRAY else leaf for leaf in static_leaves]
        return fn(*jax.tree_util.tree_unflatten(treedef, leaves))

    @functools.wraps(fn)
    def call(*args):
        # the tree structure and the non-array leaves are the (hashable) static part
        leaves, treedef = jax.tree_util.tree_flatten(args)
        dynamic = [leaf for leaf in leaves if eqx.is_array(leaf)]
        static_leaves = tuple(_ARRAY if eqx.is_array(leaf) else leaf for leaf in leaves)
        return compiled((treedef, static_leaves), dynamic)

    return call


@_async_jit
def _start_batch(diffusion: ReverseDiffusion, keys):
    def one(key):
        start_key, path_key = _split_path_key(key)
        return diffusion.start(start_key), path_key

    return jax.vmap(one)(keys)


@_async_jit
def _step_batch(diffusion: ReverseDiffusion, x, times, k, path_keys):
    def one(x, key):
        return path_step(diffusion.sampler, diffusion.model, x, times, k, key)

    return jax.vmap(one)(x, path_keys)


@_async_jit
def _coupled_block_batch(diffusion: ReverseDiffusion, fine, coarse, times, j, m, path_keys):
    def one(x_fine, x_coarse, key):
        return coupled_block(diffusion.sampler, diffusion.model, x_fine, x_coarse, times, j, m, key)

    return jax.vmap(one)(fine, coarse, path_keys)


@_async_jit
def _sample_batch(diffusion: ReverseDiffusion, times, num_steps, keys):
    def one(key):
        start_key, path_key = _split_path_key(key)
        x0 = diffusion.start(start_key)
        return reverse_path(diffusion.sampler, diffusion.model, x0, times, path_key, num_steps)

    return jax.vmap(one)(keys)


@_async_jit
def _sample_coupled_batch(diffusion: ReverseDiffusion, times, num_steps, refinement, keys):
    def one(key):
        start_key, path_key = _split_path_key(key)
        x0 = diffusion.start(start_key)
        return coupled_reverse_paths(
            diffusion.sampler, diffusion.model, x0, times, refinement, path_key, num_steps
        )

    return jax.vmap(one)(keys)


class DiffusionLevelSampler:
    """A `LevelSampler` (see `_levels.py`) over a `ReverseDiffusion`: level `l` runs
    `refinement**l` reverse steps; a coupled draw is a (fine, coarse) pair sharing its noise.

    Args:
        diffusion: the problem's reverse diffusion (prior or guided posterior score).
        refinement: `M >= 2`.
        site: the name under which draws are returned (the model's latent site).
    """

    def __init__(self, diffusion: ReverseDiffusion, *, refinement: int = 2, site: str = "x"):
        self.diffusion = diffusion
        self.refinement = check_refinement(refinement)
        self.site = site
        self.event_shapes = {site: diffusion.event_shape}
        self._costs = {}  # (level, coupled) -> NFEs per draw

    def num_steps(self, level: int) -> int:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 0:
            raise ValueError(f"level must be an int >= 0, got {level!r}.")
        return self.refinement ** int(level)

    def cost(self, level: int, coupled: bool) -> int:
        key = (int(level), bool(coupled))
        if key not in self._costs:
            fine = self.diffusion.nfe(self.num_steps(level))
            coarse = self.diffusion.nfe(self.num_steps(level - 1)) if coupled else 0
            self._costs[key] = fine + coarse
        return self._costs[key]

    def sample(self, keys, level: int, coupled: bool):
        n = self.num_steps(level)
        if coupled:
            if level < 1:
                raise ValueError("a coupled draw needs level >= 1 (level 0 has no coarser level).")
            fine, coarse = self.diffusion.sample_coupled(keys, n, self.refinement)
            return {self.site: fine}, {self.site: coarse}
        return {self.site: self.diffusion.sample(keys, n)}, None
