"""`numpyro-mlmc demo`: the README's main job, on shipped defaults with no downloads.

An inpainting problem on a held-out scikit-learn digit: the bottom rows are hidden and the rest
is observed with noise. The prior is the shipped Gaussian-mixture fit of the digits, whose
posterior is known exactly (so the realised error is printed too), or with `--prior network`
the shipped digits diffusion model. MLMC
estimates the posterior mean and pixelwise variance to a target RMSE; plain Monte Carlo at the
same finest level is run to the same target for comparison. Prints a cost table and writes one
PNG: truth, observation, posterior mean, posterior std, and the four MLMC panels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax.random as jr
import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="demo-output", help="folder for the PNG (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default: %(default)s)")
    parser.add_argument(
        "--rmse", type=float, default=None, help="target RMSE (default: 0.02 network, 0.01 gmm)"
    )
    parser.add_argument(
        "--prior",
        choices=("gmm", "network"),
        default="gmm",
        help="'gmm' (default): the shipped Gaussian-mixture fit of the digits, whose posterior "
        "is known exactly, so the demo also prints its realised error; 'network': the shipped "
        "digits diffusion model (pigdm guidance; slower: a UNet per step)",
    )
    parser.add_argument("--no-mc", action="store_true", help="skip the plain Monte Carlo run")
    parser.add_argument("--progress", action="store_true", help="show progress bars")


def _load_prior(kind: str):
    from ._gmm import GaussianMixturePrior
    from ._pretrained import list_pretrained
    from ._priors import DiffusionPrior

    available = list_pretrained()
    if kind == "network":
        if "digits" not in available:
            raise ValueError("the digits diffusion prior is not shipped; use --prior gmm.")
        return DiffusionPrior.from_pretrained("digits"), "digits diffusion model"
    if "digits-gmm" in available:
        prior = DiffusionPrior.from_pretrained("digits-gmm")
    else:  # pragma: no cover - the GMM is shipped with the package
        from ._data import load_digits_images

        prior = GaussianMixturePrior.fit(load_digits_images(split="train")[0], 10, rank=8)
    return prior, "digits Gaussian mixture (exact posterior)"


def run(args) -> int:
    import jax.numpy as jnp
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpyro
    import numpyro.distributions as dist

    from . import operators
    from ._data import load_digits_images
    from ._kernel import DiffusionPosterior
    from ._mlmc import MLMC, MonteCarlo

    prior, prior_name = _load_prior(args.prior)
    is_gmm = "mixture" in prior_name
    eps = args.rmse if args.rmse is not None else (0.01 if is_gmm else 0.02)
    if not eps > 0:
        raise ValueError(f"--rmse must be positive, got {eps}.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    test, _ = load_digits_images(split="test")
    truth = test[args.seed % test.shape[0]]
    mask = np.ones((8, 8), bool)
    mask[5:, :] = False  # the bottom three rows are hidden
    inpaint = operators.Inpaint(mask)
    noise = 0.05
    rng = np.random.default_rng(args.seed)
    y = jnp.asarray(np.asarray(inpaint(jnp.asarray(truth))) + noise * rng.normal(size=40))

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(inpaint(x), noise).to_event(1), obs=y)

    kernel = DiffusionPosterior(model)
    print(f"Prior: {prior_name}. Inpainting the bottom 3 rows of a held-out digit, noise {noise}.")
    print(f"MLMC to RMSE {eps} for the posterior mean and second moment ...")
    key = jr.key(args.seed)
    result = MLMC(kernel).run(key, y=y, rmse=eps, progress_bar=args.progress)
    print(f"guidance: {kernel.guidance}")
    print(result.summary())
    rows = [("MLMC", result.cost, result.wall_time, result.rmse)]
    if not args.no_mc:
        print(f"Plain Monte Carlo at the same finest level ({result.finest_level}) ...")
        mc = MonteCarlo(kernel, level=result.finest_level).run(
            jr.fold_in(key, 1), y=y, rmse=eps, progress_bar=args.progress
        )
        rows.append(("MC", mc.cost, mc.wall_time, mc.rmse))
    print()
    print(f"{'method':<8}{'NFEs':>14}{'wall (s)':>11}{'est. RMSE':>11}")
    for name, cost, wall, err in rows:
        print(f"{name:<8}{cost:>14,}{wall:>11.1f}{err:>11.4f}")
    if len(rows) == 2:
        print(
            f"MC / MLMC cost ratio: {rows[1][1] / rows[0][1]:.1f}x in NFEs, "
            f"{rows[1][2] / rows[0][2]:.1f}x in wall time"
        )
    else:
        print(f"predicted MC cost at the same level: {result.mc_cost_estimate:,} NFEs")
    if is_gmm:
        from ._gmm import GaussianMixturePrior

        assert isinstance(prior, GaussianMixturePrior)
        post = prior.posterior(np.eye(64)[mask.reshape(-1)], np.asarray(y), noise)
        err_mean = np.sqrt(np.mean((np.asarray(result.mean["x"]) - post.mean) ** 2))
        err_var = np.sqrt(np.mean((np.asarray(result.variance["x"]) - post.variance) ** 2))
        print(
            f"realised error against the exact posterior: mean {err_mean:.4f}, "
            f"variance {err_var:.4f}"
        )

    fig = plt.figure(figsize=(13, 6.5))
    grid = fig.add_gridspec(2, 4)
    shown = np.full(64, np.nan)
    shown[mask.reshape(-1)] = np.asarray(y)
    mean = np.asarray(result.mean["x"])
    std = np.sqrt(np.maximum(np.asarray(result.variance["x"]), 0.0))
    for i, (img, title, cmap) in enumerate(
        [
            (truth, "truth", "gray"),
            (shown.reshape(8, 8), "observed (noisy, bottom hidden)", "gray"),
            (mean, "posterior mean (MLMC)", "gray"),
            (std, "posterior std (MLMC)", "magma"),
        ]
    ):
        ax = fig.add_subplot(grid[0, i])
        im = ax.imshow(
            img, cmap=cmap, vmin=-1 if cmap == "gray" else None, vmax=1 if cmap == "gray" else None
        )
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        if cmap == "magma":
            fig.colorbar(im, ax=ax, fraction=0.046)
    panels = [fig.add_subplot(grid[1, i]) for i in range(4)]
    result.plot(axes=panels)
    fig.tight_layout()
    path = out / "demo.png"
    tmp = out / ".demo.png.tmp"
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    tmp.replace(path)
    print(f"wrote {path}")
    return 0
