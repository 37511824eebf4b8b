"""Denoising score matching with optax: AdamW, warmup + cosine decay, EMA, gradient clipping,
a progress bar, periodic checkpoints and exact resume.

Loss (Ho et al. 2020; Song et al. 2021, "Score-based generative modeling through SDEs"): for a
batch `x_0` of `B` samples, times `t = t_min + (t_max - t_min) u^p` with `u ~ U(0, 1)` and
noise `e ~ N(0, I)`, `x_t = alpha(t) x_0 + sigma(t) e`, and

    L = mean over batch and elements of (net(x_t, t) - target)^2,

with `target = e` (`"eps"`), `x_0` (`"x0"`), `alpha e - sigma x_0` (`"v"`), or, for
`"score"`, the residual `sigma net + e` (the score loss weighted by `sigma^2`). `p > 1`
(`time_exponent`) puts more training effort at low noise, where the images' detail is learnt;
`p = 1` is the usual uniform time.

Determinism and resume: the batch of step `k` comes from `data(k)` (a function of the step
only) and the noise from `fold_in(key, k)`, so a run resumed from a checkpoint at step `k`
continues the same loss curve as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from ._checkpoints import (
    CheckpointError,
    atomic_write_bytes,
    bytes_to_tensors,
    save_checkpoint,
    tensors_into_tree,
    tensors_to_bytes,
    tree_to_tensors,
)
from ._schedules import AbstractSchedule, VPSchedule
from ._score_models import PARAMETRIZATIONS

__all__ = ["TrainConfig", "TrainResult", "train", "array_batches"]

STATE_FILE = "training_state.safetensors"
STATE_CONFIG_FILE = "training_state.json"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of `train`.

    Attributes:
        steps: total optimisation steps.
        batch_size: samples per step.
        learning_rate: peak AdamW learning rate, reached after `warmup_steps` of linear
            warmup, then cosine decay to `learning_rate * final_lr_fraction` at `steps`.
        weight_decay: AdamW decoupled weight decay (Loshchilov and Hutter 2019).
        grad_clip: global-norm gradient clipping threshold.
        ema_decay: decay of the exponential moving average of the weights; the effective
            decay at step `k` is `min(ema_decay, (1 + k) / (10 + k))` so short runs are not
            dominated by the initial weights.
        t_min: smallest training time (avoids the `sigma -> 0` end, where `eps` is
            unidentifiable).
        time_exponent: `p` in `t = t_min + (t_max - t_min) u^p`.
        seed: seeds the initial noise keys (the data pipeline has its own seed).
        checkpoint_every: steps between checkpoints (0: only at the end).
        log_every: steps between progress-bar updates.
    """

    steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.02
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    t_min: float = 1e-3
    time_exponent: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive.")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")
        if self.time_exponent <= 0:
            raise ValueError(f"time_exponent must be positive, got {self.time_exponent}.")


@dataclasses.dataclass
class TrainResult:
    """`model` (raw weights), `ema_model` (averaged weights: use these for sampling),
    `losses` (per-step training loss, float32 array of length `steps`), `seconds` (wall time
    of this call), `resumed_from` (step a resumed run started at, or 0)."""

    model: eqx.Module
    ema_model: eqx.Module
    losses: np.ndarray
    seconds: float
    resumed_from: int


def array_batches(data, batch_size: int, *, seed: int = 0, flips: tuple[int, ...] = ()):
    """A deterministic batch function over a fixed data array.

    Returns `batch(step) -> (batch_size, *event_shape)` float32: samples drawn with
    replacement from `data` by `numpy.random.default_rng([seed, step])`, each axis in `flips`
    (axes of one sample) reversed with probability 1/2.
    """
    data = np.asarray(data, np.float32)

    def batch(step: int) -> np.ndarray:
        rng = np.random.default_rng([seed, step])
        out = data[rng.integers(0, data.shape[0], batch_size)]
        for axis in flips:
            flip = rng.random(batch_size) < 0.5
            out[flip] = np.flip(out[flip], axis=axis + 1)
        return out

    return batch


def _target(parametrization, x0, eps, a, s):
    if parametrization == "eps":
        return eps
    if parametrization == "x0":
        return x0
    if parametrization == "v":
        return a * eps - s * x0
    raise AssertionError(parametrization)


def make_loss(schedule: AbstractSchedule, parametrization: str, config: TrainConfig):
    """`loss(model, x0, key) -> scalar`: the denoising score-matching loss of a batch."""
    t_max = schedule.t_max

    def loss(model, x0, key):
        k_time, k_noise = jr.split(key)
        u = jr.uniform(k_time, (x0.shape[0],), dtype=x0.dtype)
        t = config.t_min + (t_max - config.t_min) * u**config.time_exponent
        eps = jr.normal(k_noise, x0.shape, dtype=x0.dtype)
        expand = (x0.shape[0],) + (1,) * (x0.ndim - 1)
        a = schedule.alpha(t).reshape(expand)
        s = schedule.sigma(t).reshape(expand)
        xt = a * x0 + s * eps
        out = jax.vmap(model)(xt, t)
        if parametrization == "score":
            return jnp.mean((s * out + eps) ** 2)
        return jnp.mean((out - _target(parametrization, x0, eps, a, s)) ** 2)

    return loss


def make_optimizer(config: TrainConfig):
    """AdamW with global-norm clipping and a warmup + cosine learning-rate schedule."""
    warmup = min(config.warmup_steps, max(config.steps - 1, 0))
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(config.steps, warmup + 1),
        end_value=config.learning_rate * config.final_lr_fraction,
    )
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(lr, weight_decay=config.weight_decay),
    )


def _state_tree(params, ema, opt_state):
    return {"params": params, "ema": ema, "opt_state": opt_state}


def _save_state(out_dir: Path, params, ema, opt_state, losses, step, meta):
    tensors = {
        f"state{k}": v for k, v in tree_to_tensors(_state_tree(params, ema, opt_state)).items()
    }
    tensors["losses"] = np.asarray(losses[:step], np.float32)
    atomic_write_bytes(out_dir / STATE_FILE, tensors_to_bytes(tensors))
    info = dict(meta, step=int(step))
    atomic_write_bytes(out_dir / STATE_CONFIG_FILE, (json.dumps(info, indent=2) + "\n").encode())


def _load_state(out_dir: Path, skeleton, meta):
    info = json.loads((out_dir / STATE_CONFIG_FILE).read_text())
    for key in ("architecture", "parametrization", "schedule", "batch_size", "seed", "data"):
        if info.get(key) != meta.get(key):
            raise CheckpointError(
                f"cannot resume from {out_dir}: its {key} is {info.get(key)!r}, this run's is "
                f"{meta.get(key)!r}. Use a fresh output directory or pass resume=False."
            )
    tensors = bytes_to_tensors((out_dir / STATE_FILE).read_bytes(), str(out_dir / STATE_FILE))
    losses = tensors.pop("losses", np.zeros(0, np.float32))
    state = {k[len("state") :]: v for k, v in tensors.items() if k.startswith("state")}
    tree = tensors_into_tree(skeleton, state, str(out_dir / STATE_FILE))
    step = int(info["step"])
    if losses.shape != (step,):
        raise CheckpointError(f"{out_dir / STATE_FILE}: loss history does not match step {step}.")
    return tree, losses, step


def train(
    model: eqx.Module,
    data: Callable[[int], np.ndarray],
    *,
    schedule: AbstractSchedule | None = None,
    parametrization: str = "eps",
    config: TrainConfig | None = None,
    out_dir=None,
    resume: bool = True,
    progress: bool = True,
    data_description: dict | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Train `model(x, t)` (one sample) by denoising score matching.

    Args:
        model: an equinox network acting on one sample, e.g. `nm.nets.UNet((8, 8), key=k)`.
        data: `data(step) -> (batch_size, *event_shape)` array, deterministic in `step`
            (e.g. `array_batches(images, 128)`).
        schedule: the noise process (default `VPSchedule()`).
        parametrization: what the network learns to return: `"eps"`, `"x0"`, `"score"`, `"v"`.
        config: a `TrainConfig`.
        out_dir: if given, every `config.checkpoint_every` steps and at the end writes a
            loadable checkpoint of the EMA weights (`config.json` + `weights.safetensors`) and
            the full training state (`training_state.safetensors` + `.json`) for resume.
        resume: continue from `out_dir`'s training state when there is one.
        progress: show a tqdm progress bar with the running loss.
        data_description: JSON-serialisable description of the data, stored in the config.
        stop_at: stop (after checkpointing) at this step, as if interrupted; for tests.
    Returns a `TrainResult`.
    """
    schedule = VPSchedule() if schedule is None else schedule
    config = TrainConfig() if config is None else config
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {parametrization!r}; use {PARAMETRIZATIONS}.")
    from ._checkpoints import architecture_to_config, schedule_to_config

    probe = np.asarray(data(0))
    event_shape = tuple(probe.shape[1:])
    if probe.shape[0] != config.batch_size:
        raise ValueError(
            f"data(step) returned a batch of {probe.shape[0]}, config.batch_size is "
            f"{config.batch_size}; make them agree."
        )
    meta = {
        "architecture": architecture_to_config(model),
        "parametrization": parametrization,
        "schedule": schedule_to_config(schedule),
        "batch_size": config.batch_size,
        "seed": config.seed,
        "data": data_description or {},
        "train_config": dataclasses.asdict(config),
    }

    optimizer = make_optimizer(config)
    params, static = eqx.partition(model, eqx.is_array)
    opt_state = optimizer.init(params)
    ema = params
    losses = np.zeros(config.steps, np.float32)
    start = 0
    out_dir = None if out_dir is None else Path(out_dir)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume and (out_dir / STATE_FILE).is_file():
            tree, old, start = _load_state(out_dir, _state_tree(params, ema, opt_state), meta)
            params, ema, opt_state = tree["params"], tree["ema"], tree["opt_state"]
            n = min(start, config.steps)
            losses[:n] = old[:n]
    loss_fn = make_loss(schedule, parametrization, config)
    base_key = jr.PRNGKey(config.seed)

    @eqx.filter_jit
    def step_fn(params, ema, opt_state, x0, step):
        key = jr.fold_in(base_key, step)
        value, grads = eqx.filter_value_and_grad(
            lambda p: loss_fn(eqx.combine(p, static), x0, key)
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = eqx.apply_updates(params, updates)
        decay = jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        return params, ema, opt_state, value

    def checkpoint(step):
        if out_dir is None:
            return
        _save_state(out_dir, params, ema, opt_state, losses, step, meta)
        training = {
            "data": data_description or {},
            "steps": int(step),
            "train_config": dataclasses.asdict(config),
            "final_loss_mean_last_100": float(np.mean(losses[max(0, step - 100) : step]))
            if step
            else None,
            "weights": "EMA",
        }
        save_checkpoint(
            out_dir,
            eqx.combine(ema, static),
            schedule=schedule,
            parametrization=parametrization,
            event_shape=event_shape,
            training=training,
        )

    end = config.steps if stop_at is None else min(stop_at, config.steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="train", dynamic_ncols=True)
    t0 = time.perf_counter()
    running = math.nan
    try:
        for step in range(start, end):
            x0 = jnp.asarray(data(step), dtype=jnp.float32)
            params, ema, opt_state, value = step_fn(params, ema, opt_state, x0, jnp.int32(step))
            value = float(value)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training loss became {value} at step {step}; lower learning_rate or "
                    "grad_clip."
                )
            losses[step] = value
            running = value if math.isnan(running) else 0.98 * running + 0.02 * value
            if bar is not None and (step + 1) % config.log_every == 0:
                bar.set_postfix(loss=f"{running:.4f}")
                bar.update(config.log_every)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                checkpoint(step + 1)
        if end > start and not (config.checkpoint_every and end % config.checkpoint_every == 0):
            checkpoint(end)
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(
        model=eqx.combine(params, static),
        ema_model=eqx.combine(ema, static),
        losses=losses[:end].copy(),
        seconds=time.perf_counter() - t0,
        resumed_from=start,
    )
