"""Shared by the example scripts: command-line flags and the digits prior.

Every example takes `--tiny` (or the environment variable `NUMPYRO_MLMC_TINY=1`) for
test-sized settings that run in seconds, `--out DIR` for its figures, `--seed`, and
`--prior {auto,pretrained,gmm}`:

* `pretrained`: the shipped digits diffusion network, `nm.DiffusionPrior.from_pretrained("digits")`;
* `gmm`: a Gaussian mixture of the same scikit-learn digits, whose diffused score is exact, so
  posteriors under linear-Gaussian observations are known in closed form and estimates can be
  checked: the shipped reference `from_pretrained("digits-gmm")` when this install has it, else
  one fitted here (`nm.GaussianMixturePrior.fit`, 10 components, 3 with `--tiny`);
* `auto` (default): `gmm` for now, so that every example can print its error against the exact
  posterior. `--prior pretrained` runs the same code with the network; check a network prior
  with `nm.mlmc_test` first (with the published vector-Jacobian form of `pigdm` the shipped
  digits network diverged at coarse levels; `DiffusionPosterior` now defaults to the isotropic
  form for network priors, `pigdm_jacobian="auto"`).
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")  # the examples write files; no display needed


def tiny_from_env() -> bool:
    return os.environ.get("NUMPYRO_MLMC_TINY", "") == "1"


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--tiny",
        action="store_true",
        default=tiny_from_env(),
        help="test-sized settings, seconds to run (also: NUMPYRO_MLMC_TINY=1)",
    )
    p.add_argument("--out", default=default_out, help="folder for figures (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (default: %(default)s)")
    p.add_argument(
        "--prior",
        choices=("auto", "pretrained", "gmm"),
        default="auto",
        help="the digits prior (default: %(default)s: pretrained if shipped, else a GMM fit)",
    )
    return p


def digits_prior(choice: str = "auto", *, tiny: bool = False):
    """The digits prior chosen by `--prior` (see the module docstring)."""
    import numpyro_mlmc as nm
    from numpyro_mlmc._data import load_digits_images

    shipped = nm.list_pretrained()
    if choice == "pretrained" and "digits" in shipped:
        return nm.DiffusionPrior.from_pretrained("digits")
    if choice == "pretrained":
        raise SystemExit("this install ships no pretrained 'digits' prior; use --prior gmm.")
    if "digits-gmm" in shipped:
        return nm.DiffusionPrior.from_pretrained("digits-gmm")
    # Rank-8 covariances plus 1e-3 I: sharp components, like an image prior (DESIGN.md).
    images, _ = load_digits_images(split="train")
    return nm.GaussianMixturePrior.fit(images, 3 if tiny else 10, rank=8, regularization=1e-3)


def held_out_digit(index: int = 0):
    """A digit from the held-out split (never seen by the prior), `(8, 8)` on `[-1, 1]`."""
    from numpyro_mlmc._data import load_digits_images

    test, _ = load_digits_images(split="test")
    return test[index]


def show_images(path, panels, *, ncols=None, size=2.3):
    """Save a grid of `(image, title)` panels (`None` leaves a cell empty); titles with "std"
    or "error" get a colour map and a colour bar."""
    import matplotlib.pyplot as plt
    import numpy as np

    ncols = ncols or len(panels)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, panel in zip(axes.ravel(), panels, strict=False):
        if panel is None:
            continue
        image, title = panel
        image = np.asarray(image, np.float64)
        heat = "std" in title or "error" in title
        if heat:
            im = ax.imshow(image, cmap="magma")
        else:  # images on the data scale [-1, 1]; counts and other data on their own
            lo, hi = (
                (-1, 1) if np.nanmin(image) >= -1.5 and np.nanmax(image) <= 1.5 else (None, None)
            )
            gray = plt.get_cmap("gray").copy()
            gray.set_bad("#4c72b0")  # unobserved pixels (NaN) in blue
            im = ax.imshow(image, cmap=gray, vmin=lo, vmax=hi)
        if heat:
            fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
