"""Quick start: a diffusion prior in a NumPyro model, posterior draws, and MLMC.

A held-out handwritten digit (8x8, scikit-learn) is observed in its top half with Gaussian
noise. The script

1. writes the inverse problem as an ordinary NumPyro model whose image latent has a diffusion
   prior;
2. draws posterior samples with `nm.DiffusionPosterior` inside `numpyro.infer.MCMC` and hands
   them to ArviZ;
3. estimates the posterior mean and pixelwise variance to a requested RMSE with `nm.MLMC`, then
   the same with plain Monte Carlo (`nm.MonteCarlo`) at MLMC's finest level, and prints both
   costs;
4. writes `quickstart.png` (truth, observation, posterior mean and standard deviation) and
   `quickstart_mlmc.png` (the four standard MLMC panels) to `--out`.

The prior is chosen by `--prior` (see `_common.py`): the shipped pretrained digits network when
this install has it, else a Gaussian mixture fitted to the digits, whose posterior is known in
closed form; then the script also prints the realised error of the MLMC estimates.

    python examples/quickstart.py --out quickstart-output
    python examples/quickstart.py --tiny --out tiny-output     # seconds, for tests

Inpainting is not where MLMC pays most (docs/results.md): expect a modest cost ratio here, and
a larger one on the denoising problem of `examples/mlmc_diagnostics.py`.
"""

from __future__ import annotations

from pathlib import Path

from _common import digits_prior, held_out_digit, parser, show_images


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0], "quickstart-output")
    p.add_argument("--rmse", type=float, default=None, help="MLMC target (default 0.03)")
    args = p.parse_args(argv)

    import arviz as az
    import jax.numpy as jnp
    import jax.random as jr
    import matplotlib.pyplot as plt
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC

    import numpyro_mlmc as nm

    tiny = args.tiny
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rmse = args.rmse if args.rmse is not None else (0.15 if tiny else 0.03)

    # --- the problem: the top half of a held-out digit, noise 0.05 ---------------------------
    prior = digits_prior(args.prior, tiny=tiny)
    print(f"prior: {prior!r}")
    truth = held_out_digit(0)
    mask = np.zeros((8, 8), bool)
    mask[:4] = True
    op = nm.operators.Inpaint(mask)
    sigma = 0.05
    rng = np.random.default_rng(args.seed)
    y = jnp.asarray(np.asarray(op(truth)) + sigma * rng.normal(size=int(mask.sum())), jnp.float32)

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(op(x), sigma).to_event(1), obs=y)

    key_mcmc, key_mlmc, key_mc = jr.split(jr.key(args.seed), 3)

    # --- 1. posterior draws through NumPyro's MCMC ----------------------------------------------
    kernel = nm.DiffusionPosterior(model, num_steps=16 if tiny else 256)
    mcmc = MCMC(
        kernel,
        num_warmup=0,  # every step is an independent guided reverse diffusion: nothing to adapt
        num_samples=8 if tiny else 100,
        num_chains=2 if tiny else 4,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(key_mcmc, y=y)
    idata = az.from_numpyro(mcmc)
    print(f"guidance chosen by 'auto': {kernel.guidance}")
    print(f"MCMC draws: {dict(idata.posterior.sizes)}")

    # --- 2. MLMC to a target RMSE, and plain MC at the same finest level -----------------------
    settings = dict(batch_size=16, pilot_samples=16) if tiny else dict(batch_size=256)
    levels = dict(min_level=1, max_level=3) if tiny else {}
    result = nm.MLMC(kernel, **levels, **settings).run(key_mlmc, y=y, rmse=rmse, progress_bar=False)
    print(result.summary())
    baseline = nm.MonteCarlo(kernel, level=result.finest_level, **settings).run(
        key_mc, y=y, rmse=rmse, progress_bar=False
    )
    print(
        f"\n{'method':<10}{'NFEs':>12}{'wall s':>10}{'est. rmse':>11}\n"
        f"{'MLMC':<10}{result.cost:>12,}{result.wall_time:>10.1f}{result.rmse:>11.4f}\n"
        f"{'plain MC':<10}{baseline.cost:>12,}{baseline.wall_time:>10.1f}{baseline.rmse:>11.4f}\n"
        f"measured NFE ratio MC/MLMC: {baseline.cost / result.cost:.2f}x "
        f"(MLMC's prediction: {result.mc_cost_estimate / result.cost:.2f}x); wall times "
        "include compilation"
    )
    mean = result.mean["x"]
    std = np.sqrt(np.maximum(result.variance["x"], 0.0))
    if isinstance(prior, nm.GaussianMixturePrior):
        exact = prior.posterior(np.eye(64)[mask.ravel()], np.asarray(y), sigma)
        err_mean = np.sqrt(np.mean((mean - exact.mean) ** 2))
        err_var = np.sqrt(np.mean((result.variance["x"] - exact.variance) ** 2))
        print(
            f"realised RMSE against the closed-form posterior: mean {err_mean:.4f}, "
            f"variance {err_var:.4f} (target {rmse})"
        )

    # --- 3. figures -------------------------------------------------------------------------------
    shown = np.full((8, 8), np.nan)
    shown[mask] = np.asarray(y)
    show_images(
        out / "quickstart.png",
        [(truth, "truth"), (shown, "observed"), (mean, "MLMC mean"), (std, "MLMC std")],
    )
    fig = result.plot()
    fig.savefig(out / "quickstart_mlmc.png", dpi=100)
    plt.close(fig)
    print(f"wrote {out / 'quickstart.png'} and {out / 'quickstart_mlmc.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
