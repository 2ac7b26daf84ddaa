"""``batchnorm fold NET.cfg NET.weights --out-cfg F.cfg --out-weights F.weights``:
a darknet network with its batch normalization folded into the weights.

The pair is read with :func:`batchnorm.io.darknet.read` (any network darknet
parses) and folded with :func:`batchnorm.io.darknet.fold`: every unit with
``batch_normalize=1`` gets ``W' = a·W`` and ``b' = biases − a·rolling_mean``
(``a = scales / d``, ``d`` as ``--dialect``'s darknet computes it), and a
standalone ``[batchnorm]`` right after a linear unit is folded into that unit.
Both outputs are written together: each is renamed into place only once both
are complete, so an output may be one of the inputs, and any error leaves every
file as it was.

It prints what was folded, which standalone ``[batchnorm]`` sections stay and
why, the sizes in bytes, and the largest relative rounding of a folded weight
to float32. Exit status 0, or 2 with one line ``batchnorm fold: error: ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

#: :data:`batchnorm.io.darknet.DIALECTS`, spelled out so that ``--help`` imports
#: nothing from the library.
DIALECTS = ("pjreddie", "alexeyab")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "cfg", type=Path, metavar="NET.cfg", help="the network's darknet .cfg"
    )
    parser.add_argument(
        "weights", type=Path, metavar="NET.weights", help="its .weights"
    )
    parser.add_argument(
        "--out-cfg",
        type=Path,
        metavar="FILE",
        help="where to write the folded .cfg (required)",
    )
    parser.add_argument(
        "--out-weights",
        type=Path,
        metavar="FILE",
        help="where to write the folded .weights (required)",
    )
    parser.add_argument(
        "--dialect",
        default=DIALECTS[0],
        metavar="{" + ",".join(DIALECTS) + "}",
        help="whose darknet runs the network: pjreddie's (√var + 1e-6, the "
        "default) or AlexeyAB's fork (√(var + 1e-5); [batchnorm] stores biases)",
    )


class _Usage(ValueError):
    """Arguments that cannot work."""


def _check_arguments(args: argparse.Namespace) -> None:
    for flag, value, suffix in (
        ("--out-cfg", args.out_cfg, ".cfg"),
        ("--out-weights", args.out_weights, ".weights"),
    ):
        if value is None:
            raise _Usage(
                f"{flag} is required: the file to write the folded network's "
                f"{suffix} to; got none. Add {flag} FOLDED{suffix}."
            )
    if args.dialect not in DIALECTS:
        raise _Usage(
            f"--dialect must be {' or '.join(DIALECTS)}; got {args.dialect!r}. Use "
            "pjreddie unless the network runs on AlexeyAB's darknet."
        )
    if args.cfg.suffix.lower() == ".weights" and args.weights.suffix.lower() == ".cfg":
        raise _Usage(
            f"the network comes as NET.cfg NET.weights, in that order; got "
            f"{args.cfg} {args.weights}. Run batchnorm fold {args.weights} "
            f"{args.cfg} ..."
        )
    if _same_file(args.out_cfg, args.out_weights):
        raise _Usage(
            f"--out-cfg {args.out_cfg} and --out-weights {args.out_weights} are the "
            "same file; give each output its own path."
        )


def _same_file(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _sizes(cfg: Path, weights: Path, network: Any) -> str:
    """The two files and their bytes, as :func:`darknet.write` writes ``network``
    (a network just read: as its files are)."""
    return (
        f"{cfg} ({len(network.cfg_text.encode()):,} bytes) and {weights} "
        f"({network.weights_size():,} bytes)"
    )


def _removed(count: int) -> str:
    return "its section removed" if count == 1 else "their sections removed"


def summary(args: argparse.Namespace, original: Any, done: Any) -> list[str]:
    """The lines ``batchnorm fold`` prints after writing ``done`` (a Folding)."""
    folded = done.network
    layers = len({index for index, _ in done.units})
    lines = [
        f"read {_sizes(args.cfg, args.weights, original)}: "
        f"{len(original.layers)} layers, dialect {args.dialect}",
        f"folded the batch normalization of {len(done.units)} unit(s) (in {layers} "
        "layer(s)) into their weights and biases",
    ]
    standalone = len(done.merged) + len(done.kept)
    if standalone:
        merged = ", ".join(f"layer {bn} into layer {into}" for bn, into in done.merged)
        lines.append(
            f"standalone [batchnorm]: {len(done.merged)} of {standalone} folded"
            + (f" ({merged}; {_removed(len(done.merged))})" if merged else "")
            + (f"; {len(done.kept)} kept:" if done.kept else "")
        )
        for index, reason in done.kept:
            lines.append(
                f"  layer {index} (line {original.layers[index].line}): {reason}"
            )
    lines.append(
        f"wrote {_sizes(args.out_cfg, args.out_weights, folded)}: "
        f"{len(folded.layers)} layers"
    )
    half_ulp = 2.0**-24
    note = (
        f"at most 2^-24 = {half_ulp:.3g}: each rounded once"
        if done.rounding <= half_ulp
        else f"above 2^-24 = {half_ulp:.3g}: some folded weights are subnormal or 0"
    )
    lines.append(
        "largest relative rounding of a folded weight to float32: "
        f"{done.rounding:.3g} ({note})"
    )
    return lines


def _dialect_hint(args: argparse.Namespace, message: str) -> str:
    """For a .weights too long for a pjreddie cfg with a standalone [batchnorm]:
    AlexeyAB's fork stores biases for those."""
    from batchnorm.io import FormatError, darknet

    if "too long" not in message or args.dialect != "pjreddie":
        return ""
    try:
        network = darknet.read_cfg(args.cfg)
    except (FormatError, ValueError, OSError):
        return ""
    if not any(layer.type == "batchnorm" for layer in network.layers):
        return ""
    return (
        " If it comes from AlexeyAB's darknet, add --dialect alexeyab (its "
        "[batchnorm] sections store biases)."
    )


def _error(message: str) -> int:
    print(f"batchnorm fold: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from batchnorm.app.convert import describe_error, one_line_warnings
    from batchnorm.io import FormatError, darknet
    from batchnorm.io.darknet import folding

    try:
        _check_arguments(args)
    except _Usage as exc:
        return _error(str(exc))
    with one_line_warnings("fold"):
        try:
            # Read into memory (not mmap): the outputs may replace the inputs.
            network = darknet.read(args.cfg, args.weights, dialect=args.dialect)
        except FormatError as exc:
            return _error(f"{exc}{_dialect_hint(args, str(exc))}")
        except (ValueError, OSError) as exc:
            return _error(describe_error(exc))
        try:
            done = folding(network, dialect=args.dialect)
        except ValueError as exc:
            return _error(f"{args.weights}: {exc}")
        try:
            darknet.write(done.network, args.out_weights, args.out_cfg)
        except (ValueError, OSError) as exc:
            return _error(describe_error(exc))
    for line in summary(args, network, done):
        print(line)
    return 0
