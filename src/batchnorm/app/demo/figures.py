"""The demo's figures, drawn with matplotlib's Agg backend from the results dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

COLORS = {False: "#d95f02", True: "#1b65b4"}
LABELS = {False: "without BN", True: "with BN"}
MODEL_NAMES = {"mlp": "MLP 64-100-100-10", "cnn": "CNN conv8-conv16"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average that ignores NaN; same length as ``values``."""
    window = max(1, min(window, len(values)))
    finite = np.isfinite(values)
    kernel = np.ones(window)
    total = np.convolve(np.where(finite, values, 0.0), kernel, mode="same")
    count = np.convolve(finite.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def loss_curves(results: dict[str, Any], out: Path) -> str:
    """Training loss at the shared learning rate, with and without BN."""
    plt = _pyplot()
    runs, lr = results["runs"], results["config"]["shared_lr"]
    models = results["config"]["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8))
    for ax, model in zip(np.atleast_1d(axes), models, strict=True):
        for batch_norm in (False, True):
            chosen = [
                r
                for r in runs
                if r["model"] == model
                and r["batch_norm"] == batch_norm
                and r["lr"] == lr
            ]
            for i, run in enumerate(chosen):
                loss = np.array([np.nan if v is None else v for v in run["loss"]])
                steps = np.arange(1, len(loss) + 1)
                ax.plot(steps, loss, color=COLORS[batch_norm], alpha=0.18, lw=0.6)
                label = LABELS[batch_norm] if i == 0 else None
                ax.plot(
                    steps,
                    _smooth(loss, 15),
                    color=COLORS[batch_norm],
                    lw=1.4,
                    label=label,
                )
        ax.set_yscale("log")
        ax.set_title(f"{MODEL_NAMES[model]}, lr = {lr} (each seed; thin: per step)")
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (cross-entropy)")
        ax.legend()
    return _save(fig, out / "loss_curves.png")


def accuracy_vs_lr(results: dict[str, Any], out: Path) -> str:
    """Final test accuracy (mean ± std over seeds) against the learning rate."""
    plt = _pyplot()
    models = results["config"]["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8))
    for ax, model in zip(np.atleast_1d(axes), models, strict=True):
        for batch_norm in (False, True):
            rows = [
                s
                for s in results["summary"]
                if s["model"] == model and s["batch_norm"] == batch_norm
            ]
            lrs = [s["lr"] for s in rows]
            mean = [
                np.nan
                if s["final_test_accuracy"]["mean"] is None
                else s["final_test_accuracy"]["mean"]
                for s in rows
            ]
            std = [s["final_test_accuracy"]["std"] or 0.0 for s in rows]
            ax.errorbar(
                lrs,
                mean,
                yerr=std,
                color=COLORS[batch_norm],
                marker="o",
                capsize=3,
                label=LABELS[batch_norm],
            )
            for s in rows:
                if s["diverged"]:
                    ax.annotate(
                        f"{s['diverged']}/{s['seeds']} diverged",
                        (s["lr"], 0.12 if batch_norm else 0.05),
                        color=COLORS[batch_norm],
                        fontsize=7,
                        ha="center",
                    )
        ax.set_xscale("log")
        ax.set_xticks(results["config"]["lrs"])
        ax.set_xticklabels([f"{lr:g}" for lr in results["config"]["lrs"]])
        ax.minorticks_off()
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{MODEL_NAMES[model]}: final test accuracy")
        ax.set_xlabel("learning rate (SGD, momentum 0.9)")
        ax.set_ylabel("test accuracy (running statistics)")
        ax.legend(loc="lower left")
    return _save(fig, out / "accuracy_vs_lr.png")


def drift(results: dict[str, Any], out: Path, units: int = 8) -> str:
    """Per-unit mean and variance of the second hidden layer over training."""
    plt = _pyplot()
    record = results["drift"]
    panels = [
        (False, "pre_activation", "without BN: input of ReLU (= Linear output)"),
        (True, "linear", "with BN: Linear output (BN input)"),
        (True, "pre_activation", "with BN: input of ReLU (= BN output)"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6), sharex=True)
    cmap = plt.get_cmap("tab10")
    for col, (batch_norm, key, title) in enumerate(panels):
        data = record["with_bn" if batch_norm else "without_bn"]
        steps = np.asarray(data["steps"])
        stats = np.asarray(data[key])  # (evaluations, 2, units)
        for row, (name, index) in enumerate((("mean", 0), ("variance", 1))):
            ax = axes[row, col]
            for unit in range(min(units, stats.shape[2])):
                ax.plot(steps, stats[:, index, unit], color=cmap(unit), lw=1.1)
            ax.set_ylabel(f"per-unit {name}")
            if row == 0:
                ax.set_title(title)
            else:
                ax.set_xlabel("training step")
    for row in range(2):  # same scale within a row: the drift is comparable
        low = min(ax.get_ylim()[0] for ax in axes[row])
        high = max(ax.get_ylim()[1] for ax in axes[row])
        for ax in axes[row]:
            ax.set_ylim(low, high)
    fig.suptitle(
        f"MLP, lr = {results['config']['shared_lr']}: statistics of {units} units of "
        "hidden layer 2 on a fixed probe of 512 training images"
    )
    return _save(fig, out / "drift.png")


def paper_figure1(results: dict[str, Any], out: Path) -> str:
    """Ioffe & Szegedy (2015) Figure 1 on the digits."""
    plt = _pyplot()
    paper = results["paper_figure1"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for batch_norm in (False, True):
        run = paper["with_bn" if batch_norm else "without_bn"]
        axes[0].plot(
            run["eval_steps"],
            run["test_accuracy"],
            color=COLORS[batch_norm],
            label=LABELS[batch_norm],
        )
    axes[0].set_title("(a) test accuracy")
    axes[0].set_xlabel("training step")
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(loc="lower right")
    for ax, batch_norm, tag in (
        (axes[1], False, "(b) without BN"),
        (axes[2], True, "(c) with BN"),
    ):
        run = paper["with_bn" if batch_norm else "without_bn"]
        q = np.asarray(run["percentiles_15_50_85"])
        ax.plot(run["eval_steps"], q[:, 1], color=COLORS[batch_norm], lw=1.5)
        ax.fill_between(
            run["eval_steps"], q[:, 0], q[:, 2], color=COLORS[batch_norm], alpha=0.15
        )
        for i in (0, 2):
            ax.plot(run["eval_steps"], q[:, i], color=COLORS[batch_norm], lw=0.8)
        ax.set_title(f"{tag}: sigmoid input of unit {paper['unit']}, layer 3")
        ax.set_xlabel("training step")
        ax.set_ylabel("15th / 50th / 85th percentile")
    low = min(axes[1].get_ylim()[0], axes[2].get_ylim()[0])
    high = max(axes[1].get_ylim()[1], axes[2].get_ylim()[1])
    axes[1].set_ylim(low, high)
    axes[2].set_ylim(low, high)
    return _save(fig, out / "paper_figure1.png")


def ema_vs_batch(results: dict[str, Any], out: Path) -> str:
    """Test accuracy early in training: running statistics vs batch statistics."""
    plt = _pyplot()
    ema = results["ema_vs_batch"]
    styles = {
        "running_momentum_0.99": ("running stats, momentum 0.99", "#1b65b4", "-"),
        "running_momentum_0.9": ("running stats, momentum 0.9", "#7570b3", "-"),
        "batch_stats_whole_test_set": (
            "batch stats of the whole test set",
            "#1b9e77",
            "--",
        ),
    }
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for key, values in ema["test_accuracy"].items():
        label, color, style = styles.get(
            key, (f"batch stats of test batches of {ema['batch_size']}", "#e7298a", ":")
        )
        ax.plot(ema["eval_steps"], values, label=label, color=color, ls=style)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"BN MLP, lr = {ema['lr']}: which statistics at test time?")
    ax.legend(loc="lower right")
    return _save(fig, out / "ema_vs_batch.png")


def write_all(results: dict[str, Any], out: Path) -> list[str]:
    """Draw every figure whose data is in ``results``; return the file names."""
    names = [loss_curves(results, out), accuracy_vs_lr(results, out)]
    if results.get("drift"):
        names.append(drift(results, out))
    if results.get("paper_figure1"):
        names.append(paper_figure1(results, out))
    if results.get("ema_vs_batch"):
        names.append(ema_vs_batch(results, out))
    return names
