"""A level sampler with a known expectation: geometric Brownian motion.

Used to test the MLMC engine apart from diffusion (DESIGN.md section 3). Each of `dimension`
independent components follows

    dS = r S dt + sigma S dW,      S(0) = s0,

so `E S(T) = s0 exp(r T)` and `E S(T)^2 = s0^2 exp((2 r + sigma^2) T)`. Level `l` takes
`M^l` steps of size `h = T / M^l`; a coupled draw runs the coarse path on the sums of the fine
Brownian increments (Giles 2008). Euler-Maruyama has weak order 1 and strong order 1/2 (MLMC
rates alpha = 1, beta = 1, gamma = 1); Milstein has strong order 1 (beta = 2 > gamma).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

__all__ = ["GeometricBrownianMotion"]

_SCHEMES = ("euler", "milstein")


class GeometricBrownianMotion:
    """`LevelSampler` for `S(T)` of a `dimension`-vector of independent GBMs.

    Args:
        rate: drift `r` (scalar or `(dimension,)`).
        volatility: `sigma` (scalar or `(dimension,)`).
        initial: `s0` (scalar or `(dimension,)`).
        maturity: `T > 0`.
        dimension: number of components.
        scheme: `"euler"` or `"milstein"`.
        refinement: `M >= 2`.
        site: name of the returned site.

    Cost unit: time steps (a coupled draw costs `M^l + M^(l-1)`).
    """

    def __init__(
        self,
        *,
        rate=0.05,
        volatility=0.2,
        initial=1.0,
        maturity: float = 1.0,
        dimension: int = 1,
        scheme: str = "milstein",
        refinement: int = 2,
        site: str = "x",
    ):
        if scheme not in _SCHEMES:
            raise ValueError(f"scheme must be one of {_SCHEMES}, got {scheme!r}.")
        if not isinstance(refinement, int) or refinement < 2:
            raise ValueError(f"refinement must be an int >= 2, got {refinement!r}.")
        if not (maturity > 0):
            raise ValueError(f"maturity must be positive, got {maturity}.")
        shape = (int(dimension),)
        self.rate = np.broadcast_to(np.asarray(rate, np.float64), shape).copy()
        self.volatility = np.broadcast_to(np.asarray(volatility, np.float64), shape).copy()
        self.initial = np.broadcast_to(np.asarray(initial, np.float64), shape).copy()
        self.maturity = float(maturity)
        self.dimension = int(dimension)
        self.scheme = scheme
        self.refinement = refinement
        self.site = site
        self.event_shapes = {site: shape}

    @property
    def exact_mean(self):
        """`E S(T)`, shape `(dimension,)`."""
        return self.initial * np.exp(self.rate * self.maturity)

    @property
    def exact_second_moment(self):
        """`E S(T)^2`, shape `(dimension,)`."""
        return self.initial**2 * np.exp((2 * self.rate + self.volatility**2) * self.maturity)

    @property
    def exact_variance(self):
        return self.exact_second_moment - self.exact_mean**2

    def num_steps(self, level: int) -> int:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 0:
            raise ValueError(f"level must be an int >= 0, got {level!r}.")
        return self.refinement ** int(level)

    def cost(self, level: int, coupled: bool) -> int:
        n = self.num_steps(level)
        return n + (n // self.refinement if coupled else 0)

    def sample(self, keys, level: int, coupled: bool):
        n = self.num_steps(level)
        if coupled and level < 1:
            raise ValueError("a coupled draw needs level >= 1 (level 0 has no coarser level).")
        params = tuple(
            jnp.asarray(a, jnp.zeros(()).dtype) for a in (self.rate, self.volatility, self.initial)
        )
        fine, coarse = _simulate(
            keys, params, self.maturity, n, self.refinement if coupled else 0, self.scheme
        )
        return {self.site: fine}, ({self.site: coarse} if coupled else None)

    def __repr__(self):
        return (
            f"GeometricBrownianMotion(dimension={self.dimension}, scheme={self.scheme!r}, "
            f"refinement={self.refinement})"
        )


def _path(params, maturity, increments, scheme):
    rate, vol, s0 = params
    h = maturity / increments.shape[0]

    def step(s, dw):
        out = s + rate * s * h + vol * s * dw
        if scheme == "milstein":
            out = out + 0.5 * vol**2 * s * (dw * dw - h)
        return out, None

    s, _ = jax.lax.scan(step, s0, increments)
    return s


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _simulate(keys, params, maturity, num_steps, refinement, scheme):
    dim = params[0].shape[0]
    h = maturity / num_steps

    def one(key):
        dw = math.sqrt(h) * jr.normal(key, (num_steps, dim), params[0].dtype)
        fine = _path(params, maturity, dw, scheme)
        if refinement:
            dw_c = dw.reshape(num_steps // refinement, refinement, dim).sum(axis=1)
            coarse = _path(params, maturity, dw_c, scheme)
        else:
            coarse = jnp.zeros_like(fine)
        return fine, coarse

    return jax.vmap(one)(keys)
