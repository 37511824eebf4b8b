"""Shared test problems (Gaussian mixtures with exact answers) and statistical checks."""

from __future__ import annotations

import numpy as np
from scipy import stats

import numpyro_mlmc as nm

FAMILY_ALPHA = 1e-3  # false-alarm rate of one moment check (all its elements together)
KS_ALPHA = 1e-4  # per KS test; fewer than 200 KS tests in the suite -> < 2% false alarms


def gmm_2d(**kwargs) -> nm.GaussianMixturePrior:
    means = np.array([[-1.0, 0.5], [1.0, 1.0], [0.5, -1.0]])
    covs = np.stack(
        [np.array([[0.2, 0.05], [0.05, 0.1]]), np.diag([0.1, 0.3]), np.diag([0.15, 0.15])]
    )
    return nm.GaussianMixturePrior(np.array([0.3, 0.4, 0.3]), means, covs, **kwargs)


def gmm_64d(
    *, rank: int = 8, floor: float = 0.05, separation: float = 0.8, seed: int = 0, **kwargs
):
    """A 64-D, 5-component mixture on 8x8 images; covariance = rank-r part + floor * I; means
    `separation * N(0, I)` (0.8: well-separated modes; 0.25: overlapping components)."""
    rng = np.random.default_rng(seed)
    k, d = 5, 64
    means = separation * rng.normal(size=(k, d))
    covs = []
    for _ in range(k):
        b = rng.normal(size=(d, rank)) / np.sqrt(rank)
        covs.append(0.3 * b @ b.T + floor * np.eye(d))
    weights = rng.uniform(0.5, 1.5, size=k)
    return nm.GaussianMixturePrior(weights, means, np.stack(covs), event_shape=(8, 8), **kwargs)


def gaussian(d: int = 3, seed: int = 1, **kwargs) -> nm.GaussianMixturePrior:
    """A single Gaussian (a one-component mixture)."""
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(d, d))
    cov = 0.3 * b @ b.T / d + 0.2 * np.eye(d)
    return nm.GaussianMixturePrior(np.ones(1), rng.normal(size=(1, d)), cov[None], **kwargs)


def bonferroni_k(num_tests: int, alpha: float = FAMILY_ALPHA) -> float:
    """Two-sided z threshold so that `num_tests` Gaussian checks together fail by chance with
    probability at most `alpha`."""
    return float(stats.norm.isf(alpha / (2 * num_tests)))


def assert_moments_match(samples, mean, variance, k=None, what=""):
    """Sample mean and variance of `samples (n, ...)` within `k` standard errors of the exact
    `mean` and `variance` (elementwise; the variance SE uses the sample fourth moment). By
    default `k` is Bonferroni-corrected over the 2 D checks so one call fails by chance with
    probability <= 1e-3 (4.47 SE for D = 64, 3.66 for D = 2)."""
    x = np.asarray(samples, np.float64).reshape(samples.shape[0], -1)
    if k is None:
        k = bonferroni_k(2 * x.shape[1])
    n = x.shape[0]
    mean = np.asarray(mean, np.float64).reshape(-1)
    variance = np.asarray(variance, np.float64).reshape(-1)
    m = x.mean(0)
    se_mean = np.sqrt(variance / n)
    z_mean = np.abs(m - mean) / se_mean
    assert z_mean.max() < k, f"{what} mean off by {z_mean.max():.2f} SE"
    centred = x - m
    v = (centred**2).sum(0) / (n - 1)
    m4 = (centred**4).mean(0)
    se_var = np.sqrt(np.maximum(m4 - v**2, 1e-300) / n)
    z_var = np.abs(v - variance) / se_var
    assert z_var.max() < k, f"{what} variance off by {z_var.max():.2f} SE"


def projection_cdf(gmm: nm.GaussianMixturePrior, u):
    """Exact CDF of `u^T x` for `x ~ gmm` (flattened)."""
    locs = gmm.means @ u
    scales = np.sqrt(np.einsum("i,kij,j->k", u, gmm.covariances, u))
    w = gmm.weights
    return lambda z: np.sum(
        w[None, :] * stats.norm.cdf((np.asarray(z)[:, None] - locs) / scales), axis=1
    )


def assert_ks_projections(samples, gmm, num_projections=3, seed=0, what=""):
    x = np.asarray(samples, np.float64).reshape(samples.shape[0], -1)
    rng = np.random.default_rng(seed)
    for _ in range(num_projections):
        u = rng.normal(size=x.shape[1])
        u /= np.linalg.norm(u)
        res = stats.kstest(x @ u, projection_cdf(gmm, u))
        assert res.pvalue > KS_ALPHA, f"{what} KS p-value {res.pvalue:.2e}"
