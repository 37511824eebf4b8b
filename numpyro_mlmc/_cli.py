"""`numpyro-mlmc` command line: `demo`, `train`, `bench`.

Each subcommand lives in its own module that defines `add_arguments(parser)` and `run(args)`;
this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMANDS = {
    "demo": (
        "numpyro_mlmc._demo",
        "Run the main job: an inpainting posterior, MLMC against plain MC.",
    ),
    "train": (
        "numpyro_mlmc._train_cli",
        "Train a diffusion prior (digits or patches16) by denoising score matching.",
    ),
    "bench": (
        "numpyro_mlmc._bench",
        "Benchmark MLMC against plain MC on denoising, super-resolution, inpainting, deblurring.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="numpyro-mlmc",
        description="Diffusion priors in NumPyro models; posterior expectations by MLMC.",
    )
    group = parser.add_argument_group(
        "multi-process runs",
        "Join JAX's distributed runtime before the command (one process per host; see "
        "nm.initialize_distributed). Give all three or none.",
    )
    group.add_argument("--coordinator-address", metavar="HOST:PORT", help="process 0's address")
    group.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        distributed = (args.coordinator_address, args.num_processes, args.process_id)
        if any(v is not None for v in distributed):
            from ._distributed import initialize_distributed

            initialize_distributed(*distributed)
        code = args._run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"numpyro-mlmc {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
