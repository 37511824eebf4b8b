"""The benchmark suite (`numpyro-mlmc bench`, `python -m benchmarks`): problems, outputs and
reproducibility."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_mlmc import _bench, _bench_problems
from numpyro_mlmc._cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("task", _bench_problems.TASKS)
def test_problem_observation_and_exact_posterior(task):
    """Each GMM problem's observation is `A truth + noise` at the stated noise level, its
    guidance is the documented one, and its closed-form posterior is concentrated near the truth
    (the observation is informative) with a positive variance."""
    p = _bench_problems.build_problem(f"digits-gmm-{task}")
    op = _bench_problems.forward_operator(task, p.truth.shape)
    clean = np.asarray(op(jnp.asarray(p.truth, jnp.float32)))
    resid = (p.observation - clean).ravel()
    # the residual is N(0, sigma^2) per element: its RMS within 4 standard errors of sigma
    rms = np.sqrt(np.mean(resid**2))
    se = p.noise_std / np.sqrt(2 * resid.size)
    assert abs(rms - p.noise_std) < 4 * se
    assert p.kernel.guidance == ("denoise" if task == "denoise" else "exact")
    err_post = np.sqrt(np.mean((p.exact["mean"] - p.truth) ** 2))
    prior_mean = np.asarray(_bench_problems.prior_for("digits", "gmm").mean).reshape(p.truth.shape)
    err_prior = np.sqrt(np.mean((prior_mean - p.truth) ** 2))
    # the posterior mean is the MMSE estimate: an informative observation brings it clearly
    # closer to the truth than the prior mean (x2 super-resolution of a digit: 0.26 vs 0.51)
    assert err_post < 0.75 * err_prior
    assert np.all(p.exact["variance"] > 0)
    np.testing.assert_allclose(
        p.exact["second_moment"], p.exact["variance"] + p.exact["mean"] ** 2, rtol=1e-6
    )


def test_problem_names():
    assert _bench_problems.parse_problem_name("patches16-network-deblur") == (
        "patches16",
        "network",
        "deblur",
    )
    for bad in ("digits-gmm", "faces-gmm-denoise", "digits-gmm-colorize", "digits-vae-denoise"):
        with pytest.raises(ValueError, match="DATASET-PRIOR-TASK|unknown task"):
            _bench_problems.parse_problem_name(bad)


def _bench_args(out):
    return [
        "bench",
        "--only",
        "digits-gmm-denoise",
        "--eps",
        "3e-2",
        "--batch-size",
        "128",
        "--out",
        str(out),
    ]


def test_bench_reproducible_and_complete(tmp_path):
    """Two runs with the same seed write byte-identical JSON; the record holds the measured
    MC, the rates and realised errors within a few eps of the exact posterior."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli_main(_bench_args(a)) == 0
    assert cli_main(_bench_args(b)) == 0
    for name in ("digits-gmm-denoise.json", "summary.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in ("digits-gmm-denoise.png", "digits-gmm-denoise.npz", "summary.md"):
        assert (a / name).stat().st_size > 0
    rec = json.loads((a / "digits-gmm-denoise.json").read_text())
    (run,) = rec["runs"]
    assert run["mc"]["cost_nfe"] > 0 and run["nfe_ratio"] == pytest.approx(
        run["mc"]["cost_nfe"] / run["mlmc"]["cost_nfe"]
    )
    assert run["mc"]["level"] == run["mlmc"]["levels"][1]
    for q in ("mean", "second_moment", "variance"):
        # a correct estimator has E[err^2] <= eps^2: a single run beyond 3 eps is a failure
        assert run["mlmc"]["realised_rmse"][q] < 3 * run["eps"], q
        assert run["mc"]["realised_rmse"][q] < 3 * run["eps"], q
    timing = json.loads((a / "digits-gmm-denoise.timing.json").read_text())
    assert timing["runs"][0]["mlmc_compile_s"] < 0.5  # compilation happened in the warm-up


def test_bench_bad_arguments(tmp_path, capsys):
    assert cli_main(["bench", "--only", "nothing-*", "--out", str(tmp_path)]) == 2
    assert "matches no problem" in capsys.readouterr().err
    assert cli_main(["bench", "--only", "digits-gmm-denoise", "--eps", "-1"]) == 2
    assert "--eps must be positive" in capsys.readouterr().err
    assert cli_main(["bench", "--only", "patches16-network-denoise", "--quick"]) == 2
    assert "pass --eps" in capsys.readouterr().err
    assert cli_main(["bench", "--only", "digits-gmm-denoise", "--pilot-samples", "1"]) == 2
    assert "--pilot-samples must be an int >= 2" in capsys.readouterr().err
    assert cli_main(["bench", "--only", "digits-*-denoise", "--sampler", "ddim"]) == 2
    assert "every draw would be the same image" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written before the error


def test_eps_labels_keep_their_digits():
    texts = [_bench._eps_text(e) for e in (2e-3, 2.5e-4, 1.25e-4, 4e-2)]
    assert texts == ["2e-03", "2.5e-04", "1.25e-04", "4e-02"]


def test_python_m_benchmarks_help():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--quick" in out.stdout


def test_quick_and_full_modes_are_consistent():
    """Every problem of the quick mode is in the full mode, and every full-mode problem name
    is valid."""
    assert set(_bench.QUICK_EPS) <= set(_bench.FULL_EPS)
    for name in _bench.FULL_EPS:
        _bench_problems.parse_problem_name(name)
