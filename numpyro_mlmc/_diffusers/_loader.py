"""Reading diffusers checkpoint directories (no PyTorch needed) into a `DiffusionPrior`.

A checkpoint is a local directory in one of the two layouts diffusers writes:

- a model directory, `UNet2DModel.save_pretrained(dir)`: `config.json` and
  `diffusion_pytorch_model.safetensors`, with the scheduler's `scheduler_config.json` either
  in `dir/scheduler/` or in `dir/` itself (older hub repositories such as the Google DDPM ones);
- a pipeline directory, `DDPMPipeline.save_pretrained(dir)`: `model_index.json`, `unet/` and
  `scheduler/`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp

from ._scheduler import DiscreteVPSchedule, schedule_from_diffusers
from ._unet import DiffusersUNet2D, check_unet_config

__all__ = ["DiffusersDenoiser", "load_diffusers_unet", "prior_from_diffusers"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
SCHEDULER_NAME = "scheduler_config.json"


class DiffusersDenoiser(eqx.Module):
    """A diffusers UNet as a `denoiser(x, t)` in continuous time.

    `denoiser(x, t)` evaluates `unet(x, schedule.timestep(t))`, the network at the fractional
    diffusers timestep `N t - 1` (clipped to `[0, N - 1]`), and returns its first
    `channels` output channels (a model with learned variances, `out_channels = 2 C`, returns
    the prediction in the first `C` and the variance interpolation in the rest, as diffusers'
    `DDPMScheduler` splits them). `x` has shape `(C, H, W)`; `t` is a scalar in `[0, 1]`.
    """

    unet: DiffusersUNet2D
    schedule: DiscreteVPSchedule
    channels: int = eqx.field(static=True)

    def __call__(self, x, t):
        out = self.unet(x, self.schedule.timestep(t))
        return out[: self.channels]


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}.") from err


def _model_dir(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory; pass the local directory of a diffusers checkpoint "
            f"(holding {CONFIG_NAME} and {WEIGHTS_NAME}, or a pipeline's unet/ and scheduler/)."
        )
    for candidate in (path / "unet", path):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"no {CONFIG_NAME} in {path} or {path / 'unet'}: this is not a diffusers UNet2DModel "
        f"directory. It needs {CONFIG_NAME} and {WEIGHTS_NAME} (what "
        "UNet2DModel.save_pretrained writes), or a pipeline layout with unet/ and scheduler/."
    )


def _read_weights(model_dir: Path) -> dict:
    from safetensors.numpy import load_file

    weights = model_dir / WEIGHTS_NAME
    if not weights.is_file():
        others = sorted(
            p.name for p in model_dir.glob("diffusion_pytorch_model*") if p.name != WEIGHTS_NAME
        )
        hint = (
            f" Found {others}: convert once, where PyTorch and diffusers are installed, with "
            "UNet2DModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)."
            if others
            else ""
        )
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} in {model_dir}; the importer reads safetensors weights only "
            f"(PyTorch pickles need torch to load).{hint}"
        )
    try:
        return load_file(str(weights))
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"could not read {weights} with safetensors' numpy API: {err}. Weights stored as "
            "bfloat16 have no numpy dtype: save them as float32 or float16."
        ) from err


def load_diffusers_unet(path, *, dtype=jnp.float32) -> DiffusersUNet2D:
    """Load a diffusers `UNet2DModel` checkpoint directory as an Equinox `DiffusersUNet2D`.

    Args:
        path: a model directory (`config.json`, `diffusion_pytorch_model.safetensors`) or a
            pipeline directory holding one under `unet/`.
        dtype: dtype of the weights in JAX (default float32; float16 checkpoints are cast).

    Raises `FileNotFoundError` for missing files and `ValueError` for unsupported options or
    weights that do not match the config.
    """
    model_dir = _model_dir(Path(os.fspath(path)))
    config = _read_json(model_dir / CONFIG_NAME)
    check_unet_config(config)  # before reading (possibly large) weights
    return DiffusersUNet2D.from_state_dict(config, _read_weights(model_dir), dtype=dtype)


def _scheduler_config(path: Path, model_dir: Path, scheduler_config) -> dict:
    if isinstance(scheduler_config, dict):
        return scheduler_config
    if scheduler_config is not None:
        given = Path(os.fspath(scheduler_config))
        file = given / SCHEDULER_NAME if given.is_dir() else given
        if not file.is_file():
            raise FileNotFoundError(f"scheduler config {file} does not exist.")
        return _read_json(file)
    candidates = []
    for base in (path, model_dir, model_dir.parent):
        for file in (base / "scheduler" / SCHEDULER_NAME, base / SCHEDULER_NAME):
            if file not in candidates:
                candidates.append(file)
    for file in candidates:
        if file.is_file():
            return _read_json(file)
    raise FileNotFoundError(
        f"no scheduler config found (looked for {[str(c) for c in candidates]}). The noise "
        "schedule the model was trained with is needed: pass scheduler_config= (a dict, a "
        f"{SCHEDULER_NAME} file or its directory), e.g. DDPMScheduler().config."
    )


def _event_shape(unet: DiffusersUNet2D, event_shape) -> tuple[int, ...]:
    cfg = unet.config
    c = unet.in_channels
    if event_shape is None:
        size = cfg["sample_size"]
        if size is None:
            raise ValueError(
                "the UNet config has no sample_size; pass event_shape=(C, H, W) explicitly."
            )
        h, w = (size, size) if isinstance(size, int) else size
        event_shape = (c, h, w)
    event_shape = tuple(int(d) for d in event_shape)
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    if len(event_shape) != 3 or event_shape[0] != c or event_shape[1] % factor:
        raise ValueError(
            f"event_shape {event_shape} does not fit this UNet: it needs (C={c}, H, W) with H "
            f"and W multiples of {factor} (2 to the number of downsampling steps)."
        )
    if event_shape[2] % factor:
        raise ValueError(f"event_shape {event_shape}: W must be a multiple of {factor}.")
    return event_shape


def prior_from_diffusers(
    cls, path, *, scheduler_config=None, event_shape=None, dtype=jnp.float32, **prior_kwargs
):
    """Build a `DiffusionPrior` (class `cls`) from a diffusers checkpoint directory; the body
    of `DiffusionPrior.from_diffusers` (see its docstring)."""
    path = Path(os.fspath(path))
    model_dir = _model_dir(path)
    unet = load_diffusers_unet(path, dtype=dtype)
    sched = _scheduler_config(path, model_dir, scheduler_config)
    schedule, parametrization = schedule_from_diffusers(sched)
    c_in, c_out = unet.in_channels, unet.out_channels
    learned = sched.get("variance_type") in ("learned", "learned_range")
    if not (c_out == c_in or (learned and c_out == 2 * c_in)):
        raise ValueError(
            f"the UNet maps {c_in} channels to {c_out}; a denoiser must return the sample's "
            f"{c_in} channels (or 2 x {c_in} with a learned variance_type)."
        )
    denoiser = DiffusersDenoiser(unet, schedule, c_in)
    prior_kwargs.setdefault("schedule", schedule)
    prior_kwargs.setdefault("parametrization", parametrization)
    return cls(denoiser, event_shape=_event_shape(unet, event_shape), **prior_kwargs)
