"""``batchnorm inspect``: each batch normalization's statistics and a health check.

Two kinds of input:

- a darknet network, ``batchnorm inspect NET.cfg NET.weights`` (either order, told
  apart by suffix; ``inspect NET.weights --cfg NET.cfg`` also works), read with
  :func:`batchnorm.io.darknet.read` so that any network darknet parses can be
  inspected. For every batch-normalized unit (a layer's, or a recurrent layer's
  ``wz.``, ``input_layer.``… sub-layer) it prints min / median / max of γ
  (``scales``), ``rolling_mean`` and ``rolling_variance`` as one table row, and
  flags:

  ``non-finite``
      NaN or ±inf in ``scales``, ``biases``, ``rolling_mean`` or
      ``rolling_variance``: every output of the channel is NaN at test time.
  ``negative-variance``
      ``rolling_variance < 0``: darknet takes √ of it, NaN outputs.
  ``tiny-variance``
      ``0 ≤ rolling_variance < --var-tiny`` (default 1e-6). darknet normalizes
      at test time with ``(x − mean) / (√var + ε)``, ε = 1e-6, so below 1e-6
      (√var < 1e-3) the channel's gain is 1 / (√var + 1e-6) ≥ ~1000: the input
      is amplified by at least ~1000·γ, and by 1e6·γ at var = 0, the state an
      untrained layer's statistics are in (darknet starts them at 0).
  ``dead-gamma``
      ``|scales| < --gamma-tiny`` (default 1e-6): the channel outputs its bias
      alone, whatever the input (a dead channel).

  Each flag gives its count and the first channels. ``--json`` prints the same
  as one JSON document, ``--plot FILE.png`` draws it (matplotlib, from the
  ``demo`` extra), one panel each for γ, rolling mean and log10 rolling
  variance, with the units that have a problem in red.
- a harness model, ``.npz`` or ``.pt``/``.pth`` (with ``--cfg`` or ``--like``
  for a ``.pt`` that does not record its structure): each BatchNorm's
  conventions (momentum, ε and placement, variance kind, mode), its statistics,
  and problems (running variance ≤ 0 or non-finite, statistics never updated,
  γ ≈ 0).

Exit status 0 when healthy, 1 when a problem was found, 2 when the input cannot
be read (a missing file, a FormatError, a bad combination of arguments).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

GAMMA_TINY = 1e-6
#: Below this rolling variance darknet's gain 1 / (√var + 1e-6) exceeds ~1000.
VAR_TINY = 1e-6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file",
        type=Path,
        metavar="FILE",
        help="model: .npz, .pt, .pth, or a darknet .cfg/.weights (give both)",
    )
    parser.add_argument(
        "pair",
        type=Path,
        nargs="?",
        metavar="FILE2",
        help="the other file of a darknet pair: NET.cfg NET.weights, either order",
    )
    parser.add_argument(
        "--cfg", type=Path, help="darknet .cfg (for .weights, or a .pt's structure)"
    )
    parser.add_argument("--like", type=Path, help=".npz with the structure (for .pt)")
    darknet = parser.add_argument_group("darknet networks (NET.cfg NET.weights)")
    darknet.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document (header, per-unit stats, problems, totals)",
    )
    darknet.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="also draw gamma, rolling mean and log10 rolling variance per unit "
        "(needs matplotlib: the demo extra)",
    )
    darknet.add_argument(
        "--var-tiny",
        default=None,
        metavar="V",
        help=f"flag rolling_variance below V (default {VAR_TINY:g}: with darknet's "
        "eps = 1e-6 added to sqrt(var), the channel is then amplified by more "
        "than ~1000 gamma)",
    )
    darknet.add_argument(
        "--gamma-tiny",
        default=None,
        metavar="G",
        help=f"flag |scales| below G as dead channels (default {GAMMA_TINY:g})",
    )


# -- darknet: the command -------------------------------------------------------


class _Usage(ValueError):
    """Arguments that do not go together."""


def _darknet_pair(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """``(cfg, weights)`` when the arguments name a darknet network, else None."""
    paths = [args.file] + ([args.pair] if args.pair is not None else [])
    suffixes = [p.suffix.lower() for p in paths]
    if len(paths) == 2:
        if sorted(suffixes) != [".cfg", ".weights"]:
            raise _Usage(
                "inspect FILE FILE2 takes a darknet pair, one .cfg and one .weights "
                f"(either order); got {paths[0]} and {paths[1]}. Give "
                "NET.cfg NET.weights, or a single .npz/.pt file."
            )
        if args.cfg is not None:
            raise _Usage(
                f"--cfg {args.cfg} and the pair {paths[0]} {paths[1]} both name a "
                ".cfg; give the pair alone (NET.cfg NET.weights) or "
                "NET.weights --cfg NET.cfg."
            )
        cfg, weights = paths if suffixes[0] == ".cfg" else paths[::-1]
    elif suffixes[0] == ".cfg":
        raise _Usage(
            f"{paths[0]}: a darknet .cfg needs its .weights; got the .cfg alone. "
            f"Run batchnorm inspect {paths[0]} NET.weights."
        )
    elif suffixes[0] == ".weights":
        if args.cfg is None:
            raise _Usage(
                f"{paths[0]}: a darknet .weights file needs its .cfg; got the "
                f".weights alone. Run batchnorm inspect NET.cfg {paths[0]} (or "
                "add --cfg NET.cfg)."
            )
        cfg, weights = args.cfg, paths[0]
    else:
        return None
    if args.like is not None:
        raise _Usage(
            f"--like goes with a .pt/.pth file; got it with the darknet pair {cfg} "
            f"{weights}. Drop --like."
        )
    return cfg, weights


def _threshold(text: str | None, flag: str, default: float) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise _Usage(f"{flag} must be a number >= 0 (e.g. {default:g}); got {text!r}.")
    return value


def _check_plot(path: Path | None) -> str | None:
    """The error for a ``--plot`` target that cannot be written (None when fine)."""
    if path is None:
        return None
    if path.suffix.lower() != ".png":
        return (
            f"--plot writes a PNG, so FILE must end in .png; got {path}. "
            f"Use --plot {path.with_suffix('.png')}."
        )
    if not path.parent.is_dir():
        return (
            f"--plot {path}: the folder {path.parent} does not exist; create it first."
        )
    return None


def _pair_hint(cfg: Path, weights: Path) -> str:
    """Which of the two files is newer, for a .weights that does not fit its cfg."""
    from batchnorm.io import FormatError, darknet

    try:
        darknet.read_cfg(cfg)  # the cfg is fine: the weights do not fit it
        times = {cfg: cfg.stat().st_mtime, weights: weights.stat().st_mtime}
    except (FormatError, OSError, ValueError):
        return ""
    newer, older = sorted(times, key=times.__getitem__, reverse=True)
    gap = times[newer] - times[older]
    if gap <= 0:
        return ""
    return (
        f" {newer} is newer (modified {gap:.3g} s after {older}): if they are not "
        "a pair, use the .cfg this .weights was trained with."
    )


def _error(message: str) -> int:
    print(f"batchnorm inspect: error: {message}", file=sys.stderr)
    return 2


def _run_darknet(args: argparse.Namespace, cfg: Path, weights: Path) -> int:
    import json

    from batchnorm.app.convert import describe_error, one_line_warnings
    from batchnorm.app.inspect.plot import plot
    from batchnorm.app.inspect.report import analyse, document, text
    from batchnorm.app.main import missing_modules
    from batchnorm.io import FormatError, darknet

    if args.plot is not None:
        missing = missing_modules(
            "inspect", {"matplotlib": "matplotlib"}, "pip install 'batchnorm[demo]'"
        )
        if missing:
            print(missing, file=sys.stderr)
            return 2
    try:
        th = (
            _threshold(args.var_tiny, "--var-tiny", VAR_TINY),
            _threshold(args.gamma_tiny, "--gamma-tiny", GAMMA_TINY),
        )
    except _Usage as exc:
        return _error(str(exc))
    bad_plot = _check_plot(args.plot)
    if bad_plot:
        return _error(bad_plot)
    with one_line_warnings("inspect"):
        try:
            # One pass into memory, not mmap: a file that darknet rewrites while
            # we read it (backup weights during training) is then a FormatError,
            # never a SIGBUS.
            network = darknet.read(cfg, weights)
        except FileNotFoundError as exc:
            return _error(describe_error(exc))
        except FormatError as exc:
            return _error(f"{exc}{_pair_hint(cfg, weights)}")
        except (ValueError, OSError) as exc:
            return _error(describe_error(exc))
    units = analyse(network, *th)
    if args.plot is not None:
        try:
            plot(units, args.plot, Path(cfg).name, th)
        except (OSError, ValueError) as exc:
            return _error(describe_error(exc))
    if args.json:
        report = document(network, units, (cfg, weights), th, args.plot)
        print(json.dumps(report, indent=1, allow_nan=False))
    else:
        print(text(network, units, (cfg, weights), th))
        if args.plot is not None:
            print(f"wrote {args.plot}")
    return 1 if any(u.problems for u in units) else 0


# -- harness models (.npz, .pt) -------------------------------------------------


def _summary_line(name: str, values: np.ndarray) -> str:
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


def _run_harness(args: argparse.Namespace) -> int:
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
    darknet_only = [
        flag
        for flag, value in (
            ("--json", args.json),
            ("--plot", args.plot),
            ("--var-tiny", args.var_tiny),
            ("--gamma-tiny", args.gamma_tiny),
        )
        if value not in (None, False)
    ]
    if darknet_only:
        return _error(
            f"{' and '.join(darknet_only)} inspect darknet networks "
            f"(batchnorm inspect NET.cfg NET.weights); got {args.file}. Drop "
            f"{'them' if darknet_only[1:] else 'it'}, or convert the model to "
            ".weights first."
        )
    with one_line_warnings("inspect"):
        try:
            obj = read_any(args.file, args, allow_nonfinite=True)
        except (FormatError, ValueError, TypeError, OSError, ImportError) as exc:
            return _error(describe_error(exc))
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
                print("  " + _summary_line(name, np.asarray(value, np.float64)))
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


def run(args: argparse.Namespace) -> int:
    try:
        pair = _darknet_pair(args)
    except _Usage as exc:
        return _error(str(exc))
    if pair is None:
        return _run_harness(args)
    return _run_darknet(args, *pair)
