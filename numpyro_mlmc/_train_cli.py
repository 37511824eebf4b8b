"""`numpyro-mlmc train`: train a diffusion prior on a data set we ship.

    numpyro-mlmc train --dataset digits --steps 4000 --out runs/digits
    numpyro-mlmc train --dataset patches16 --steps 6000 --out runs/patches16
    numpyro-mlmc train --dataset digits --gmm --out runs/digits-gmm   # the GMM reference

The output directory is a checkpoint (`config.json` + `weights.safetensors`, EMA weights)
loadable with `nm.DiffusionPrior.from_pretrained(DIR)`; it also holds the training state, so
running the same command again resumes where it stopped (pass `--no-resume` to start over).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax.random as jr

# Architectures and training settings of the shipped priors (see docs/model_cards/). They are
# sized for CPU training: a 2-core machine shared with other jobs runs a few steps per second.
# The middle block of each UNet has self-attention at 4x4.
PRESETS = {
    "digits": {
        "network": {
            "channels": 24,
            "channel_multipliers": [1, 2],
            "num_res_blocks": 1,
            "attention_resolutions": [],
            "num_heads": 4,
        },
        "train": {"batch_size": 64, "learning_rate": 2e-3, "warmup_steps": 100},
        "ema_decay": 0.999,
    },
    "patches16": {
        "network": {
            "channels": 16,
            "channel_multipliers": [1, 2, 2],
            "num_res_blocks": 1,
            "attention_resolutions": [],
            "num_heads": 4,
        },
        "train": {"batch_size": 64, "learning_rate": 2e-3, "warmup_steps": 100},
        "ema_decay": 0.998,
    },
}


def dataset_batches(dataset: str, batch_size: int, seed: int):
    """`(data(step), event_shape, description)` for a named data set (training split)."""
    from ._data import (
        PATCH_TEST_IMAGES,
        PATCH_TRAIN_IMAGES,
        load_digits_images,
        load_patch_images,
        sample_patches,
    )
    from ._training import array_batches

    if dataset == "digits":
        images, _ = load_digits_images(split="train")
        description = {
            "name": "digits",
            "source": "sklearn.datasets.load_digits, 8x8, pixel/16 mapped to [-1, 1]",
            "split": "train: 80% of the 1,797 digits (load_digits_images(split='train'), "
            "hold-out seed 0)",
            "num_train": int(images.shape[0]),
            "augmentation": "none (flips would change digit identity)",
        }
        return array_batches(images, batch_size, seed=seed), (8, 8), description
    if dataset == "patches16":
        images = load_patch_images("train")

        def data(step):
            return sample_patches(images, batch_size, size=16, seed=[seed, step], flips=True)

        description = {
            "name": "patches16",
            "source": "16x16 patches of scikit-image's bundled images, grayscale (rgb2gray), "
            "mapped to [-1, 1]",
            "train_images": list(PATCH_TRAIN_IMAGES),
            "held_out_images": list(PATCH_TEST_IMAGES),
            "augmentation": "fresh uniformly placed patches every step; random horizontal "
            "and vertical flips",
        }
        return data, (16, 16), description
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(PRESETS)}.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=None, help="optimisation steps")
    parser.add_argument(
        "--gmm",
        action="store_true",
        help="fit the Gaussian-mixture reference (exact diffused score) instead of a network",
    )
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--channels", type=int, default=None, help="UNet base channels")
    parser.add_argument("--ema-decay", type=float, default=None)
    parser.add_argument(
        "--time-exponent", type=float, default=1.5, help="p in t = t_min + (1 - t_min) u^p"
    )
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", action="store_true", help="start over in --out")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


# Gaussian-mixture references: candidate component counts chosen by validation likelihood
# (digits), or a fixed count that keeps the shipped file small (patches16: 16 full 256x256
# covariances stored in float32 are 4.2 MB).
GMM_SETTINGS = {
    "digits": {"candidates": [5, 10, 20, 40], "regularization": 1e-4, "dtype": "float64"},
    "patches16": {
        "candidates": [16],
        "regularization": 1e-4,
        "dtype": "float32",
        "num_patches": 20000,
    },
}


def fit_reference_gmm(dataset: str, out, *, seed: int = 0) -> dict:
    """Fit and save the Gaussian-mixture reference of a data set; returns a summary dict.

    The number of components is chosen among `GMM_SETTINGS[dataset]["candidates"]` by the
    mean log-likelihood of a 15% validation part of the training split, then the mixture is
    refitted on the whole training split (EM, scikit-learn, full covariances + `reg * I`).
    """
    import time

    import numpy as np

    from ._checkpoints import save_gmm_checkpoint
    from ._data import PATCH_TEST_IMAGES, PATCH_TRAIN_IMAGES, load_digits_images, load_patches16
    from ._gmm import GaussianMixturePrior

    settings = GMM_SETTINGS[dataset]
    t0 = time.perf_counter()
    if dataset == "digits":
        data, _ = load_digits_images(split="train")
        source = "load_digits_images(split='train')"
    else:
        data = load_patches16(split="train", num_patches=settings["num_patches"], seed=seed)
        source = (
            f"load_patches16(split='train', num_patches={settings['num_patches']}, "
            f"seed={seed}) from {list(PATCH_TRAIN_IMAGES)}; held out: {list(PATCH_TEST_IMAGES)}"
        )
    reg = settings["regularization"]
    scores = {}
    candidates = settings["candidates"]
    if len(candidates) > 1:
        order = np.random.default_rng(seed).permutation(data.shape[0])
        n_val = int(0.15 * data.shape[0])
        val, fit = data[order[:n_val]], data[order[n_val:]]
        for k in candidates:
            gmm = GaussianMixturePrior.fit(fit, k, regularization=reg, seed=seed)
            scores[k] = float(np.mean(gmm.log_prob(val.astype(np.float32))))
        best = max(scores, key=scores.get)
    else:
        best = candidates[0]
    gmm = GaussianMixturePrior.fit(data, best, regularization=reg, seed=seed)
    summary = {
        "data": source,
        "num_train": int(data.shape[0]),
        "num_components": int(best),
        "regularization": reg,
        "validation_mean_log_likelihood": {str(k): v for k, v in scores.items()},
        "fit": f"sklearn.mixture.GaussianMixture, full covariances, EM, random_state={seed}",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    save_gmm_checkpoint(
        out,
        gmm,
        training=summary,
        description=f"Gaussian-mixture reference for the {dataset} prior",
        dtype=getattr(np, settings["dtype"]),
    )
    return summary


def run(args) -> int:
    if args.gmm:
        summary = fit_reference_gmm(args.dataset, args.out, seed=args.seed)
        print(f"fitted {args.dataset} GMM reference: {summary}; checkpoint in {args.out}")
        return 0
    if args.steps is None:
        raise ValueError("--steps is required to train a network (or pass --gmm).")
    from ._schedules import VPSchedule
    from ._training import TrainConfig, train
    from .nets import UNet

    preset = PRESETS[args.dataset]
    network = dict(preset["network"])
    if args.channels is not None:
        network["channels"] = args.channels
    train_kwargs = dict(preset["train"])
    if args.batch_size is not None:
        train_kwargs["batch_size"] = args.batch_size
    if args.learning_rate is not None:
        train_kwargs["learning_rate"] = args.learning_rate
    config = TrainConfig(
        steps=args.steps,
        ema_decay=preset["ema_decay"] if args.ema_decay is None else args.ema_decay,
        time_exponent=args.time_exponent,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        **train_kwargs,
    )
    data, event_shape, description = dataset_batches(args.dataset, config.batch_size, args.seed)
    model = UNet(event_shape, key=jr.PRNGKey(args.seed), **network)
    result = train(
        model,
        data,
        schedule=VPSchedule(),
        parametrization="eps",
        config=config,
        out_dir=args.out,
        resume=not args.no_resume,
        progress=not args.no_progress,
        data_description=description,
    )
    tail = result.losses[-100:]
    print(
        f"trained {args.dataset}: steps {result.resumed_from}..{len(result.losses)} in "
        f"{result.seconds:.0f} s, mean loss of the last {len(tail)} steps {tail.mean():.4f}; "
        f"checkpoint in {args.out} (config: {dataclasses.asdict(config)})"
    )
    return 0
