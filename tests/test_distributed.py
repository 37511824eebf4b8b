"""Two processes on JAX's distributed runtime (localhost, CPU collectives) give the result of a
single-process run, bit for bit; bad arguments to `initialize_distributed` are refused."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import numpyro_mlmc as nm

JOB = textwrap.dedent(
    """
    import sys
    import numpy as np
    import numpyro_mlmc as nm

    out, port = sys.argv[1], sys.argv[2]
    num_processes, process_id = int(sys.argv[3]), int(sys.argv[4])
    if num_processes > 1:
        nm.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id, timeout_s=120)
    import jax, jax.random as jr
    from numpyro_mlmc.testing import GeometricBrownianMotion

    assert jax.process_count() == num_processes
    gbm = GeometricBrownianMotion(dimension=3, volatility=[0.1, 0.2, 0.3], scheme="milstein")
    fixed = nm.MLMC(gbm, min_level=1, batch_size=10).run(
        jr.key(3), num_samples=[50, 30, 20], progress_bar=False
    )
    adaptive = nm.MLMC(gbm, batch_size=64, pilot_samples=32).run(
        jr.key(4), rmse=0.02, progress_bar=False
    )
    mc = nm.MonteCarlo(gbm, level=2, batch_size=16).run(
        jr.key(5), num_samples=40, progress_bar=False
    )
    arrays = {}
    for name, r in (("fixed", fixed), ("adaptive", adaptive), ("mc", mc)):
        arrays.update({f"{name}/{k}": v for k, v in r.estimates.items()})
        arrays[f"{name}/samples"] = np.asarray(r.levels["samples"])
        arrays[f"{name}/draws"] = r.draws["x"]
    np.savez(f"{out}.{process_id}.npz", **arrays)
    """
)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, port, num_processes):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", JOB, str(out), str(port), str(num_processes), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(num_processes)
    ]
    errors = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=900)
            errors.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    launch(tmp_path / "single", 0, 1)
    launch(tmp_path / "pair", free_port(), 2)
    with np.load(tmp_path / "single.0.npz") as one:
        single = dict(one)
    for rank in (0, 1):
        with np.load(tmp_path / f"pair.{rank}.npz") as data:
            assert sorted(data.files) == sorted(single)
            for name in data.files:
                np.testing.assert_array_equal(data[name], single[name], err_msg=f"{rank} {name}")


@pytest.mark.parametrize(
    "args, error, match",
    [
        (("127.0.0.1:1234", 2, None), ValueError, "all of"),
        (("127.0.0.1", 2, 0), ValueError, "host:port"),
        (("127.0.0.1:1234", 0, 0), ValueError, "num_processes"),
        (("127.0.0.1:1234", 2, 2), ValueError, "process_id"),
        (("127.0.0.1:1234", 2.0, 0), TypeError, "num_processes"),
    ],
)
def test_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        nm.initialize_distributed(*args)
