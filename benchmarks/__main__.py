"""`python -m benchmarks`: the benchmark suite, the same as `numpyro-mlmc bench`.

    python -m benchmarks --quick      # digits problems at one loose eps, about 5 minutes
    python -m benchmarks              # every problem (full mode), under an hour on 2 cores

Run from the repository root; results go to `benchmarks/results/suite/`.
"""

import argparse
import sys

from numpyro_mlmc import _bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    _bench.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _bench.run(args)
    except ValueError as err:
        print(f"python -m benchmarks: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
