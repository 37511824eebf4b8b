"""Allocation, rates, the bias test and the streaming accumulators against hand computation."""

import math

import numpy as np
import pytest

from numpyro_mlmc._accumulators import LevelAccumulator, StreamingCovariance, StreamingMoments
from numpyro_mlmc._allocation import (
    QuantityLevels,
    bias_remainder,
    coarse_level_pays,
    corrected_norm,
    decay_start,
    fit_rate,
    floor_decay,
    optimal_samples,
    plan,
)


def test_optimal_samples_by_hand():
    # V = (1, 1/4), C = (1, 3), budget theta eps^2 = 0.5 * 0.01^2 = 5e-5.
    # sum sqrt(V C) = 1 + sqrt(3/4) = 1.8660254; N_0 = 1.8660254 / 5e-5 = 37320.5 -> 37321;
    # N_1 = sqrt(1/12) * 37320.5 = 10773.4 -> 10774.
    n = optimal_samples([1.0, 0.25], [1.0, 3.0], 0.5 * 0.01**2)
    assert n.tolist() == [37321, 10774]
    # the variance constraint holds and is nearly tight
    var = 1.0 / n[0] + 0.25 / n[1]
    assert var <= 5e-5 and var > 0.9999 * 5e-5


def test_optimal_samples_is_optimal():
    # Lagrange optimum: perturbing N along the constraint never lowers the cost.
    v, c = np.array([2.0, 0.3, 0.05]), np.array([1.0, 3.0, 6.0])
    n = optimal_samples(v, c, 1e-4).astype(float)
    cost = float(n @ c)
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = n * np.exp(0.2 * rng.normal(size=3))
        m *= np.sum(v / m) / 1e-4  # rescale onto the constraint sum V/N = budget
        assert m @ c >= cost * (1 - 1e-3)


def test_optimal_samples_rejects_bad_input():
    with pytest.raises(ValueError):
        optimal_samples([1.0], [0.0], 1.0)
    with pytest.raises(ValueError):
        optimal_samples([1.0], [1.0], 0.0)


def test_corrected_norm_by_hand():
    # mean(Ybar^2) = (9 + 16) / 2 = 12.5; mean(Var)/N = 2 / 4 = 0.5 -> sqrt(12)
    assert corrected_norm([3.0, 4.0], [2.0, 2.0], 4) == pytest.approx(math.sqrt(12.0))
    # noise larger than the signal: clipped at zero, never negative
    assert corrected_norm([0.1, -0.1], [4.0, 4.0], 4) == 0.0


def test_corrected_norm_removes_the_noise_bias():
    # E Y = 0 in 100 elements, Var Y = 1, N = 50: the raw norm is about sqrt(1/50) = 0.14,
    # the corrected one is 0 up to the fluctuation of mean(Ybar^2), whose sd is
    # sqrt(2/100)/50 = 2.8e-3 -> corrected norm below sqrt(4 * 2.8e-3) = 0.11 at 4 sigma.
    rng = np.random.default_rng(1)
    y = rng.normal(size=(50, 100))
    raw = math.sqrt(np.mean(y.mean(0) ** 2))
    corrected = corrected_norm(y.mean(0), y.var(0, ddof=1), 50)
    assert raw > 0.1
    assert corrected < 0.11


def test_fit_rate_on_exact_geometric_data():
    levels = np.arange(1, 6)
    assert fit_rate(levels, 3.0 * 2.0 ** (-1.5 * levels), 2) == pytest.approx(1.5)
    assert fit_rate(levels, 4.0 ** (-0.7 * levels), 4) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        fit_rate([1], [1.0], 2)


def test_floor_decay_by_hand():
    # j = 2: max(0, 0.5 * 0.5 / 2) = 0.125; j = 3: max(0, 0.5 * 0.125 / 2) = 0.03125
    out = floor_decay([1.0, 0.5, 0.0, 0.0], 1.0, 2)
    assert out.tolist() == [1.0, 0.5, 0.125, 0.03125]
    # the first correction level (j = 1) is never floored
    assert floor_decay([1.0, 0.0, 0.0], 1.0, 2)[1] == 0.0


def test_decay_start():
    assert decay_start([0.8, 0.4, 0.2, 0.1]) == 0
    assert decay_start([0.1, 0.4, 0.2, 0.1]) == 1  # rises first: decay from position 1
    assert decay_start([0.4, 0.2, 0.1, 0.3]) == 3  # the last pair rises: nothing established
    # pairs at the noise level count as consistent with decay
    assert decay_start([0.4, 0.01, 0.02], noise=[0.01, 0.01, 0.01]) == 0


def test_bias_remainder_by_hand():
    # max(m_{L-1} / M^alpha, m_L) / (M^alpha - 1) = max(0.04 / 2, 0.01) / 1 = 0.02
    assert bias_remainder([0.04, 0.01], 1.0, 2) == pytest.approx(0.02)
    # alpha = 2: max(0.04 / 4, 0.02) / 3
    assert bias_remainder([0.04, 0.02], 2.0, 2) == pytest.approx(0.02 / 3)


def test_coarse_level_pays_threshold():
    # M = 2: (sqrt(2) - 1)^2 / 3 = 0.05719...
    thr = (math.sqrt(2) - 1) ** 2 / 3
    assert coarse_level_pays(0.99 * thr, 1.0, 2)
    assert not coarse_level_pays(1.01 * thr, 1.0, 2)
    # M = 4: (2 - 1)^2 / 5 = 0.2
    assert coarse_level_pays(0.19, 1.0, 4) and not coarse_level_pays(0.21, 1.0, 4)


def _quantity(magnitudes, variances, noise=None):
    m = np.asarray(magnitudes, float)
    return QuantityLevels(
        np.asarray(variances, float), m, np.zeros_like(m) if noise is None else noise
    )


def test_plan_bias_test_by_hand():
    # levels 0..4, magnitudes of E Y halving from level 1 (alpha = 1 exactly); remainder
    # max(0.02 / 2, 0.01) / (2 - 1) = 0.01; the test needs 0.01 <= sqrt(1 - 0.5) eps,
    # i.e. eps >= 0.01414.
    levels = np.arange(5)
    q = _quantity([1.0, 0.08, 0.04, 0.02, 0.01], [1.0, 0.1, 0.05, 0.025, 0.0125])
    costs = np.array([1, 3, 6, 12, 24], float)
    ok = plan(levels, {"q": q}, costs, rmse=0.0142, theta=0.5, refinement=2)
    bad = plan(levels, {"q": q}, costs, rmse=0.0141, theta=0.5, refinement=2)
    assert ok.alpha["q"] == pytest.approx(1.0)
    assert ok.beta["q"] == pytest.approx(1.0)
    assert ok.bias["q"] == pytest.approx(0.01)
    assert ok.established["q"] and ok.bias_ok["q"]
    assert not bad.bias_ok["q"]
    # allocation is the Lagrange rule on the (floored, here unchanged) variances
    assert ok.samples.tolist() == optimal_samples(q.variances, costs, 0.5 * 0.0142**2).tolist()


def test_plan_guard_against_pre_asymptotic_levels():
    # The last correction grew: decay is not established, so the bias test fails however
    # small the magnitudes are (the pre-asymptotic guard), and needs `decay_levels` levels.
    levels = np.arange(4)
    costs = np.array([1, 3, 6, 12], float)
    rising = _quantity([1.0, 1e-6, 1e-7, 2e-7], [1.0, 0.1, 0.05, 0.025])
    a = plan(levels, {"q": rising}, costs, rmse=1.0, theta=0.5, refinement=2)
    assert not a.established["q"] and not a.bias_ok["q"]
    # two decaying corrections are not enough when decay_levels=3, enough when 2
    short = _quantity([1.0, 0.08, 0.04], [1.0, 0.1, 0.05])
    b = plan(np.arange(3), {"q": short}, costs[:3], rmse=1.0, theta=0.5, refinement=2)
    assert not b.bias_ok["q"]
    c = plan(
        np.arange(3), {"q": short}, costs[:3], rmse=1.0, theta=0.5, refinement=2, decay_levels=2
    )
    assert c.bias_ok["q"]


def test_plan_takes_the_largest_requirement():
    levels = np.arange(4)
    costs = np.array([1, 3, 6, 12], float)
    q1 = _quantity([1.0, 0.08, 0.04, 0.02], [1.0, 0.1, 0.05, 0.025])
    q2 = _quantity([1.0, 0.08, 0.04, 0.02], [4.0, 0.01, 0.3, 0.1])
    a = plan(levels, {"a": q1, "b": q2}, costs, rmse=0.01, theta=0.5, refinement=2)
    n1 = optimal_samples(q1.variances, costs, 0.5e-4)
    v2 = floor_decay(q2.variances, 0.0, 2)
    n2 = optimal_samples(v2, costs, 0.5e-4)
    assert a.samples.tolist() == np.maximum(n1, n2).tolist()


def test_streaming_moments_match_numpy():
    rng = np.random.default_rng(2)
    x = 100.0 + rng.gamma(2.0, size=(1000, 3))  # large mean: raw power sums would fail
    acc = StreamingMoments((3,))
    for chunk in np.array_split(x, [7, 300, 301, 650]):
        acc.update(chunk)
    c = x - x.mean(0)
    np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(acc.variance, x.var(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(acc.m3, (c**3).sum(0), rtol=1e-8)
    np.testing.assert_allclose(acc.fourth_central_moment, (c**4).mean(0), rtol=1e-10)
    cov = StreamingCovariance((3,))
    y = x**2
    for a, b in zip(np.array_split(x, 5), np.array_split(y, 5), strict=True):
        cov.update(a, b)
    expect = ((x - x.mean(0)) * (y - y.mean(0))).sum(0) / 999
    np.testing.assert_allclose(cov.covariance, expect, rtol=1e-10)


def test_level_accumulator_corrections():
    rng = np.random.default_rng(3)
    f, c = rng.normal(size=(40, 2)), rng.normal(size=(40, 2))
    acc = LevelAccumulator({"a": (2,)}, coupled=True)
    acc.update({"a": f[:10]}, {"a": c[:10]})
    acc.update({"a": f[10:]}, {"a": c[10:]})
    assert acc.count == 40
    np.testing.assert_allclose(acc.correction["a"].mean, (f - c).mean(0), rtol=1e-12)
    np.testing.assert_allclose(acc.fine["a"].variance, f.var(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(acc.coarse["a"].mean, c.mean(0), rtol=1e-12)


def test_allocation_refuses_non_finite_or_overflowing_variances():
    """An overflowing level (unstable sampler) stops with an error instead of an int cast of
    inf that used to make the adaptive loop spin."""
    from numpyro_mlmc._allocation import optimal_samples

    with pytest.raises(FloatingPointError, match="not finite"):
        optimal_samples([np.inf, 1.0], [1.0, 2.0], 0.1)
    with pytest.raises(FloatingPointError, match="too large"):
        optimal_samples([1e300, 1.0], [1.0, 2.0], 1e-300)
