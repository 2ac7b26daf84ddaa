"""The demo's report: per-configuration summaries, the table, the JSON, the findings.

Used by :mod:`batchnorm.app.demo` (``batchnorm demo``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def _stats(values: list[float | None]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return {
        "mean": float(np.mean(finite)) if finite else None,
        "std": float(np.std(finite)) if finite else None,
        "per_seed": [None if v is None or not math.isfinite(v) else v for v in values],
    }


def summarize(runs: list[dict[str, Any]], config: dict[str, Any]) -> list[dict]:
    summary = []
    for model in config["models"]:
        for batch_norm in (False, True):
            for lr in config["lrs"]:
                group = sorted(
                    (
                        r
                        for r in runs
                        if (r["model"], r["batch_norm"], r["lr"])
                        == (model, batch_norm, lr)
                    ),
                    key=lambda r: r["seed"],
                )
                diverged = [r["seed"] for r in group if r["diverged_at"] is not None]
                final = [
                    None if r["diverged_at"] is not None else r["test_accuracy"][-1]
                    for r in group
                ]
                reached = [r["steps_to_target"] for r in group]
                summary.append(
                    {
                        "model": model,
                        "batch_norm": batch_norm,
                        "lr": lr,
                        "seeds": len(group),
                        "final_test_accuracy": _stats(final),
                        "steps_to_target": {
                            **_stats(
                                [float(s) if s is not None else None for s in reached]
                            ),
                            "reached": sum(s is not None for s in reached),
                        },
                        "roughness": _stats([r["roughness"] for r in group]),
                        "diverged": len(diverged),
                        "diverged_seeds": diverged,
                    }
                )
    return summary


def table(summary: list[dict[str, Any]], config: dict[str, Any]) -> str:
    target = config["target_accuracy"]
    lines = [
        f"{'model':5} {'BN':3} {'lr':>6}  {'final test acc':>15}  "
        f"{f'steps to {target:.0%}':>15}  {'roughness':>15}  diverged",
    ]

    def cell(stats: dict[str, Any], fmt: str) -> str:
        if stats["mean"] is None:
            return "—"
        return f"{stats['mean']:{fmt}} ± {stats['std']:{fmt}}"

    for row in summary:
        steps = row["steps_to_target"]
        reached = f"{cell(steps, '.0f')} ({steps['reached']}/{row['seeds']})"
        lines.append(
            f"{row['model']:5} {'yes' if row['batch_norm'] else 'no':3} "
            f"{row['lr']:>6g}  {cell(row['final_test_accuracy'], '.3f'):>15}  "
            f"{reached:>15}  {cell(row['roughness'], '.3f'):>15}  "
            f"{row['diverged']}/{row['seeds']}"
        )
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def print_findings(results: dict[str, Any]) -> None:
    paper, ema = results["paper_figure1"], results["ema_vs_batch"]
    for key, name in (("without_bn", "without BN"), ("with_bn", "with BN")):
        run = paper[key]
        acc = np.asarray(run["test_accuracy"])
        first = next(
            (s for s, a in zip(run["eval_steps"], acc, strict=True) if a >= 0.9), None
        )
        print(
            f"Figure 1 network {name:10}: final test accuracy {acc[-1]:.3f}, "
            f"first ≥ 90% at step {first}"
        )
    steps = ema["eval_steps"]
    for key, values in ema["test_accuracy"].items():
        early = {s: v for s, v in zip(steps, values, strict=True) if s in (25, 50, 100)}
        early_text = ", ".join(f"step {s}: {v:.3f}" for s, v in early.items())
        print(f"test accuracy with {key:28}: {early_text}; final {values[-1]:.3f}")
