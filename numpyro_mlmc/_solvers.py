"""Reverse-time samplers and the coupling of a fine and a coarse path.

Each sampler is a pure per-sample step `x_s = step(model, x, t, s, z)` from time `t` down to
`s < t` that takes its standard Gaussian noise `z` as an argument. Stochastic samplers also
describe how their step noise enters the state, as a pair `(c, std)`: with the denoiser output
held fixed, the step is affine in `x_t` with coefficient `c`, and it adds `std * z`. That is all
the coupling needs.

**Coupling** (Giles 2008; Haji-Ali et al. 2024, arXiv 2409.15511). The fine grid refines each
coarse step `[t, s]` into `M` fine steps with noises `z_1..z_M`. The coarse step is driven by

    eta_1 = std_1 z_1,      eta_{k+1} = c_{k+1} eta_k + std_{k+1} z_{k+1},
    z_coarse = eta_M / sqrt(Var eta_M),

the "reweighted increments". For the DDPM ancestral step, `Var eta_M` equals the coarse step's
own variance exactly (the composition of the fine Gaussian transitions given `x_0` is the coarse
one); for Euler-Maruyama (`c = 1`, `std = sqrt(h)`) it is the summed Brownian increment. Either
way `z_coarse ~ N(0, I)`, so the coarse path has exactly the law of an independent coarse run.
Deterministic samplers are coupled through their shared start.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ._score_models import AbstractScoreModel

__all__ = [
    "AbstractReverseSampler",
    "Ancestral",
    "EulerMaruyama",
    "DDIM",
    "Heun",
    "reverse_path",
    "coupled_reverse_paths",
    "get_sampler",
]


class AbstractReverseSampler(eqx.Module):
    """A reverse-time step. `stochastic` samplers take Gaussian noise `z` of the state's shape;
    deterministic ones ignore it."""

    @property
    @abc.abstractmethod
    def stochastic(self) -> bool:
        """Whether the step consumes its noise argument."""

    @property
    @abc.abstractmethod
    def nfe_per_step(self) -> int:
        """Network evaluations per step."""

    @abc.abstractmethod
    def step(self, model: AbstractScoreModel, x, t, s, z):
        """One step from time `t` to `s < t` for one sample `x`."""

    def noise_coefficients(self, model: AbstractScoreModel, t, s):
        """`(c, std)`: the step's coefficient on `x_t` with the network output held fixed, and
        the standard deviation of the noise it adds. Used by the coupling."""
        raise NotImplementedError(f"{type(self).__name__} is deterministic.")

    def num_function_evaluations(self, num_steps: int, final_sigma: float) -> int:
        """NFEs of one path of `num_steps` steps that ends where `sigma = final_sigma`."""
        return self.nfe_per_step * num_steps


class Ancestral(AbstractReverseSampler):
    """DDPM ancestral sampling in exponential-integrator form (Ho et al. 2020).

    From `t` to `s`, with `x_t | x_s ~ N(r x_s, v I)` the forward transition,

        x_s = alpha_s v / sigma_t^2 x0_hat + r sigma_s^2 / sigma_t^2 x_t
              + sqrt(v) sigma_s / sigma_t z,

    the mean and standard deviation of the Gaussian posterior `q(x_s | x_t, x_0 = x0_hat)`.
    Exact in law when `x0_hat` is exact and the prior is a point mass; first order in weak error.
    """

    stochastic = True  # type: ignore[assignment]
    nfe_per_step = 1  # type: ignore[assignment]

    def _coefficients(self, model, t, s):
        sched = model.schedule
        r, v = sched.transition(t, s)
        sigma_t2 = sched.sigma(t) ** 2
        sigma_s2 = sched.sigma(s) ** 2
        c_x0 = sched.alpha(s) * v / sigma_t2
        c_xt = r * sigma_s2 / sigma_t2
        std = jnp.sqrt(v * sigma_s2 / sigma_t2)
        return c_x0, c_xt, std

    def step(self, model, x, t, s, z):
        c_x0, c_xt, std = self._coefficients(model, t, s)
        return c_x0 * model.denoise(x, t) + c_xt * x + std * z

    def noise_coefficients(self, model, t, s):
        _, c_xt, std = self._coefficients(model, t, s)
        return c_xt, std


class EulerMaruyama(AbstractReverseSampler):
    """Euler-Maruyama on the reverse SDE `dx = [f x - g^2 score] dt + g dW` (Song et al. 2021):

        x_s = x_t - h (f(t) x_t - g(t)^2 score(x_t, t)) + g(t) sqrt(h) z,     h = t - s.

    Weak order one. Coupled through summed Brownian increments.
    """

    stochastic = True  # type: ignore[assignment]
    nfe_per_step = 1  # type: ignore[assignment]

    def step(self, model, x, t, s, z):
        sched = model.schedule
        h = t - s
        g2 = sched.diffusion_squared(t)
        drift = sched.drift(t) * x - g2 * model.score(x, t)
        return x - h * drift + jnp.sqrt(g2 * h) * z

    def noise_coefficients(self, model, t, s):
        # Coupling is on the Brownian increment dW = sqrt(h) z, not on g(t) dW: each path scales
        # the shared increment by its own g(t).
        return jnp.ones(()), jnp.sqrt(t - s)


class DDIM(AbstractReverseSampler):
    """DDIM (Song, Meng and Ermon, ICLR 2021) with stochasticity `eta` in [0, 1]:

        x_s = alpha_s x0_hat + sqrt(sigma_s^2 - tau^2) eps_hat + tau z,

    with `eps_hat = (x_t - alpha_t x0_hat) / sigma_t` and `tau = eta` times the ancestral
    standard deviation. `eta = 1` is the ancestral sampler; `eta = 0` is the deterministic
    first-order exponential integrator of the probability-flow ODE.
    """

    eta: float = 0.0

    nfe_per_step = 1  # type: ignore[assignment]

    def __check_init__(self):
        if not (0.0 <= self.eta <= 1.0):
            raise ValueError(f"DDIM eta must lie in [0, 1], got {self.eta}.")

    @property
    def stochastic(self):
        return self.eta > 0

    def _coefficients(self, model, t, s):
        sched = model.schedule
        _, v = sched.transition(t, s)
        sigma_t, sigma_s = sched.sigma(t), sched.sigma(s)
        tau = self.eta * jnp.sqrt(v) * sigma_s / sigma_t
        c_eps = jnp.sqrt(jnp.maximum(sigma_s**2 - tau**2, 0.0))
        return sched.alpha(s), c_eps, tau

    def step(self, model, x, t, s, z):
        sched = model.schedule
        x0 = model.denoise(x, t)
        eps = (x - sched.alpha(t) * x0) / sched.sigma(t)
        c_x0, c_eps, tau = self._coefficients(model, t, s)
        out = c_x0 * x0 + c_eps * eps
        if self.eta > 0:
            out = out + tau * z
        return out

    def noise_coefficients(self, model, t, s):
        _, c_eps, tau = self._coefficients(model, t, s)
        return c_eps / model.schedule.sigma(t), tau


class Heun(AbstractReverseSampler):
    """Heun's second-order method on the probability-flow ODE
    `dx/dt = f(t) x - g(t)^2 score(x, t) / 2` (Karras et al., NeurIPS 2022).

    Deterministic; two NFEs per step, except a final step onto `sigma = 0` (VP schedules ending
    at `t = 0`), which is an Euler step because the score is undefined there.
    """

    stochastic = False  # type: ignore[assignment]
    nfe_per_step = 2  # type: ignore[assignment]

    def step(self, model, x, t, s, z):
        sched = model.schedule

        def velocity(y, tau):
            return sched.drift(tau) * y - 0.5 * sched.diffusion_squared(tau) * model.score(y, tau)

        d1 = velocity(x, t)
        x_euler = x + (s - t) * d1

        def corrector(_):
            return x + 0.5 * (s - t) * (d1 + velocity(x_euler, s))

        # The predicate does not depend on the batch, so under vmap this stays a real branch.
        return jax.lax.cond(sched.sigma(s) > 0, corrector, lambda _: x_euler, None)

    def num_function_evaluations(self, num_steps, final_sigma):
        return 2 * num_steps - (1 if final_sigma <= 0 else 0)


_SAMPLERS = {
    "ancestral": Ancestral,
    "ddpm": Ancestral,
    "euler_maruyama": EulerMaruyama,
    "em": EulerMaruyama,
    "ddim": DDIM,
    "heun": Heun,
}


def get_sampler(sampler) -> AbstractReverseSampler:
    """A sampler object from a name (`"ancestral"`, `"euler_maruyama"`, `"ddim"`, `"heun"`) or
    an `AbstractReverseSampler` instance."""
    if isinstance(sampler, AbstractReverseSampler):
        return sampler
    if isinstance(sampler, str) and sampler.lower() in _SAMPLERS:
        return _SAMPLERS[sampler.lower()]()
    raise ValueError(
        f"unknown sampler {sampler!r}; pass one of {sorted(set(_SAMPLERS))} or an instance of "
        "Ancestral, EulerMaruyama, DDIM(eta) or Heun."
    )


def _step_noise(key, index, shape, dtype, stochastic=True):
    """`normal(fold_in(key, index))`; zeros for a deterministic sampler, whose step ignores its
    noise (skipping the draw saves a random-bit generation per step, which costs as much as a
    cheap analytic score)."""
    if not stochastic:
        return jnp.zeros(shape, dtype)
    return jr.normal(jr.fold_in(key, index), shape, dtype)


def reverse_path(
    sampler: AbstractReverseSampler,
    model: AbstractScoreModel,
    x_start,
    times,
    key,
    num_steps=None,
):
    """Run one reverse path (one sample, no batch axis) over the decreasing grid `times`.

    `times` has shape `(N + 1,)`; with `num_steps` given (possibly traced), only the first
    `num_steps` steps are taken, so one compiled function serves grids of any length up to `N`
    (the rest of `times` is padding). Step `k` uses noise `normal(fold_in(key, k))`, so the path
    equals the fine path of `coupled_reverse_paths` with the same key. Returns the end state."""

    def body(k, x):
        return path_step(sampler, model, x, times, k, key)

    n = times.shape[0] - 1 if num_steps is None else num_steps
    return jax.lax.fori_loop(0, n, body, x_start)


def path_step(sampler, model, x, times, k, key):
    """Step `k` of `reverse_path` (from `times[k]` to `times[k + 1]`, noise index `k`)."""
    z = _step_noise(key, k, x.shape, x.dtype, sampler.stochastic)
    return sampler.step(model, x, times[k], times[k + 1], z)


def coupled_block(sampler, model, x_fine, x_coarse, fine_times, j, refinement: int, key):
    """Coarse step `j` of `coupled_reverse_paths`: `refinement` fine steps and the coarse step
    driven by their reweighted increments. Returns `(x_fine, x_coarse)`."""
    m = int(refinement)
    taus = jax.lax.dynamic_slice_in_dim(fine_times, j * m, m + 1)
    x, eta, var = x_fine, jnp.zeros_like(x_fine), jnp.zeros((), x_fine.dtype)
    for i in range(m):
        z = _step_noise(key, j * m + i, x.shape, x.dtype, sampler.stochastic)
        t, s = taus[i], taus[i + 1]
        x = sampler.step(model, x, t, s, z)
        if sampler.stochastic:
            c, std = sampler.noise_coefficients(model, t, s)
            eta = c * eta + std * z
            var = c**2 * var + std**2
    # A step onto sigma = 0 adds no noise (var = 0); guard the 0 / 0.
    safe_var = jnp.where(var > 0, var, 1.0)
    z_coarse = jnp.where(var > 0, eta / jnp.sqrt(safe_var), 0.0)
    x_coarse = sampler.step(model, x_coarse, taus[0], taus[m], z_coarse)
    return x, x_coarse


def coupled_reverse_paths(
    sampler: AbstractReverseSampler,
    model: AbstractScoreModel,
    x_start,
    fine_times,
    refinement: int,
    key,
    num_steps=None,
):
    """A fine and a coarse path from the same start, sharing their noise (one sample).

    `fine_times` has shape `(M * N + 1,)` (or longer, with `num_steps = M * N` given, possibly
    traced); the coarse grid is every `M`-th fine time, `M = refinement`. The fine path is
    identical to `reverse_path(..., fine_times, key)`; the coarse path is driven by the
    reweighted increments of the fine noises (module docstring). Returns
    `(fine_end, coarse_end)`.
    """
    m = int(refinement)
    if num_steps is None:
        num_steps = fine_times.shape[0] - 1
        if num_steps % m:
            raise ValueError(
                f"the fine grid has {num_steps} steps, not a multiple of the refinement {m}."
            )

    def coarse_body(j, carry):
        return coupled_block(sampler, model, *carry, fine_times, j, m, key)

    return jax.lax.fori_loop(0, num_steps // m, coarse_body, (x_start, x_start))
