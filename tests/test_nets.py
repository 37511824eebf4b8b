"""The Equinox networks: shapes, the zero-output start, per-sample contract, bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import numpyro_mlmc as nm
from numpyro_mlmc.nets import MLPScoreNet, UNet

TINY = dict(channels=8, channel_multipliers=(1, 2), num_res_blocks=1, num_heads=2)


def _perturbed(model, key, scale=0.1):
    """The model with every weight moved by `scale` N(0, 1) noise (nets start at output 0)."""
    params, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jr.split(key, len(leaves))
    leaves = [p + scale * jr.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((8, 8), dict(TINY, attention_resolutions=(4,))),
        ((8, 8, 3), dict(TINY, attention_resolutions=())),
        ((16, 16, 1), dict(TINY, channel_multipliers=(1, 2, 2), mid_attention=False)),
    ],
)
def test_unet_shapes_and_zero_start(shape, kwargs):
    net = UNet(shape, key=jr.PRNGKey(0), **kwargs)
    x = jr.normal(jr.PRNGKey(1), (3, *shape))
    t = jnp.array([0.01, 0.5, 1.0])
    out = jax.vmap(net)(x, t)
    assert out.shape == x.shape
    # Zero-initialised output convolution: the untrained network returns exactly 0.
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    moved = jax.vmap(_perturbed(net, jr.PRNGKey(2)))(x, t)
    assert moved.shape == x.shape and bool(jnp.all(jnp.isfinite(moved)))
    assert float(jnp.std(moved)) > 0


def test_unet_depends_on_time_and_input():
    net = _perturbed(UNet((8, 8), key=jr.PRNGKey(0), **TINY), jr.PRNGKey(3))
    x = jr.normal(jr.PRNGKey(1), (8, 8))
    assert not np.allclose(net(x, 0.1), net(x, 0.9))
    assert not np.allclose(net(x, 0.1), net(2 * x, 0.1))


def test_unet_config_rebuilds_same_architecture():
    net = UNet((16, 16), key=jr.PRNGKey(0), **dict(TINY, channel_multipliers=(1, 2, 2)))
    again = UNet(**net.config(), key=jr.PRNGKey(0))
    same = jax.tree.map(
        lambda a, b: a.shape == b.shape,
        eqx.filter(net, eqx.is_array),
        eqx.filter(again, eqx.is_array),
    )
    assert all(jax.tree.leaves(same))


def test_unet_bad_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        UNet((6, 6), channel_multipliers=(1, 2, 2), key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="data_shape"):
        UNet((8,), key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="num_heads"):
        UNet((8, 8), channels=5, num_heads=4, key=jr.PRNGKey(0))
    net = UNet((8, 8), key=jr.PRNGKey(0), **TINY)
    with pytest.raises(ValueError, match="one image"):
        net(jnp.zeros((2, 8, 8)), 0.5)


def test_mlp_score_net():
    net = MLPScoreNet((2,), width=16, num_layers=2, key=jr.PRNGKey(0))
    x = jr.normal(jr.PRNGKey(1), (5, 2))
    out = jax.vmap(net)(x, jnp.linspace(0.1, 1.0, 5))
    assert out.shape == (5, 2)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    moved = _perturbed(net, jr.PRNGKey(2))
    assert float(jnp.std(jax.vmap(moved)(x, jnp.linspace(0.1, 1.0, 5)))) > 0
    assert MLPScoreNet(**net.config(), key=jr.PRNGKey(0)).config() == net.config()
    with pytest.raises(ValueError, match="one sample"):
        net(jnp.zeros((3, 2)), 0.5)


def test_networks_plug_into_diffusion_prior():
    net = _perturbed(UNet((8, 8), key=jr.PRNGKey(0), **TINY), jr.PRNGKey(4), scale=0.01)
    prior = nm.DiffusionPrior(net, event_shape=(8, 8), num_steps=4, batch_size=4)
    draws = prior.sample(jr.PRNGKey(5), (4,))
    assert draws.shape == (4, 8, 8) and bool(jnp.all(jnp.isfinite(draws)))
    with pytest.raises(ValueError):
        nm.DiffusionPrior(net, event_shape=(16, 16))
