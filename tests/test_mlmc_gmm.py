"""MLMC over reverse diffusion on a 64-D Gaussian-mixture inpainting problem, against the
closed-form posterior (exact diffused posterior score)."""

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_mlmc as nm

D = 64
SIGMA = 0.1


def _problem():
    rng = np.random.default_rng(0)
    k = 3
    means = 0.5 * rng.normal(size=(k, D))
    covs = []
    for _ in range(k):
        u = 0.4 * rng.normal(size=(D, 4))
        covs.append(u @ u.T + 0.05 * np.eye(D))
    prior = nm.GaussianMixturePrior(np.ones(k) / k, means, np.stack(covs))
    mask = np.zeros(D, bool)
    mask[::4] = True  # observe a quarter of the pixels
    a = np.eye(D)[mask]
    truth = np.asarray(prior.sample(jr.key(1)), np.float64)
    y = a @ truth + SIGMA * rng.normal(size=a.shape[0])
    return prior, mask, a, y


@pytest.fixture(scope="module")
def problem():
    prior, mask, a, y = _problem()
    post = prior.posterior(a, y, SIGMA)
    diffusion = nm.ReverseDiffusion(
        model=post.score_model(),
        sampler=nm.Ancestral(),
        x_start_mean=jnp.zeros(D),
        x_start_std=prior.schedule.prior_std(),
        event_shape=(D,),
        t_start=prior.schedule.t_max,
    )
    return prior, mask, y, post, nm.DiffusionLevelSampler(diffusion, refinement=2)


def _errors(result, post):
    em = np.sqrt(np.mean((result.mean["x"] - post.mean) ** 2))
    ev = np.sqrt(np.mean((result.variance["x"] - post.variance) ** 2))
    return em, ev


@pytest.mark.slow
def test_mlmc_matches_the_closed_form_posterior(problem):
    # A correct estimator has E[err^2] <= eps^2 for the RMS error over the 64 pixels; an error
    # above 2 eps then has probability below 1/4 by Markov's inequality and far below that for
    # near-Gaussian errors averaged over pixels. 9 of 10 runs are required.
    _, _, _, post, sampler = problem
    eps = 0.01
    passed = 0
    for i in range(10):
        result = nm.MLMC(sampler).run(jr.key(10 + i), rmse=eps, progress_bar=False)
        em, ev = _errors(result, post)
        passed += int(em <= 2 * eps and ev <= 2 * eps)
        assert result.converged
    assert passed >= 9


@pytest.mark.slow
def test_mlmc_through_diffusion_posterior(problem):
    # nm.MLMC(kernel).run(key, y=..., rmse=...): the kernel's level sampler with exact guidance.
    prior, mask, y, post, _ = problem
    op = nm.operators.Inpaint(mask)

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(op(x), SIGMA).to_event(1), obs=y)

    kernel = nm.DiffusionPosterior(model, guidance="exact")
    eps = 0.02
    result = nm.MLMC(kernel, min_level=5).run(
        jr.key(3), y=jnp.asarray(y), rmse=eps, progress_bar=False
    )
    em, ev = _errors(result, post)
    # single run: error above 3 eps has probability < 1/9 by Chebyshev, far less in practice
    assert em <= 3 * eps and ev <= 3 * eps
    assert result.mean["x"].shape == (D,)
    baseline = nm.MonteCarlo(kernel, num_steps=128).run(
        jr.key(4), y=jnp.asarray(y), rmse=eps, progress_bar=False
    )
    em, ev = _errors(baseline, post)
    assert em <= 3 * eps and ev <= 3 * eps
