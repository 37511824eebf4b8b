"""Bring your own network: train a small Equinox denoiser and use it as a NumPyro prior.

`nm.DiffusionPrior` wraps any JAX callable `net(x, t)` that acts on one sample. What it needs
to know is the noise schedule the network was trained with and what the network returns (its
parametrization). This script

1. defines a residual MLP in Equinox (nothing from `numpyro_mlmc.nets`), with a sinusoidal time
   embedding;
2. trains it by denoising score matching with optax on the scikit-learn digits: for
   `x_t = alpha(t) x_0 + sigma(t) e`, minimise `E ||net(x_t, t) - e||^2` (the `"eps"`
   parametrization) under `nm.VPSchedule()`;
3. wraps it, `nm.DiffusionPrior(net, schedule=schedule, event_shape=(8, 8),
   parametrization="eps")`, draws unconditional samples, and denoises a held-out digit
   observed with noise 0.5 (`guidance="denoise"`, the exact start-time sampler).

    python examples/custom_network_prior.py --out custom-output        # about a minute
    python examples/custom_network_prior.py --tiny --out tiny-output    # untrained-quality, seconds

Writes `custom_network_loss.png`, `custom_network_samples.png` and
`custom_network_denoising.png` to `--out`. For a proper prior use the training CLI
(`numpyro-mlmc train`) or `nm.nets.UNet`; see docs/how-to/bring-your-own-network.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from _common import held_out_digit, parser, show_images


class Denoiser(eqx.Module):
    """`net(x, t) -> eps_hat`, `x` of shape `(8, 8)`, `t` a scalar in `[0, 1]`."""

    embed: eqx.nn.Linear
    blocks: list
    out: eqx.nn.Linear
    frequencies: jax.Array

    def __init__(self, *, width=256, depth=3, key):
        keys = jr.split(key, depth + 2)
        self.frequencies = jnp.exp(jnp.linspace(0.0, math.log(1000.0), 16))
        self.embed = eqx.nn.Linear(64 + 32, width, key=keys[0])
        self.blocks = [eqx.nn.MLP(width, width, width, 1, jax.nn.silu, key=k) for k in keys[1:-1]]
        out = eqx.nn.Linear(width, 64, key=keys[-1])
        self.out = eqx.tree_at(lambda layer: layer.weight, out, out.weight * 0.0)  # start at 0

    def __call__(self, x, t):
        phase = t * self.frequencies
        h = self.embed(jnp.concatenate([x.reshape(-1), jnp.sin(phase), jnp.cos(phase)]))
        for block in self.blocks:
            h = h + block(jax.nn.silu(h))
        return self.out(jax.nn.silu(h)).reshape(x.shape)


def train(net, images, schedule, *, steps, key, batch_size=256, learning_rate=2e-3):
    """Denoising score matching, eps target, times uniform on `[1e-3, 1]`. Returns the trained
    network and the loss per step."""
    import optax

    optimizer = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps, 0.05))
    opt_state = optimizer.init(eqx.filter(net, eqx.is_array))
    data = jnp.asarray(images)

    def loss_fn(net, key):
        k_idx, k_t, k_e = jr.split(key, 3)
        x0 = data[jr.randint(k_idx, (batch_size,), 0, data.shape[0])]
        t = jr.uniform(k_t, (batch_size,), minval=1e-3, maxval=1.0)
        e = jr.normal(k_e, x0.shape)
        a = schedule.alpha(t)[:, None, None]
        s = schedule.sigma(t)[:, None, None]
        pred = jax.vmap(net)(a * x0 + s * e, t)
        return jnp.mean((pred - e) ** 2)

    @eqx.filter_jit
    def step(net, opt_state, key):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(net, key)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(net, eqx.is_array))
        return eqx.apply_updates(net, updates), opt_state, loss

    losses = []
    for i in range(steps):
        net, opt_state, loss = step(net, opt_state, jr.fold_in(key, i))
        losses.append(float(loss))
    return net, losses


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0], "custom-output")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 3000)")
    args = p.parse_args(argv)

    import matplotlib.pyplot as plt
    import numpy as np
    import numpyro
    import numpyro.distributions as dist

    import numpyro_mlmc as nm
    from numpyro_mlmc._data import load_digits_images

    tiny = args.tiny
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps if args.steps is not None else (20 if tiny else 3000)
    num_steps = 16 if tiny else 256

    schedule = nm.VPSchedule()
    images, _ = load_digits_images(split="train")
    key_init, key_train, key_prior, key_post = jr.split(jr.key(args.seed), 4)
    net = Denoiser(width=64 if tiny else 256, key=key_init)
    net, losses = train(net, images, schedule, steps=steps, key=key_train)
    print(f"trained {steps} steps: loss {losses[0]:.3f} -> {np.mean(losses[-50:]):.3f}")

    # --- the network as a NumPyro distribution ---------------------------------------------------
    prior = nm.DiffusionPrior(
        net, schedule=schedule, event_shape=(8, 8), parametrization="eps", num_steps=num_steps
    )
    samples = np.asarray(prior.sample(key_prior, (8,)))

    # --- denoising a held-out digit: y = x + 0.5 n ------------------------------------------------
    truth = held_out_digit(7)
    sigma = 0.5
    y = jnp.asarray(truth + sigma * np.random.default_rng(args.seed).normal(size=(8, 8)))

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(x, sigma).to_event(2), obs=y)

    draws = nm.sample_posterior(
        key_post, model, 16 if tiny else 256, num_steps=num_steps, guidance="denoise", y=y
    )["x"]
    mean, std = draws.mean(0), draws.std(0, ddof=1)
    print(
        f"denoising RMSE: observation {np.sqrt(np.mean((np.asarray(y) - truth) ** 2)):.3f}, "
        f"posterior mean {np.sqrt(np.mean((mean - truth) ** 2)):.3f}"
    )

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.semilogy(losses)
    ax.set(xlabel="step", ylabel="DSM loss (eps)", title="training")
    fig.tight_layout()
    fig.savefig(out / "custom_network_loss.png", dpi=100)
    plt.close(fig)
    show_images(
        out / "custom_network_samples.png",
        [(s, f"sample {i}") for i, s in enumerate(samples)],
        ncols=4,
    )
    show_images(
        out / "custom_network_denoising.png",
        [
            (truth, "truth"),
            (y, f"y = x + {sigma} n"),
            (mean, "posterior mean"),
            (std, "posterior std"),
        ],
    )
    print(f"wrote figures to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
