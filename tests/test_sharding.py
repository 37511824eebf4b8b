"""Batches spread over devices: the same key gives the same result on 1 and 4 devices.

Four CPU devices are forced with `XLA_FLAGS=--xla_force_host_platform_device_count=4`, which
must be set before JAX starts, so each configuration runs in a subprocess that writes its
results to an `.npz` file.

Every result is compared bit for bit: a path's end state depends on its key only, the host
merges the same batches in the same order whatever the device count, and each batch runs in
chunks whose shape does not depend on the device count (`_sharding.py`), so every chunk is the
same compiled program on the same rows on 1 or 4 devices. This covers diffusion samplers whose
score has matrix products and reductions (a Gaussian-mixture score, an MLP score network with
DPS guidance, which differentiates through it), not only the elementwise GBM sampler: with one
computation sharded over the devices those agreed only to about 1e-5.
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
from numpyro_mlmc._sharding import BatchRunner
from numpyro_mlmc.testing import GeometricBrownianMotion

JOB = textwrap.dedent(
    """
    import sys
    import equinox as eqx
    import jax, jax.numpy as jnp, jax.random as jr, numpy as np
    import numpyro, numpyro.distributions as dist
    import numpyro_mlmc as nm
    from numpyro_mlmc.testing import GeometricBrownianMotion

    out = {"num_devices": np.array(len(jax.devices()))}


    def record(prefix, r):
        # everything in the result that does not measure time
        for group in ("estimates", "stderr", "rmse_estimates", "bias_estimates"):
            for k, v in getattr(r, group).items():
                out[f"{prefix}_{group}_{k}"] = np.asarray(v)
        for name, table in r.level_tables.items():
            for field, v in table._asdict().items():
                out[f"{prefix}_levels_{name}_{field}"] = np.asarray(v)
        for k, v in r.draws.items():
            out[f"{prefix}_draws_{k}"] = np.asarray(v)
        out[f"{prefix}_cost"] = np.asarray(r.cost)

    gbm = GeometricBrownianMotion(dimension=4, volatility=[0.1, 0.15, 0.2, 0.25])
    if sys.argv[2] != "network":
        # batch_size 10, chunk_size 3: batches of 10 and 2 draws, a batch of 10 as four
        # chunks of 3 rows (the last two rows padding)
        r = nm.MLMC(gbm, min_level=1, batch_size=10, chunk_size=3).run(
            jr.key(3), num_samples=[50, 30, 20], progress_bar=False
        )
        record("gbm", r)
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
    if sys.argv[2] != "network":
        # batch_size 256: batches of 256 and 16 draws; at the default chunk_size (64) a batch
        # of 256 runs as four chunks (all on one device, or one on each of four)
        kernel = nm.DiffusionPosterior(model, num_steps=8)
        r = nm.MLMC(kernel, min_level=1, batch_size=256).run(
            jr.key(5), y=y, num_samples=[272, 80], progress_bar=False
        )
        record("diffusion", r)
        draws = nm.sample_posterior(jr.key(6), model, 200, batch_size=128, num_steps=8, y=y)
        out["posterior_x"] = draws["x"]
    else:
        net = nm.nets.MLPScoreNet((d,), width=32, num_layers=2, key=jr.key(8))
        # the output layer starts at zero; random weights make the network's output count
        weight = 0.3 * jr.normal(jr.key(9), net.embed_out.weight.shape)
        net = eqx.tree_at(lambda m: m.embed_out.weight, net, weight)
        net_prior = nm.DiffusionPrior(net, event_shape=(d,))

        def net_model(y=None):
            x = numpyro.sample("x", net_prior)
            numpyro.sample("y", dist.Normal(x[:2], 0.2).to_event(1), obs=y)

        net_kernel = nm.DiffusionPosterior(net_model, num_steps=8)
        r = nm.MLMC(net_kernel, min_level=1, batch_size=256).run(
            jr.key(10), y=y, num_samples=[272, 80], progress_bar=False
        )
        record("net", r)
        r = nm.MonteCarlo(net_kernel, level=1, batch_size=256).run(
            jr.key(11), y=y, num_samples=144, progress_bar=False
        )
        record("net_mc", r)
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
        np.testing.assert_array_equal(one[name], four[name], err_msg=name)


def test_one_and_four_devices_agree(tmp_path):
    one, four = run_job(tmp_path, 1, "fixed"), run_job(tmp_path, 4, "fixed")
    compare(one, four)
    # a diffusion sampler with a Gaussian-mixture score (exact guidance: matrix products,
    # reductions): estimates and every level statistic
    assert one["diffusion_levels_x_mean_samples"].tolist() == [272, 80]
    assert "diffusion_levels_x_variance_variance" in one
    assert one["posterior_x"].shape == (200, 4)


@pytest.mark.slow
def test_network_diffusion_identical_on_one_and_four_devices(tmp_path):
    one, four = run_job(tmp_path, 1, "network"), run_job(tmp_path, 4, "network")
    compare(one, four)
    # an MLP score network under PiGDM guidance (it differentiates through the network)
    assert one["net_levels_x_mean_samples"].tolist() == [272, 80]
    assert one["net_mc_levels_x_mean_samples"].tolist() == [144]
    assert np.all(np.abs(one["net_estimates_x_mean"]) > 0)


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


@pytest.mark.parametrize("size", [1, 2, 16, 63, 64, 65, 100, 130, 256, 512])
def test_chunk_layout(size):
    # equal chunks of at most chunk_size rows, fewer than one padding row per chunk
    rows, chunks = BatchRunner(chunk_size=64).layout(size)
    assert rows <= 64
    assert rows * chunks >= size > rows * chunks - chunks
    assert chunks == -(-size // 64)
    keys = BatchRunner(chunk_size=64).keys(jr.key(0), 5, size)
    assert [k.shape[0] for k in keys] == [rows] * chunks
    expected = [jr.key_data(jr.fold_in(jr.key(0), i)) for i in range(5, 5 + rows * chunks)]
    got = np.concatenate([np.asarray(jr.key_data(k)) for k in keys])
    np.testing.assert_array_equal(np.stack(expected), got)


def test_chunk_size_argument():
    gbm = GeometricBrownianMotion(dimension=2)
    a = nm.MLMC(gbm, min_level=1, batch_size=8).run(
        jr.key(0), num_samples=[20, 10], progress_bar=False
    )
    for chunk_size in (None, 1, 3, 100):
        b = nm.MLMC(gbm, min_level=1, batch_size=8, chunk_size=chunk_size).run(
            jr.key(0), num_samples=[20, 10], progress_bar=False
        )
        np.testing.assert_array_equal(a.estimates["x_mean"], b.estimates["x_mean"])
    for bad, error in ((0, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="chunk_size"):
            nm.MLMC(gbm, chunk_size=bad)
        with pytest.raises(error, match="chunk_size"):
            nm.MonteCarlo(gbm, level=1, chunk_size=bad)
