"""The MLMC engine on a test SDE with a known expectation (geometric Brownian motion).

Most keys use JAX's "rbg" implementation: on these CPUs it compiles about four times faster than
threefry, and every (level, batch shape) pair compiles once. Tests of batch-size independence
and of the public defaults use threefry keys.
"""

import math
import warnings

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from scipy.stats import norm

import numpyro_mlmc as nm
from numpyro_mlmc.testing import GeometricBrownianMotion

IMPL = "rbg"
GBM = GeometricBrownianMotion(dimension=4, volatility=[0.1, 0.15, 0.2, 0.25], scheme="milstein")


def key(seed):
    return jr.key(seed, impl=IMPL)


def rms(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def realised_errors(result, sde):
    return np.array(
        [
            rms(result.mean["x"], sde.exact_mean),
            rms(result.estimates["x_second_moment"], sde.exact_second_moment),
            rms(result.variance["x"], sde.exact_variance),
        ]
    )


def test_rms_error_over_independent_runs():
    # A correct estimator has E[err^2] <= eps^2 (variance theta eps^2 plus bias^2 <= (1 - theta)
    # eps^2). In the worst case E[err^2] = eps^2 with Gaussian errors, the mean of 20 squared
    # errors exceeds 1.3^2 eps^2 with probability P(chi2_20 > 33.8) = 2.8% (less for errors
    # averaged over 4 elements); with the variance at its budget and a negligible bias, as
    # here, P(chi2_20 > 67.6) < 1e-6. That is the false-alarm rate of this test.
    eps = 0.005
    errors = np.array(
        [
            realised_errors(nm.MLMC(GBM).run(key(100 + i), rmse=eps, progress_bar=False), GBM)
            for i in range(20)
        ]
    )
    rms_errors = np.sqrt(np.mean(errors**2, axis=0))
    assert np.all(rms_errors <= 1.3 * eps), rms_errors


def test_cost_grows_like_eps_minus_two_when_beta_exceeds_gamma():
    # Milstein: beta = 2 > gamma = 1, so cost ~ eps^-2 (Giles 2015, Theorem 1). Costs are
    # averaged over 4 runs per eps; their relative scatter is a few percent, i.e. an error of
    # a few hundredths in the slope, well inside the +-0.3 tolerance.
    eps_values = np.array([0.008, 0.004, 0.002])
    costs = [
        np.mean(
            [nm.MLMC(GBM).run(key(200 + i), rmse=eps, progress_bar=False).cost for i in range(4)]
        )
        for eps in eps_values
    ]
    slope = np.polyfit(np.log(eps_values), np.log(costs), 1)[0]
    assert abs(slope + 2.0) <= 0.3, slope


def test_rates_by_mlmc_test():
    # Euler-Maruyama: weak order 1 (alpha = 1), strong order 1/2 (beta = 1); Milstein beta = 2;
    # gamma = 1 exactly. Fitted over levels 1..5 from 4000 draws per level. The drift r = 1
    # makes the weak error (~ e h / 2) large against the sampling noise of E Y_l (~5e-4).
    euler = GeometricBrownianMotion(dimension=4, rate=1.0, volatility=0.3, scheme="euler")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # kurtosis findings are not the point
        diag_e = nm.mlmc_test(euler, key(1), num_samples=4000, max_level=5)
        diag_m = nm.mlmc_test(GBM, key(2), num_samples=4000, max_level=5, quantity="x_mean")
    assert diag_e.gamma == pytest.approx(1.0, abs=0.05)
    assert diag_e.beta == pytest.approx(1.0, abs=0.25)
    assert diag_e.alpha == pytest.approx(1.0, abs=0.35)
    assert diag_m.beta == pytest.approx(2.0, abs=0.3)
    assert list(diag_e.table.index) == list(range(6))
    assert "alpha" in diag_e.summary()
    diag_e.plot()


def test_batch_size_does_not_change_the_estimate():
    # Needs the default threefry keys: "rbg" bits differ under vmap, so with rbg keys a draw
    # depends on its batch. A fixed allocation keeps the compilations few; the adaptive
    # driver takes its decisions from the same accumulated sums either way.
    counts = [700, 300]
    a = nm.MLMC(GBM, batch_size=64, min_level=0).run(
        jr.key(3), num_samples=counts, progress_bar=False
    )
    b = nm.MLMC(GBM, batch_size=512, min_level=0).run(
        jr.key(3), num_samples=counts, progress_bar=False
    )
    # Same draws; XLA may round float32 arithmetic differently for different batch shapes
    # (a few ulp per draw), hence float32 tolerance rather than bitwise equality.
    for name in a.estimates:
        np.testing.assert_allclose(a.estimates[name], b.estimates[name], rtol=1e-6, atol=1e-7)


def test_look_ahead_does_not_change_the_run(monkeypatch):
    """Batches dispatched ahead of the merge (`_IN_FLIGHT`) give the same adaptive run, bit
    for bit, as merging each batch before starting the next."""
    from numpyro_mlmc import _mlmc

    def run():
        return nm.MLMC(GBM, batch_size=64, pilot_samples=64).run(
            jr.key(5), rmse=0.02, progress_bar=False
        )

    ahead = run()
    monkeypatch.setattr(_mlmc, "_IN_FLIGHT", 1)
    one_at_a_time = run()
    assert ahead.cost == one_at_a_time.cost
    np.testing.assert_array_equal(
        ahead.levels["samples"].to_numpy(), one_at_a_time.levels["samples"].to_numpy()
    )
    for name in ahead.estimates:
        np.testing.assert_array_equal(ahead.estimates[name], one_at_a_time.estimates[name])


def test_default_key_fixed_allocation_and_result_api():
    r = nm.MLMC(GBM, min_level=1).run(jr.key(0), num_samples=[4000, 500, 200], progress_bar=False)
    assert r.levels.index.tolist() == [1, 2, 3]
    assert r.levels["samples"].tolist() == [4000, 500, 200]
    assert r.cost == 4000 * 2 + 500 * 6 + 200 * 12
    assert r.mean["x"].shape == (4,) and r.variance["x"].shape == (4,)
    se = r.stderr["x_mean"]
    # bias of Milstein at 8 steps ~ r^2 h T / 2 ~ 2e-4, far below 4 standard errors
    assert np.all(np.abs(r.mean["x"] - GBM.exact_mean) <= 4 * se + 1e-3)
    assert math.isfinite(r.rmse) and r.rmse > 0
    assert r.gamma == pytest.approx(1.0)
    assert r.mc_cost_estimate > 0
    text = r.summary()
    assert "level table" in text and "x_variance" in text
    assert "r_hat" not in text.lower() and "ess" not in text.lower().split()
    r.plot()
    idata = r.to_inference_data()
    assert idata.posterior["x"].dims[:2] == ("chain", "draw")
    assert idata.posterior["x"].shape == (1, 200, 4)
    assert "x_mean" in idata.mlmc and "level_samples" in idata.mlmc
    assert not any("r_hat" in v or "ess" in v for v in idata.mlmc.data_vars)


def test_user_functional_black_scholes():
    # E max(S_T - K, 0) = s0 e^{rT} N(d1) - K N(d2) (undiscounted Black-Scholes).
    strike, eps = 1.0, 0.004
    r = nm.MLMC(GBM).run(
        key(4),
        rmse=eps,
        functionals={"call": lambda x: jnp.maximum(x - strike, 0.0)},
        progress_bar=False,
    )
    s0, rate, vol, t = GBM.initial, GBM.rate, GBM.volatility, GBM.maturity
    d1 = (np.log(s0 / strike) + (rate + vol**2 / 2) * t) / (vol * np.sqrt(t))
    exact = s0 * np.exp(rate * t) * norm.cdf(d1) - strike * norm.cdf(d1 - vol * np.sqrt(t))
    assert set(r.estimates) == {"call"} and r.mean == {}
    # |err| RMS <= 3 eps: with E err^2 <= eps^2 and Gaussian errors, fails with p < 1e-4
    assert rms(r.estimates["call"], exact) <= 3 * eps


def test_monte_carlo_baseline():
    mc = nm.MonteCarlo(GBM, num_steps=16).run(key(5), rmse=0.01, progress_bar=False)
    assert mc.method == "MonteCarlo" and mc.levels.index.tolist() == [4]
    assert math.isnan(mc.bias_estimate)
    n = int(mc.levels["samples"].iloc[0])
    assert mc.cost == n * 16
    # the variance budget theta eps^2 is met (up to the sampling error of V estimates)
    assert np.mean(mc.stderr["x_second_moment"] ** 2) <= 1.1 * 0.5 * 0.01**2
    assert rms(mc.mean["x"], GBM.exact_mean) <= 3 * 0.01
    with pytest.raises(ValueError, match="power"):
        nm.MonteCarlo(GBM, num_steps=12)
    with pytest.raises(ValueError, match="exactly one"):
        nm.MonteCarlo(GBM, num_steps=16, level=4)


def test_progress_bar_runs():
    r = nm.MLMC(GBM, min_level=0).run(key(6), rmse=0.02, progress_bar=True)
    assert r.cost > 0


class _NaNAtLevel:
    """GBM whose level-`bad` draws number 3 of every batch is NaN."""

    def __init__(self, bad):
        self.bad, self.refinement = bad, 2
        self.cost = GBM.cost

    def sample(self, keys, level, coupled):
        fine, coarse = GBM.sample(keys, level, coupled)
        if level == self.bad:
            fine = {"x": fine["x"].at[3].set(jnp.nan)}
        return fine, coarse


def test_bad_input_errors():
    with pytest.raises(ValueError, match="rmse"):
        nm.MLMC(GBM).run(key(0), rmse=0.0)
    with pytest.raises(ValueError, match="rmse"):
        nm.MLMC(GBM).run(key(0), rmse=-1.0)
    with pytest.raises(ValueError, match="rmse"):
        nm.MLMC(GBM).run(key(0), rmse=float("nan"))
    with pytest.raises(ValueError, match="rmse"):
        nm.MLMC(GBM).run(key(0), rmse=float("inf"))
    with pytest.raises(ValueError, match="exactly one"):
        nm.MLMC(GBM).run(key(0))
    with pytest.raises(ValueError, match="max_level"):
        nm.MLMC(GBM, min_level=4, max_level=2)
    with pytest.raises(TypeError, match="not an array"):
        nm.MLMC(GBM, min_level=0).run(
            key(0), rmse=0.1, functionals={"bad": lambda x: [x, x]}, progress_bar=False
        )
    with pytest.raises(TypeError, match="not an array"):
        nm.MLMC(GBM, min_level=0).run(
            key(0), rmse=0.1, functionals={"bad": lambda x: None}, progress_bar=False
        )
    with pytest.raises(TypeError, match="functionals"):
        nm.MLMC(GBM).run(key(0), rmse=0.1, functionals=[lambda x: x])
    with pytest.raises(TypeError, match="key"):
        nm.MLMC(GBM).run("not a key", rmse=0.1)
    with pytest.raises(ValueError, match="refinement"):
        nm.MLMC(GBM, refinement=3).run(key(0), rmse=0.1)
    with pytest.raises(TypeError, match="level sampler"):
        nm.MLMC(object()).run(key(0), rmse=0.1)


def test_nonfinite_draws_stop_with_level_and_count():
    # the fake sampler spoils row 3 of every call: one call per batch (chunk_size=None) makes
    # that one draw per 128-draw pilot batch; 64-row chunks would make it two
    with pytest.raises(FloatingPointError, match=r"level 2 produced 1 non-finite"):
        nm.MLMC(_NaNAtLevel(2), min_level=0, chunk_size=None).run(
            key(7), rmse=0.01, progress_bar=False
        )
    with pytest.raises(FloatingPointError, match=r"level 2 produced 2 non-finite"):
        nm.MLMC(_NaNAtLevel(2), min_level=0, chunk_size=64).run(
            key(7), rmse=0.01, progress_bar=False
        )
    with pytest.warns(RuntimeWarning, match="discarded"):
        r = nm.MLMC(_NaNAtLevel(2), min_level=0, on_nonfinite="discard").run(
            key(7), rmse=0.01, progress_bar=False
        )
    assert r.discarded[2] >= 1 and r.discarded[0] == 0
    assert all(np.all(np.isfinite(v)) for v in r.estimates.values())


class _BrokenCoupling:
    """GBM whose coarse path is shifted: the telescoping sum is broken."""

    refinement = 2

    def cost(self, level, coupled):
        return GBM.cost(level, coupled)

    def sample(self, keys, level, coupled):
        fine, coarse = GBM.sample(keys, level, coupled)
        if coupled:
            coarse = {"x": coarse["x"] + 0.05}
        return fine, coarse


def test_mlmc_test_warns_on_a_broken_coupling():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diag = nm.mlmc_test(_BrokenCoupling(), key(8), num_samples=2000, max_level=3)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("consistency check fails" in m for m in messages), messages
    assert np.nanmax(diag.table["consistency"].to_numpy()) > 1
    # the healthy sampler passes the same check (familywise false-alarm 1% per level)
    healthy = nm.mlmc_test(
        GeometricBrownianMotion(dimension=4, volatility=0.1, scheme="euler"),
        key(8),
        num_samples=2000,
        max_level=3,
    )
    assert np.nanmax(healthy.table["consistency"].to_numpy()) <= 1
