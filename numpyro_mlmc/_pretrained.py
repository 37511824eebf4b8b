"""The registry of shipped priors and `load_pretrained`.

Shipped checkpoints live in the package (`numpyro_mlmc/pretrained/<name>/`, each a
`config.json` + `weights.safetensors` directory, see `_checkpoints.py`); nothing is ever
downloaded. `load_pretrained` also accepts the path of any checkpoint directory, e.g. the
output of `numpyro-mlmc train`.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from ._checkpoints import CheckpointError, load_checkpoint, load_gmm_checkpoint, read_config

__all__ = ["list_pretrained", "load_pretrained", "pretrained_path"]

# name -> one-line description. Model cards: docs/model_cards/<name>.md.
_REGISTRY = {
    "digits": "UNet diffusion prior on scikit-learn's 8x8 digits, [-1, 1], VP linear, eps",
    "digits-gmm": "Gaussian mixture fitted to the same digits: exact diffused score",
    "patches16": "UNet diffusion prior on 16x16 grayscale natural-image patches, [-1, 1]",
    "patches16-gmm": "Gaussian mixture fitted to the same patches: exact diffused score",
}


def list_pretrained(*, with_descriptions: bool = False):
    """Names of the priors shipped with the package, sorted.

    With `with_descriptions=True`, returns `{name: description}` instead. Load one with
    `nm.DiffusionPrior.from_pretrained(name)`.
    """
    names = sorted(n for n in _REGISTRY if _shipped_dir(n).is_dir())
    if with_descriptions:
        return {n: _REGISTRY[n] for n in names}
    return names


def _shipped_dir(name: str) -> Path:
    return Path(str(resources.files("numpyro_mlmc") / "pretrained" / name))


def pretrained_path(name_or_path) -> Path:
    """The checkpoint directory of a shipped name, or the given path if it is a directory."""
    if isinstance(name_or_path, str) and name_or_path in _REGISTRY:
        path = _shipped_dir(name_or_path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"the shipped prior {name_or_path!r} is registered but its files are missing "
                f"from the installed package ({path}); reinstall numpyro-mlmc."
            )
        return path
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"pass a shipped prior's name ({list_pretrained()}) or a checkpoint directory path, "
            f"got {name_or_path!r}."
        )
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return path
    raise FileNotFoundError(
        f"{str(name_or_path)!r} is neither a shipped prior nor a checkpoint directory. Shipped "
        f"priors: {list_pretrained()}; or pass the directory written by "
        "`numpyro-mlmc train --out DIR`. Nothing is downloaded."
    )


def load_pretrained(name_or_path, **kwargs):
    """Load a shipped prior by name or a checkpoint directory by path.

    Returns a `DiffusionPrior` for network checkpoints and a `GaussianMixturePrior` for
    Gaussian-mixture ones (`"digits-gmm"`, `"patches16-gmm"`). Keyword arguments go to the
    prior's constructor (`num_steps`, `sampler`, `spacing`, `batch_size`). The loaded prior's
    `config` attribute holds the checkpoint's `config.json`.

    Raises `FileNotFoundError` for unknown names or paths, and `CheckpointError` (a
    `ValueError`) for corrupt, tampered or mismatched checkpoints, with the list of problems.
    """
    from ._priors import DiffusionPrior

    path = pretrained_path(name_or_path)
    config = read_config(path)
    name = name_or_path if isinstance(name_or_path, str) and name_or_path in _REGISTRY else None
    if config["kind"] == "gaussian_mixture":
        prior, config = load_gmm_checkpoint(path, **kwargs)
    elif config["kind"] == "diffusion":
        from ._checkpoints import schedule_from_config

        network, config = load_checkpoint(path)
        prior = DiffusionPrior(
            network,
            schedule=schedule_from_config(config["schedule"]),
            event_shape=tuple(config["event_shape"]),
            parametrization=config["parametrization"],
            **kwargs,
        )
    else:
        raise CheckpointError(
            f"{path / 'config.json'} has unknown kind {config['kind']!r}; expected "
            "'diffusion' or 'gaussian_mixture'."
        )
    prior.config = config
    prior.name = name or path.name
    return prior
