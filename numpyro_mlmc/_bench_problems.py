"""The benchmark problems: four imaging inverse problems on two datasets and two priors.

A problem is `(dataset, prior, task)`:

* `dataset`: `"digits"` (scikit-learn 8x8 digits) or `"patches16"` (16x16 natural-image
  patches from scikit-image's bundled images), on the `[-1, 1]` scale; the ground truth is a
  fixed held-out image.
* `prior`: `"network"` (the shipped pretrained UNet, `DiffusionPrior.from_pretrained`) or
  `"gmm"`: a Gaussian mixture fitted to the same training data with each covariance cut to a
  low rank plus `1e-4 I` (sharp and image-like, DESIGN.md "Where MLMC pays"), whose posterior
  under a linear-Gaussian likelihood is known in closed form, so realised errors are exact.
* `task`, the paper's three problems plus deblurring (arXiv 2409.15511, section 5):

  ===========  ==========================================================  ===========
  task         forward map `y = A x + sigma n`                             `sigma`
  ===========  ==========================================================  ===========
  denoise      identity                                                    0.8
  superres     x2 average pooling (`operators.Downsample(2)`)              0.05
  inpaint      a centred box of half the height and width is missing       0.05
  deblur       5x5 Gaussian blur, std 1 pixel, reflecting boundary         0.05
  ===========  ==========================================================  ===========

Each problem is a NumPyro model (`x ~ prior`, `y ~ Normal(A x, sigma)`) handed to
`nm.DiffusionPosterior`, whose `level_sampler` is what MLMC and MC run: guidance `"denoise"`
(the start-time sampler, exact for denoising) for `denoise`; otherwise `"exact"` for the GMM and
`"pigdm"` for the network.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

DATASETS = ("digits", "patches16")
PRIORS = ("gmm", "network")
TASKS = ("denoise", "superres", "inpaint", "deblur")
NOISE = {"denoise": 0.8, "superres": 0.05, "inpaint": 0.05, "deblur": 0.05}
# (sampler, time spacing) per task, chosen by measured level statistics (benchmarks/README.md)
SAMPLING = {
    "denoise": ("ancestral", "uniform"),
    "superres": ("ddim", "polynomial"),
    "inpaint": ("ddim", "polynomial"),
    "deblur": ("ddim", "polynomial"),
}
GMM_FIT = {  # components, covariance rank, training images used
    "digits": dict(num_components=10, rank=8, num_train=None),
    "patches16": dict(num_components=8, rank=16, num_train=2000),
}


def problem_name(dataset: str, prior: str, task: str) -> str:
    return f"{dataset}-{prior}-{task}"


def parse_problem_name(name: str) -> tuple[str, str, str]:
    parts = name.split("-")
    if len(parts) != 3 or parts[0] not in DATASETS or parts[1] not in PRIORS:
        raise ValueError(
            f"unknown problem {name!r}; names are DATASET-PRIOR-TASK with DATASET in "
            f"{DATASETS}, PRIOR in {PRIORS}, TASK in {TASKS}, e.g. 'digits-gmm-denoise'."
        )
    if parts[2] not in TASKS:
        raise ValueError(f"unknown task {parts[2]!r} in {name!r}; choose one of {TASKS}.")
    return tuple(parts)


@functools.cache
def training_images(dataset: str) -> np.ndarray:
    """`(n, H, W)` float64 training images on `[-1, 1]`."""
    from ._data import load_digits_images, load_patches16

    if dataset == "digits":
        return np.asarray(load_digits_images(split="train")[0], np.float64)
    n = GMM_FIT[dataset]["num_train"]
    return np.asarray(load_patches16(split="train", num_patches=n, seed=0), np.float64)


@functools.cache
def ground_truth(dataset: str) -> np.ndarray:
    """A fixed held-out image `(H, W)`: the first test digit, or the most textured of the
    first 64 held-out patches (largest pixel standard deviation)."""
    from ._data import load_digits_images, load_patches16

    if dataset == "digits":
        return np.asarray(load_digits_images(split="test")[0][0], np.float64)
    patches = np.asarray(load_patches16(split="test", num_patches=64, seed=0), np.float64)
    return patches[int(np.argmax(patches.std(axis=(1, 2))))]


@functools.cache
def prior_for(dataset: str, prior: str, seed: int = 0):
    """The prior object: the shipped network, or the sharp GMM fitted here (deterministic)."""
    from ._gmm import GaussianMixturePrior
    from ._priors import DiffusionPrior

    if prior == "network":
        return DiffusionPrior.from_pretrained(dataset)
    spec = GMM_FIT[dataset]
    images = training_images(dataset)
    return GaussianMixturePrior.fit(
        images,
        spec["num_components"],
        rank=spec["rank"],
        regularization=1e-4,
        seed=seed,
    )


def forward_operator(task: str, image_shape: tuple[int, int]):
    """The forward map `A` of a task as an `nm.operators` object."""
    from . import operators

    h, w = image_shape
    if task == "denoise":
        return operators.Identity()
    if task == "superres":
        return operators.Downsample(2)
    if task == "inpaint":
        mask = np.ones(image_shape, bool)
        mask[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = False
        return operators.Inpaint(mask)
    if task == "deblur":
        r = np.arange(-2, 3)
        k = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2))
        return operators.Blur(k / k.sum(), boundary="reflect")
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}.")


@dataclass
class Problem:
    """One benchmark problem, built: the model, its observation and the MLMC level sampler.

    Attributes:
        name: `dataset-prior-task`.
        truth: `(H, W)` ground-truth image.
        observation: `y`, the operator's output shape.
        kernel: the `nm.DiffusionPosterior` (its `.guidance` says which guidance ran).
        level_sampler: what `nm.MLMC` / `nm.MonteCarlo` sample.
        exact: for GMM priors, `{"mean", "second_moment", "variance"}` of the closed-form
            posterior as `(H, W)` arrays; `None` for network priors.
    """

    name: str
    dataset: str
    prior: str
    task: str
    noise_std: float
    truth: np.ndarray
    observation: np.ndarray
    kernel: object
    level_sampler: object
    exact: dict | None


def build_problem(
    name: str, *, seed: int = 0, sampler=None, spacing=None, exponent: float = 2.0
) -> Problem:
    """Build problem `name` (`dataset-prior-task`); the observation noise is drawn from
    `numpy.random.default_rng(seed)`, so a seed gives the same `y` everywhere. `sampler` and
    `spacing` default to the task's entry in `SAMPLING`."""
    import numpyro
    import numpyro.distributions as dist

    from ._kernel import DiffusionPosterior

    dataset, prior_kind, task = parse_problem_name(name)
    prior = prior_for(dataset, prior_kind, seed)
    truth = ground_truth(dataset)
    shape = truth.shape
    op = forward_operator(task, shape)
    sigma = NOISE[task]
    clean = np.asarray(op(jnp.asarray(truth, jnp.float32)), np.float64)
    rng = np.random.default_rng([seed, TASKS.index(task), DATASETS.index(dataset)])
    y = (clean + sigma * rng.normal(size=clean.shape)).astype(np.float32)
    event_ndim = y.ndim

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(op(x), sigma).to_event(event_ndim), obs=y)

    if task == "denoise":
        guidance = "denoise"
    else:
        guidance = "exact" if prior_kind == "gmm" else "pigdm"
    default_sampler, default_spacing = SAMPLING[task]
    kernel = DiffusionPosterior(
        model,
        guidance=guidance,
        sampler=default_sampler if sampler is None else sampler,
        spacing=default_spacing if spacing is None else spacing,
        exponent=exponent,
    )
    sampler = kernel.level_sampler((), {"y": jnp.asarray(y)})
    exact = None
    if prior_kind == "gmm":
        lin = kernel.structure.linear_gaussian
        post = prior.posterior(lin.matrix, lin.observation, lin.noise_std, lin.offset)
        exact = {
            "mean": np.asarray(post.mean, np.float64).reshape(shape),
            "second_moment": np.asarray(post.second_moment, np.float64).reshape(shape),
            "variance": np.asarray(post.variance, np.float64).reshape(shape),
        }
    return Problem(
        name=name,
        dataset=dataset,
        prior=prior_kind,
        task=task,
        noise_std=sigma,
        truth=truth,
        observation=y,
        kernel=kernel,
        level_sampler=sampler,
        exact=exact,
    )
