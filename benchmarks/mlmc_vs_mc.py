"""MLMC against plain Monte Carlo on GMM imaging problems as hard as real images.

Problems (DESIGN.md, "Where MLMC pays"): a 10-component GMM fitted to the scikit-learn digits
with each covariance cut to rank 8 plus 1e-4 I; a held-out digit observed by

* `denoise`: `y = x + 0.8 n`, the start-time sampler (reverse diffusion with the prior score
  from `t*`, `sigma(t*)/alpha(t*) = 0.8`, started at `alpha(t*) y`);
* `inpaint`: the top half of the pixels with noise 0.05, the exact posterior score from `t_max`.

The quantity of interest is the posterior second moment (pixelwise); realised RMSEs are
measured against the closed-form posterior. For each `eps`, MLMC runs adaptively; plain MC then
runs at MLMC's finest level with the same variance budget `theta eps^2`. Costs are NFEs and
wall-clock seconds (compilation excluded by a warm-up at each level and batch shape).

    python benchmarks/mlmc_vs_mc.py --problems denoise inpaint --eps 4e-3 2e-3 1e-3

Writes `benchmarks/results/mlmc_vs_mc.json` and `benchmarks/results/mlmc_vs_mc.png`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import jax.random as jr
import numpy as np

import numpyro_mlmc as nm
from numpyro_mlmc._data import load_digits_images

HERE = Path(__file__).resolve().parent


def second_moment(x):
    return x * x


FUNCTIONALS = {"second_moment": second_moment}


def build_problem(name, prior, truth, rng, *, spacing, sampler):
    d = truth.size
    if name == "denoise":
        sigma = 0.8
        y = truth + sigma * rng.normal(size=d)
        post = prior.posterior(np.eye(d), y, sigma)
        sched = prior.schedule
        t_star = sched.time_at_noise_ratio(sigma)
        diffusion = nm.ReverseDiffusion(
            model=prior.score_model(),
            sampler=sampler,
            x_start_mean=jnp.asarray(float(sched.alpha(t_star)) * y, jnp.float32),
            x_start_std=0.0,
            event_shape=(d,),
            t_start=t_star,
            spacing=spacing,
        )
    elif name == "inpaint":
        sigma = 0.05
        mask = np.zeros(d, bool)
        mask[: d // 2] = True
        a = np.eye(d)[mask]
        y = a @ truth + sigma * rng.normal(size=a.shape[0])
        post = prior.posterior(a, y, sigma)
        diffusion = nm.ReverseDiffusion(
            model=post.score_model(),
            sampler=sampler,
            x_start_mean=jnp.zeros(d),
            x_start_std=prior.schedule.prior_std(),
            event_shape=(d,),
            t_start=prior.schedule.t_max,
            spacing=spacing,
        )
    else:
        raise ValueError(f"unknown problem {name!r}")
    return post, nm.DiffusionLevelSampler(diffusion, refinement=2)


def warm_up(sampler, levels, batch_size):
    """Compile every (level, batch shape) pair used below, so wall times are run times."""
    shapes = sorted({max(1, batch_size // 4**k) for k in range(3)})
    for lev in levels:
        for shape in shapes:
            keys = jr.split(jr.key(0), shape)
            for coupled in (False, True) if lev > 0 else (False,):
                out = sampler.sample(keys, lev, coupled)[0]["x"]
                out.block_until_ready()
    # the functional evaluator and the key derivation
    nm.MLMC(sampler, min_level=levels[0], batch_size=batch_size).run(
        jr.key(1), num_samples=[2], functionals=FUNCTIONALS, progress_bar=False
    )


def realised(result, post):
    return float(np.sqrt(np.mean((result.estimates["second_moment"] - post.second_moment) ** 2)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["denoise", "inpaint"])
    parser.add_argument("--eps", nargs="+", type=float, default=[4e-3, 2e-3, 1e-3])
    parser.add_argument("--spacing", default="uniform", choices=["uniform", "polynomial"])
    parser.add_argument("--sampler", default="ancestral")
    parser.add_argument("--min-level", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--budget", type=float, default=900.0, help="seconds for all runs")
    parser.add_argument(
        "--skip-mc-above",
        type=float,
        default=400.0,
        help="skip a measured MC run predicted to take longer (seconds)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)

    start_all = time.perf_counter()
    images, _ = load_digits_images(split="train")
    test, _ = load_digits_images(split="test")
    prior = nm.GaussianMixturePrior.fit(
        images.reshape(len(images), -1), 10, rank=8, regularization=1e-4, seed=args.seed
    )
    truth = test[0].reshape(-1).astype(np.float64)
    sampler_obj = nm._solvers.get_sampler(args.sampler)
    records = []
    for name in args.problems:
        rng = np.random.default_rng(args.seed + 1)
        post, sampler = build_problem(
            name, prior, truth, rng, spacing=args.spacing, sampler=sampler_obj
        )
        warmed = set()
        last = None  # (eps, MLMC wall seconds) of the previous eps
        for i, eps in enumerate(sorted(args.eps, reverse=True)):
            elapsed = time.perf_counter() - start_all
            # MLMC time grows like eps^-2; the probe at 2 eps adds a quarter
            predicted = 0.0 if last is None else 1.25 * last[1] * (last[0] / eps) ** 2
            if elapsed + predicted > args.budget:
                print(f"[{name}] time budget: stopping before eps={eps:g}", flush=True)
                break
            engine = nm.MLMC(sampler, min_level=args.min_level, batch_size=args.batch_size)
            # an untimed pass at 2 eps (a quarter of the cost) finds the levels; compile them and
            # one more, so the timed runs measure sampling, not compilation
            probe = engine.run(
                jr.key(1000 + i), rmse=2 * eps, functionals=FUNCTIONALS, progress_bar=False
            )
            new = [lev for lev in range(0, probe.finest_level + 2) if lev not in warmed]
            if new:
                warm_up(sampler, new, args.batch_size)
                warmed.update(new)
            ml = engine.run(jr.key(i), rmse=eps, functionals=FUNCTIONALS, progress_bar=False)
            finest = ml.finest_level
            rec = {
                "problem": name,
                "eps": eps,
                "spacing": args.spacing,
                "sampler": args.sampler,
                "mlmc": {
                    "cost_nfe": ml.cost,
                    "wall_s": ml.wall_time,
                    "levels": [ml.coarsest_level, finest],
                    "samples": ml.levels["samples"].tolist(),
                    "variance_per_level": ml.levels["variance"].tolist(),
                    "mean_abs_per_level": ml.levels["mean_abs"].tolist(),
                    "estimated_rmse": ml.rmse,
                    "realised_rmse": realised(ml, post),
                    "alpha": ml.alpha,
                    "beta": ml.beta,
                    "gamma": ml.gamma,
                    "converged": ml.converged,
                    "mc_cost_prediction": ml.mc_cost_estimate,
                },
            }
            last = (eps, ml.wall_time)
            nfe_rate = ml.cost / max(ml.wall_time, 1e-9)
            predicted_mc_s = ml.mc_cost_estimate / nfe_rate
            if predicted_mc_s <= args.skip_mc_above and (
                time.perf_counter() - start_all + predicted_mc_s <= args.budget
            ):
                mc = nm.MonteCarlo(sampler, level=finest, batch_size=args.batch_size).run(
                    jr.key(10_000 + i), rmse=eps, functionals=FUNCTIONALS, progress_bar=False
                )
                rec["mc"] = {
                    "cost_nfe": mc.cost,
                    "wall_s": mc.wall_time,
                    "level": finest,
                    "samples": int(mc.levels["samples"].iloc[0]),
                    "realised_rmse": realised(mc, post),
                }
                rec["nfe_ratio"] = mc.cost / ml.cost
                rec["wall_ratio"] = mc.wall_time / ml.wall_time
            else:
                rec["mc"] = None
                rec["predicted_nfe_ratio"] = ml.mc_cost_estimate / ml.cost
            records.append(rec)
            mc_txt = (
                f"MC {rec['mc']['cost_nfe']:,} NFE {rec['mc']['wall_s']:.1f}s "
                f"(err {rec['mc']['realised_rmse']:.2e}) ratio NFE {rec['nfe_ratio']:.2f} "
                f"wall {rec['wall_ratio']:.2f}"
                if rec["mc"]
                else f"MC skipped, predicted ratio {rec['predicted_nfe_ratio']:.2f}"
            )
            print(
                f"[{name}] eps {eps:.1e}: MLMC levels {ml.coarsest_level}-{finest} "
                f"{ml.cost:,} NFE {ml.wall_time:.1f}s (err {rec['mlmc']['realised_rmse']:.2e}, "
                f"est {ml.rmse:.2e}); {mc_txt}",
                flush=True,
            )
            write(args, argv, records, start_all)  # after every eps: a timeout loses nothing
    write(args, argv, records, start_all)


def write(args, argv, records, start_all):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "mlmc_vs_mc" + (f"_{args.tag}" if args.tag else "")
    meta = {
        "command": "python benchmarks/mlmc_vs_mc.py " + " ".join(argv or []),
        "total_wall_s": time.perf_counter() - start_all,
        "records": records,
    }
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2))
    if records:
        plot(records, out / f"{stem}.png")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}", flush=True)


def plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = sorted({r["problem"] for r in records})
    fig, axes = plt.subplots(1, max(1, len(problems)), figsize=(5 * max(1, len(problems)), 4))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, problems, strict=False):
        rs = [r for r in records if r["problem"] == name]
        eps = [r["eps"] for r in rs]
        ax.loglog(eps, [r["mlmc"]["cost_nfe"] for r in rs], "o-", label="MLMC (measured)")
        pairs = [(r["eps"], r["mc"]["cost_nfe"]) for r in rs if r["mc"]]
        if pairs:
            ax.loglog(*zip(*pairs, strict=True), "s-", label="MC (measured)")
        ax.loglog(
            eps,
            [r["mlmc"]["mc_cost_prediction"] for r in rs],
            "s:",
            alpha=0.6,
            label="MC (predicted)",
        )
        ax.set(xlabel="target RMSE eps", ylabel="cost (NFEs)", title=f"{name}: second moment")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
