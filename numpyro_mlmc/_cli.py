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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="numpyro-mlmc",
        description="Diffusion priors in NumPyro models; posterior expectations by MLMC.",
    )
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
        code = args._run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"numpyro-mlmc {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
