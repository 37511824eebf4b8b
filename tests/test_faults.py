"""Non-finite values from the network on some paths: detected, reported with level and count,
never averaged into an estimate silently."""

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_mlmc as nm


def overflowing_denoiser(x, t):
    """An eps-network that returns NaN when the first pixel exceeds 0.7: on a few percent of
    the paths at level 1 and about a fifth at level 3 (with the key below)."""
    return jnp.where(x[..., :1] > 0.7, jnp.nan, 0.5 * x)


PRIOR = nm.DiffusionPrior(overflowing_denoiser, event_shape=(4,), num_steps=4)
Y = jnp.array([0.5, 0.0, 0.0, 0.0])


def model(y=None):
    x = numpyro.sample("x", PRIOR)
    numpyro.sample("y", dist.Normal(x, 0.3).to_event(1), obs=y)


def run(**settings):
    mlmc = nm.MLMC(nm.DiffusionPosterior(model), min_level=1, batch_size=64, **settings)
    return mlmc.run(jr.key(0), y=Y, num_samples=[128, 64, 64], progress_bar=False)


def test_network_nans_stop_the_run_with_level_and_count():
    with pytest.raises(FloatingPointError, match=r"level \d produced \d+ non-finite draw"):
        run()


def test_network_nans_discarded_are_counted_and_warned():
    with pytest.warns(RuntimeWarning, match="discarded"):
        result = run(on_nonfinite="discard")
    assert sum(result.discarded.values()) > 0
    assert result.discarded[3] > 0
    assert any("discarded" in w for w in result.warnings)
    np.testing.assert_array_equal(result.levels["samples"], [128, 64, 64])  # kept draws
    for value in result.estimates.values():
        assert np.all(np.isfinite(value))
    # the discarded draws' cost is counted, not hidden
    paid = int(np.sum(result.levels["samples"] * result.levels["cost_per_sample"]))
    assert result.cost > paid
