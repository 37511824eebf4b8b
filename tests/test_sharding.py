"""Batches sharded over devices: the same key gives the same result on 1 and 4 devices.

Four CPU devices are forced with `XLA_FLAGS=--xla_force_host_platform_device_count=4`, which
must be set before JAX starts, so each configuration runs in a subprocess that writes its
estimates to an `.npz` file.

What is exact and what is not: a path's end state depends on its key only, and the host merges
the same batches in the same order whatever the device count. The GBM sampler is elementwise,
so its estimates are bit-identical. A diffusion sampler's score contains matrix products, and
XLA's CPU kernels round a row of a matrix product differently for different numbers of rows
(one device computes the whole batch, four compute a quarter each; the same happens when
`batch_size` changes on one device), so those agree to float32 rounding, checked here at
1e-5 relative to the estimate's scale.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.random as jr
import numpy as np
import pytest

import numpyro_mlmc as nm
from numpyro_mlmc.testing import GeometricBrownianMotion

JOB = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, jax.random as jr, numpy as np
    import numpyro, numpyro.distributions as dist
    import numpyro_mlmc as nm
    from numpyro_mlmc.testing import GeometricBrownianMotion

    out = {"num_devices": np.array(len(jax.devices()))}
    gbm = GeometricBrownianMotion(dimension=4, volatility=[0.1, 0.15, 0.2, 0.25])
    # batch_size 10: shapes 10 and 2, padded to 12 and 4 on four devices
    r = nm.MLMC(gbm, min_level=1, batch_size=10).run(
        jr.key(3), num_samples=[50, 30, 20], progress_bar=False
    )
    for k, v in r.estimates.items():
        out["gbm_" + k] = v
    out["gbm_draws"] = r.draws["x"]
    if sys.argv[2] == "adaptive":
        r = nm.MLMC(gbm, batch_size=64).run(jr.key(4), rmse=0.01, progress_bar=False)
        for k, v in r.estimates.items():
            out["adaptive_" + k] = v
        out["adaptive_samples"] = np.asarray(r.levels["samples"])
    rng = np.random.default_rng(0)
    d = 4
    means = rng.normal(size=(2, d))
    covs = np.stack([np.eye(d) * 0.3, np.eye(d) * 0.5])
    prior = nm.GaussianMixturePrior(np.array([0.4, 0.6]), means, covs)

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(x[:2], 0.2).to_event(1), obs=y)

    y = jnp.array([0.3, -0.2])
    kernel = nm.DiffusionPosterior(model, num_steps=8)
    r = nm.MLMC(kernel, min_level=1, batch_size=16).run(
        jr.key(5), y=y, num_samples=[40, 24], progress_bar=False
    )
    for k, v in r.estimates.items():
        out["diffusion_" + k] = v
    draws = nm.sample_posterior(jr.key(6), model, 30, batch_size=16, num_steps=8, y=y)
    out["posterior_x"] = draws["x"]
    np.savez(sys.argv[1], **out)
    """
)


def run_job(tmp_path, num_devices, mode):
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}"
    )
    out = tmp_path / f"devices{num_devices}.npz"
    proc = subprocess.run(
        [sys.executable, "-c", JOB, str(out), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as data:
        result = dict(data)
    assert int(result.pop("num_devices")) == num_devices
    return result


def compare(one, four):
    assert one.keys() == four.keys()
    for name in one:
        if name.startswith(("gbm_", "adaptive_")):
            np.testing.assert_array_equal(one[name], four[name], err_msg=name)
        else:
            scale = max(1.0, float(np.max(np.abs(one[name]))))
            np.testing.assert_allclose(one[name], four[name], rtol=0, atol=1e-5 * scale)


def test_one_and_four_devices_agree(tmp_path):
    compare(run_job(tmp_path, 1, "fixed"), run_job(tmp_path, 4, "fixed"))


@pytest.mark.slow
def test_adaptive_run_identical_on_one_and_four_devices(tmp_path):
    one, four = run_job(tmp_path, 1, "adaptive"), run_job(tmp_path, 4, "adaptive")
    compare(one, four)
    assert "adaptive_x_mean" in one


def test_devices_argument():
    gbm = GeometricBrownianMotion(dimension=2)
    a = nm.MLMC(gbm, min_level=1, batch_size=8).run(
        jr.key(0), num_samples=[20, 10], progress_bar=False
    )
    for devices in (1, jax.local_devices(), jax.local_devices()[0]):
        b = nm.MLMC(gbm, min_level=1, batch_size=8, devices=devices).run(
            jr.key(0), num_samples=[20, 10], progress_bar=False
        )
        np.testing.assert_array_equal(a.estimates["x_mean"], b.estimates["x_mean"])


@pytest.mark.parametrize(
    "devices, error",
    [
        (0, ValueError),
        (99, ValueError),
        ([], ValueError),
        (["cpu:0"], TypeError),
        (True, TypeError),
        (1.5, TypeError),
    ],
)
def test_bad_devices(devices, error):
    gbm = GeometricBrownianMotion(dimension=2)
    with pytest.raises(error, match="devices"):
        nm.MLMC(gbm, devices=devices)
    with pytest.raises(error, match="devices"):
        nm.MonteCarlo(gbm, level=1, devices=devices)
