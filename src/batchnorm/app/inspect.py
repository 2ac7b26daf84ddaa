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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GAMMA_TINY = 1e-6
#: Below this rolling variance darknet's gain 1 / (√var + 1e-6) exceeds ~1000.
VAR_TINY = 1e-6
#: darknet's (pjreddie's) ε, added to √var at test time.
DARKNET_EPS = 1e-6
#: How many channels a flag lists.
FIRST = 8
#: The arrays the non-finite check covers, in the order they are reported.
ROLES = ("scales", "biases", "rolling_mean", "rolling_variance")
FLAGS = ("non-finite", "negative-variance", "tiny-variance", "dead-gamma")


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


# -- darknet: the analysis ------------------------------------------------------


@dataclass
class Problem:
    """One flag of one unit: ``count`` channels of ``array``, the first listed."""

    flag: str
    array: str
    count: int
    channels: list[int]
    message: str


@dataclass
class UnitReport:
    """One batch-normalized unit: where it is, its statistics, its problems."""

    layer: int
    section: str
    type: str
    line: int
    prefix: str
    channels: int
    stats: dict[str, dict[str, float | None]]
    problems: list[Problem] = field(default_factory=list)
    log_variance: dict[str, float | None] = field(default_factory=dict)

    @property
    def where(self) -> str:
        unit = f" unit {self.prefix}" if self.prefix else ""
        return f"layer {self.layer} [{self.section}] line {self.line}{unit}"


_QUANTILES = ("min", "q1", "median", "q3", "max")


def _stats(values: np.ndarray) -> dict[str, float | None]:
    """min, quartiles, median and max of the finite values (None when none is)."""
    flat = np.asarray(values).ravel()
    finite = np.isfinite(flat)
    if not finite.all():
        flat = flat[finite]
    out: dict[str, float | None] = {"finite": int(flat.size)}
    if flat.size == 0:
        return {**dict.fromkeys(_QUANTILES), **out}
    points = np.percentile(flat.astype(np.float64), [0, 25, 50, 75, 100])
    return {**{k: float(v) for k, v in zip(_QUANTILES, points, strict=True)}, **out}


def _listed(mask: np.ndarray) -> tuple[int, list[int]]:
    where = np.flatnonzero(mask)
    return int(where.size), where[:FIRST].tolist()


def _channels(count: int, first: list[int], total: int) -> str:
    more = ", ..." if count > len(first) else ""
    return f"{count} of {total} channels [{', '.join(map(str, first))}{more}]"


def _unit_problems(
    arrays: dict[str, np.ndarray], channels: int, var_tiny: float, gamma_tiny: float
) -> list[Problem]:
    problems = []
    for role in ROLES:
        if role not in arrays:
            continue
        bad = ~np.isfinite(arrays[role])
        if bad.any():
            count, first = _listed(bad)
            values = arrays[role][bad]
            kinds = [
                name
                for name, hit in (
                    ("NaN", np.isnan(values).any()),
                    ("+inf", np.isposinf(values).any()),
                    ("-inf", np.isneginf(values).any()),
                )
                if hit
            ]
            problems.append(
                Problem(
                    "non-finite",
                    role,
                    count,
                    first,
                    f"{role} is {'/'.join(kinds)} at "
                    f"{_channels(count, first, channels)}: those channels output "
                    "NaN",
                )
            )
    var = arrays["rolling_variance"]
    with np.errstate(invalid="ignore"):
        negative = var < 0
        tiny = (var >= 0) & (var < var_tiny)
        dead = np.abs(arrays["scales"]) < gamma_tiny
    if negative.any():
        count, first = _listed(negative)
        problems.append(
            Problem(
                "negative-variance",
                "rolling_variance",
                count,
                first,
                f"rolling_variance < 0 at {_channels(count, first, channels)} "
                f"(min {float(var[negative].min()):.3g}): sqrt gives NaN outputs",
            )
        )
    if tiny.any():
        count, first = _listed(tiny)
        smallest = float(var[tiny].min())
        gain = 1.0 / (math.sqrt(smallest) + DARKNET_EPS)
        problems.append(
            Problem(
                "tiny-variance",
                "rolling_variance",
                count,
                first,
                f"rolling_variance < {var_tiny:g} at "
                f"{_channels(count, first, channels)} (min {smallest:.3g}): "
                f"the input is amplified by up to {gain:.3g} x gamma",
            )
        )
    if dead.any():
        count, first = _listed(dead)
        problems.append(
            Problem(
                "dead-gamma",
                "scales",
                count,
                first,
                f"|scales| < {gamma_tiny:g} at {_channels(count, first, channels)}: "
                "dead channels (they output their bias alone)",
            )
        )
    return problems


def analyse(network: Any, var_tiny: float, gamma_tiny: float) -> list[UnitReport]:
    """A report for every batch-normalized unit of a :class:`darknet.Network`."""
    units = []
    for layer in network.layers:
        for unit in layer.units:
            if not unit.batch_normalize:
                continue
            arrays = {
                role: layer.arrays[name]
                for role, name in unit.names.items()
                if role in ROLES
            }
            var = arrays["rolling_variance"]
            with np.errstate(invalid="ignore", divide="ignore"):
                log_var = np.log10(var[var > 0])
            units.append(
                UnitReport(
                    layer=layer.index,
                    section=layer.section,
                    type=layer.type,
                    line=layer.line,
                    prefix=unit.prefix,
                    channels=unit.channels,
                    stats={role: _stats(value) for role, value in arrays.items()},
                    problems=_unit_problems(
                        arrays, unit.channels, var_tiny, gamma_tiny
                    ),
                    log_variance=_stats(log_var),
                )
            )
    return units


# -- darknet: output ------------------------------------------------------------


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _text(
    network: Any, units: list[UnitReport], files: tuple[Path, Path], th: Any
) -> str:
    cfg, weights = files
    header = network.header
    channels = sum(u.channels for u in units)
    lines = [
        f"{cfg} + {weights}: {len(network.layers)} layers, {len(units)} "
        f"batch-normalized units ({channels} channels); weights version "
        f"{header.major}.{header.minor}.{header.revision}, seen {header.seen}",
        "darknet at test time: (x - rolling_mean) / (sqrt(rolling_variance) + "
        f"{DARKNET_EPS:g}) * scales + biases",
        f"flags: non-finite; negative-variance; tiny-variance (var < {th[0]:g}, "
        f"--var-tiny); dead-gamma (|scales| < {th[1]:g}, --gamma-tiny)",
    ]
    if not units:
        lines.append("no batch-normalized units: nothing to check")
        return "\n".join(lines)
    sec = max(7, *(len(u.section) for u in units))
    pre = max(4, *(len(u.prefix) for u in units))
    chw = max(2, *(len(str(u.channels)) for u in units))
    left = f"{'layer':>5} {'section':<{sec}} {'line':>5} {'unit':<{pre}} {'C':>{chw}}"
    groups = ("gamma (scales)", "rolling_mean", "rolling_variance")
    top = " " * len(left) + "".join(f" {g:<26}" for g in groups)
    names = "".join(f" {k:>8}" for k in ("min", "median", "max") * 3)
    lines += ["", top.rstrip(), f"{left}{names}  flags"]
    for u in units:
        row = (
            f"{u.layer:>5} {u.section:<{sec}} {u.line:>5} {u.prefix or '-':<{pre}} "
            f"{u.channels:>{chw}}"
        )
        for role in ("scales", "rolling_mean", "rolling_variance"):
            s = u.stats[role]
            row += "".join(f" {_number(s[k]):>8}" for k in ("min", "median", "max"))
        flags = sorted({p.flag for p in u.problems}, key=FLAGS.index)
        lines.append(f"{row}  {' '.join(flags)}".rstrip())
    problems = [(u, p) for u in units for p in u.problems]
    if problems:
        lines += ["", "problems:"]
        lines += [f"  [{p.flag}] {u.where}: {p.message}" for u, p in problems]
    lines += ["", _summary(units)]
    return "\n".join(lines)


def _summary(units: list[UnitReport]) -> str:
    bad = [u for u in units if u.problems]
    if not bad:
        return f"healthy: {len(units)} batch-normalized units, no problems"
    count = sum(len(u.problems) for u in units)
    layers = sorted({u.layer for u in bad})
    shown = ", ".join(map(str, layers[:FIRST])) + (
        ", ..." if len(layers) > FIRST else ""
    )
    by_flag = ", ".join(
        f"{n} {flag}"
        for flag in FLAGS
        if (n := sum(p.flag == flag for u in units for p in u.problems))
    )
    return (
        f"{count} problem(s) ({by_flag}) in {len(bad)} of {len(units)} "
        f"batch-normalized units, layers {shown}"
    )


def _document(
    network: Any,
    units: list[UnitReport],
    files: tuple[Path, Path],
    th: tuple[float, float],
    plot: Path | None,
) -> dict[str, Any]:
    header = network.header
    problems = [
        {
            "layer": u.layer,
            "section": u.section,
            "line": u.line,
            "prefix": u.prefix,
            "flag": p.flag,
            "array": p.array,
            "count": p.count,
            "first_channels": p.channels,
            "message": p.message,
        }
        for u in units
        for p in u.problems
    ]
    return {
        "cfg": str(files[0]),
        "weights": str(files[1]),
        "header": {
            "major": header.major,
            "minor": header.minor,
            "revision": header.revision,
            "seen": header.seen,
        },
        "layers": len(network.layers),
        "epsilon": DARKNET_EPS,
        "thresholds": {"var_tiny": th[0], "gamma_tiny": th[1]},
        "units": [
            {
                "layer": u.layer,
                "section": u.section,
                "type": u.type,
                "line": u.line,
                "prefix": u.prefix,
                "channels": u.channels,
                "stats": u.stats,
                "flags": sorted({p.flag for p in u.problems}, key=FLAGS.index),
                "problems": [
                    {
                        "flag": p.flag,
                        "array": p.array,
                        "count": p.count,
                        "first_channels": p.channels,
                        "message": p.message,
                    }
                    for p in u.problems
                ],
            }
            for u in units
        ],
        "problems": problems,
        "totals": {
            "units": len(units),
            "channels": sum(u.channels for u in units),
            "units_with_problems": sum(bool(u.problems) for u in units),
            "problems": len(problems),
            "by_flag": {f: sum(p["flag"] == f for p in problems) for f in FLAGS},
        },
        "healthy": not problems,
        "summary": _summary(units),
        "plot": None if plot is None else str(plot),
    }


def _series(units: list[UnitReport], key: str) -> dict[str, np.ndarray]:
    def value(u: UnitReport, q: str) -> float:
        stats = u.log_variance if key == "log_variance" else u.stats[key]
        v = stats[q]
        return math.nan if v is None else v

    return {q: np.array([value(u, q) for u in units]) for q in _QUANTILES}


def _label(u: UnitReport) -> str:
    return f"{u.layer}{'.' + u.prefix.rstrip('.') if u.prefix else ''}"


def plot(
    units: list[UnitReport], path: Path, title: str, th: tuple[float, float]
) -> None:
    """Per unit: min–max line, interquartile box, median tick; problems in red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from batchnorm.io._atomic import atomic_write

    n = max(len(units), 1)
    fig = Figure(figsize=(min(40.0, max(8.0, 3.0 + 0.14 * n)), 9.0), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    x = np.arange(len(units))
    bad = np.array([bool(u.problems) for u in units], bool)
    colors = np.where(bad, "#d62728", "#1f77b4")
    panels = (
        ("scales", "gamma (scales)"),
        ("rolling_mean", "rolling mean"),
        ("log_variance", "log10 rolling variance"),
    )
    for ax, (key, label) in zip(axes, panels, strict=True):
        s = _series(units, key)
        for i in np.flatnonzero(bad):
            ax.axvspan(i - 0.5, i + 0.5, color="#d62728", alpha=0.12, lw=0)
        ax.vlines(x, s["min"], s["max"], colors=colors, lw=1.0)
        ax.bar(
            x,
            s["q3"] - s["q1"],
            bottom=s["q1"],
            width=0.6,
            color=colors,
            alpha=0.45,
            edgecolor=colors,
            linewidth=0.8,
        )
        ax.scatter(x, s["median"], marker="_", s=60, c="k", linewidths=1.2, zorder=3)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    off_scale = [
        i for i, u in enumerate(units) if (u.log_variance["finite"] or 0) < u.channels
    ]
    if off_scale:
        axes[2].scatter(
            off_scale,
            [0.03] * len(off_scale),
            transform=axes[2].get_xaxis_transform(),
            marker="v",
            s=40,
            c="#d62728",
            zorder=4,
            label="has var <= 0 or non-finite (off the log scale)",
        )
    axes[2].axhline(
        math.log10(th[0]) if th[0] > 0 else -6.0,
        color="#d62728",
        lw=0.8,
        ls="--",
        label=f"--var-tiny {th[0]:g}",
    )
    axes[2].legend(loc="lower right", fontsize=8)
    for i in np.flatnonzero(bad)[:60]:
        u = units[i]
        flags = sorted({p.flag for p in u.problems}, key=FLAGS.index)
        axes[0].annotate(
            f"L{_label(u)}: {', '.join(flags)}",
            xy=(float(i), 0.98),
            xycoords=axes[0].get_xaxis_transform(),
            rotation=90,
            ha="center",
            va="top",
            fontsize=7,
            color="#d62728",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "#d62728"},
            zorder=5,
        )
    step = max(1, math.ceil(len(units) / 60))
    ticks = sorted(set(range(0, len(units), step)) | set(np.flatnonzero(bad).tolist()))
    axes[2].set_xticks(ticks, [_label(units[i]) for i in ticks], rotation=90)
    for tick, position in zip(axes[2].get_xticklabels(), ticks, strict=True):
        if bad[position]:
            tick.set_color("#d62728")
    axes[2].tick_params(axis="x", labelsize=7)
    axes[2].set_xlabel("batch-normalized unit, in network order (darknet layer index)")
    axes[2].set_xlim(-0.75, max(len(units) - 0.25, 0.75))
    problems = int(bad.sum())
    fig.suptitle(
        f"{title}: {len(units)} batch-normalized units, "
        + (f"{problems} with problems (red)" if problems else "healthy"),
        color="#d62728" if problems else "black",
    )
    fig.tight_layout()
    atomic_write(path, lambda file: fig.savefig(file, format="png"))


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
        document = _document(network, units, (cfg, weights), th, args.plot)
        print(json.dumps(document, indent=1, allow_nan=False))
    else:
        print(_text(network, units, (cfg, weights), th))
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
