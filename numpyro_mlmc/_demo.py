"""`numpyro-mlmc demo`: the README's main job, on shipped defaults with no downloads."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax.random as jr
import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="demo-output", help="folder for the PNG (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=2000, help="posterior draws")
    parser.add_argument("--num-steps", type=int, default=256, help="reverse steps per draw")


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._data import load_digits_images
    from ._diffusion import ReverseDiffusion
    from ._gmm import GaussianMixturePrior
    from ._solvers import Ancestral

    if args.num_samples < 2 or args.num_steps < 1:
        raise ValueError("--num-samples must be >= 2 and --num-steps >= 1.")
    out = Path(args.out)
    images, _ = load_digits_images(split="train")
    test, _ = load_digits_images(split="test")
    print("Fitting a 10-component Gaussian mixture to the scikit-learn digits ...")
    prior = GaussianMixturePrior.fit(images, 10, rank=8, regularization=1e-3, seed=args.seed)
    truth = test[0].reshape(-1)
    rng = np.random.default_rng(args.seed)
    mask = np.zeros(64, bool)
    mask[:32] = True  # observe the top half
    noise = 0.05
    a = np.eye(64)[mask]
    y = a @ truth + noise * rng.normal(size=a.shape[0])
    posterior = prior.posterior(a, y, noise)

    diffusion = ReverseDiffusion(
        model=posterior.score_model(),
        sampler=Ancestral(),
        x_start_mean=np.zeros(64, np.float32),
        x_start_std=prior.schedule.prior_std(),
        event_shape=(64,),
        t_start=prior.schedule.t_max,
    )
    keys = jr.split(jr.key(args.seed), args.num_samples)
    start = time.perf_counter()
    draws = np.asarray(diffusion.sample(keys, args.num_steps), np.float64)
    wall = time.perf_counter() - start
    mean, var = draws.mean(0), draws.var(0, ddof=1)
    err_mean = np.sqrt(np.mean((mean - posterior.mean.reshape(-1)) ** 2))
    err_var = np.sqrt(np.mean((var - posterior.variance.reshape(-1)) ** 2))
    nfe = args.num_samples * diffusion.nfe(args.num_steps)
    print(
        f"{args.num_samples} posterior draws x {args.num_steps} ancestral steps: "
        f"{nfe:,} NFEs in {wall:.1f} s"
    )
    print(f"RMSE against the closed-form posterior: mean {err_mean:.4f}, variance {err_var:.4f}")

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
    shown = np.full(64, np.nan)
    shown[mask] = y
    panels = [
        (truth, "truth"),
        (shown, "observed (top half)"),
        (mean, "posterior mean"),
        (np.sqrt(var), "posterior std"),
    ]
    for ax, (img, title) in zip(axes, panels, strict=True):
        ax.imshow(img.reshape(8, 8), cmap="gray" if title != "posterior std" else "magma")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    path = out / "demo.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return 0
