"""Throughput (network function evaluations per second) against the number of devices.

Plain Monte Carlo draws of a posterior whose prior is the shipped `digits` diffusion network
(8x8 UNet, eps-parametrised), denoising `y = x + 0.2 n` with the start-time sampler, run with
`MonteCarlo(..., devices=d)` for each device count `d`: every batch of paths is sharded over
`d` devices along a 1-D mesh. Compilation is excluded (an untimed run with the same shapes
first); each count is timed `--repeats` times and the best is kept.

On a CPU-only machine the devices are forced host devices: the script restarts itself with
`XLA_FLAGS=--xla_force_host_platform_device_count=<max count>`; they share the same cores, so
this measures the sharding overhead, not a speed-up. On a machine with several GPUs it uses the
real devices unchanged (counts above `jax.device_count()` are skipped).

    python benchmarks/scaling.py                       # devices 1 2 4
    python benchmarks/scaling.py --devices 1 2 4 8 --num-samples 8192 --batch-size 1024

Writes `benchmarks/results/scaling_<platform>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORCE = "--xla_force_host_platform_device_count"


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--num-samples", type=int, default=2048, help="draws per timed run")
    parser.add_argument("--num-steps", type=int, default=16, help="reverse steps per draw")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON path (default: results/scaling_*.json)")
    args = parser.parse_args(argv)
    if min(args.devices) < 1 or args.num_samples < 2 or args.batch_size < 1:
        parser.error("--devices, --num-samples and --batch-size must be positive")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    import jax

    wanted = max(args.devices)
    if jax.default_backend() == "cpu" and jax.device_count() < wanted:
        if FORCE in os.environ.get("XLA_FLAGS", ""):
            raise SystemExit(f"XLA_FLAGS already sets {FORCE}; unset it or ask for fewer devices")
        env = dict(os.environ)
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FORCE}={wanted}".strip()
        os.execve(sys.executable, [sys.executable, __file__, *(argv or sys.argv[1:])], env)

    import jax.numpy as jnp
    import jax.random as jr
    import numpyro
    import numpyro.distributions as dist

    import numpyro_mlmc as nm

    prior = nm.DiffusionPrior.from_pretrained("digits")
    truth = jnp.zeros((8, 8))
    y = truth + 0.2 * jr.normal(jr.key(1), (8, 8))

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(x, 0.2).to_event(2), obs=y)

    kernel = nm.DiffusionPosterior(model, num_steps=args.num_steps)
    rows = []
    backend = jax.default_backend()
    print(f"{backend}: {jax.device_count()} devices ({jax.devices()[0].device_kind})")
    for d in args.devices:
        if d > jax.local_device_count():
            print(f"skip {d} devices: only {jax.local_device_count()} here")
            continue
        mc = nm.MonteCarlo(kernel, num_steps=args.num_steps, batch_size=args.batch_size, devices=d)

        def once(seed):
            start = time.perf_counter()
            r = mc.run(jr.key(seed), y=y, num_samples=args.num_samples, progress_bar=False)
            return r.cost, time.perf_counter() - start

        once(0)  # compiles every batch shape used below
        timings = [once(1 + i) for i in range(args.repeats)]
        cost = timings[0][0]
        best = min(t for _, t in timings)
        rows.append(
            {
                "devices": d,
                "nfe": int(cost),
                "best_wall_s": best,
                "walls_s": [t for _, t in timings],
                "nfe_per_s": cost / best,
            }
        )
        print(
            f"devices {d}: {cost} NFE in {best:.2f} s (best of {args.repeats}): "
            f"{cost / best:,.0f} NFE/s",
            flush=True,
        )
    base = rows[0]["nfe_per_s"] if rows else float("nan")
    for row in rows:
        row["speedup_vs_first"] = row["nfe_per_s"] / base
    out = Path(args.out or HERE / "results" / f"scaling_{backend}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "scaling",
        "date": time.strftime("%Y-%m-%d"),
        "backend": backend,
        "device_kind": jax.devices()[0].device_kind,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
