"""``batchnorm inspect FILE``: each BatchNorm's statistics and a health check.

Flags running variance ≤ 0 or non-finite, statistics never updated, γ ≈ 0, and
prints each layer's conventions (momentum, ε and placement, variance kind, mode).
Exit status 0 when healthy, 1 when a problem was found, 2 when the file cannot
be read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

GAMMA_TINY = 1e-6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="model: .npz, .weights, .pt, .pth")
    parser.add_argument("--cfg", type=Path, help="darknet .cfg (for .weights)")
    parser.add_argument("--like", type=Path, help=".npz with the structure (for .pt)")


def _summary(name: str, values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return f"{name:>12}: no finite values"
    return (
        f"{name:>12}: min {finite.min():.4g}  mean {finite.mean():.4g}  "
        f"max {finite.max():.4g}"
    )


def health(layer: Any) -> list[str]:
    """Problems with one BatchNorm's state, as sentences (empty when healthy)."""
    problems = []
    var, mean = layer.running_var, layer.running_mean
    bad = ~np.isfinite(var) | ~np.isfinite(mean)
    if bad.any():
        problems.append(
            f"non-finite running statistics at channels "
            f"{np.flatnonzero(bad)[:8].tolist()}"
        )
    nonpositive = np.isfinite(var) & (var <= 0)
    if nonpositive.any():
        problems.append(
            f"running_var <= 0 at {int(nonpositive.sum())} channels "
            f"{np.flatnonzero(nonpositive)[:8].tolist()} (divides by ~eps at test time)"
        )
    untouched = np.all(mean == layer.initial_running_mean) and np.all(
        var == layer.initial_running_var
    )
    if untouched:
        problems.append(
            "statistics never updated (still at their initial values): "
            "train mode was never used, or the file lost them"
        )
    if layer.gamma is not None:
        tiny = np.abs(layer.gamma) < GAMMA_TINY
        if tiny.any():
            problems.append(f"gamma ~ 0 at {int(tiny.sum())} channels (dead channels)")
    return problems


def run(args: argparse.Namespace) -> int:
    from batchnorm.app.convert import (
        describe_error,
        missing_extra,
        one_line_warnings,
        read_any,
    )
    from batchnorm.io import FormatError
    from batchnorm.layer import BatchNorm
    from batchnorm.nn import children

    missing = missing_extra("inspect", args.file)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    with one_line_warnings("inspect"):
        try:
            obj = read_any(args.file, args, allow_nonfinite=True)
        except (FormatError, ValueError, TypeError, OSError, ImportError) as exc:
            print(f"batchnorm inspect: error: {describe_error(exc)}", file=sys.stderr)
            return 2
    layers = children(obj)
    found = 0
    print(f"{args.file}: {len(layers)} layer(s)")
    for index, layer in enumerate(layers):
        if not isinstance(layer, BatchNorm):
            continue
        momentum = "cumulative" if layer.momentum is None else f"{layer.momentum:g}"
        mode = "train" if layer.use_batch_stats else "eval"
        print(
            f"[{index}] BatchNorm C={layer.num_features} axis={layer.axis} "
            f"momentum={momentum} (on the old value; torch's {_torch(layer)}) "
            f"eps={layer.eps:g} ({layer.eps_placement} the root) "
            f"running_var={layer.running_var_kind} ddof={layer.ddof} mode={mode} "
            f"batches={layer.num_batches_tracked} values={layer.num_values_seen}"
        )
        for name in ("running_mean", "running_var", "gamma", "beta"):
            value = getattr(layer, name)
            if value is not None:
                print("  " + _summary(name, np.asarray(value, np.float64)))
        problems = health(layer)
        found += len(problems)
        for problem in problems:
            print(f"  PROBLEM: {problem}")
        if not problems:
            print("  ok")
    print(f"{found} problem(s) found" if found else "healthy")
    return 1 if found else 0


def _torch(layer: Any) -> str:
    return "None" if layer.momentum is None else f"{1 - layer.momentum:g}"
