"""Resumable runs: `run(..., checkpoint=path)` saves after every batch; a run interrupted at
any batch and started again finishes with estimates equal to an uninterrupted run's."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax.random as jr
import numpy as np
import pytest

import numpyro_mlmc as nm
from numpyro_mlmc.testing import GeometricBrownianMotion

GBM = GeometricBrownianMotion(dimension=3, volatility=[0.1, 0.2, 0.3], scheme="euler")


class Interruptible:
    """The GBM sampler, interrupted (KeyboardInterrupt) at its `after`-th batch. Private
    attributes are not part of a checkpoint's identity, so interrupted and resumed runs match."""

    def __init__(self, after=None):
        self.gbm = GBM
        self.refinement = GBM.refinement
        self._after = after
        self._calls = 0
        self._drawn = 0

    def cost(self, level, coupled):
        return self.gbm.cost(level, coupled)

    def sample(self, keys, level, coupled):
        self._calls += 1
        if self._after is not None and self._calls > self._after:
            raise KeyboardInterrupt
        self._drawn += keys.shape[0]
        return self.gbm.sample(keys, level, coupled)


def key():
    return jr.key(11, impl="rbg")


def mlmc(sampler):
    return nm.MLMC(sampler, batch_size=64, pilot_samples=32)


def assert_same(a, b):
    assert a.estimates.keys() == b.estimates.keys()
    for name in a.estimates:
        np.testing.assert_array_equal(a.estimates[name], b.estimates[name], err_msg=name)
        np.testing.assert_array_equal(a.stderr[name], b.stderr[name], err_msg=name)
    np.testing.assert_array_equal(a.levels["samples"], b.levels["samples"])
    assert a.cost == b.cost
    assert a.discarded == b.discarded
    for site in a.draws:
        np.testing.assert_array_equal(a.draws[site], b.draws[site])


@pytest.fixture(scope="module")
def reference():
    sampler = Interruptible()
    result = mlmc(sampler).run(key(), rmse=0.02, progress_bar=False)
    return result, sampler._calls


def test_checkpointed_run_equals_plain_run_and_a_finished_checkpoint_replays(tmp_path, reference):
    ref, _ = reference
    path = tmp_path / "run.npz"
    a = mlmc(Interruptible()).run(key(), rmse=0.02, progress_bar=False, checkpoint=path)
    assert_same(a, ref)
    assert path.exists()
    again = Interruptible(after=0)  # any draw would raise: a finished run replays only
    assert_same(mlmc(again).run(key(), rmse=0.02, progress_bar=False, checkpoint=path), ref)
    assert again._drawn == 0
    assert [p.name for p in tmp_path.iterdir()] == ["run.npz"]


def test_interrupted_runs_resume_exactly(tmp_path, reference):
    ref, total_calls = reference
    # interrupt in the coarsest-level search, in the pilot and in the adaptive rounds
    for after in sorted({1, 3, total_calls // 2, total_calls - 1}):
        path = tmp_path / f"run{after}.npz"
        first = Interruptible(after=after)
        with pytest.raises(KeyboardInterrupt):
            mlmc(first).run(key(), rmse=0.02, progress_bar=False, checkpoint=path)
        second = Interruptible()
        result = mlmc(second).run(key(), rmse=0.02, progress_bar=False, checkpoint=path)
        assert_same(result, ref)
        # nothing drawn twice: the resumed run drew only what the first had not finished
        assert first._calls - 1 + second._calls == total_calls, after


def test_a_resumed_run_interrupted_again_resumes_exactly(tmp_path, reference):
    ref, total_calls = reference
    path = tmp_path / "run.npz"
    first, second = Interruptible(after=2), Interruptible(after=total_calls // 2)
    for sampler in (first, second):
        with pytest.raises(KeyboardInterrupt):
            mlmc(sampler).run(key(), rmse=0.02, progress_bar=False, checkpoint=path)
    third = Interruptible()
    assert_same(mlmc(third).run(key(), rmse=0.02, progress_bar=False, checkpoint=path), ref)
    assert first._calls - 1 + second._calls - 1 + third._calls == total_calls


def test_monte_carlo_resumes(tmp_path):
    ref = nm.MonteCarlo(Interruptible(), level=3, batch_size=32, pilot_samples=32).run(
        key(), rmse=0.02, progress_bar=False
    )
    path = tmp_path / "mc.npz"
    with pytest.raises(KeyboardInterrupt):
        nm.MonteCarlo(Interruptible(after=4), level=3, batch_size=32, pilot_samples=32).run(
            key(), rmse=0.02, progress_bar=False, checkpoint=path
        )
    result = nm.MonteCarlo(Interruptible(), level=3, batch_size=32, pilot_samples=32).run(
        key(), rmse=0.02, progress_bar=False, checkpoint=path
    )
    assert_same(result, ref)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    path = tmp_path / "run.npz"
    nm.MLMC(GBM, min_level=1, batch_size=16).run(
        key(), num_samples=[40, 20], progress_bar=False, checkpoint=path
    )
    before = path.read_bytes()
    cases = [
        (dict(key=jr.key(12, impl="rbg")), "key"),
        (dict(num_samples=[40, 30]), "num_samples"),
        (dict(batch_size=8), "batch_size"),
        (dict(sampler=GeometricBrownianMotion(dimension=3, scheme="euler")), "level sampler"),
        (dict(functionals={"m": lambda x: x}), "functionals"),
    ]
    for change, what in cases:
        args = dict(key=key(), num_samples=[40, 20], batch_size=16, sampler=GBM)
        args.update(change)
        engine = nm.MLMC(args.pop("sampler"), min_level=1, batch_size=args.pop("batch_size"))
        with pytest.raises(nm.RunCheckpointError, match=what) as err:
            engine.run(progress_bar=False, checkpoint=path, **args)
        assert "start afresh" in str(err.value)
    with pytest.raises(nm.RunCheckpointError, match="method"):
        nm.MonteCarlo(GBM, level=1, batch_size=16).run(
            key(), num_samples=40, progress_bar=False, checkpoint=path
        )
    assert path.read_bytes() == before  # a refused checkpoint is left as it was
    path.write_bytes(before[: len(before) // 2])
    with pytest.raises(nm.RunCheckpointError, match="not a readable"):
        nm.MLMC(GBM, min_level=1, batch_size=16).run(
            key(), num_samples=[40, 20], progress_bar=False, checkpoint=path
        )


KILL_JOB = textwrap.dedent(
    """
    import sys, time
    import jax.random as jr, numpy as np
    import numpyro_mlmc as nm
    from numpyro_mlmc.testing import GeometricBrownianMotion

    GBM = GeometricBrownianMotion(dimension=3, volatility=[0.1, 0.2, 0.3], scheme="euler")

    class Slow:
        def __init__(self, delay):
            self.gbm, self.refinement, self._delay = GBM, GBM.refinement, delay

        def cost(self, level, coupled):
            return self.gbm.cost(level, coupled)

        def sample(self, keys, level, coupled):
            time.sleep(self._delay)
            return self.gbm.sample(keys, level, coupled)

    out, checkpoint, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    r = nm.MLMC(Slow(delay), batch_size=64, pilot_samples=32).run(
        jr.key(11, impl="rbg"), rmse=0.02, progress_bar=False,
        checkpoint=None if checkpoint == "-" else checkpoint,
    )
    np.savez(out, **r.estimates, samples=np.asarray(r.levels["samples"]))
    """
)


def _job(args):
    return subprocess.Popen(
        [sys.executable, "-c", KILL_JOB, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def _finish(proc, timeout=600):
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_sigkill_mid_run_and_restart(tmp_path):
    checkpoint = tmp_path / "run.npz"
    victim = _job([tmp_path / "never.npz", checkpoint, 0.3])
    try:
        deadline = time.monotonic() + 600
        while not checkpoint.exists():  # wait for a few saved batches
            assert victim.poll() is None, victim.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        time.sleep(3.0)
        assert victim.poll() is None, "the run finished before it could be killed"
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.communicate(timeout=60)  # reaps it and closes its pipes
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "never.npz").exists()
    resumed = _job([tmp_path / "resumed.npz", checkpoint, 0.0])
    _finish(resumed)
    plain = _job([tmp_path / "plain.npz", "-", 0.0])
    _finish(plain)
    with np.load(tmp_path / "resumed.npz") as a, np.load(tmp_path / "plain.npz") as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.npz", "resumed.npz", "run.npz"]
