"""Forward operators: values, adjoints, batching, differentiability, errors."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from scipy import ndimage

import numpyro_mlmc as nm

IMAGE = (8, 8)
MASK = np.random.default_rng(0).random(IMAGE) < 0.4
OPERATORS = [
    nm.operators.Identity(),
    nm.operators.Inpaint(MASK),
    nm.operators.Blur.gaussian(3, 0.8, boundary="periodic"),
    nm.operators.Blur.gaussian(5, 1.2, boundary="reflect"),
    nm.operators.Downsample(2),
    nm.operators.Project(np.random.default_rng(1).normal(size=(10, 64)), image_shape=IMAGE),
]


def _ids(op):
    return f"{type(op).__name__}{getattr(op, 'boundary', '')}"


@pytest.mark.parametrize("op", OPERATORS, ids=_ids)
def test_adjoint_identity(op):
    """<A x, y> = <x, A^T y> for random x, y (the transpose is the exact adjoint)."""
    x = jr.normal(jr.key(0), IMAGE)
    y = jr.normal(jr.key(1), op.output_shape(IMAGE))
    lhs = jnp.vdot(op(x), y)
    rhs = jnp.vdot(x, op.transpose(y))
    np.testing.assert_allclose(float(lhs), float(rhs), rtol=1e-4, atol=1e-4)
    assert op(x).shape == op.output_shape(IMAGE)


@pytest.mark.parametrize("op", OPERATORS, ids=_ids)
def test_batched_jit_and_linear(op):
    xs = jr.normal(jr.key(2), (3, 2, *IMAGE))
    out = jax.jit(lambda v: op(v))(xs)
    assert out.shape == (3, 2, *op.output_shape(IMAGE))
    np.testing.assert_allclose(out[1, 0], op(xs[1, 0]), rtol=1e-5, atol=1e-5)
    a, b = xs[0, 0], xs[0, 1]
    np.testing.assert_allclose(op(2 * a - b), 2 * op(a) - op(b), rtol=1e-4, atol=1e-4)
    grad = jax.grad(lambda v: jnp.sum(op(v) ** 2))(a)
    np.testing.assert_allclose(grad, 2 * op.transpose(op(a)), rtol=1e-4, atol=1e-4)


def test_operator_values():
    x = np.arange(64, dtype=np.float32).reshape(IMAGE)
    np.testing.assert_array_equal(nm.operators.Inpaint(MASK)(jnp.asarray(x)), x[MASK])
    down = nm.operators.Downsample(2)(jnp.asarray(x))
    np.testing.assert_allclose(down, x.reshape(4, 2, 4, 2).mean(axis=(1, 3)))
    kernel = np.random.default_rng(3).random((3, 3))
    for boundary, mode in [("periodic", "wrap"), ("reflect", "reflect")]:
        blurred = nm.operators.Blur(kernel, boundary=boundary)(jnp.asarray(x))
        # scipy's convolve with the same centring (mode "reflect" = half-sample symmetric)
        expected = ndimage.convolve(x.astype(np.float64), kernel, mode=mode)
        if boundary == "reflect":
            expected = ndimage.convolve(x.astype(np.float64), kernel, mode="mirror")
        np.testing.assert_allclose(blurred, expected, rtol=1e-4, atol=1e-3)


def test_operator_errors():
    with pytest.raises(ValueError, match="observes no pixel"):
        nm.operators.Inpaint(np.zeros(IMAGE, bool))
    with pytest.raises(ValueError, match="boolean"):
        nm.operators.Inpaint(np.full(IMAGE, 0.5))
    with pytest.raises(ValueError, match="mask has shape"):
        nm.operators.Inpaint(MASK)(jnp.zeros((4, 4)))
    with pytest.raises(ValueError, match="multiple"):
        nm.operators.Downsample(3)(jnp.zeros(IMAGE))
    with pytest.raises(ValueError, match="positive int"):
        nm.operators.Downsample(0)
    with pytest.raises(ValueError, match="boundary"):
        nm.operators.Blur(np.ones((3, 3)), boundary="zero")
    with pytest.raises(ValueError, match="2-D"):
        nm.operators.Blur(np.ones(3))
    with pytest.raises(ValueError, match="columns"):
        nm.operators.Project(np.ones((2, 5)), image_shape=IMAGE)
