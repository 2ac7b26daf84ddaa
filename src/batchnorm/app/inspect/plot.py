"""darknet networks: the per-unit distribution figure (``--plot``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from batchnorm.app.inspect.report import FLAGS, QUANTILES, UnitReport


def _series(units: list[UnitReport], key: str) -> dict[str, np.ndarray]:
    def value(u: UnitReport, q: str) -> float:
        stats = u.log_variance if key == "log_variance" else u.stats[key]
        v = stats[q]
        return math.nan if v is None else v

    return {q: np.array([value(u, q) for u in units]) for q in QUANTILES}


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
