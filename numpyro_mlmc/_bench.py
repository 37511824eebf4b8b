"""`numpyro-mlmc bench`: MLMC against plain Monte Carlo on the benchmark problems.

For each problem (`_bench_problems.py`) and each target RMSE `eps` (loosest first), the suite

1. runs `nm.MLMC` adaptively to `eps` for the pixelwise posterior **mean** and **second
   moment** (the paper's default quantity), so the posterior variance `E x^2 - (E x)^2` comes
   with them;
2. runs plain `nm.MonteCarlo` at MLMC's finest level with the same variance budget
   `theta eps^2` (measured, not predicted);
3. records costs in network function evaluations (NFEs) and seconds, the fitted rates
   alpha, beta, gamma, the per-level table, and for GMM priors the realised RMSE of every
   estimate against the closed-form posterior.

Wall-clock: before a problem's first eps every batch shape is drawn once at levels 0-1,
untimed (`_warm_up`), so compilation (one per batch shape: the reverse-diffusion grids are
padded to one bucket with a traced step count, or stepped by level-independent jitted steps)
is not timed; JAX's compile-time events are summed during every timed run and reported
(`compile_s`, expected 0), and subtracted.

Outputs under `--out` (default `benchmarks/results/suite`): for each problem
`<problem>.json` (deterministic: the same seed gives the same file, byte for byte),
`<problem>.timing.json` (seconds, which vary run to run), `<problem>.png` (the four standard
MLMC panels, cost against eps, realised error or the posterior images) and `<problem>.npz`
(the tightest estimates); and `summary.json` / `summary.md` (the ratio table).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import time
from pathlib import Path

import numpy as np

from ._bench_problems import DATASETS, PRIORS, TASKS, build_problem, problem_name

# Target RMSEs per problem. Quick: every digits problem at one eps (aimed at <= 5 min on 2 CPU
# cores). Full (aimed at <= 60 min on 2 cores): GMM problems down to the eps where MLMC's levels
# reach 128-512 steps and measured MC takes at most a few minutes (patches16 inverse problems to
# 1.25e-4 or 6.25e-5, where MC needs 35-57 M NFEs); network problems (plain MC ran 3,700-7,200
# UNet evaluations per second here, against 0.1-2.6 M GMM scores) down to 5e-3 on the digits,
# and to 2.5e-3 for super-resolution and deblurring, where the bias test asks for 256 steps
# (plain MC there 3-18 min); on patches16 the posteriors are wider, super-resolution
# most of all (MC at eps 4e-2 would need ~6,000 draws of 512 steps), so their eps are looser.
# Pilots of 32 draws for networks (`PILOT_SAMPLES`).
QUICK_EPS = {
    "digits-gmm-denoise": (4e-3,),
    "digits-gmm-superres": (2e-3,),
    "digits-gmm-inpaint": (1e-3,),
    "digits-gmm-deblur": (1e-3,),
    "digits-network-denoise": (4e-2,),
}
FULL_EPS = {
    "digits-gmm-denoise": (8e-3, 4e-3, 2e-3),
    "digits-gmm-superres": (2e-3, 1e-3, 5e-4),
    "digits-gmm-inpaint": (1e-3, 5e-4, 2.5e-4),
    "digits-gmm-deblur": (1e-3, 5e-4, 2.5e-4),
    "patches16-gmm-denoise": (8e-3, 4e-3, 2e-3),
    "patches16-gmm-superres": (5e-4, 2.5e-4, 1.25e-4),
    "patches16-gmm-inpaint": (5e-4, 2.5e-4, 1.25e-4, 6.25e-5),
    "patches16-gmm-deblur": (5e-4, 2.5e-4, 1.25e-4, 6.25e-5),
    "digits-network-denoise": (1e-2, 5e-3),
    "digits-network-superres": (1e-2, 5e-3, 2.5e-3),
    "digits-network-inpaint": (1e-2, 5e-3),
    "digits-network-deblur": (1e-2, 5e-3, 2.5e-3),
    "patches16-network-denoise": (2e-2, 1e-2),
    "patches16-network-superres": (8e-2,),
    "patches16-network-inpaint": (4e-2, 2e-2),
    "patches16-network-deblur": (4e-2, 2e-2),
}
# Pilot draws per level (MLMC) and for MC's variance estimate. At the network eps above plain MC
# needs a few hundred to a few thousand draws, so 128-draw pilots on four or five levels would
# be a large share of MLMC's cost (and of the comparison).
PILOT_SAMPLES = {"gmm": 128, "network": 32}
QUANTITIES = ("mean", "second_moment", "variance")


def _mean(x):
    return x


def _second_moment(x):
    return x * x


FUNCTIONALS = {"mean": _mean, "second_moment": _second_moment}


class CompileTimer(contextlib.AbstractContextManager):
    """Sums JAX's tracing, lowering and compilation events while active (seconds)."""

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self):
        self.seconds = 0.0
        self._active = False

    def _listener(self, event, duration, **_):
        if self._active and event in self.EVENTS:
            self.seconds += float(duration)

    def __enter__(self):
        import jax.monitoring

        if not getattr(CompileTimer, "_registered", False):
            jax.monitoring.register_event_duration_secs_listener(CompileTimer._dispatch)
            CompileTimer._registered = True
        CompileTimer._current = self
        self._active = True
        return self

    def __exit__(self, *exc):
        self._active = False
        CompileTimer._current = None
        return False

    @staticmethod
    def _dispatch(event, duration, **kwargs):
        current = getattr(CompileTimer, "_current", None)
        if current is not None:
            current._listener(event, duration, **kwargs)


def _estimates(result):
    mean = np.asarray(result.estimates["mean"], np.float64)
    second = np.asarray(result.estimates["second_moment"], np.float64)
    return {"mean": mean, "second_moment": second, "variance": second - mean**2}


def _realised(result, exact):
    if exact is None:
        return None
    est = _estimates(result)
    return {q: float(np.sqrt(np.mean((est[q] - exact[q]) ** 2))) for q in QUANTITIES}


def _level_table(result):
    t = result.level_tables[result.governing]
    return {
        "level": [int(v) for v in t.level],
        "num_steps": [int(v) for v in t.num_steps],
        "samples": [int(v) for v in t.samples],
        "cost_per_sample": [int(v) for v in t.cost_per_sample],
        "variance": [float(v) for v in t.variance],
        "kurtosis": [_finite(v) for v in t.kurtosis],
        "mean_abs": [float(v) for v in t.mean_abs],
        "fine_variance": [float(v) for v in t.fine_variance],
        "fine_mean_abs": [float(v) for v in t.fine_mean_abs],
    }


def _eps_text(eps):
    """`2.5e-04`, `1.25e-04`, `2e-03`: up to three significant digits, no trailing zeros."""
    mantissa, exponent = f"{eps:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def _finite(x):
    x = float(x)
    return x if math.isfinite(x) else None


def run_problem(
    name,
    eps_list,
    *,
    seed=0,
    batch_size=512,
    run_mc=True,
    sampler=None,
    spacing=None,
    pilot_samples=None,
    log=print,
):
    """Run one problem at every eps in `eps_list` (loosest first). Returns `(record, timing,
    arrays)`: the deterministic record, the seconds, and the tightest estimates. `sampler` and
    `spacing` override the task's defaults (`_bench_problems.SAMPLING`), `pilot_samples` the
    prior's (`PILOT_SAMPLES`)."""
    import jax.random as jr

    from ._mlmc import MLMC, MonteCarlo

    t0 = time.perf_counter()
    problem = build_problem(name, seed=seed, sampler=sampler, spacing=spacing)
    build_s = time.perf_counter() - t0
    sampler = problem.level_sampler
    if pilot_samples is None:
        pilot_samples = PILOT_SAMPLES[problem.prior]
    record = {
        "problem": name,
        "dataset": problem.dataset,
        "prior": problem.prior,
        "task": problem.task,
        "noise_std": problem.noise_std,
        "guidance": problem.kernel.guidance,
        "sampler": repr(problem.kernel.sampler),
        "spacing": problem.kernel.spacing,
        "exponent": problem.kernel.exponent,
        "refinement": 2,
        "theta": 0.5,
        "batch_size": batch_size,
        "pilot_samples": pilot_samples,
        "seed": seed,
        "quantities": list(FUNCTIONALS),
        "runs": [],
    }
    timing = {"problem": name, "build_s": build_s, "warmup_s": None, "runs": []}
    arrays = {"truth": problem.truth, "observation": problem.observation}
    if problem.exact is not None:
        arrays.update({f"exact_{q}": v for q, v in problem.exact.items()})
    base = jr.key(seed)
    for i, eps in enumerate(sorted(eps_list, reverse=True)):
        mlmc = MLMC(sampler, batch_size=batch_size, pilot_samples=pilot_samples, chunk_size=None)
        key = jr.fold_in(base, 2 * i)
        if i == 0:  # compile every shape the runs use, untimed (_warm_up)
            t = time.perf_counter()
            _warm_up(sampler, batch_size, jr.fold_in(base, 2**31 - 1))
            timing["warmup_s"] = time.perf_counter() - t
        with CompileTimer() as ct:
            t = time.perf_counter()
            ml = mlmc.run(key, rmse=eps, functionals=FUNCTIONALS, progress_bar=False)
            ml_s = time.perf_counter() - t
        run = {
            "eps": eps,
            "mlmc": {
                "cost_nfe": int(ml.cost),
                "wasted_nfe": int(ml.wasted_cost),
                "levels": [ml.coarsest_level, ml.finest_level],
                "governing": ml.governing,
                "rmse_estimate": _finite(ml.rmse),
                "bias_estimate": _finite(ml.bias_estimate),
                "alpha": _finite(ml.alpha),
                "beta": _finite(ml.beta),
                "gamma": _finite(ml.gamma),
                "converged": bool(ml.converged),
                "mc_cost_prediction": int(ml.mc_cost_estimate),
                "table": _level_table(ml),
                "realised_rmse": _realised(ml, problem.exact),
            },
            "mc": None,
        }
        run_timing = {"eps": eps, "mlmc_s": ml_s - ct.seconds, "mlmc_compile_s": ct.seconds}
        if run_mc:
            mc_engine = MonteCarlo(
                sampler,
                level=ml.finest_level,
                batch_size=batch_size,
                pilot_samples=pilot_samples,
                chunk_size=None,
            )
            with CompileTimer() as ct:
                t = time.perf_counter()
                mc = mc_engine.run(
                    jr.fold_in(base, 2 * i + 1),
                    rmse=eps,
                    functionals=FUNCTIONALS,
                    progress_bar=False,
                )
                mc_s = time.perf_counter() - t
            run["mc"] = {
                "cost_nfe": int(mc.cost),
                "level": ml.finest_level,
                "samples": int(mc.levels["samples"].iloc[0]),
                "rmse_estimate": _finite(mc.rmse),
                "realised_rmse": _realised(mc, problem.exact),
            }
            run["nfe_ratio"] = mc.cost / ml.cost
            run_timing.update(mc_s=mc_s - ct.seconds, mc_compile_s=ct.seconds)
            run_timing["wall_ratio"] = run_timing["mc_s"] / max(run_timing["mlmc_s"], 1e-9)
            run_timing["wall_over_nfe_ratio"] = run_timing["wall_ratio"] / run["nfe_ratio"]
        run["predicted_nfe_ratio"] = ml.mc_cost_estimate / ml.cost
        record["runs"].append(run)
        timing["runs"].append(run_timing)
        arrays.update({f"mlmc_{q}": v for q, v in _estimates(ml).items()})
        log(_line(name, run, run_timing))
    return record, timing, arrays


def _warm_up(sampler, batch_size, key):
    """Compile what the timed runs use, cheaply: one draw of every batch shape the engines use
    (`batch_size`, `/4`, `/16`), coupled and single, at levels 0-1 (one and two steps). The
    reverse-diffusion grids share one compilation across levels (device loop) or step with
    level-independent jitted steps (host loop), so no later level compiles; `CompileTimer`
    reports any compilation left in the timed runs and it is subtracted."""
    from ._mlmc import MLMC, MonteCarlo

    n = batch_size + batch_size // 4 + batch_size // 16
    MLMC(sampler, batch_size=batch_size, chunk_size=None).run(
        key, num_samples=[n, n], functionals=FUNCTIONALS, progress_bar=False
    )
    MonteCarlo(sampler, level=0, batch_size=batch_size, chunk_size=None).run(
        key, num_samples=n, functionals=FUNCTIONALS, progress_bar=False
    )


def _line(name, run, timing):
    ml = run["mlmc"]
    text = (
        f"[{name}] eps {_eps_text(run['eps'])}: MLMC levels {ml['levels'][0]}-{ml['levels'][1]} "
        f"{ml['cost_nfe']:,} NFE {timing['mlmc_s']:.1f}s"
    )
    if ml["realised_rmse"]:
        text += f" (realised {ml['realised_rmse'][ml['governing']]:.2e})"
    if run["mc"]:
        text += (
            f"; MC {run['mc']['cost_nfe']:,} NFE {timing['mc_s']:.1f}s; ratio NFE "
            f"{run['nfe_ratio']:.2f} wall {timing['wall_ratio']:.2f}"
        )
    return text


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def _write_json(path: Path, obj):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def plot_problem(record, arrays, path):
    """Six panels: the four standard MLMC panels (Giles 2015) of the tightest eps (samples for
    every eps), cost against eps, and realised error (GMM) or the posterior images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = record["runs"]
    last = runs[-1]["mlmc"]
    tab = last["table"]
    lev = np.asarray(tab["level"])
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    ax = axes.ravel()

    def log2(v):
        v = np.asarray(v, np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(v > 0, np.log2(v), np.nan)

    gov = last["governing"]
    ax[0].plot(lev, log2(tab["fine_variance"]), "o--", label="$P_l$")
    ax[0].plot(lev[1:], log2(tab["variance"][1:]), "o-", label="$P_l - P_{l-1}$")
    ax[0].set(xlabel="level $l$ ($2^l$ steps)", ylabel="log2 variance", title=f"variance ({gov})")
    ax[0].legend()
    ax[1].plot(lev, log2(tab["fine_mean_abs"]), "o--", label="$P_l$")
    ax[1].plot(lev[1:], log2(tab["mean_abs"][1:]), "o-", label="$P_l - P_{l-1}$")
    ax[1].set(xlabel="level $l$", ylabel="log2 |mean|", title=f"mean ({gov})")
    ax[1].legend()
    for r in runs:
        t = r["mlmc"]["table"]
        ax[2].semilogy(t["level"], t["samples"], "o-", label=f"eps {_eps_text(r['eps'])}")
    ax[2].set(xlabel="level $l$", ylabel="$N_l$", title="samples per level")
    ax[2].legend()
    eps = np.array([r["eps"] for r in runs])
    ax[3].loglog(eps, eps**2 * [r["mlmc"]["cost_nfe"] for r in runs], "o-", label="MLMC")
    mc = [(r["eps"], r["mc"]["cost_nfe"]) for r in runs if r["mc"]]
    if mc:
        e, c = map(np.array, zip(*mc, strict=True))
        ax[3].loglog(e, e**2 * c, "s-", label="MC (measured)")
    ax[3].loglog(
        eps,
        eps**2 * [r["mlmc"]["mc_cost_prediction"] for r in runs],
        "s:",
        alpha=0.6,
        label="MC (predicted)",
    )
    ax[3].set(xlabel="eps", ylabel="eps$^2$ x cost (NFEs)", title="cost")
    ax[3].legend()
    if runs[0]["mlmc"]["realised_rmse"]:
        for q, mk in zip(QUANTITIES, "o^s", strict=True):
            ax[4].loglog(
                eps, [r["mlmc"]["realised_rmse"][q] for r in runs], mk + "-", label=f"MLMC {q}"
            )
        if mc:
            ax[4].loglog(
                e,
                [r["mc"]["realised_rmse"]["second_moment"] for r in runs if r["mc"]],
                "x--",
                label="MC second_moment",
            )
        ax[4].loglog(eps, eps, "k:", label="eps")
        ax[4].set(xlabel="eps", ylabel="realised RMSE", title="error against the exact posterior")
        ax[4].legend(fontsize=8)
    else:
        ax[4].axis("off")
    _images(ax[5], arrays, record)
    fig.suptitle(f"{record['problem']} (guidance {record['guidance']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _images(ax, arrays, record):
    """truth | MLMC mean | MLMC std (| exact std) side by side."""
    tiles = [
        arrays["truth"],
        arrays["mlmc_mean"],
        np.sqrt(np.clip(arrays["mlmc_variance"], 0, None)),
    ]
    names = ["truth", "MLMC mean", "MLMC std"]
    if "exact_variance" in arrays:
        tiles.append(np.sqrt(np.clip(arrays["exact_variance"], 0, None)))
        names.append("exact std")
    norm = [np.clip((t + 1) / 2, 0, 1) for t in tiles[:2]]
    smax = max(float(np.max(t)) for t in tiles[2:]) or 1.0
    norm += [t / smax for t in tiles[2:]]
    h, w = tiles[0].shape
    gap = np.ones((h, 1))
    ax.imshow(
        np.concatenate([x for t in norm for x in (t, gap)][:-1], axis=1),
        cmap="gray",
        vmin=0,
        vmax=1,
    )
    ax.set_xticks([(w + 1) * k + w / 2 - 0.5 for k in range(len(names))], names, fontsize=8)
    ax.set_yticks([])
    ax.set_title(f"posterior (std scaled to max {smax:.2g})")


def summary_table(records, timings) -> str:
    """A Markdown table: one row per problem and eps."""
    head = (
        "| problem | guidance | eps | MLMC levels | MLMC NFEs | MC NFEs (level) | NFE ratio | "
        "MLMC s | MC s | wall ratio | alpha | beta | gamma | MLMC realised RMSE (m / E x^2 / var) |"
    )
    rows = [head, "|" + "---|" * 14]
    for rec in records:
        tim = timings[rec["problem"]]
        for run, rt in zip(rec["runs"], tim["runs"], strict=True):
            ml, mc = run["mlmc"], run["mc"]
            real = ml["realised_rmse"]
            rows.append(
                f"| {rec['problem']} | {rec['guidance']} | {_eps_text(run['eps'])} | "
                f"{ml['levels'][0]}-{ml['levels'][1]} | {ml['cost_nfe']:,} | "
                + (
                    f"{mc['cost_nfe']:,} ({mc['level']}) | **{run['nfe_ratio']:.2f}** | "
                    if mc
                    else "- | - | "
                )
                + f"{rt['mlmc_s']:.1f} | "
                + (f"{rt['mc_s']:.1f} | {rt['wall_ratio']:.2f} | " if mc else "- | - | ")
                + " | ".join(_fmt(ml[k]) for k in ("alpha", "beta", "gamma"))
                + " | "
                + (" / ".join(f"{real[q]:.1e}" for q in QUANTITIES) if real else "-")
                + " |"
            )
    return "\n".join(rows) + "\n"


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="digits problems at one loose eps (about 5 minutes on 2 cores)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="PATTERN",
        help="problems to run, as names or shell patterns (e.g. 'digits-gmm-*'); names are "
        f"DATASET-PRIOR-TASK with DATASET in {DATASETS}, PRIOR in {PRIORS}, TASK in {TASKS}",
    )
    parser.add_argument(
        "--eps",
        nargs="+",
        type=float,
        help="target RMSEs for every selected problem (overrides the mode's)",
    )
    parser.add_argument(
        "--sampler",
        choices=["ancestral", "euler_maruyama", "ddim", "heun"],
        help="override every problem's sampler (default: ancestral for denoising, ddim else)",
    )
    parser.add_argument(
        "--spacing",
        choices=["uniform", "polynomial"],
        help="override every problem's time spacing (default: uniform for denoising, "
        "polynomial else)",
    )
    parser.add_argument(
        "--pilot-samples",
        type=int,
        help="pilot draws per level for MLMC and for MC's variance estimate (default: 128 for "
        "GMM priors, 32 for networks)",
    )
    parser.add_argument("--no-mc", action="store_true", help="skip the measured MC runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=512,
        help="paths per sampler call (default 512: 256-512 gave the best NFE rate on 2 CPU "
        "cores for GMM and network problems; 2048 was up to 40%% slower)",
    )
    parser.add_argument(
        "--out",
        help="output folder (default: benchmarks/results/suite, or benchmarks/results/"
        "suite-quick with --quick); the summary covers every problem in it",
    )


def select(args) -> dict:
    table = QUICK_EPS if args.quick else FULL_EPS
    names = list(table)
    if args.only:
        every = [problem_name(d, p, t) for d in DATASETS for p in PRIORS for t in TASKS]
        names = [n for n in every if any(fnmatch.fnmatch(n, pat) for pat in args.only)]
        if not names:
            raise ValueError(
                f"--only {' '.join(args.only)} matches no problem; names look like "
                f"'digits-gmm-denoise' (DATASET-PRIOR-TASK)."
            )
    if args.sampler is not None:
        from ._solvers import get_sampler

        denoise = [n for n in names if n.endswith("-denoise")]
        if denoise and not get_sampler(args.sampler).stochastic:
            raise ValueError(
                f"--sampler {args.sampler} is deterministic, and the denoising problems "
                f"({', '.join(denoise)}) start every path from alpha(t*) y, so every draw would "
                "be the same image; use a stochastic sampler there or leave them out (--only)."
            )
    if args.eps:
        bad = [e for e in args.eps if not (0 < e < math.inf)]
        if bad:
            raise ValueError(f"--eps must be positive and finite, got {bad}.")
        return {n: tuple(args.eps) for n in names}
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(
            f"{', '.join(missing)} has no eps in {'quick' if args.quick else 'full'} mode; "
            "pass --eps."
        )
    return {n: table[n] for n in names}


def write_summary(out: Path, mode: str) -> None:
    """`summary.json` (the records of every problem in `out`, in suite order) and
    `summary.md` (their ratio table with the seconds)."""
    order = {n: i for i, n in enumerate(FULL_EPS)}
    paths = sorted(
        (p for p in out.glob("*.json") if p.stem != "summary" and not p.stem.endswith(".timing")),
        key=lambda p: (order.get(p.stem, len(order)), p.stem),
    )
    records = [json.loads(p.read_text()) for p in paths]
    timings = {
        r["problem"]: json.loads((out / f"{r['problem']}.timing.json").read_text()) for r in records
    }
    _write_json(out / "summary.json", {"mode": mode, "records": records})
    total = sum(
        (t["build_s"] or 0)
        + (t["warmup_s"] or 0)
        + sum(
            r["mlmc_s"] + r["mlmc_compile_s"] + r.get("mc_s", 0) + r.get("mc_compile_s", 0)
            for r in t["runs"]
        )
        for t in timings.values()
    )
    (out / "summary.md").write_text(
        "**At each problem's tightest eps**\n\n"
        + summary_table(
            [{**r, "runs": r["runs"][-1:]} for r in records],
            {k: {**t, "runs": t["runs"][-1:]} for k, t in timings.items()},
        )
        + f"\n**Every run** ({len(records)} problems; {total / 60:.0f} min of building, "
        "compiling and timed runs, summed from the `*.timing.json` files)\n\n"
        + summary_table(records, timings)
    )


def run(args) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive int, got {args.batch_size}.")
    if args.pilot_samples is not None and args.pilot_samples < 2:
        raise ValueError(f"--pilot-samples must be an int >= 2, got {args.pilot_samples}.")
    chosen = select(args)
    out = Path(args.out or ("benchmarks/results/suite" + ("-quick" if args.quick else "")))
    out.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    print(f"numpyro-mlmc bench ({mode}): {len(chosen)} problems -> {out}", flush=True)
    start = time.perf_counter()
    for name, eps in chosen.items():
        record, timing, arrays = run_problem(
            name,
            eps,
            seed=args.seed,
            batch_size=args.batch_size,
            run_mc=not args.no_mc,
            sampler=args.sampler,
            spacing=args.spacing,
            pilot_samples=args.pilot_samples,
            log=lambda s: print(s, flush=True),
        )
        _write_json(out / f"{name}.json", record)
        _write_json(out / f"{name}.timing.json", timing)
        np.savez(out / f"{name}.npz", **arrays)
        plot_problem(record, arrays, out / f"{name}.png")
        # the summary covers every problem in the folder and is rewritten after each one, so a
        # stopped run keeps what it measured and `--only` reruns update their rows
        write_summary(out, mode)
    print(f"done in {time.perf_counter() - start:.0f} s; table in {out / 'summary.md'}", flush=True)
    return 0
