"""Time one batched reverse-diffusion call of a benchmark problem's sampler, per level.

    python benchmarks/sampler_call.py --problem digits-gmm-superres --paths 512

Prints milliseconds per call (compilation excluded, mean of `--repeats` calls) for levels 0, 1,
3 and 8 (1 to 256 steps) and for the start draw alone: the fixed per-call cost is what makes
MLMC's many short coarse-level paths cost more per NFE than MC's long ones.
"""

import argparse
import time

import jax
import jax.random as jr

from numpyro_mlmc._bench_problems import build_problem
from numpyro_mlmc._diffusion import _sample_batch, _start_batch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="digits-gmm-superres")
    parser.add_argument("--paths", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    diffusion = build_problem(args.problem).level_sampler.diffusion
    keys = jr.split(jr.key(0), args.paths)

    def per_call_ms(fn):
        jax.block_until_ready(fn())
        t = time.perf_counter()
        for _ in range(args.repeats):
            jax.block_until_ready(fn())
        return (time.perf_counter() - t) / args.repeats * 1e3

    for level in (0, 1, 3, 8):
        times, n = diffusion._padded_times(2**level)
        ms = per_call_ms(lambda times=times, n=n: _sample_batch(diffusion, times, n, keys))
        print(f"{args.problem}: level {level} ({2**level} steps): {ms:.1f} ms per call", flush=True)
    print(f"start draw alone: {per_call_ms(lambda: _start_batch(diffusion, keys)):.1f} ms")


if __name__ == "__main__":
    main()
