"""Peak memory (RSS) of MLMC and Monte Carlo runs against the number of samples.

The accumulators are streaming float64 moments whose size depends on the image size and the
number of levels, not on the number of samples; batches have a fixed shape; at most
`max_stored_draws` draws are kept; a checkpoint's journal grows with the adaptive rounds, not
the samples. So peak RSS should not grow when the sample count grows tenfold. Each
configuration runs in a fresh process (peak RSS is a high-water mark) on a 64-D Gaussian-
mixture posterior (exact diffused score, ancestral sampler):

* `mlmc`: fixed allocation `[N, N/4, N/16]` on levels 1-3 (2, 4, 8 steps), with a checkpoint;
* `mc`: plain Monte Carlo, `N` draws at level 3.

    python benchmarks/memory.py --samples 20000          # runs N and 10 N

Writes `benchmarks/results/memory.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = """
import resource, sys, time, json, os
import jax, jax.numpy as jnp, jax.random as jr, numpy as np
import numpyro_mlmc as nm

method, n, checkpoint = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
d, k = 64, 3
means = 0.5 * rng.normal(size=(k, d))
covs = []
for _ in range(k):
    u = 0.4 * rng.normal(size=(d, 4))
    covs.append(u @ u.T + 0.05 * np.eye(d))
prior = nm.GaussianMixturePrior(np.ones(k) / k, means, np.stack(covs))
a = np.eye(d)[::4]
post = prior.posterior(a, a @ means[0], 0.1)
diffusion = nm.ReverseDiffusion(
    model=post.score_model(), sampler=nm.Ancestral(), x_start_mean=jnp.zeros(d),
    x_start_std=prior.schedule.prior_std(), event_shape=(d,), t_start=prior.schedule.t_max,
)
sampler = nm.DiffusionLevelSampler(diffusion, refinement=2)
start = time.perf_counter()
if method == "mlmc":
    r = nm.MLMC(sampler, min_level=1, batch_size=512).run(
        jr.key(0), num_samples=[n, n // 4, n // 16], progress_bar=False, checkpoint=checkpoint
    )
else:
    r = nm.MonteCarlo(sampler, level=3, batch_size=512).run(
        jr.key(0), num_samples=n, progress_bar=False
    )
wall = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
print(json.dumps({
    "method": method, "samples": int(np.sum(r.levels["samples"])), "cost_nfe": int(r.cost),
    "wall_s": wall, "peak_rss_mib": peak_kib / 1024,
    "checkpoint_bytes": os.path.getsize(checkpoint) if method == "mlmc" else None,
}))
"""


def measure(method: str, n: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, method, str(n), os.path.join(folder, "run.npz")],
            capture_output=True,
            text=True,
            timeout=3600,
            env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")},
        )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000, help="N (default: %(default)s)")
    parser.add_argument("--out", default=str(HERE / "results" / "memory.json"))
    args = parser.parse_args(argv)
    if args.samples < 16:
        parser.error("--samples must be >= 16")
    rows = []
    for method in ("mlmc", "mc"):
        for n in (args.samples, 10 * args.samples):
            row = measure(method, n)
            rows.append(row)
            print(
                f"{method:5s} N={n:>8d} draws={row['samples']:>8d} NFE={row['cost_nfe']:>10d} "
                f"peak RSS {row['peak_rss_mib']:7.1f} MiB  wall {row['wall_s']:6.1f} s",
                flush=True,
            )
    growth = {
        m: rows[2 * i + 1]["peak_rss_mib"] / rows[2 * i]["peak_rss_mib"]
        for i, m in enumerate(("mlmc", "mc"))
    }
    print("peak RSS ratio 10N / N:", {k: round(v, 3) for k, v in growth.items()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "memory",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "rows": rows,
        "peak_rss_ratio_10N_over_N": growth,
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
