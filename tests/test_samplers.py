"""Reverse samplers: exact laws, weak orders, the coupling, compilation counts."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import (
    assert_ks_projections,
    assert_moments_match,
    gaussian,
    gmm_2d,
    gmm_64d,
)
from scipy import stats

import numpyro_mlmc as nm

STOCHASTIC = [nm.Ancestral(), nm.EulerMaruyama(), nm.DDIM(eta=0.5)]
ALL = [*STOCHASTIC, nm.DDIM(), nm.Heun()]
EXPECTED_ORDER = {"Ancestral": 1, "EulerMaruyama": 1, "DDIM": 1, "Heun": 2}


def _name(s):
    return f"{type(s).__name__}{getattr(s, 'eta', '')}"


# ----- exact laws ---------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", STOCHASTIC, ids=_name)
def test_2d_gmm_law(sampler):
    """Enough steps: KS on projections, mean and variance within the Bonferroni band."""
    prior = gmm_2d()
    keys = jr.split(jr.key(11), 20_000)
    x = prior.reverse_diffusion(sampler).sample(keys, 1024)
    assert_moments_match(x, prior.mean, prior.variance, what=_name(sampler))
    assert_ks_projections(x, prior, what=_name(sampler))
    # The cross-covariance too: compare the full covariance matrix.
    cov = np.cov(np.asarray(x, np.float64).T)
    np.testing.assert_allclose(cov, prior.covariance_matrix, atol=0.025)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sampler, num_steps",
    [(nm.Ancestral(), 512), (nm.EulerMaruyama(), 256), (nm.DDIM(eta=0.5), 256)],
    ids=lambda v: _name(v) if not isinstance(v, int) else str(v),
)
def test_64d_gmm_law(sampler, num_steps):
    prior = gmm_64d()
    keys = jr.split(jr.key(12), 2000)
    x = prior.reverse_diffusion(sampler).sample(keys, num_steps)
    assert x.shape == (2000, 8, 8)
    assert_moments_match(x, prior.mean, prior.variance, what=_name(sampler))
    assert_ks_projections(x, prior, what=_name(sampler))


def test_gmm_exact_sampling():
    prior = gmm_64d()
    x = prior.sample(jr.key(0), (4000,))
    assert x.shape == (4000, 8, 8)
    assert_moments_match(x, prior.mean, prior.variance, what="exact")
    assert_ks_projections(x, prior, what="exact")


# ----- weak order -----------------------------------------------------------------------------


def _propagate_gaussian(sampler, prior, num_steps):
    """Exact mean and covariance of the sampler's output for a Gaussian prior: every step is
    affine in (x, z), so moments propagate without Monte Carlo error. Starts from the exact
    marginal at t_max, isolating the discretisation error."""
    model = prior.score_model()
    times = jnp.asarray(nm.time_grid(num_steps, t_start=prior.schedule.t_max))
    d = prior.dimension
    zero = jnp.zeros(d)

    def body(carry, k):
        m, c = carry
        step = lambda x, z: sampler.step(model, x, times[k], times[k + 1], z)
        a = jax.jacfwd(step, 0)(zero, zero)
        b = jax.jacfwd(step, 1)(zero, zero)
        return (a @ m + step(zero, zero), a @ c @ a.T + b @ b.T), None

    m0, c0 = prior.diffused_moments(prior.schedule.t_max)
    (m, c), _ = jax.lax.scan(body, (jnp.asarray(m0), jnp.asarray(c0)), jnp.arange(num_steps))
    return np.asarray(m), np.asarray(c)


@pytest.mark.parametrize("sampler", ALL, ids=_name)
def test_weak_order_exact_moments(sampler):
    """Error of E|x|^2 against the exact Gaussian answer; slope of log error against log N
    over N = 128..1024 equals the sampler's order within 0.15 (no sampling noise here)."""
    with jax.enable_x64(True):
        prior = gaussian(3)
        exact = prior.second_moment.sum()
        steps = np.array([128, 256, 512, 1024])
        errors = []
        for n in steps:
            m, c = _propagate_gaussian(sampler, prior, int(n))
            errors.append(abs(np.trace(c) + m @ m - exact))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    expected = EXPECTED_ORDER[type(sampler).__name__]
    assert abs(slope - expected) < 0.15, (slope, errors)


@pytest.mark.slow
def test_weak_order_on_a_mixture_by_monte_carlo():
    """On the (non-Gaussian) 2-D mixture, the ancestral sampler's second-moment error decays
    at order ~1 (fitted over N = 16..128, where the bias is >= 17 standard errors)."""
    prior = gmm_2d()
    exact = prior.second_moment.sum()
    keys = jr.split(jr.key(5), 100_000)
    diffusion = prior.reverse_diffusion("ancestral")
    steps = np.array([16, 32, 64, 128])
    errors, ses = [], []
    for n in steps:
        x = np.asarray(diffusion.sample(keys, int(n)), np.float64)
        q = (x**2).sum(1)
        errors.append(abs(q.mean() - exact))
        ses.append(q.std() / np.sqrt(q.size))
    assert min(e / s for e, s in zip(errors, ses, strict=True)) > 15
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert 0.75 < slope < 1.25, (slope, errors)


# ----- coupling -------------------------------------------------------------------------------


@pytest.mark.parametrize("refinement", [2, 3, 4])
@pytest.mark.parametrize("schedule", [nm.VPSchedule(), nm.CosineVPSchedule(), nm.VESchedule()])
def test_reweighted_increments_have_the_coarse_variance(refinement, schedule):
    """The coarse noise built from the fine noises has exactly the coarse step's variance."""
    prior = gaussian(2, schedule=schedule)
    model = prior.score_model()
    sampler = nm.Ancestral()
    fine = nm.time_grid(8 * refinement, t_start=schedule.t_max)
    for j in range(8):
        taus = fine[j * refinement : (j + 1) * refinement + 1]
        var = 0.0
        for i in range(refinement):
            c, std = sampler.noise_coefficients(model, taus[i], taus[i + 1])
            var = float(c) ** 2 * var + float(std) ** 2
        _, coarse_std = sampler.noise_coefficients(model, taus[0], taus[-1])
        np.testing.assert_allclose(var, float(coarse_std) ** 2, rtol=2e-4, atol=1e-9)


@pytest.mark.parametrize("sampler", ALL, ids=_name)
def test_fine_path_equals_single_path(sampler):
    prior = gmm_2d()
    diffusion = prior.reverse_diffusion(sampler)
    keys = jr.split(jr.key(3), 64)
    fine, coarse = diffusion.sample_coupled(keys, 16, 2)
    single = diffusion.sample(keys, 16)
    np.testing.assert_allclose(np.asarray(fine), np.asarray(single), rtol=1e-5, atol=1e-5)
    coarse_single = diffusion.sample(keys, 8)
    if not sampler.stochastic:  # deterministic: the coarse path is the coarse run itself
        np.testing.assert_allclose(np.asarray(coarse), np.asarray(coarse_single), atol=1e-5)


@pytest.mark.parametrize("sampler", STOCHASTIC, ids=_name)
@pytest.mark.parametrize("refinement", [2, 4])
def test_coarse_path_has_the_independent_coarse_law(sampler, refinement):
    """Two-sample KS tests and moments: coupled coarse paths vs independent coarse runs."""
    prior = gmm_2d()
    diffusion = prior.reverse_diffusion(sampler)
    n = 20_000
    _, coarse = diffusion.sample_coupled(jr.split(jr.key(1), n), 8 * refinement, refinement)
    independent = diffusion.sample(jr.split(jr.key(2), n), 8)
    coarse, independent = np.asarray(coarse, np.float64), np.asarray(independent, np.float64)
    for u in (np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.6, -0.8])):
        assert stats.ks_2samp(coarse @ u, independent @ u).pvalue > 1e-4
    # Means: difference of two independent sample means, 4.5 SE (Bonferroni over 2 elements).
    se = np.sqrt(coarse.var(0) / n + independent.var(0) / n)
    assert np.all(np.abs(coarse.mean(0) - independent.mean(0)) < 4.5 * se)
    # Coupling works: the pair is far closer than two independent draws.
    fine, coarse = diffusion.sample_coupled(jr.split(jr.key(1), 4000), 8 * refinement, refinement)
    assert np.var(np.asarray(fine - coarse)) < 0.2 * 2 * np.var(np.asarray(fine))


def test_level_variance_decays_on_a_64d_mixture():
    """Ancestral coupling on the 64-D mixture, reverse diffusion started from a noisy image
    (the start-time denoising sampler, sigma = 0.8, as MLMC runs it): V[P_l - P_{l-1}] falls
    with fitted beta >= 1 over levels 3..7 while V[P_l] stays flat (changes < 2x while V_l
    falls > 10x).

    Measured (2000 pairs): V_l ratios 2.1, 2.3, 2.4, 2.5 between levels 3..7 (beta 1.23);
    V[P_l] grows 1.56x as the coarse levels' variance collapse fades. Started from pure noise
    at t = 1 with well-separated modes, coupled paths can end in different modes with a
    probability that decays like h^0.7, and beta over levels 3..7 is ~0.75 (recorded in the
    benchmarks, not asserted here)."""
    prior = gmm_64d()
    sched = prior.schedule
    sigma = 0.8
    t_star = sched.time_at_noise_ratio(sigma)
    y = prior.sample(jr.key(0)) + sigma * jr.normal(jr.key(1), (8, 8))
    diffusion = nm.ReverseDiffusion(
        model=prior.score_model(),
        sampler=nm.Ancestral(),
        x_start_mean=sched.alpha(t_star) * y,
        x_start_std=0.0,
        event_shape=(8, 8),
        t_start=t_star,
    )
    sampler = nm.DiffusionLevelSampler(diffusion, refinement=2)
    n = 2000
    keys = jr.split(jr.key(21), n)
    levels = np.arange(3, 8)
    v_diff, v_fine = [], []
    for level in levels:
        fine, coarse = sampler.sample(keys, int(level), coupled=True)
        f = np.asarray(fine["x"], np.float64).reshape(n, -1)
        c = np.asarray(coarse["x"], np.float64).reshape(n, -1)
        v_diff.append((f - c).var(0, ddof=1).mean())
        v_fine.append(f.var(0, ddof=1).mean())
    beta = -np.polyfit(levels, np.log2(v_diff), 1)[0]
    assert beta >= 1.0, (beta, v_diff)
    assert v_diff[0] / v_diff[-1] > 10, v_diff
    assert max(v_fine) / min(v_fine) < 2.0, v_fine
    assert sampler.cost(5, coupled=True) == 32 + 16
    assert sampler.cost(5, coupled=False) == 32


# ----- compilation, parametrisations, priors in models ---------------------------------------


def test_no_recompilation_across_batches_of_one_shape():
    traces = []

    class CountingNet(eqx.Module):
        weight: jax.Array

        def __call__(self, x, t):
            traces.append(1)
            return self.weight * x * t

    prior = nm.DiffusionPrior(CountingNet(jnp.ones(())), event_shape=(4,), num_steps=8)
    # New weights of the same shape are traced, not baked in (built before counting: the
    # constructor's shape check traces the network once).
    other = nm.DiffusionPrior(CountingNet(0.5 * jnp.ones(())), event_shape=(4,))
    other = other.reverse_diffusion()
    diffusion = prior.reverse_diffusion()
    for seed in range(3):
        diffusion.sample(jr.split(jr.key(seed), 16), 8)
    first = len(traces)
    for seed in range(3, 6):
        diffusion.sample(jr.split(jr.key(seed), 16), 8)
        other.sample(jr.split(jr.key(seed), 16), 8)
        diffusion.sample(jr.split(jr.key(seed), 16), 32)  # other levels share the compilation
    assert len(traces) == first
    diffusion.sample(jr.split(jr.key(9), 32), 8)  # a new batch shape compiles once
    assert len(traces) > first


@pytest.mark.parametrize("parametrization", ["eps", "x0", "score", "v"])
def test_parametrizations_agree(parametrization):
    """Wrap the exact GMM denoiser in each parametrisation: same score and denoiser."""
    prior = gmm_2d()
    exact = prior.score_model()
    sched = prior.schedule

    def net(x, t):
        x0 = exact.denoise(x, t)
        a, s = sched.alpha(t), sched.sigma(t)
        eps = (x - a * x0) / s
        return {"x0": x0, "eps": eps, "score": -eps / s, "v": a * eps - s * x0}[parametrization]

    wrapped = nm.DiffusionPrior(net, event_shape=(2,), parametrization=parametrization)
    model = wrapped.score_model()
    x = jr.normal(jr.key(0), (2,))
    for t in (0.05, 0.3, 0.8):
        np.testing.assert_allclose(model.score(x, t), exact.score(x, t), rtol=2e-3, atol=1e-4)
        np.testing.assert_allclose(model.denoise(x, t), exact.denoise(x, t), rtol=2e-3, atol=1e-4)


def test_prior_in_a_numpyro_model():
    import numpyro
    import numpyro.distributions as dist
    from numpyro import handlers
    from numpyro.infer import Predictive

    prior = gmm_2d(num_steps=32)
    net_prior = nm.DiffusionPrior(
        lambda x, t: prior.score_model().denoise(x, t),
        event_shape=(2,),
        parametrization="x0",
        num_steps=16,
    )
    for p in (prior, net_prior):

        def model(p=p):
            x = numpyro.sample("x", p)
            numpyro.sample("y", dist.Normal(x.sum(), 1.0))

        trace = handlers.trace(handlers.seed(model, 0)).get_trace()
        assert trace["x"]["value"].shape == (2,)
        draws = Predictive(model, num_samples=5)(jr.key(1))
        assert draws["x"].shape == (5, 2) and draws["y"].shape == (5,)
    assert net_prior.sample(jr.key(0), (3, 2)).shape == (3, 2, 2)
    with pytest.raises(NotImplementedError, match="DiffusionPosterior"):
        net_prior.log_prob(jnp.zeros(2))


def test_gmm_log_prob_and_score_are_exact():
    prior = gmm_2d()
    x = np.array([[0.3, -0.2], [1.5, 0.7]])
    expected = np.log(
        sum(
            w * stats.multivariate_normal(m, c).pdf(x)
            for w, m, c in zip(prior.weights, prior.means, prior.covariances, strict=True)
        )
    )
    np.testing.assert_allclose(np.asarray(prior.log_prob(jnp.asarray(x))), expected, rtol=1e-5)
    model = prior.score_model()
    for t in (0.0, 0.1, 0.7):
        g = jax.grad(lambda z: model.log_density(z, t))(jnp.asarray(x[0]))
        np.testing.assert_allclose(model.score(jnp.asarray(x[0]), t), g, rtol=1e-4, atol=1e-5)


def _full_score_model(prior):
    """The mixture's score with every component and the full `(K, D, D)` eigenbasis."""
    return nm.GaussianMixtureScoreModel(
        log_weights=jnp.log(jnp.asarray(prior.weights, jnp.float32)),
        means=jnp.asarray(prior.means, jnp.float32),
        eigenvectors=jnp.asarray(prior._eigenvectors, jnp.float32),
        eigenvalues=jnp.asarray(prior._eigenvalues, jnp.float32),
        schedule=prior.schedule,
        event_shape=prior.event_shape,
    )


def test_gmm_low_rank_score_equals_the_full_form():
    """`gmm_64d` covariances are rank 8 + 0.05 I: the score model keeps 8 eigenpairs and the
    floor, and its log density and score equal the full-eigenbasis form at every time."""
    prior = gmm_64d()
    low, full = prior.score_model(), _full_score_model(prior)
    assert low.eigenvectors.shape == (5, 64, 8)
    np.testing.assert_allclose(low.isotropic, 0.05, rtol=1e-6)
    x = prior.sample(jr.key(0), (3,))
    for t in (0.01, 0.2, 0.9):
        for xi in x:
            np.testing.assert_allclose(low.score(xi, t), full.score(xi, t), rtol=2e-4, atol=2e-4)
            np.testing.assert_allclose(
                low.log_density(xi, t), full.log_density(xi, t), rtol=1e-5, atol=1e-4
            )
    # a full-rank covariance keeps the full form
    assert gaussian(3).score_model().isotropic is None


def test_gmm_score_model_drops_only_negligible_components():
    """A posterior that leaves one component at weight ~1e-30 scores without it (same score
    near the heavy modes); `log_prob` keeps every component."""
    prior = gmm_64d()
    heavy = prior.weights.copy()
    heavy[0] = 1e-30
    sharp = nm.GaussianMixturePrior(heavy, prior.means, prior.covariances, event_shape=(8, 8))
    model = sharp.score_model()
    assert model.means.shape[0] == 4
    assert sharp.score_model(negligible_weight=0.0).means.shape[0] == 5
    x = prior.sample(jr.key(1), (4,))
    full = _full_score_model(sharp)
    for xi in x:
        np.testing.assert_allclose(model.score(xi, 0.3), full.score(xi, 0.3), rtol=2e-4, atol=2e-4)
    near_dropped = jnp.asarray(prior.means[0].reshape(8, 8), jnp.float32)
    assert np.isfinite(float(sharp.log_prob(near_dropped)))
    np.testing.assert_allclose(
        sharp.log_prob(near_dropped), full.log_density(near_dropped, 0.0), rtol=1e-5
    )


def test_gmm_posterior_single_gaussian_closed_form():
    prior = gaussian(3)
    a = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
    y = np.array([0.5, -0.3])
    post = prior.posterior(a, y, 0.2)
    cov = prior.covariances[0]
    s = a @ cov @ a.T + 0.04 * np.eye(2)
    gain = cov @ a.T @ np.linalg.inv(s)
    np.testing.assert_allclose(
        post.mean.reshape(-1), prior.means[0] + gain @ (y - a @ prior.means[0])
    )
    np.testing.assert_allclose(post.covariance_matrix, cov - gain @ a @ cov, atol=1e-10)


def test_gmm_fit_recovers_a_mixture():
    prior = gmm_2d()
    data = prior.sample(jr.key(0), (3000,))
    fit = nm.GaussianMixturePrior.fit(np.asarray(data), 3, seed=0)
    np.testing.assert_allclose(np.sort(fit.weights), np.sort(prior.weights), atol=0.05)
    np.testing.assert_allclose(fit.mean, prior.mean, atol=0.05)
    low = nm.GaussianMixturePrior.fit(np.asarray(data), 3, rank=1, regularization=1e-3)
    assert np.linalg.matrix_rank(low.covariances[0] - 1e-3 * np.eye(2), tol=1e-8) == 1


# ----- bad input -----------------------------------------------------------------------------


def test_bad_input_errors():
    ident = lambda x, t: x
    with pytest.raises(ValueError, match="parametrization"):
        nm.DiffusionPrior(ident, event_shape=(2,), parametrization="noise")
    with pytest.raises(ValueError, match="event_shape"):
        nm.DiffusionPrior(lambda x, t: x[:1], event_shape=(2,))
    with pytest.raises(TypeError, match="callable"):
        nm.DiffusionPrior(3.0, event_shape=(2,))
    with pytest.raises(ValueError, match="positive definite"):
        nm.GaussianMixturePrior(np.ones(1), np.zeros((1, 2)), np.diag([1.0, -1.0])[None])
    with pytest.raises(ValueError, match="symmetric"):
        nm.GaussianMixturePrior(np.ones(1), np.zeros((1, 2)), np.array([[[1.0, 0.5], [0.0, 1.0]]]))
    with pytest.raises(ValueError, match="num_steps"):
        nm.DiffusionPrior(ident, event_shape=(2,), num_steps=0)
    diffusion = gmm_2d().reverse_diffusion()
    with pytest.raises(ValueError, match="refinement"):
        diffusion.sample_coupled(jr.split(jr.key(0), 2), 4, 1)
    with pytest.raises(ValueError, match="num_steps"):
        diffusion.sample(jr.split(jr.key(0), 2), -3)
    with pytest.raises(ValueError, match="refinement"):
        nm.DiffusionLevelSampler(diffusion, refinement=1)
    with pytest.raises(ValueError, match="sampler"):
        gmm_2d(sampler="rk4")
    with pytest.raises(ValueError, match="parametrization='v'"):
        nm.DiffusionPrior(
            ident, event_shape=(2,), parametrization="v", schedule=nm.VESchedule()
        ).score_model()


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_host_and_device_step_loops_agree(sampler):
    """`loop="host"` (a Python loop over compiled steps, the CPU default for networks) and
    `loop="device"` (one `fori_loop` program) take the same steps with the same noise."""
    from numpyro_mlmc._diffusion import resolve_loop

    net = nm.nets.MLPScoreNet((6,), width=32, num_layers=2, key=jr.key(3))
    prior = nm.DiffusionPrior(net, event_shape=(6,))
    base = nm.ReverseDiffusion(
        model=prior.score_model(),
        sampler=nm._solvers.get_sampler(sampler),
        x_start_mean=jnp.zeros(6),
        x_start_std=1.0,
        event_shape=(6,),
        t_start=1.0,
    )
    assert resolve_loop("auto", base.model) == "host"  # tests run on the CPU backend
    gmm = gmm_2d()
    assert resolve_loop("auto", gmm.score_model()) == "device"
    device = nm.ReverseDiffusion(**{**_fields(base), "loop": "device"})
    host = nm.ReverseDiffusion(**{**_fields(base), "loop": "host"})
    keys = jr.split(jr.key(0), 5)
    np.testing.assert_allclose(host.sample(keys, 12), device.sample(keys, 12), atol=2e-5)
    pairs = zip(host.sample_coupled(keys, 12, 2), device.sample_coupled(keys, 12, 2), strict=True)
    for a, b in pairs:
        np.testing.assert_allclose(a, b, atol=2e-5)
    # the fine path of a coupled pair is the uncoupled path of the same key
    np.testing.assert_allclose(
        host.sample_coupled(keys, 12, 2)[0], host.sample(keys, 12), atol=2e-5
    )
    with pytest.raises(ValueError, match="loop must be one of"):
        nm.ReverseDiffusion(**{**_fields(base), "loop": "gpu"})


def _fields(diffusion):
    import dataclasses

    return {f.name: getattr(diffusion, f.name) for f in dataclasses.fields(diffusion)}
