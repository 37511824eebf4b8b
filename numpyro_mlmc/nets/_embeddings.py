"""Time embeddings shared by the networks."""

from __future__ import annotations

import math

import jax.numpy as jnp


def sinusoidal_embedding(t, dim: int, *, scale: float = 1000.0):
    """Transformer-style embedding of a scalar time, shape `(dim,)`.

    With `s = scale * t` and frequencies `w_j = 10000^(-j / (dim/2 - 1))`, `j < dim/2`, returns
    `[sin(s w_0), ..., sin(s w_{dim/2-1}), cos(s w_0), ..., cos(s w_{dim/2-1})]` (Vaswani et al.
    2017; Ho et al. 2020). `scale = 1000` maps continuous `t in [0, 1]` to the range of the
    1000 discrete DDPM steps, so the frequencies resolve small time differences.
    """
    if dim % 2 or dim < 4:
        raise ValueError(f"time embedding dimension must be even and >= 4, got {dim}.")
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / (half - 1))
    angle = scale * jnp.asarray(t, dtype=freqs.dtype) * freqs
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)])
