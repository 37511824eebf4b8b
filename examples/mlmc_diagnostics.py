"""MLMC diagnostics: Giles' `mlmc_test` and the four standard panels, on the paper's denoising
problem.

A held-out digit is observed as `y = x + 0.8 n` (the noise of the paper's denoising experiment,
on the [-1, 1] scale). `guidance="denoise"` starts the reverse diffusion at the time `t*` with
`sigma(t*) / alpha(t*) = 0.8` from `alpha(t*) y`: exact for any prior up to score and
discretisation error. The quantity of interest is the pixelwise second moment, the paper's
default and the quantity that few-step samplers get most wrong.

`nm.mlmc_test` runs a fixed number of coupled draws on every level `0 .. L` and reports, per
level, the mean and variance of `P_l` and of the correction `Y_l = P_l - P_{l-1}`, the cost,
the kurtosis and the consistency check, then fits the rates alpha (bias), beta (variance) and
gamma (cost). It then runs adaptive MLMC at a few `rmse` values for the `N_l` and cost panels.
How to read all this: docs/how-to/read-diagnostics.md.

    python examples/mlmc_diagnostics.py --out diagnostics-output
    python examples/mlmc_diagnostics.py --tiny --out tiny-output

Writes `mlmc_test.png` (the four panels), `mlmc_run.png` (`MLMCResult.plot()` of the tightest
run) and `mlmc_levels.csv` (the level table) to `--out`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from _common import digits_prior, held_out_digit, parser


def second_moment(x):
    return x * x


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0], "diagnostics-output")
    p.add_argument("--num-samples", type=int, default=None, help="draws per level (default 2000)")
    p.add_argument("--max-level", type=int, default=None, help="finest level L (default 8)")
    p.add_argument(
        "--rmse", type=float, nargs="+", default=None, help="MLMC targets (default 0.02 0.01 0.005)"
    )
    args = p.parse_args(argv)

    import jax.numpy as jnp
    import jax.random as jr
    import matplotlib.pyplot as plt
    import numpy as np
    import numpyro
    import numpyro.distributions as dist

    import numpyro_mlmc as nm

    tiny = args.tiny
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    num_samples = args.num_samples or (32 if tiny else 2000)
    max_level = args.max_level or (3 if tiny else 8)
    rmse_values = args.rmse or ((0.2,) if tiny else (0.02, 0.01, 0.005))

    prior = digits_prior(args.prior, tiny=tiny)
    truth = held_out_digit(11)
    sigma = 0.8
    y = jnp.asarray(truth + sigma * np.random.default_rng(args.seed).normal(size=(8, 8)))

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(x, sigma).to_event(2), obs=y)

    kernel = nm.DiffusionPosterior(model, guidance="denoise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        test = nm.mlmc_test(
            kernel,
            jr.key(args.seed),
            y=y,
            num_samples=num_samples,
            max_level=max_level,
            rmse_values=rmse_values,
            functionals={"second_moment": second_moment},
            batch_size=32 if tiny else 500,
        )
    print(test.summary())
    for w in caught:  # the same findings are in test.warnings; print them once, plainly
        print(f"diagnostic warning: {w.message}")

    fig = test.plot()
    fig.savefig(out / "mlmc_test.png", dpi=100)
    plt.close(fig)
    tightest = test.runs[min(test.runs)]
    fig = tightest.plot()
    fig.savefig(out / "mlmc_run.png", dpi=100)
    plt.close(fig)
    test.table.to_csv(out / "mlmc_levels.csv")
    print(
        f"fitted rates: alpha {test.alpha:.2f}, beta {test.beta:.2f}, gamma {test.gamma:.2f}; "
        + ("beta > gamma: MLMC cost ~ eps^-2" if test.beta > test.gamma else "beta <= gamma")
    )
    print(f"wrote {out / 'mlmc_test.png'}, {out / 'mlmc_run.png'} and {out / 'mlmc_levels.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
