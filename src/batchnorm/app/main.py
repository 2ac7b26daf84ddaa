"""Command line: ``batchnorm demo | bench | example | convert | inspect | fold |
train``.

The console script's entry point. A command's module is imported only when that
command is named, so ``batchnorm --help`` imports no command and
``batchnorm demo --help`` imports only the demo's.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand name -> (module with ``add_arguments(parser)`` and ``run(args) -> int``,
# one-line help).
COMMANDS = {
    "example": ("batchnorm.app.example", "run a short example of the functional API"),
    "demo": (
        "batchnorm.app.demo",
        "train on the digits with and without BN; write plots",
    ),
    "bench": (
        "batchnorm.app.bench",
        "quick kernel benchmark against the floor and torch",
    ),
    "convert": (
        "batchnorm.app.convert",
        "convert a model between .npz, .weights (darknet), .pt/.pth and .onnx",
    ),
    "inspect": (
        "batchnorm.app.inspect",
        "print each BatchNorm's statistics and a health check",
    ),
    "fold": (
        "batchnorm.app.fold",
        "fold a darknet network's batch normalization into its weights",
    ),
    "train": ("batchnorm.app.train", "data-parallel training over MPI (mpiexec)"),
}


def missing_modules(
    command: str, needs: dict[str, str], install: str, alternative: str = ""
) -> str | None:
    """The one-line error for a command whose optional dependencies do not import.

    ``needs`` maps each import name to the name pip installs it by; ``install``
    is the pip command that brings them (usually an extra). None when every
    module imports. Commands call this before doing any work, so a missing
    extra never leaves half-made output behind.
    """
    missing = []
    for module, package in needs.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if not missing:
        return None
    names = " and ".join(
        [", ".join(missing[:-1]), missing[-1]] if missing[1:] else missing
    )
    verb = "is" if len(missing) == 1 else "are"
    return (
        f"batchnorm {command} needs {names}, which {verb} not "
        f"installed: {install}{alternative}"
    )


def _named_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first argument that is not an option."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of the command ``argv`` names (all if None)."""
    parser = argparse.ArgumentParser(
        prog="batchnorm", description="Exact batch normalization for NumPy."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    named = None if argv is None else _named_command(argv)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if argv is None or name == named:
            importlib.import_module(module_name).add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
