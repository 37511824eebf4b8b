"""Safe checkpoints: a directory with `config.json` and `weights.safetensors`.

Layout of a checkpoint directory:

- `config.json`: what the weights mean: `kind` (`"diffusion"` or `"gaussian_mixture"`), the
  architecture (a class name from `numpyro_mlmc.nets.ARCHITECTURES` and its constructor
  arguments), the noise schedule, the parametrisation, the event shape, the data
  normalisation, the training data and steps, the library version, and the sha256 of the
  weights file.
- `weights.safetensors`: one tensor per array leaf of the network, named by its path in the
  pytree (`jax.tree_util.keystr`, e.g. `.conv_in.weight`).

Loading never unpickles anything: JSON and safetensors only, and the architecture is built
from a fixed table of classes, never from a name imported at run time. The weights' sha256 is
checked before they are parsed; missing, unexpected, wrongly shaped or wrongly typed tensors
are all listed in one `CheckpointError`. Files are written to a temporary name in the same
directory and renamed into place (`os.replace`, atomic on POSIX), so a crash never leaves a
half-written file; the weights are replaced before the config, and a config whose checksum
does not match its weights is reported as such.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr
import numpy as np

from ._schedules import AbstractSchedule, CosineVPSchedule, VESchedule, VPSchedule

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "load_gmm_checkpoint",
    "read_config",
    "save_checkpoint",
    "save_gmm_checkpoint",
]

FORMAT_NAME = "numpyro-mlmc-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"

_SCHEDULES = {
    "VPSchedule": VPSchedule,
    "CosineVPSchedule": CosineVPSchedule,
    "VESchedule": VESchedule,
}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, tampered with, or does not match its config."""


def _library_version() -> str:
    from . import __version__

    return __version__


# ----- atomic files ------------------------------------------------------------------------


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and `os.replace`,
    so readers see either the old file or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_to_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)


def bytes_to_tensors(data: bytes, what: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    try:
        return load(data)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(
            f"{what} is not a valid safetensors file ({type(err).__name__}: {err}); it is "
            "corrupt or truncated: re-save or re-download the checkpoint."
        ) from None


# ----- pytrees <-> named tensors -------------------------------------------------------------


def tree_to_tensors(tree) -> dict[str, np.ndarray]:
    """Array leaves of a pytree as `{keystr(path): numpy array}`."""
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def tensors_into_tree(skeleton, tensors: dict[str, np.ndarray], what: str):
    """Replace the array leaves of `skeleton` by the same-named tensors.

    Every problem (missing names, unexpected names, wrong shapes, wrong dtypes) is collected
    and raised together in one `CheckpointError`.
    """
    params, static = eqx.partition(skeleton, eqx.is_array)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [jax.tree_util.keystr(path) for path, _ in flat]
    problems = []
    missing = [n for n in names if n not in tensors]
    unexpected = sorted(set(tensors) - set(names))
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
    new_leaves = []
    for name, (_, leaf) in zip(names, flat, strict=True):
        if name not in tensors:
            new_leaves.append(leaf)
            continue
        value = tensors[name]
        if leaf.ndim == 0 and value.shape == (1,):
            value = value.reshape(())  # safetensors stores 0-d arrays with shape (1,)
        if tuple(value.shape) != tuple(leaf.shape):
            problems.append(
                f"wrong shape for {name}: file has {tuple(value.shape)}, the architecture "
                f"needs {tuple(leaf.shape)}"
            )
        elif value.dtype != leaf.dtype:
            problems.append(f"wrong dtype for {name}: file has {value.dtype}, needs {leaf.dtype}")
        new_leaves.append(jax.numpy.asarray(value))
    if problems:
        raise CheckpointError(
            f"{what} does not match the architecture in its config:\n  - "
            + "\n  - ".join(problems)
            + "\nCheck that config.json and the weights come from the same checkpoint."
        )
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, new_leaves), static)


# ----- config pieces -------------------------------------------------------------------------


def schedule_to_config(schedule: AbstractSchedule) -> dict:
    name = type(schedule).__name__
    if name not in _SCHEDULES:
        raise ValueError(
            f"cannot store schedule {schedule!r}: checkpoints support {sorted(_SCHEDULES)}."
        )
    kwargs = {f.name: float(getattr(schedule, f.name)) for f in dataclasses.fields(schedule)}
    return {"class": name, "kwargs": kwargs}


def schedule_from_config(config: dict) -> AbstractSchedule:
    name = config.get("class")
    if name not in _SCHEDULES:
        raise CheckpointError(f"unknown schedule class {name!r}; known: {sorted(_SCHEDULES)}.")
    return _SCHEDULES[name](**config.get("kwargs", {}))


def architecture_to_config(model) -> dict:
    from .nets import ARCHITECTURES

    name = type(model).__name__
    if ARCHITECTURES.get(name) is not type(model):
        raise ValueError(
            f"cannot store a {name}: checkpoints hold the architectures "
            f"{sorted(ARCHITECTURES)} of numpyro_mlmc.nets (rebuildable from their config)."
        )
    return {"class": name, "kwargs": model.config()}


def build_architecture(config: dict):
    """Build an untrained network from `{"class": name, "kwargs": {...}}` (fixed key; the
    values are then replaced by the checkpoint's weights)."""
    from .nets import ARCHITECTURES

    name = config.get("class")
    if name not in ARCHITECTURES:
        raise CheckpointError(
            f"unknown architecture {name!r}; this library builds {sorted(ARCHITECTURES)}."
        )
    try:
        return ARCHITECTURES[name](**config.get("kwargs", {}), key=jr.PRNGKey(0))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot build {name} from the config's arguments: {err}") from None


# ----- save / load -------------------------------------------------------------------------


def _write_checkpoint(directory, tensors, config) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = tensors_to_bytes(tensors)
    config = dict(config)
    config["weights"] = {
        "file": WEIGHTS_FILE,
        "sha256": sha256_bytes(data),
        "num_bytes": len(data),
        "num_parameters": int(sum(v.size for v in tensors.values())),
    }
    atomic_write_bytes(directory / WEIGHTS_FILE, data)
    text = json.dumps(config, indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(directory / CONFIG_FILE, text.encode())
    return directory


def save_checkpoint(
    directory,
    model,
    *,
    schedule: AbstractSchedule,
    parametrization: str,
    event_shape,
    normalization: dict | None = None,
    training: dict | None = None,
    description: str = "",
) -> Path:
    """Save a network of `numpyro_mlmc.nets` as a loadable diffusion-prior checkpoint.

    Args:
        directory: created if needed; `config.json` and `weights.safetensors` are replaced
            atomically.
        model: a `UNet` or `MLPScoreNet` (its `config()` rebuilds the architecture).
        schedule, parametrization, event_shape: what `DiffusionPrior` needs.
        normalization: how data were scaled (default: pixel values mapped to `[-1, 1]`).
        training: free-form JSON-serialisable description of the training run.
    Returns the directory path.
    """
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": "diffusion",
        "description": description,
        "library_version": _library_version(),
        "architecture": architecture_to_config(model),
        "schedule": schedule_to_config(schedule),
        "parametrization": parametrization,
        "event_shape": [int(d) for d in event_shape],
        "normalization": normalization
        or {"range": [-1.0, 1.0], "description": "pixel values mapped linearly to [-1, 1]"},
        "training": training or {},
    }
    return _write_checkpoint(directory, tree_to_tensors(model), config)


def read_config(directory) -> dict:
    """Read and validate `config.json` of a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist.")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a checkpoint needs {CONFIG_FILE}.")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the file is corrupt.") from None
    problems = []
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object.")
    if config.get("format") != FORMAT_NAME:
        problems.append(f"'format' is {config.get('format')!r}, expected {FORMAT_NAME!r}")
    if config.get("format_version") != FORMAT_VERSION:
        problems.append(
            f"'format_version' is {config.get('format_version')!r}; this library reads "
            f"version {FORMAT_VERSION}"
        )
    required = ["kind", "event_shape", "weights"]
    if config.get("kind") == "diffusion":
        required += ["architecture", "schedule", "parametrization"]
    for key in required:
        if key not in config:
            problems.append(f"required field {key!r} is missing")
    if "weights" in config and "sha256" not in config.get("weights", {}):
        problems.append("'weights.sha256' is missing")
    if problems:
        raise CheckpointError(
            f"{path} is not a valid checkpoint config:\n  - " + "\n  - ".join(problems)
        )
    return config


def _read_weights(directory: Path, config: dict) -> dict[str, np.ndarray]:
    path = directory / config["weights"].get("file", WEIGHTS_FILE)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint's weights file is not there.")
    data = path.read_bytes()
    digest = sha256_bytes(data)
    expected = config["weights"]["sha256"]
    if digest != expected:
        raise CheckpointError(
            f"checksum mismatch for {path}: sha256 is {digest}, config.json records "
            f"{expected}. The weights were modified or corrupted after saving (or the two "
            "files come from different checkpoints); do not use them."
        )
    return bytes_to_tensors(data, str(path))


def load_checkpoint(directory):
    """Load a diffusion-prior checkpoint: returns `(network, config)`.

    Raises `CheckpointError` (a `ValueError`) listing what is wrong when the config is
    invalid, the weights' checksum does not match, or tensors are missing, unexpected or of
    the wrong shape or dtype; `FileNotFoundError` when the directory does not exist.
    """
    directory = Path(directory)
    config = read_config(directory)
    if config["kind"] != "diffusion":
        raise CheckpointError(
            f"{directory} holds a {config['kind']!r} checkpoint, not a diffusion network; "
            "load it with load_pretrained / DiffusionPrior.from_pretrained."
        )
    tensors = _read_weights(directory, config)
    skeleton = build_architecture(config["architecture"])
    model = tensors_into_tree(skeleton, tensors, f"{directory / WEIGHTS_FILE}")
    return model, config


def save_gmm_checkpoint(
    directory, gmm, *, training: dict | None = None, description="", dtype=np.float64
):
    """Save a `GaussianMixturePrior` (weights, means and covariances, stored in `dtype`) with
    its schedule and event shape. Loading casts back to float64 and re-symmetrises."""
    tensors = {
        "weights": np.asarray(gmm.weights, dtype),
        "means": np.asarray(gmm.means, dtype),
        "covariances": np.asarray(gmm.covariances, dtype),
    }
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": "gaussian_mixture",
        "description": description,
        "library_version": _library_version(),
        "schedule": schedule_to_config(gmm.schedule),
        "event_shape": [int(d) for d in gmm.event_shape],
        "num_components": int(gmm.num_components),
        "normalization": {
            "range": [-1.0, 1.0],
            "description": "pixel values mapped linearly to [-1, 1]",
        },
        "training": training or {},
    }
    return _write_checkpoint(directory, tensors, config)


def load_gmm_checkpoint(directory, **kwargs):
    """Load a Gaussian-mixture checkpoint as a `GaussianMixturePrior` (keyword arguments go
    to its constructor, e.g. `num_steps`). Returns `(prior, config)`."""
    from ._gmm import GaussianMixturePrior

    directory = Path(directory)
    config = read_config(directory)
    if config["kind"] != "gaussian_mixture":
        raise CheckpointError(f"{directory} holds a {config['kind']!r} checkpoint, not a GMM.")
    tensors = _read_weights(directory, config)
    event_shape = tuple(config["event_shape"])
    k = int(config.get("num_components", tensors.get("weights", np.zeros(0)).shape[0]))
    d = math.prod(event_shape)
    expected = {"weights": (k,), "means": (k, d), "covariances": (k, d, d)}
    problems = [f"missing tensor {n}" for n in expected if n not in tensors]
    problems += [f"unexpected tensor {n}" for n in sorted(set(tensors) - set(expected))]
    problems += [
        f"wrong shape for {n}: file has {tuple(tensors[n].shape)}, needs {shape}"
        for n, shape in expected.items()
        if n in tensors and tuple(tensors[n].shape) != shape
    ]
    if problems:
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} does not match its config:\n  - " + "\n  - ".join(problems)
        )
    schedule = schedule_from_config(config["schedule"])
    covariances = tensors["covariances"].astype(np.float64)
    prior = GaussianMixturePrior(
        tensors["weights"].astype(np.float64),
        tensors["means"].astype(np.float64),
        0.5 * (covariances + np.swapaxes(covariances, 1, 2)),
        schedule=schedule,
        event_shape=event_shape,
        **kwargs,
    )
    return prior, config
