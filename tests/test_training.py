"""Denoising score matching: the loss falls, resume continues the same curve, data pipelines."""

import dataclasses
import json

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import numpyro_mlmc as nm
from numpyro_mlmc._checkpoints import CheckpointError
from numpyro_mlmc._data import (
    PATCH_TEST_IMAGES,
    PATCH_TRAIN_IMAGES,
    load_patch_images,
    load_patches16,
    sample_patches,
)
from numpyro_mlmc._training import TrainConfig, array_batches, train
from numpyro_mlmc.nets import MLPScoreNet

CONFIG = TrainConfig(
    steps=60,
    batch_size=64,
    learning_rate=3e-3,
    warmup_steps=5,
    checkpoint_every=20,
    ema_decay=0.9,
)


@pytest.fixture(scope="module")
def data2d():
    # Two well-separated clusters in 2-D, on the [-1, 1] scale of image data.
    rng = np.random.default_rng(0)
    centres = np.array([[-0.6, 0.4], [0.5, -0.5]])
    return (centres[rng.integers(0, 2, 2000)] + 0.05 * rng.normal(size=(2000, 2))).astype(
        np.float32
    )


def _net():
    return MLPScoreNet((2,), width=32, num_layers=2, key=jr.PRNGKey(0))


def test_loss_falls_below_the_untrained_value(data2d):
    result = train(_net(), array_batches(data2d, 64), config=CONFIG, progress=False)
    assert result.losses.shape == (60,)
    # The untrained net returns 0, so its eps-loss is mean(e^2) over 128 N(0,1) draws:
    # 1 +- sqrt(2/128) = 1 +- 0.125. Clusters of std 0.05 make eps predictable from x_t at
    # most times; 0.6 is more than 3 standard errors below 1 for a 10-step average.
    assert abs(result.losses[0] - 1.0) < 4 * np.sqrt(2 / 128)
    assert result.losses[-10:].mean() < 0.6


def test_resume_continues_the_same_loss_curve(tmp_path, data2d):
    data = array_batches(data2d, 64, seed=1)
    straight = train(_net(), data, config=CONFIG, progress=False)
    first = train(_net(), data, config=CONFIG, out_dir=tmp_path, progress=False, stop_at=20)
    assert first.losses.shape == (20,)
    state = json.loads((tmp_path / "training_state.json").read_text())
    assert state["step"] == 20
    resumed = train(_net(), data, config=CONFIG, out_dir=tmp_path, progress=False)
    assert resumed.resumed_from == 20
    np.testing.assert_array_equal(resumed.losses, straight.losses)
    x = jnp.array([0.1, -0.3])
    np.testing.assert_array_equal(
        np.asarray(resumed.ema_model(x, 0.2)), np.asarray(straight.ema_model(x, 0.2))
    )
    # The output directory is a loadable checkpoint of the EMA weights.
    prior = nm.DiffusionPrior.from_pretrained(tmp_path, num_steps=8, batch_size=16)
    assert prior.event_shape == (2,) and prior.config["training"]["steps"] == 60
    np.testing.assert_array_equal(
        np.asarray(prior.denoiser(x, 0.2)), np.asarray(straight.ema_model(x, 0.2))
    )
    draws = prior.sample(jr.PRNGKey(0), (16,))
    assert draws.shape == (16, 2) and bool(jnp.all(jnp.isfinite(draws)))


def test_resume_refuses_a_different_run(tmp_path, data2d):
    data = array_batches(data2d, 64)
    train(_net(), data, config=CONFIG, out_dir=tmp_path, progress=False, stop_at=5)
    other = MLPScoreNet((2,), width=16, num_layers=2, key=jr.PRNGKey(0))
    with pytest.raises(CheckpointError, match="architecture"):
        train(other, data, config=CONFIG, out_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="parametrization"):
        train(_net(), data, config=CONFIG, out_dir=tmp_path, parametrization="x0", progress=False)


@pytest.mark.parametrize("parametrization", ["x0", "v", "score"])
def test_other_parametrizations_train(parametrization, data2d):
    config = dataclasses.replace(CONFIG, steps=3)
    result = train(
        _net(),
        array_batches(data2d, 64),
        config=config,
        parametrization=parametrization,
        progress=False,
    )
    assert np.all(np.isfinite(result.losses))


def test_bad_settings(data2d):
    with pytest.raises(ValueError, match="batch_size"):
        train(_net(), array_batches(data2d, 32), config=CONFIG, progress=False)
    with pytest.raises(ValueError, match="parametrization"):
        train(_net(), array_batches(data2d, 64), config=CONFIG, parametrization="noise")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


def test_array_batches_are_deterministic_and_flip():
    data = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    batch = array_batches(data, 50, seed=3, flips=(1,))
    np.testing.assert_array_equal(batch(7), batch(7))
    assert not np.array_equal(batch(7), batch(8))
    rows = {tuple(b.ravel()) for b in batch(7)}
    allowed = {tuple(d.ravel()) for d in data} | {tuple(d[:, ::-1].ravel()) for d in data}
    assert rows <= allowed and len(rows) == 4  # both images, flipped and not


def test_patch_pipeline():
    assert not set(PATCH_TRAIN_IMAGES) & set(PATCH_TEST_IMAGES)
    train_patches = load_patches16(num_patches=300, seed=0)
    test_patches = load_patches16(split="test", num_patches=300, seed=0)
    for p in (train_patches, test_patches):
        assert p.shape == (300, 16, 16) and p.dtype == np.float32
        assert p.min() >= -1.0 and p.max() <= 1.0
    np.testing.assert_array_equal(train_patches, load_patches16(num_patches=300, seed=0))
    images = load_patch_images("test")
    assert sorted(images) == sorted(PATCH_TEST_IMAGES)
    # Without flips every patch is a window of some held-out image.
    patch = sample_patches(images, 1, seed=5, flips=False)[0]
    found = any(
        np.array_equal(im[r : r + 16, c : c + 16], patch)
        for im in images.values()
        for r in range(im.shape[0] - 15)
        for c in range(0, im.shape[1] - 15)
        if im[r, c] == patch[0, 0]
    )
    assert found
    with pytest.raises(ValueError, match="split"):
        load_patch_images("validation")


def test_progress_bar_reports_the_loss(data2d, capsys):
    config = dataclasses.replace(CONFIG, steps=4, log_every=2)
    train(_net(), array_batches(data2d, 64), config=config, progress=True)
    err = capsys.readouterr().err
    assert "loss=" in err
