"""darknet networks: per-unit statistics, problems, the text and JSON reports."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: darknet's (pjreddie's) ε, added to √var at test time.
DARKNET_EPS = 1e-6
#: How many channels a flag lists.
FIRST = 8
#: The arrays the non-finite check covers, in the order they are reported.
ROLES = ("scales", "biases", "rolling_mean", "rolling_variance")
FLAGS = ("non-finite", "negative-variance", "tiny-variance", "dead-gamma")


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


QUANTILES = ("min", "q1", "median", "q3", "max")


def _stats(values: np.ndarray) -> dict[str, float | None]:
    """min, quartiles, median and max of the finite values (None when none is)."""
    flat = np.asarray(values).ravel()
    finite = np.isfinite(flat)
    if not finite.all():
        flat = flat[finite]
    out: dict[str, float | None] = {"finite": int(flat.size)}
    if flat.size == 0:
        return {**dict.fromkeys(QUANTILES), **out}
    points = np.percentile(flat.astype(np.float64), [0, 25, 50, 75, 100])
    return {**{k: float(v) for k, v in zip(QUANTILES, points, strict=True)}, **out}


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


def text(
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


def document(
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
