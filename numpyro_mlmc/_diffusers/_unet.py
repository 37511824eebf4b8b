"""An Equinox implementation of diffusers' `UNet2DModel`, built from its state dict.

The layers mirror diffusers (`models/unets/unet_2d.py`, `unet_2d_blocks.py`, `resnet.py`,
`embeddings.py`, `attention_processor.py`) in inference mode (dropout off), so that a
checkpoint's `diffusion_pytorch_model.safetensors` loads by name, with PyTorch's layouts kept:
convolution kernels `(out, in, kh, kw)`, linear weights `(out, in)`. Every module acts on
**one** sample, `x` of shape `(C, H, W)`; `vmap` for batches.

Architecture: Ho et al., "Denoising diffusion probabilistic models" (NeurIPS 2020), the UNet of
PixelCNN++ with group norm, sinusoidal time embedding and self-attention at chosen resolutions.
"""

from __future__ import annotations

import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DiffusersUNet2D", "check_unet_config"]

_DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
_MID_BLOCKS = ("UNetMidBlock2D", None)
_ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")

# UNet2DModel's constructor defaults, used for keys a config leaves out.
_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1.0,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}


def _strip(block_type):
    # diffusers accepts a "UNetRes" prefix on block names and strips it.
    if isinstance(block_type, str) and block_type.startswith("UNetRes"):
        return block_type[7:]
    return block_type


def check_unet_config(config: dict) -> dict:
    """Validate a diffusers `UNet2DModel` config; returns it with defaults filled in.

    Raises `ValueError` naming every unsupported block type or option found.
    """
    if not isinstance(config, dict):
        raise TypeError(f"a UNet config must be a dict, got {type(config).__name__}.")
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ValueError(
            f"model class {name!r} is not supported; the importer reads diffusers UNet2DModel "
            "checkpoints (unconditional pixel-space DDPM-style models)."
        )
    cfg = {k: config.get(k, v) for k, v in _DEFAULTS.items()}
    problems = []
    down = [_strip(b) for b in cfg["down_block_types"]]
    up = [_strip(b) for b in cfg["up_block_types"]]
    for kind, types, known in (("down", down, _DOWN_BLOCKS), ("up", up, _UP_BLOCKS)):
        bad = sorted({b for b in types if b not in known})
        if bad:
            problems.append(f"{kind} block types {bad} (supported: {list(known)})")
    if cfg["mid_block_type"] not in _MID_BLOCKS:
        problems.append(
            f"mid_block_type={cfg['mid_block_type']!r} (supported: 'UNetMidBlock2D' or None)"
        )
    if cfg["time_embedding_type"] != "positional":
        problems.append(
            f"time_embedding_type={cfg['time_embedding_type']!r} (supported: 'positional'; "
            "'fourier' belongs to score-SDE VE models, 'learned' has no fractional timesteps)"
        )
    if cfg["class_embed_type"] is not None or cfg["num_class_embeds"] is not None:
        problems.append(
            "class conditioning (class_embed_type/num_class_embeds): only unconditional "
            "models are supported"
        )
    if cfg["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        problems.append(
            f"resnet_time_scale_shift={cfg['resnet_time_scale_shift']!r} "
            "(supported: 'default', 'scale_shift')"
        )
    if str(cfg["act_fn"]).lower() not in _ACTIVATIONS:
        problems.append(f"act_fn={cfg['act_fn']!r} (supported: {list(_ACTIVATIONS)})")
    for key in ("downsample_type", "upsample_type"):
        if cfg[key] not in ("conv", "resnet", None):
            problems.append(f"{key}={cfg[key]!r} (supported: 'conv', 'resnet')")
    if cfg["norm_num_groups"] is None:
        problems.append("norm_num_groups=None (give an int)")
    channels = list(cfg["block_out_channels"])
    if not (len(down) == len(up) == len(channels)) or not channels:
        problems.append(
            "down_block_types, up_block_types and block_out_channels must have the same "
            f"non-zero length, got {len(down)}, {len(up)}, {len(channels)}"
        )
    if problems:
        raise ValueError(
            "this diffusers UNet2DModel config uses options the importer does not support: "
            + "; ".join(problems)
            + "."
        )
    cfg["down_block_types"] = down
    cfg["up_block_types"] = up
    cfg["block_out_channels"] = [int(c) for c in channels]
    cfg["act_fn"] = str(cfg["act_fn"]).lower()
    return cfg


def _activation(name: str, x):
    if name in ("silu", "swish"):
        return jax.nn.silu(x)
    if name == "mish":
        return x * jnp.tanh(jax.nn.softplus(x))
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.relu(x)


# --------------------------------------------------------------------------------------------
# Layers (per sample, channels first)


class _Linear(eqx.Module):
    weight: jax.Array  # (out, in)
    bias: jax.Array | None

    def __call__(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + jnp.expand_dims(self.bias, range(y.ndim - 1))


class _Conv2d(eqx.Module):
    weight: jax.Array  # (out, in, kh, kw)
    bias: jax.Array | None
    stride: int = eqx.field(static=True, default=1)
    padding: tuple[int, int] = eqx.field(static=True, default=(1, 1))  # (before, after)

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x[None],
            self.weight.astype(x.dtype),
            window_strides=(self.stride, self.stride),
            padding=(self.padding, self.padding),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )[0]
        return y if self.bias is None else y + self.bias[:, None, None]


class _GroupNorm(eqx.Module):
    weight: jax.Array
    bias: jax.Array
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __call__(self, x):
        c = x.shape[0]
        g = x.reshape(self.groups, c // self.groups, -1)
        mean = g.mean(axis=(1, 2), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2), keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.eps)
        x = g.reshape(x.shape)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _upsample_nearest(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool(x):
    c, h, w = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


class _Downsample(eqx.Module):
    """`Downsample2D`: a stride-2 3x3 convolution, or 2x2 average pooling without one."""

    conv: _Conv2d | None

    def __call__(self, x):
        return _avg_pool(x) if self.conv is None else self.conv(x)


class _Upsample(eqx.Module):
    """`Upsample2D`: nearest-neighbour 2x, then an optional 3x3 convolution."""

    conv: _Conv2d | None

    def __call__(self, x):
        x = _upsample_nearest(x)
        return x if self.conv is None else self.conv(x)


class _ResnetBlock(eqx.Module):
    """`ResnetBlock2D` (pre-norm, time embedding added or as scale-shift)."""

    norm1: _GroupNorm
    conv1: _Conv2d
    time_emb_proj: _Linear
    norm2: _GroupNorm
    conv2: _Conv2d
    conv_shortcut: _Conv2d | None
    act: str = eqx.field(static=True)
    time_embedding_norm: str = eqx.field(static=True)
    output_scale_factor: float = eqx.field(static=True)
    resample: str | None = eqx.field(static=True)  # None, "up" or "down"

    def __call__(self, x, temb):
        h = _activation(self.act, self.norm1(x))
        if self.resample == "up":
            x, h = _upsample_nearest(x), _upsample_nearest(h)
        elif self.resample == "down":
            x, h = _avg_pool(x), _avg_pool(h)
        h = self.conv1(h)
        temb = self.time_emb_proj(_activation(self.act, temb))[:, None, None]
        if self.time_embedding_norm == "scale_shift":
            scale, shift = jnp.split(temb, 2, axis=0)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + temb)
        h = self.conv2(_activation(self.act, h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class _Attention(eqx.Module):
    """The spatial self-attention block (`Attention` with `_from_deprecated_attn_block`)."""

    group_norm: _GroupNorm | None
    to_q: _Linear
    to_k: _Linear
    to_v: _Linear
    to_out: _Linear
    heads: int = eqx.field(static=True)
    rescale_output_factor: float = eqx.field(static=True)

    def __call__(self, x):
        c, h, w = x.shape
        y = x if self.group_norm is None else self.group_norm(x)
        tokens = y.reshape(c, h * w).T  # (HW, C)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        d = q.shape[-1] // self.heads

        def split(a):
            return a.reshape(h * w, self.heads, d).transpose(1, 0, 2)  # (heads, HW, d)

        q, k, v = split(q), split(k), split(v)
        logits = jnp.einsum("hqd,hkd->hqk", q, k) / math.sqrt(d)
        out = jnp.einsum("hqk,hkd->hqd", jax.nn.softmax(logits, axis=-1), v)
        out = self.to_out(out.transpose(1, 0, 2).reshape(h * w, self.heads * d))
        return (out.T.reshape(c, h, w) + x) / self.rescale_output_factor


class _DownBlock(eqx.Module):
    resnets: tuple[_ResnetBlock, ...]
    attentions: tuple[_Attention, ...] | None
    downsampler: _Downsample | _ResnetBlock | None

    def __call__(self, x, temb):
        outputs = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
            outputs.append(x)
        if self.downsampler is not None:
            if isinstance(self.downsampler, _ResnetBlock):
                x = self.downsampler(x, temb)
            else:
                x = self.downsampler(x)
            outputs.append(x)
        return x, outputs


class _UpBlock(eqx.Module):
    resnets: tuple[_ResnetBlock, ...]
    attentions: tuple[_Attention, ...] | None
    upsampler: _Upsample | _ResnetBlock | None

    def __call__(self, x, skips, temb):
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=0), temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsampler is not None:
            if isinstance(self.upsampler, _ResnetBlock):
                x = self.upsampler(x, temb)
            else:
                x = self.upsampler(x)
        return x


class _MidBlock(eqx.Module):
    resnets: tuple[_ResnetBlock, ...]
    attentions: tuple[_Attention | None, ...]

    def __call__(self, x, temb):
        x = self.resnets[0](x, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            if attention is not None:
                x = attention(x)
            x = resnet(x, temb)
        return x


# --------------------------------------------------------------------------------------------
# The model


class DiffusersUNet2D(eqx.Module):
    """diffusers' `UNet2DModel` in Equinox, for one sample.

    `unet(x, timestep)` with `x` of shape `(in_channels, H, W)` and a scalar, possibly
    fractional, diffusers timestep (`0 .. num_train_timesteps - 1`) returns the network output
    of shape `(out_channels, H, W)`, exactly what
    `UNet2DModel(x[None], torch.tensor([timestep])).sample[0]` returns in PyTorch (up to
    float32 rounding). Build one with `nm.load_diffusers_unet(path)` or
    `DiffusersUNet2D.from_state_dict(config, state_dict)`.

    Supported: down blocks `DownBlock2D`, `AttnDownBlock2D`; up blocks `UpBlock2D`,
    `AttnUpBlock2D`; mid block `UNetMidBlock2D` with or without attention, or none;
    positional time embedding (`flip_sin_to_cos`, `freq_shift`, `time_embedding_dim`);
    `resnet_time_scale_shift` `default` or `scale_shift`; `downsample_type`/`upsample_type`
    `conv` or `resnet`; `downsample_padding`; `center_input_sample`; `mid_block_scale_factor`;
    `attention_head_dim` (or None: one head); `attn_norm_num_groups`; activations silu, mish,
    gelu, relu. Dropout is ignored (inference).
    """

    frozen_config: tuple = eqx.field(static=True)  # hashable (key, value) pairs
    frequencies: jax.Array  # (half,) sinusoid frequencies of the time embedding
    conv_in: _Conv2d
    time_linear_1: _Linear
    time_linear_2: _Linear
    down_blocks: tuple[_DownBlock, ...]
    mid_block: _MidBlock | None
    up_blocks: tuple[_UpBlock, ...]
    conv_norm_out: _GroupNorm
    conv_out: _Conv2d

    def __init__(self, config, frequencies, layers):
        self.frozen_config = tuple(
            (k, tuple(v) if isinstance(v, list | tuple) else v) for k, v in sorted(config.items())
        )
        self.frequencies = frequencies
        for name, value in layers.items():
            setattr(self, name, value)

    @property
    def config(self) -> dict:
        """The validated `UNet2DModel` config, with defaults filled in."""
        return dict(self.frozen_config)

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def out_channels(self) -> int:
        return int(self.config["out_channels"])

    def time_embedding(self, timestep):
        """The sinusoidal embedding of a scalar timestep, as diffusers' `Timesteps`."""
        arg = jnp.asarray(timestep, self.frequencies.dtype) * self.frequencies
        emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])
        if self.config["flip_sin_to_cos"]:
            half = self.frequencies.shape[0]
            emb = jnp.concatenate([emb[half:], emb[:half]])
        if self.config["block_out_channels"][0] % 2:
            emb = jnp.pad(emb, (0, 1))
        return emb

    def __call__(self, x, timestep):
        if x.ndim != 3 or x.shape[0] != self.in_channels:
            raise ValueError(
                f"DiffusersUNet2D takes one sample of shape (C={self.in_channels}, H, W), got "
                f"{x.shape}; vmap it for batches."
            )
        if self.config["center_input_sample"]:
            x = 2 * x - 1.0
        temb = self.time_linear_1(self.time_embedding(timestep))
        temb = self.time_linear_2(jax.nn.silu(temb)).astype(x.dtype)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, outputs = block(h, temb)
            skips.extend(outputs)
        if self.mid_block is not None:
            h = self.mid_block(h, temb)
        for block in self.up_blocks:
            h = block(h, skips, temb)
        h = jax.nn.silu(self.conv_norm_out(h))
        return self.conv_out(h)

    @classmethod
    def from_state_dict(cls, config: dict, state_dict: dict, *, dtype=jnp.float32):
        """Build from a `UNet2DModel` config dict and its state dict (name -> numpy array).

        Raises `ValueError` naming unsupported options, and missing, unexpected or
        wrongly shaped weights.
        """
        cfg = check_unet_config(config)
        weights = _Weights(state_dict, dtype)
        layers = _build(cfg, weights)
        weights.finish()
        half = cfg["block_out_channels"][0] // 2
        # As diffusers: exp(-log(10000) * i / (half - freq_shift)), in float32.
        exponent = np.float32(-math.log(10000)) * np.arange(half, dtype=np.float32)
        exponent = exponent / np.float32(half - cfg["freq_shift"])
        frequencies = jnp.asarray(np.exp(exponent), dtype=dtype)
        return cls(cfg, frequencies, layers)


# --------------------------------------------------------------------------------------------
# State dict -> layers

_DEPRECATED_ATTENTION = re.compile(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.")
_RENAMED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class _Weights:
    """Takes named arrays out of a state dict, checking shapes; reports all problems at once."""

    def __init__(self, state_dict, dtype):
        self.arrays = {}
        for name, value in state_dict.items():
            # Checkpoints saved before diffusers 0.14 name the attention projections
            # query/key/value/proj_attn; diffusers renames them on load, and so do we.
            name = _DEPRECATED_ATTENTION.sub(lambda m: f"{m[1]}.{_RENAMED[m[2]]}.", name)
            self.arrays[name] = value
        self.dtype = dtype
        self.missing, self.mismatched = [], []

    def take(self, name, shape):
        shape = tuple(int(s) for s in shape)
        if name not in self.arrays:
            self.missing.append(f"{name} {shape}")
            return jnp.zeros(shape, self.dtype)
        value = np.asarray(self.arrays.pop(name))
        if value.shape != shape:
            self.mismatched.append(f"{name}: checkpoint {value.shape}, config {shape}")
            return jnp.zeros(shape, self.dtype)
        return jnp.asarray(value, dtype=self.dtype)

    def finish(self):
        problems = []
        for label, items in (
            ("missing", self.missing),
            ("with a shape other than the config implies", self.mismatched),
            ("unexpected", sorted(self.arrays)),
        ):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" * (len(items) > 8))
                problems.append(f"weights {label}: {shown}")
        if problems:
            raise ValueError(
                "the checkpoint's weights do not match its UNet2DModel config: "
                + "; ".join(problems)
                + ". Check that config.json and diffusion_pytorch_model.safetensors belong "
                "to the same model."
            )


def _linear(w, prefix, n_in, n_out, bias=True):
    return _Linear(
        w.take(f"{prefix}.weight", (n_out, n_in)),
        w.take(f"{prefix}.bias", (n_out,)) if bias else None,
    )


def _conv(w, prefix, n_in, n_out, kernel=3, stride=1, padding=(1, 1)):
    return _Conv2d(
        w.take(f"{prefix}.weight", (n_out, n_in, kernel, kernel)),
        w.take(f"{prefix}.bias", (n_out,)),
        stride=stride,
        padding=padding,
    )


def _norm(w, prefix, channels, groups, eps):
    if channels % groups:
        raise ValueError(
            f"group norm {prefix!r}: {channels} channels are not divisible into {groups} groups."
        )
    return _GroupNorm(
        w.take(f"{prefix}.weight", (channels,)),
        w.take(f"{prefix}.bias", (channels,)),
        groups=int(groups),
        eps=float(eps),
    )


def _resnet(w, prefix, cfg, n_in, n_out, temb, scale=1.0, resample=None):
    groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]
    shift = cfg["resnet_time_scale_shift"]
    return _ResnetBlock(
        norm1=_norm(w, f"{prefix}.norm1", n_in, groups, eps),
        conv1=_conv(w, f"{prefix}.conv1", n_in, n_out),
        time_emb_proj=_linear(
            w, f"{prefix}.time_emb_proj", temb, 2 * n_out if shift == "scale_shift" else n_out
        ),
        norm2=_norm(w, f"{prefix}.norm2", n_out, groups, eps),
        conv2=_conv(w, f"{prefix}.conv2", n_out, n_out),
        conv_shortcut=(
            _conv(w, f"{prefix}.conv_shortcut", n_in, n_out, kernel=1, padding=(0, 0))
            if n_in != n_out
            else None
        ),
        act=cfg["act_fn"],
        time_embedding_norm=shift,
        output_scale_factor=float(scale),
        resample=resample,
    )


def _attention(w, prefix, cfg, channels, groups, scale=1.0):
    head_dim = cfg["attention_head_dim"]
    head_dim = channels if head_dim is None else int(head_dim)
    heads = channels // head_dim
    if heads < 1:
        raise ValueError(
            f"attention_head_dim={head_dim} is larger than the {channels} channels of {prefix!r}."
        )
    inner = heads * head_dim
    return _Attention(
        group_norm=(
            None
            if groups is None
            else _norm(w, f"{prefix}.group_norm", channels, groups, cfg["norm_eps"])
        ),
        to_q=_linear(w, f"{prefix}.to_q", channels, inner),
        to_k=_linear(w, f"{prefix}.to_k", channels, inner),
        to_v=_linear(w, f"{prefix}.to_v", channels, inner),
        to_out=_linear(w, f"{prefix}.to_out.0", inner, channels),
        heads=heads,
        rescale_output_factor=float(scale),
    )


def _build(cfg, w):
    channels = cfg["block_out_channels"]
    temb = cfg["time_embedding_dim"] or 4 * channels[0]
    layers = {
        "conv_in": _conv(w, "conv_in", cfg["in_channels"], channels[0]),
        "time_linear_1": _linear(w, "time_embedding.linear_1", channels[0], temb),
        "time_linear_2": _linear(w, "time_embedding.linear_2", temb, temb),
    }
    n_layers = int(cfg["layers_per_block"])
    groups = cfg["norm_num_groups"]

    down_blocks = []
    out = channels[0]
    for i, kind in enumerate(cfg["down_block_types"]):
        prefix = f"down_blocks.{i}"
        n_in, out = out, channels[i]
        resnets = tuple(
            _resnet(w, f"{prefix}.resnets.{j}", cfg, n_in if j == 0 else out, out, temb)
            for j in range(n_layers)
        )
        attentions = None
        if kind == "AttnDownBlock2D":
            attentions = tuple(
                _attention(w, f"{prefix}.attentions.{j}", cfg, out, groups) for j in range(n_layers)
            )
        downsampler = None
        if i < len(channels) - 1:
            if kind == "AttnDownBlock2D" and cfg["downsample_type"] == "resnet":
                downsampler = _resnet(
                    w, f"{prefix}.downsamplers.0", cfg, out, out, temb, resample="down"
                )
            else:  # DownBlock2D always uses a convolution
                pad = int(cfg["downsample_padding"])
                downsampler = _Downsample(
                    _conv(
                        w,
                        f"{prefix}.downsamplers.0.conv",
                        out,
                        out,
                        stride=2,
                        padding=(pad, pad) if pad else (0, 1),
                    )
                )
        down_blocks.append(_DownBlock(resnets, attentions, downsampler))
    layers["down_blocks"] = tuple(down_blocks)

    mid = None
    if cfg["mid_block_type"] is not None:
        c = channels[-1]
        scale = cfg["mid_block_scale_factor"]
        attn_groups = cfg["attn_norm_num_groups"]
        if attn_groups is None and cfg["resnet_time_scale_shift"] == "default":
            attn_groups = groups
        resnets = tuple(
            _resnet(w, f"mid_block.resnets.{j}", cfg, c, c, temb, scale=scale) for j in range(2)
        )
        attention = None
        if cfg["add_attention"]:
            attention = _attention(w, "mid_block.attentions.0", cfg, c, attn_groups, scale)
        mid = _MidBlock(resnets, (attention,))
    layers["mid_block"] = mid

    up_blocks = []
    reversed_channels = channels[::-1]
    out = reversed_channels[0]
    for i, kind in enumerate(cfg["up_block_types"]):
        prefix = f"up_blocks.{i}"
        prev, out = out, reversed_channels[i]
        skip_in = reversed_channels[min(i + 1, len(channels) - 1)]
        resnets = []
        for j in range(n_layers + 1):
            skip = skip_in if j == n_layers else out
            n_in = (prev if j == 0 else out) + skip
            resnets.append(_resnet(w, f"{prefix}.resnets.{j}", cfg, n_in, out, temb))
        attentions = None
        if kind == "AttnUpBlock2D":
            attentions = tuple(
                _attention(w, f"{prefix}.attentions.{j}", cfg, out, groups)
                for j in range(n_layers + 1)
            )
        upsampler = None
        if i < len(channels) - 1:
            if kind == "AttnUpBlock2D" and cfg["upsample_type"] == "resnet":
                upsampler = _resnet(w, f"{prefix}.upsamplers.0", cfg, out, out, temb, resample="up")
            else:  # UpBlock2D always uses a convolution
                upsampler = _Upsample(_conv(w, f"{prefix}.upsamplers.0.conv", out, out))
        up_blocks.append(_UpBlock(tuple(resnets), attentions, upsampler))
    layers["up_blocks"] = tuple(up_blocks)

    layers["conv_norm_out"] = _norm(w, "conv_norm_out", channels[0], groups, cfg["norm_eps"])
    layers["conv_out"] = _conv(w, "conv_out", channels[0], cfg["out_channels"])
    return layers
