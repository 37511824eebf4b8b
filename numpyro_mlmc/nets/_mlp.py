"""A residual MLP denoiser for vectors (and any small event shape, flattened inside)."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ._embeddings import sinusoidal_embedding

__all__ = ["MLPScoreNet"]


class _ResidualLayer(eqx.Module):
    norm: eqx.nn.LayerNorm
    linear1: eqx.nn.Linear
    time: eqx.nn.Linear
    linear2: eqx.nn.Linear

    def __init__(self, width, time_dim, *, key):
        k1, k2, k3 = jr.split(key, 3)
        self.norm = eqx.nn.LayerNorm(width)
        self.linear1 = eqx.nn.Linear(width, width, key=k1)
        self.time = eqx.nn.Linear(time_dim, width, key=k2)
        self.linear2 = eqx.nn.Linear(width, width, key=k3)

    def __call__(self, h, temb):
        u = self.linear1(jax.nn.silu(self.norm(h))) + self.time(temb)
        return h + self.linear2(jax.nn.silu(u))


class MLPScoreNet(eqx.Module):
    """Residual MLP `net(x, t) -> array of x's shape`, for vector data.

    `x` has shape `data_shape` (flattened to `D = prod(data_shape)` inside), `t` is a scalar.
    Layout: `h = Linear(x)`; `num_layers` residual blocks
    `h <- h + W2 silu(W1 silu(LayerNorm h) + T e(t))` with `e(t)` a sinusoidal time embedding
    passed through a 2-layer MLP; output `Linear(silu(LayerNorm h))`, initialised at zero so the
    untrained network returns 0 (a neutral start for every parametrisation).

    Args:
        data_shape: shape of one sample, e.g. `(2,)` or `(64,)`.
        width: hidden width (default 256).
        num_layers: number of residual blocks (default 3).
        time_embedding_dim: size of the sinusoidal embedding (default 64).
        time_scale: multiplier of `t` inside the embedding (default 1000, for `t in [0, 1]`).
        key: a `jax.random` key for the initial weights.
    """

    data_shape: tuple[int, ...] = eqx.field(static=True)
    width: int = eqx.field(static=True)
    num_layers: int = eqx.field(static=True)
    time_embedding_dim: int = eqx.field(static=True)
    time_scale: float = eqx.field(static=True)
    embed_in: eqx.nn.Linear
    time_mlp: eqx.nn.MLP
    layers: tuple[_ResidualLayer, ...]
    out_norm: eqx.nn.LayerNorm
    embed_out: eqx.nn.Linear

    def __init__(
        self,
        data_shape,
        *,
        width: int = 256,
        num_layers: int = 3,
        time_embedding_dim: int = 64,
        time_scale: float = 1000.0,
        key,
    ):
        self.data_shape = tuple(int(d) for d in data_shape)
        if not self.data_shape or any(d < 1 for d in self.data_shape):
            raise ValueError(f"data_shape must be a tuple of positive ints, got {data_shape!r}.")
        if width < 1 or num_layers < 0:
            raise ValueError(f"need width >= 1 and num_layers >= 0, got {width}, {num_layers}.")
        self.width = int(width)
        self.num_layers = int(num_layers)
        self.time_embedding_dim = int(time_embedding_dim)
        self.time_scale = float(time_scale)
        d = math.prod(self.data_shape)
        keys = jr.split(key, num_layers + 3)
        self.embed_in = eqx.nn.Linear(d, width, key=keys[0])
        self.time_mlp = eqx.nn.MLP(
            time_embedding_dim, width, width, depth=2, activation=jax.nn.silu, key=keys[1]
        )
        self.layers = tuple(_ResidualLayer(width, width, key=k) for k in keys[3:])
        self.out_norm = eqx.nn.LayerNorm(width)
        out = eqx.nn.Linear(width, d, key=keys[2])
        self.embed_out = eqx.tree_at(
            lambda m: (m.weight, m.bias),
            out,
            (jnp.zeros_like(out.weight), jnp.zeros_like(out.bias)),
        )

    def config(self) -> dict:
        """Constructor arguments (JSON-serialisable) that rebuild this architecture."""
        return {
            "data_shape": list(self.data_shape),
            "width": self.width,
            "num_layers": self.num_layers,
            "time_embedding_dim": self.time_embedding_dim,
            "time_scale": self.time_scale,
        }

    def __call__(self, x, t):
        if x.shape != self.data_shape:
            raise ValueError(
                f"MLPScoreNet built for samples of shape {self.data_shape} got x of shape "
                f"{x.shape}; it acts on one sample (vmap it over a batch)."
            )
        temb = self.time_mlp(
            sinusoidal_embedding(t, self.time_embedding_dim, scale=self.time_scale)
        )
        h = self.embed_in(x.reshape(-1))
        for layer in self.layers:
            h = layer(h, temb)
        return self.embed_out(jax.nn.silu(self.out_norm(h))).reshape(self.data_shape)
