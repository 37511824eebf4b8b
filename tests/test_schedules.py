"""Schedules: closed forms, SDE coefficients by differentiation, inverses, nested grids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro_mlmc as nm

SCHEDULES = [
    nm.VPSchedule(),
    nm.VPSchedule(beta_min=0.05, beta_max=12.0),
    nm.CosineVPSchedule(),
    nm.VESchedule(),
]
TIMES = [0.013, 0.2, 0.5, 0.77, 0.95]


def test_vp_linear_closed_form():
    s = nm.VPSchedule(beta_min=0.1, beta_max=20.0)
    for t in TIMES:
        alpha_bar = np.exp(-(0.1 * t + 0.5 * 19.9 * t**2))
        np.testing.assert_allclose(float(s.alpha_bar(t)), alpha_bar, rtol=1e-6)
        np.testing.assert_allclose(float(s.sigma(t)), np.sqrt(1 - alpha_bar), rtol=1e-6)
        np.testing.assert_allclose(float(s.beta(t)), 0.1 + 19.9 * t, rtol=1e-6)


def test_cosine_closed_form():
    s = nm.CosineVPSchedule()
    f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    for t in TIMES:
        np.testing.assert_allclose(float(s.alpha_bar(t)), f(t) / f(0.0), rtol=1e-5)
    assert float(s.alpha_bar(s.t_max)) > 0


def test_ve_closed_form():
    s = nm.VESchedule(sigma_min=0.01, sigma_max=50.0)
    for t in TIMES:
        np.testing.assert_allclose(float(s.sigma(t)), 0.01 * 5000.0**t, rtol=1e-5)
        assert float(s.alpha(t)) == 1.0


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
def test_sde_coefficients_match_derivatives(schedule):
    # f = d log alpha / dt and g^2 = d sigma^2 / dt - 2 f sigma^2, by automatic differentiation.
    for t in TIMES:
        t = jnp.asarray(t)
        f = jax.grad(schedule.log_alpha)(t)
        dsig2 = jax.grad(lambda u: schedule.sigma(u) ** 2)(t)
        np.testing.assert_allclose(float(schedule.drift(t)), float(f), rtol=1e-4, atol=1e-6)
        g2 = float(dsig2 - 2 * f * schedule.sigma(t) ** 2)
        np.testing.assert_allclose(float(schedule.diffusion_squared(t)), g2, rtol=1e-4)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
def test_transition_and_inverse(schedule):
    for t, s in [(0.9, 0.3), (0.5, 0.49), (0.2, 0.0)]:
        r, v = schedule.transition(t, s)
        np.testing.assert_allclose(
            float(r), float(schedule.alpha(t) / schedule.alpha(s)), rtol=1e-5
        )
        expected = float(schedule.sigma(t) ** 2 - r**2 * schedule.sigma(s) ** 2)
        np.testing.assert_allclose(float(v), expected, rtol=1e-4, atol=1e-7)
    for t in [0.1, 0.4, 0.8]:
        ratio = float(schedule.noise_ratio(t))
        np.testing.assert_allclose(schedule.time_at_noise_ratio(ratio), t, rtol=1e-4)


def test_vp_is_variance_preserving():
    for s in (nm.VPSchedule(), nm.CosineVPSchedule()):
        t = jnp.linspace(0.0, s.t_max, 11)
        np.testing.assert_allclose(np.asarray(s.alpha(t) ** 2 + s.sigma(t) ** 2), 1.0, rtol=1e-6)


@pytest.mark.parametrize("spacing", ["uniform", "polynomial"])
@pytest.mark.parametrize("refinement", [2, 3, 4])
def test_time_grids_nest(spacing, refinement):
    for n in [1, 2, 5, 16]:
        coarse = nm.time_grid(n, t_start=0.9, t_end=0.0, spacing=spacing, exponent=3.0)
        fine = nm.time_grid(n * refinement, t_start=0.9, t_end=0.0, spacing=spacing, exponent=3.0)
        assert coarse.shape == (n + 1,)
        np.testing.assert_allclose(fine[::refinement], coarse, rtol=0, atol=1e-15)
        assert coarse[0] == 0.9 and coarse[-1] == 0.0
        assert np.all(np.diff(fine) < 0)


def test_polynomial_spacing_concentrates_near_the_end():
    grid = nm.time_grid(10, t_start=1.0, spacing="polynomial", exponent=2.0)
    steps = -np.diff(grid)
    assert steps[-1] < steps[0] / 10


def test_bad_schedule_and_grid_input():
    with pytest.raises(ValueError, match="num_steps"):
        nm.time_grid(0, t_start=1.0)
    with pytest.raises(TypeError, match="num_steps"):
        nm.time_grid(2.5, t_start=1.0)
    with pytest.raises(ValueError, match="spacing"):
        nm.time_grid(4, t_start=1.0, spacing="log")
    with pytest.raises(ValueError, match="beta_min"):
        nm.VPSchedule(beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        nm.VESchedule(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="noise"):
        nm.VESchedule().time_at_noise_ratio(100.0)
