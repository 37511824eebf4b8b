"""Checkpoints: bitwise round trip, checksums, lists of problems, atomic writes, no pickle."""

import json
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import numpyro_mlmc as nm
from numpyro_mlmc._checkpoints import (
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    load_gmm_checkpoint,
    save_checkpoint,
    save_gmm_checkpoint,
    sha256_bytes,
)
from numpyro_mlmc._pretrained import load_pretrained
from numpyro_mlmc.nets import MLPScoreNet, UNet


def _perturbed(model, key, scale=0.1):
    params, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jr.split(key, len(leaves))
    leaves = [p + scale * jr.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


@pytest.fixture(scope="module")
def unet():
    net = UNet(
        (8, 8),
        channels=8,
        channel_multipliers=(1, 2),
        num_res_blocks=1,
        num_heads=2,
        key=jr.PRNGKey(0),
    )
    return _perturbed(net, jr.PRNGKey(1))


def _save(path, net, schedule=None):
    return save_checkpoint(
        path,
        net,
        schedule=schedule or nm.VPSchedule(),
        parametrization="eps",
        event_shape=(8, 8),
        training={"data": "test", "steps": 0},
    )


def _rewrite_weights(path, tensors):
    """Replace the weights and record their new checksum (a consistent but wrong checkpoint)."""
    save_file(tensors, str(path / "weights.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["weights"]["sha256"] = sha256_bytes((path / "weights.safetensors").read_bytes())
    (path / "config.json").write_text(json.dumps(config))


def test_round_trip_is_bitwise(tmp_path, unet):
    _save(tmp_path / "ckpt", unet)
    loaded, config = load_checkpoint(tmp_path / "ckpt")
    x = jr.normal(jr.PRNGKey(2), (4, 8, 8))
    t = jnp.array([0.01, 0.2, 0.5, 0.9])
    np.testing.assert_array_equal(
        np.asarray(jax.vmap(unet)(x, t)), np.asarray(jax.vmap(loaded)(x, t))
    )
    for key in ("architecture", "schedule", "parametrization", "event_shape", "normalization"):
        assert key in config
    assert config["weights"]["sha256"] == sha256_bytes(
        (tmp_path / "ckpt" / "weights.safetensors").read_bytes()
    )
    assert config["library_version"] == nm.__version__
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "weights.safetensors"]


def test_round_trip_through_from_pretrained(tmp_path, unet):
    schedule = nm.CosineVPSchedule()
    _save(tmp_path / "ckpt", unet, schedule)
    prior = nm.DiffusionPrior.from_pretrained(tmp_path / "ckpt", num_steps=3)
    assert isinstance(prior, nm.DiffusionPrior)
    assert prior.schedule == schedule and prior.event_shape == (8, 8)
    assert prior.parametrization == "eps" and prior.num_steps == 3
    x = jr.normal(jr.PRNGKey(3), (8, 8))
    np.testing.assert_array_equal(np.asarray(prior.denoiser(x, 0.3)), np.asarray(unet(x, 0.3)))


def test_mlp_round_trip(tmp_path):
    net = _perturbed(MLPScoreNet((3,), width=8, num_layers=1, key=jr.PRNGKey(0)), jr.PRNGKey(1))
    save_checkpoint(tmp_path, net, schedule=nm.VPSchedule(), parametrization="x0", event_shape=(3,))
    loaded, _ = load_checkpoint(tmp_path)
    x = jnp.array([0.1, -0.2, 0.3])
    np.testing.assert_array_equal(np.asarray(net(x, 0.4)), np.asarray(loaded(x, 0.4)))


def test_tampered_weights_fail_checksum(tmp_path, unet):
    path = _save(tmp_path / "ckpt", unet)
    raw = bytearray((path / "weights.safetensors").read_bytes())
    raw[-5] ^= 0x01  # flip one bit inside the last tensor's data
    (path / "weights.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)


def test_corrupt_file_with_matching_checksum(tmp_path, unet):
    path = _save(tmp_path / "ckpt", unet)
    raw = (path / "weights.safetensors").read_bytes()[:100]  # truncated
    (path / "weights.safetensors").write_bytes(raw)
    config = json.loads((path / "config.json").read_text())
    config["weights"]["sha256"] = sha256_bytes(raw)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_checkpoint(path)


def test_missing_unexpected_and_misshapen_tensors_are_all_listed(tmp_path, unet):
    path = _save(tmp_path / "ckpt", unet)
    tensors = load_file(str(path / "weights.safetensors"))
    names = sorted(tensors)
    gone, bent = names[0], names[1]
    del tensors[gone]
    tensors[bent] = np.zeros((*tensors[bent].shape, 2), tensors[bent].dtype)
    tensors["extra.weight"] = np.zeros(3, np.float32)
    _rewrite_weights(path, tensors)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert f"missing tensors (1): {gone}" in message
    assert f"wrong shape for {bent}" in message
    assert "unexpected tensors (1): extra.weight" in message


def test_wrong_dtype_is_listed(tmp_path, unet):
    path = _save(tmp_path / "ckpt", unet)
    tensors = load_file(str(path / "weights.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].astype(np.float16)
    _rewrite_weights(path, tensors)
    with pytest.raises(CheckpointError, match=f"wrong dtype for {name}"):
        load_checkpoint(path)


def test_bad_configs(tmp_path, unet):
    path = _save(tmp_path / "ckpt", unet)
    good = json.loads((path / "config.json").read_text())

    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)

    bad = dict(good, format_version=99)
    del bad["schedule"]
    (path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "format_version" in str(info.value) and "'schedule' is missing" in str(info.value)

    bad = dict(good, architecture={"class": "os.system", "kwargs": {}})
    (path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_checkpoint(path)

    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_weights_file(tmp_path, unet):
    path = _save(tmp_path / "ckpt", unet)
    (path / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights file is not there"):
        load_checkpoint(path)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new contents")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]  # no temporary file left behind


def test_gmm_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(200, 2, 2)) + np.array([[1.0, 0.0], [0.0, -1.0]])
    gmm = nm.GaussianMixturePrior.fit(data, 2, seed=0)
    save_gmm_checkpoint(tmp_path, gmm)
    loaded, config = load_gmm_checkpoint(tmp_path)
    assert config["kind"] == "gaussian_mixture" and loaded.event_shape == (2, 2)
    np.testing.assert_array_equal(loaded.means, gmm.means)
    np.testing.assert_array_equal(loaded.covariances, gmm.covariances)
    prior = load_pretrained(tmp_path)
    assert isinstance(prior, nm.GaussianMixturePrior)
    with pytest.raises(CheckpointError, match="not a diffusion network"):
        load_checkpoint(tmp_path)
    tensors = load_file(str(tmp_path / "weights.safetensors"))
    tensors["means"] = tensors["means"][:, :3]
    _rewrite_weights(tmp_path, tensors)
    with pytest.raises(CheckpointError, match="wrong shape for means"):
        load_gmm_checkpoint(tmp_path)


def test_checkpoints_contain_no_pickle(tmp_path, unet):
    path = _save(tmp_path / "ckpt", unet)
    for name in os.listdir(path):
        data = (path / name).read_bytes()
        assert not data.startswith(b"\x80"), f"{name} looks like a pickle"
