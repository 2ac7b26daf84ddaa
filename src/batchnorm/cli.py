"""Command line: ``batchnorm demo | bench | example | convert | inspect``; nothing
imports this module."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand name -> module with ``add_arguments(parser)`` and ``run(args) -> int``.
# Modules are imported only when their command runs, so ``batchnorm --help`` is fast.
COMMANDS = {
    "example": ("batchnorm._example", "run a short example of the functional API"),
    "demo": ("batchnorm.demo", "train on the digits with and without BN; write plots"),
    "bench": ("batchnorm.bench", "quick kernel benchmark against the floor and torch"),
    "convert": (
        "batchnorm.io._cli_convert",
        "convert a model between .npz, .weights (darknet), .pt/.pth and .onnx",
    ),
    "inspect": (
        "batchnorm.io._cli_inspect",
        "print each BatchNorm's statistics and a health check",
    ),
    "train": ("batchnorm._train_command", "data-parallel training over MPI (mpiexec)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm", description="Exact batch normalization for NumPy."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        module.add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
