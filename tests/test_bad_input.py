"""A battery of invalid inputs, one or more for every public entry point.

Each case must raise a documented exception type and a message that says what to change, and
leave no file behind (each case runs in an empty working folder, which must stay empty).

Documented types: `TypeError` (wrong kind of argument), `ValueError` (wrong value; its
subclasses `nm`'s `ModelError` for a model the kernel cannot use and `nm.RunCheckpointError`
for a run checkpoint of another run or a damaged one, and the weights' `CheckpointError`),
`FileNotFoundError` (a path that does not exist), `FloatingPointError` (NaN or inf draws),
`NotImplementedError` (an operation a diffusion prior cannot do), and for the command line
exit status 2 with `error: <message>` on stderr (argparse's own errors exit with 2 as well).
"""

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_mlmc as nm
from numpyro_mlmc._cli import main as cli
from numpyro_mlmc._model_structure import ModelError
from numpyro_mlmc.testing import GeometricBrownianMotion

GBM = GeometricBrownianMotion(dimension=2)
W, M, C = np.ones(2) / 2, np.zeros((2, 3)), np.stack([np.eye(3)] * 2)
GMM = nm.GaussianMixturePrior(W, M, C)


def identity_denoiser(x, t):
    return x


NET_PRIOR = nm.DiffusionPrior(identity_denoiser, event_shape=(3,), num_steps=4)


def gmm_model(y=None):
    x = numpyro.sample("x", GMM)
    numpyro.sample("y", dist.Normal(x, 0.1).to_event(1), obs=y)


def net_model(y=None):
    x = numpyro.sample("x", NET_PRIOR)
    numpyro.sample("y", dist.Normal(x[:2], 0.1).to_event(1), obs=y)


def no_prior_model(y=None):
    numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)


class NaNSampler:
    """GBM whose level-1 draws are NaN in every `every`-th row."""

    refinement = 2

    def __init__(self, every):
        self.every = every

    def cost(self, level, coupled):
        return GBM.cost(level, coupled)

    def sample(self, keys, level, coupled):
        fine, coarse = GBM.sample(keys, level, coupled)
        if level == 1:
            rows = jnp.arange(keys.shape[0])[:, None] % self.every == 0
            fine = {"x": jnp.where(rows, jnp.nan, fine["x"])}
        return fine, coarse


def key():
    return jr.key(0)


def mlmc_run(sampler=GBM, settings=None, **run):
    run.setdefault("progress_bar", False)
    return nm.MLMC(sampler, **(settings or {})).run(key(), **run)


def build(model, **kwargs):
    return nm.DiffusionPosterior(model, num_steps=4).build((), kwargs)


CASES = [
    # priors and schedules
    ("gmm weights", lambda: nm.GaussianMixturePrior(-W, M, C), ValueError, "non-negative"),
    ("gmm nan means", lambda: nm.GaussianMixturePrior(W, M + np.nan, C), ValueError, "finite"),
    ("gmm covariance", lambda: nm.GaussianMixturePrior(W, M, -C), ValueError, "identity"),
    ("gmm shapes", lambda: nm.GaussianMixturePrior(W, M, C[:, :2, :2]), ValueError, "(K, D, D)"),
    ("prior denoiser", lambda: nm.DiffusionPrior(3, event_shape=(2,)), TypeError, "callable"),
    (
        "prior parametrization",
        lambda: nm.DiffusionPrior(identity_denoiser, event_shape=(2,), parametrization="foo"),
        ValueError,
        "choose one of",
    ),
    (
        "prior event_shape",
        lambda: nm.DiffusionPrior(identity_denoiser, event_shape="ab"),
        TypeError,
        r"such as \(8, 8\)",
    ),
    (
        "prior num_steps",
        lambda: nm.DiffusionPrior(identity_denoiser, event_shape=(2,), num_steps=0),
        ValueError,
        "at least one",
    ),
    (
        "prior sampler",
        lambda: nm.DiffusionPrior(identity_denoiser, event_shape=(2,), sampler="foo"),
        ValueError,
        "pass one of",
    ),
    (
        "prior schedule",
        lambda: nm.DiffusionPrior(identity_denoiser, event_shape=(2,), schedule="vp"),
        TypeError,
        r"nm.VPSchedule\(\)",
    ),
    (
        "pretrained name",
        lambda: nm.DiffusionPrior.from_pretrained("nope"),
        FileNotFoundError,
        "train",
    ),
    ("pretrained type", lambda: nm.DiffusionPrior.from_pretrained(3), TypeError, "directory"),
    ("schedule betas", lambda: nm.VPSchedule(beta_min=-1.0), ValueError, "0 < beta_min"),
    ("schedule t_max", lambda: nm.VPSchedule(t_max=0.0), ValueError, "positive finite t_max"),
    ("prior density", lambda: NET_PRIOR.log_prob(jnp.zeros(3)), NotImplementedError, "condition"),
    # operators
    ("inpaint mask", lambda: nm.operators.Inpaint(np.array([0.5, 1.0])), ValueError, "boolean"),
    ("inpaint empty", lambda: nm.operators.Inpaint(np.zeros(3, bool)), ValueError, "at least one"),
    (
        "inpaint shape",
        lambda: nm.operators.Inpaint(np.ones(3, bool))(jnp.zeros(4)),
        ValueError,
        "build the mask",
    ),
    ("blur kernel", lambda: nm.operators.Blur(np.ones(3)), ValueError, "2-D"),
    ("blur nan", lambda: nm.operators.Blur(np.full((3, 3), np.nan)), ValueError, "finite"),
    ("blur boundary", lambda: nm.operators.Blur(np.ones((3, 3)), "x"), ValueError, "'periodic'"),
    ("blur input", lambda: nm.operators.Blur(np.ones((3, 3)))(jnp.zeros(5)), ValueError, "2 axes"),
    ("downsample factor", lambda: nm.operators.Downsample(0), ValueError, "positive int"),
    (
        "downsample size",
        lambda: nm.operators.Downsample(3)(jnp.zeros((8, 8))),
        ValueError,
        "multiple",
    ),
    ("project nan", lambda: nm.operators.Project(np.full((2, 3), np.nan)), ValueError, "finite"),
    (
        "project shape",
        lambda: nm.operators.Project(np.ones((2, 3)))(jnp.zeros(4)),
        ValueError,
        r"shape \(3,\)",
    ),
    # the kernel and sample_posterior
    ("kernel model", lambda: nm.DiffusionPosterior(3), TypeError, "NumPyro model"),
    (
        "kernel guidance",
        lambda: nm.DiffusionPosterior(gmm_model, guidance="x"),
        ValueError,
        "one of",
    ),
    ("kernel steps", lambda: nm.DiffusionPosterior(gmm_model, num_steps=-1), ValueError, ">= 1"),
    (
        "kernel scale",
        lambda: nm.DiffusionPosterior(gmm_model, guidance_scale=float("nan")),
        ValueError,
        "positive and finite",
    ),
    (
        "kernel exponent",
        lambda: nm.DiffusionPosterior(gmm_model, exponent=-1.0),
        ValueError,
        "positive and finite",
    ),
    (
        "kernel spacing",
        lambda: nm.DiffusionPosterior(gmm_model, spacing="log"),
        ValueError,
        "'uniform' or 'polynomial'",
    ),
    (
        "observation shape",
        lambda: build(gmm_model, y=jnp.zeros(5)),
        ModelError,
        r"pass an observation of shape \(3,\)",
    ),
    ("observation nan", lambda: build(gmm_model, y=jnp.full(3, jnp.nan)), ModelError, "mask them"),
    ("no prior site", lambda: build(no_prior_model, y=1.0), ModelError, "numpyro.sample"),
    (
        "exact guidance",
        lambda: nm.DiffusionPosterior(net_model, guidance="exact").build((), {"y": jnp.zeros(2)}),
        ModelError,
        "Use 'denoise', 'pigdm' or 'dps'",
    ),
    (
        "posterior key",
        lambda: nm.sample_posterior("k", gmm_model, 4, y=jnp.zeros(3)),
        TypeError,
        r"jax.random.key\(0\)",
    ),
    (
        "posterior count",
        lambda: nm.sample_posterior(key(), gmm_model, 0, y=jnp.zeros(3)),
        ValueError,
        ">= 1",
    ),
    (
        "posterior chains",
        lambda: nm.sample_posterior(key(), gmm_model, 4, num_chains=0, y=jnp.zeros(3)),
        ValueError,
        ">= 1",
    ),
    (
        "posterior model_args",
        lambda: nm.sample_posterior(key(), gmm_model, 4, model_args=jnp.zeros(3)),
        TypeError,
        r"model_args=\(a,\)",
    ),
    (
        "posterior devices",
        lambda: nm.sample_posterior(key(), gmm_model, 4, num_steps=2, devices=99, y=jnp.zeros(3)),
        ValueError,
        "between 1 and",
    ),
    # MLMC and MonteCarlo
    ("mlmc sampler", lambda: mlmc_run(object(), rmse=0.1), TypeError, "cost"),
    ("mlmc rmse", lambda: mlmc_run(rmse=-1.0), ValueError, "positive finite"),
    ("mlmc target", lambda: mlmc_run(rmse=0.1, num_samples=[10]), ValueError, "exactly one"),
    ("mlmc counts", lambda: mlmc_run(num_samples=5), TypeError, r"\[4000, 1000, 250\]"),
    ("mlmc batch", lambda: nm.MLMC(GBM, batch_size=0), ValueError, ">= 1"),
    ("mlmc theta", lambda: nm.MLMC(GBM, theta=1.5), ValueError, "strictly between"),
    ("mlmc faults", lambda: nm.MLMC(GBM, on_nonfinite="ignore"), ValueError, "'discard'"),
    ("mlmc devices", lambda: nm.MLMC(GBM, devices=99), ValueError, "between 1 and"),
    ("mlmc levels", lambda: nm.MLMC(GBM, min_level=4, max_level=2), ValueError, ">= min_level"),
    ("mlmc key", lambda: nm.MLMC(GBM).run("k", rmse=0.1), TypeError, r"jax.random.key\(0\)"),
    (
        "mlmc functionals",
        lambda: mlmc_run(rmse=0.1, functionals=[np.mean]),
        TypeError,
        "dict name",
    ),
    (
        "mlmc functional value",
        lambda: mlmc_run(
            num_samples=[4], functionals={"f": lambda x: [x]}, settings={"min_level": 0}
        ),
        TypeError,
        "return a jax/numpy array",
    ),
    (
        "mlmc refinement",
        lambda: mlmc_run(rmse=0.1, settings={"refinement": 3}),
        ValueError,
        "pass refinement equal",
    ),
    (
        "nan draws",
        lambda: mlmc_run(NaNSampler(4), num_samples=[8, 8], settings={"min_level": 0}),
        FloatingPointError,
        r"level 1 produced 2 non-finite.*on_nonfinite='discard'",
    ),
    (
        "all-nan draws discarded",
        lambda: mlmc_run(
            NaNSampler(1),
            num_samples=[8, 100],
            settings={"min_level": 0, "on_nonfinite": "discard", "batch_size": 32},
        ),
        FloatingPointError,
        "level 1: .* non-finite .* Fix the score model",
    ),
    ("mc steps", lambda: nm.MonteCarlo(GBM, num_steps=3), ValueError, "pass level="),
    ("mc choice", lambda: nm.MonteCarlo(GBM), ValueError, "exactly one"),
    (
        "mc count",
        lambda: nm.MonteCarlo(GBM, level=1).run(key(), num_samples=1, progress_bar=False),
        ValueError,
        ">= 2",
    ),
    ("mlmc_test count", lambda: nm.mlmc_test(GBM, key(), num_samples=1), ValueError, ">= 2"),
    # run checkpoints (all checked before anything is drawn or written)
    ("checkpoint type", lambda: mlmc_run(rmse=0.1, checkpoint=3), TypeError, "file path"),
    (
        "checkpoint folder missing",
        lambda: mlmc_run(rmse=0.1, checkpoint="missing/run.npz"),
        FileNotFoundError,
        "create it first",
    ),
    ("checkpoint is a folder", lambda: mlmc_run(rmse=0.1, checkpoint="."), ValueError, "file path"),
]


@pytest.mark.parametrize("fn, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(fn, error, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        fn()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "run.npz"
    mlmc_run(num_samples=[20, 10], settings={"min_level": 1, "batch_size": 8}, checkpoint=path)
    return path


@pytest.mark.parametrize(
    "change, what",
    [({"num_samples": [20, 12]}, "num_samples"), ({"settings": {"min_level": 1}}, "batch_size")],
)
def test_checkpoint_of_another_run(saved_run, change, what):
    args = {"num_samples": [20, 10], "settings": {"min_level": 1, "batch_size": 8}, **change}
    before = saved_run.read_bytes()
    with pytest.raises(nm.RunCheckpointError, match=f"{what}.*start afresh"):
        mlmc_run(checkpoint=saved_run, **args)
    assert saved_run.read_bytes() == before
    assert [p.name for p in saved_run.parent.iterdir()] == ["run.npz"]


def test_damaged_checkpoints(tmp_path, saved_run):
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(saved_run.read_bytes()[:200])
    with pytest.raises(nm.RunCheckpointError, match="delete it"):
        mlmc_run(
            num_samples=[20, 10], settings={"min_level": 1, "batch_size": 8}, checkpoint=damaged
        )
    damaged.write_bytes(b"not a checkpoint")
    with pytest.raises(nm.RunCheckpointError, match="delete it"):
        mlmc_run(
            num_samples=[20, 10], settings={"min_level": 1, "batch_size": 8}, checkpoint=damaged
        )
    assert [p.name for p in tmp_path.iterdir()] == ["damaged.npz"]


def test_weights_checkpoint_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        nm.DiffusionPrior.from_pretrained(tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "digits", "--out", "out"], "--steps is required"),
        (["demo", "--prior", "gmm", "--rmse", "-1", "--out", "out"], "--rmse must be positive"),
        (
            ["--coordinator-address", "localhost", "--num-processes", "2", "--process-id", "0"]
            + ["demo", "--out", "out"],
            "host:port",
        ),
        (["--num-processes", "2", "demo", "--out", "out"], "all of coordinator_address"),
    ],
)
def test_cli(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert list(tmp_path.iterdir()) == []


def test_cli_argparse_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (["train", "--dataset", "nope", "--out", "o"], ["demo", "--seed", "x"], ["nope"]):
        with pytest.raises(SystemExit) as exit_info:
            cli(argv)
        assert exit_info.value.code == 2
        assert "invalid" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
