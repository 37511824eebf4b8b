"""A small DDPM-style UNet in Equinox, acting on one image."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ._embeddings import sinusoidal_embedding

__all__ = ["UNet"]


def _groups(channels: int) -> int:
    # GroupNorm with up to 8 groups that divide the channel count (Wu and He 2018).
    return math.gcd(channels, 8)


class _ResBlock(eqx.Module):
    norm1: eqx.nn.GroupNorm
    conv1: eqx.nn.Conv2d
    time: eqx.nn.Linear
    norm2: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    skip: eqx.nn.Conv2d | None

    def __init__(self, c_in, c_out, time_dim, *, key):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.norm1 = eqx.nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = eqx.nn.Conv2d(c_in, c_out, 3, padding=1, key=k1)
        self.time = eqx.nn.Linear(time_dim, c_out, key=k2)
        self.norm2 = eqx.nn.GroupNorm(_groups(c_out), c_out)
        conv2 = eqx.nn.Conv2d(c_out, c_out, 3, padding=1, key=k3)
        # Zero-initialised last convolution: each block starts as the identity (Goyal et al.).
        self.conv2 = eqx.tree_at(lambda m: m.weight, conv2, jnp.zeros_like(conv2.weight))
        self.skip = None if c_in == c_out else eqx.nn.Conv2d(c_in, c_out, 1, key=k4)

    def __call__(self, x, temb):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.time(temb)[:, None, None]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class _Attention(eqx.Module):
    norm: eqx.nn.GroupNorm
    attention: eqx.nn.MultiheadAttention

    def __init__(self, channels, num_heads, *, key):
        if channels % num_heads:
            raise ValueError(
                f"attention needs the channel count ({channels}) to be divisible by "
                f"num_heads ({num_heads}); change channels or num_heads."
            )
        self.norm = eqx.nn.GroupNorm(_groups(channels), channels)
        self.attention = eqx.nn.MultiheadAttention(num_heads, channels, key=key)

    def __call__(self, x):
        c, h, w = x.shape
        tokens = self.norm(x).reshape(c, h * w).T  # (h w, c)
        out = self.attention(tokens, tokens, tokens)
        return x + out.T.reshape(c, h, w)


class _Downsample(eqx.Module):
    # 2x2 average pooling then a 3x3 convolution at the lower resolution. (A stride-2
    # convolution does the same job, but its gradient is several times slower on CPU.)
    conv: eqx.nn.Conv2d

    def __init__(self, channels, *, key):
        self.conv = eqx.nn.Conv2d(channels, channels, 3, padding=1, key=key)

    def __call__(self, x):
        c, h, w = x.shape
        return self.conv(x.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4)))


class _Upsample(eqx.Module):
    conv: eqx.nn.Conv2d

    def __init__(self, channels, *, key):
        self.conv = eqx.nn.Conv2d(channels, channels, 3, padding=1, key=key)

    def __call__(self, x):
        # Nearest-neighbour upsampling by repetition (a broadcast, cheap to differentiate).
        c, h, w = x.shape
        up = jnp.broadcast_to(x[:, :, None, :, None], (c, h, 2, w, 2)).reshape(c, 2 * h, 2 * w)
        return self.conv(up)


class UNet(eqx.Module):
    """A DDPM-style UNet `net(x, t) -> array of x's shape` on **one** image.

    `x` has shape `(H, W)` (grayscale) or `(H, W, C)` (channels last, `C` = 1 or 3, or any),
    `t` is a scalar time. Layout (Ho et al. 2020, "Denoising diffusion probabilistic models";
    Nichol and Dhariwal 2021): a 3x3 input convolution to `channels`; per resolution level
    `i` with multiplier `m_i`, `num_res_blocks` residual blocks of `channels * m_i` channels
    (GroupNorm, SiLU, 3x3 conv, an additive projection of the time embedding, then again),
    self-attention after each block whose resolution is in `attention_resolutions`, and 2x2
    average pooling with a 3x3 convolution between levels; a middle block (residual,
    attention, residual); the mirrored up path with skip connections (concatenation) and
    nearest upsampling; GroupNorm, SiLU and a zero-initialised 3x3 output convolution, so the
    untrained network returns 0.

    The time embedding is sinusoidal in `time_scale * t` followed by a 2-layer MLP of width
    `4 * channels`.

    Args:
        data_shape: `(H, W)` or `(H, W, C)`; `H` and `W` divisible by
            `2 ** (len(channel_multipliers) - 1)`.
        channels: base channel count (default 32).
        channel_multipliers: channel multiplier per resolution level (default `(1, 2)`).
        num_res_blocks: residual blocks per level on the down path (default 2).
        attention_resolutions: side lengths at which to apply self-attention (default `(4,)`;
            the middle block always has attention when `mid_attention` is true).
        num_heads: attention heads (default 4).
        mid_attention: self-attention in the middle block (default True).
        time_scale: multiplier of `t` inside the embedding (default 1000, for `t in [0, 1]`).
        key: a `jax.random` key for the initial weights.
    """

    data_shape: tuple[int, ...] = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    channel_multipliers: tuple[int, ...] = eqx.field(static=True)
    num_res_blocks: int = eqx.field(static=True)
    attention_resolutions: tuple[int, ...] = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    mid_attention: bool = eqx.field(static=True)
    time_scale: float = eqx.field(static=True)
    time_mlp: eqx.nn.MLP
    conv_in: eqx.nn.Conv2d
    down: tuple
    mid: tuple
    up: tuple
    norm_out: eqx.nn.GroupNorm
    conv_out: eqx.nn.Conv2d

    def __init__(
        self,
        data_shape,
        *,
        channels: int = 32,
        channel_multipliers=(1, 2),
        num_res_blocks: int = 2,
        attention_resolutions=(4,),
        num_heads: int = 4,
        mid_attention: bool = True,
        time_scale: float = 1000.0,
        key,
    ):
        data_shape = tuple(int(d) for d in data_shape)
        if len(data_shape) not in (2, 3) or any(d < 1 for d in data_shape):
            raise ValueError(
                f"UNet data_shape must be (H, W) or (H, W, C) with positive sizes, got "
                f"{data_shape}."
            )
        multipliers = tuple(int(m) for m in channel_multipliers)
        if not multipliers or any(m < 1 for m in multipliers):
            raise ValueError(f"channel_multipliers must be positive ints, got {multipliers}.")
        factor = 2 ** (len(multipliers) - 1)
        height, width = data_shape[:2]
        if height % factor or width % factor:
            raise ValueError(
                f"image size {height}x{width} is not divisible by {factor} = 2^(number of "
                f"levels - 1) for channel_multipliers={multipliers}; use fewer levels."
            )
        if channels < 1 or num_res_blocks < 1:
            raise ValueError("channels and num_res_blocks must be positive.")
        self.data_shape = data_shape
        self.channels = int(channels)
        self.channel_multipliers = multipliers
        self.num_res_blocks = int(num_res_blocks)
        self.attention_resolutions = tuple(int(r) for r in attention_resolutions)
        self.num_heads = int(num_heads)
        self.mid_attention = bool(mid_attention)
        self.time_scale = float(time_scale)
        image_channels = 1 if len(data_shape) == 2 else data_shape[2]
        time_dim = 4 * channels
        keys = iter(jr.split(key, 8 + 4 * len(multipliers) * (num_res_blocks + 2)))

        self.time_mlp = eqx.nn.MLP(
            channels, time_dim, time_dim, depth=2, activation=jax.nn.silu, key=next(keys)
        )
        self.conv_in = eqx.nn.Conv2d(image_channels, channels, 3, padding=1, key=next(keys))

        down, skip_channels = [], [channels]
        c, resolution = channels, height
        for level, mult in enumerate(multipliers):
            for _ in range(num_res_blocks):
                block = _ResBlock(c, channels * mult, time_dim, key=next(keys))
                c = channels * mult
                attn = (
                    _Attention(c, num_heads, key=next(keys))
                    if resolution in self.attention_resolutions
                    else None
                )
                down.append((block, attn))
                skip_channels.append(c)
            if level < len(multipliers) - 1:
                down.append(_Downsample(c, key=next(keys)))
                skip_channels.append(c)
                resolution //= 2
        self.down = tuple(down)
        self.mid = (
            _ResBlock(c, c, time_dim, key=next(keys)),
            _Attention(c, num_heads, key=next(keys)) if mid_attention else None,
            _ResBlock(c, c, time_dim, key=next(keys)),
        )
        up = []
        for level in reversed(range(len(multipliers))):
            mult = multipliers[level]
            for _ in range(num_res_blocks + 1):
                block = _ResBlock(
                    c + skip_channels.pop(), channels * mult, time_dim, key=next(keys)
                )
                c = channels * mult
                attn = (
                    _Attention(c, num_heads, key=next(keys))
                    if resolution in self.attention_resolutions
                    else None
                )
                up.append((block, attn))
            if level > 0:
                up.append(_Upsample(c, key=next(keys)))
                resolution *= 2
        self.up = tuple(up)
        self.norm_out = eqx.nn.GroupNorm(_groups(c), c)
        conv_out = eqx.nn.Conv2d(c, image_channels, 3, padding=1, key=next(keys))
        self.conv_out = eqx.tree_at(
            lambda m: (m.weight, m.bias),
            conv_out,
            (jnp.zeros_like(conv_out.weight), jnp.zeros_like(conv_out.bias)),
        )

    def config(self) -> dict:
        """Constructor arguments (JSON-serialisable) that rebuild this architecture."""
        return {
            "data_shape": list(self.data_shape),
            "channels": self.channels,
            "channel_multipliers": list(self.channel_multipliers),
            "num_res_blocks": self.num_res_blocks,
            "attention_resolutions": list(self.attention_resolutions),
            "num_heads": self.num_heads,
            "mid_attention": self.mid_attention,
            "time_scale": self.time_scale,
        }

    def __call__(self, x, t):
        if x.shape != self.data_shape:
            raise ValueError(
                f"UNet built for images of shape {self.data_shape} got x of shape {x.shape}; "
                "it acts on one image (vmap it over a batch)."
            )
        h = x[None] if x.ndim == 2 else jnp.transpose(x, (2, 0, 1))  # (C, H, W)
        temb = self.time_mlp(sinusoidal_embedding(t, self.channels, scale=self.time_scale))
        h = self.conv_in(h)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, _Downsample):
                h = layer(h)
            else:
                block, attn = layer
                h = block(h, temb)
                if attn is not None:
                    h = attn(h)
            skips.append(h)
        block1, attn, block2 = self.mid
        h = block1(h, temb)
        if attn is not None:
            h = attn(h)
        h = block2(h, temb)
        for layer in self.up:
            if isinstance(layer, _Upsample):
                h = layer(h)
            else:
                block, attn = layer
                h = block(jnp.concatenate([h, skips.pop()], axis=0), temb)
                if attn is not None:
                    h = attn(h)
        out = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return out[0] if x.ndim == 2 else jnp.transpose(out, (1, 2, 0))
