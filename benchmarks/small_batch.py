"""Small batches on the digits: plain BN, ghost BN and batch renormalization.

Normalization groups of g = 4 and 8 samples, three ways, for the demo's BN MLP and
CNN (``batchnorm.nn.mlp`` / ``cnn``):

- ``BN``: plain batch norm, mini-batches of g;
- ``renorm``: batch renormalization, mini-batches of g, ``rmax``/``dmax`` from
  ``renorm_schedule`` (plain BN for the first epoch, then linear ramps to 3 and 5
  over the next 3 epochs, set on the layers every step);
- ``ghost``: mini-batches of 32 normalized in virtual batches of g
  (``virtual_batch_size=g``): the same noisy statistics, a 32-sample gradient;

and ``BN, batch 32`` as the reference. Every run sees the same number of training
samples (EPOCHS epochs of the 1437 training images), SGD with momentum 0.9, lr
0.1 · batch/32 (linear scaling), weight decay 5e-4, BN momentum 0.99. Test accuracy
on the 360 test images uses the running statistics (EMA) and, at the end, also
recalibrated statistics (``batchnorm.inference.recalibrate`` on the training set in
the run's own mini-batch size). Writes ``docs/figures/small_batch.png``.

    python benchmarks/small_batch.py        # ~2-3 min on 2 cores
"""

from __future__ import annotations

import copy
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import batchnorm
from batchnorm import nn
from batchnorm.inference import recalibrate
from batchnorm.layer import BatchNorm
from batchnorm.renorm import renorm_schedule

EPOCHS = 8
SEEDS = (0, 1, 2)
GROUPS = (4, 8)
MODELS = ("mlp", "cnn")
EVALS_PER_EPOCH = 2
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "small_batch.png"


def _single_thread() -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return
    threadpool_limits(1)


def _model(name: str, seed: int, variant: str, group: int) -> Any:
    build = {"mlp": nn.mlp, "cnn": nn.cnn}[name]
    model = build(batch_norm=True, rng=np.random.default_rng(seed), bn_momentum=0.99)
    for i, layer in enumerate(model.layers):
        if isinstance(layer, BatchNorm):
            options = {
                "ghost": {"virtual_batch_size": group},
                "renorm": {"renorm": True},
            }
            extra = options.get(variant, {})
            model.layers[i] = BatchNorm(**{**layer.config(), **extra})
    return model


def run(task: tuple[str, str, int, int]) -> dict[str, Any]:
    """One run: test accuracy (EMA) during training; EMA and recalibrated at the end."""
    _single_thread()
    name, variant, group, seed = task
    batch = 32 if variant in ("ghost", "reference") else group
    data = nn.load_digits(seed=0)
    if name == "cnn":
        data = data.reshape(1, 8, 8)
    model = _model(name, seed, variant, group)
    norms = [layer for layer in model.layers if isinstance(layer, BatchNorm)]
    optimizer = nn.SGD(model, 0.1 * batch / 32, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.SoftmaxCrossEntropy()
    rng = np.random.default_rng(1000 + seed)
    batches = nn.minibatches(data.x_train, data.y_train, batch, rng)
    steps_per_epoch = len(data.x_train) // batch
    steps = EPOCHS * steps_per_epoch
    every = steps_per_epoch // EVALS_PER_EPOCH
    epochs, curve = [0.0], [nn.accuracy(model, data.x_test, data.y_test)]
    for step in range(1, steps + 1):
        if variant == "renorm":
            rmax, dmax = renorm_schedule(
                step, warmup=steps_per_epoch, ramp=3 * steps_per_epoch
            )
            for layer in norms:
                layer.rmax, layer.dmax = rmax, dmax
        xb, yb = next(batches)
        loss_fn(model.forward(xb), yb)
        model.backward(loss_fn.backward())
        optimizer.step()
        if step % every == 0 or step == steps:
            epochs.append(step / steps_per_epoch)
            curve.append(nn.accuracy(model, data.x_test, data.y_test))
    calibrated = copy.deepcopy(model)
    x = data.x_train
    recalibrate(calibrated, [x[i : i + batch] for i in range(0, len(x) - 1, batch)])
    return {
        "task": task,
        "batch": batch,
        "epochs": epochs,
        "curve": curve,
        "ema": curve[-1],
        "recalibrated": nn.accuracy(calibrated, data.x_test, data.y_test),
    }


def _tasks() -> list[tuple[str, str, int, int]]:
    tasks = []
    for name in MODELS:
        for seed in SEEDS:
            tasks.append((name, "reference", 32, seed))
            for group in GROUPS:
                for variant in ("BN", "renorm", "ghost"):
                    tasks.append((name, variant, group, seed))
    # Longest first keeps both workers busy to the end.
    return sorted(tasks, key=lambda t: (t[1] in ("ghost", "reference"), t[0] != "cnn"))


LABELS = {
    "BN": "BN, batch {g}",
    "renorm": "renorm, batch {g}",
    "ghost": "ghost BN, batch 32 / {g}",
    "reference": "BN, batch 32",
}


def _plot(results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(MODELS), len(GROUPS), figsize=(10, 7), sharey=True)
    colors = {"BN": "C3", "renorm": "C0", "ghost": "C2", "reference": "0.5"}
    for row, name in enumerate(MODELS):
        for col, group in enumerate(GROUPS):
            ax = axes[row][col]
            for variant in ("BN", "renorm", "ghost", "reference"):
                g = 32 if variant == "reference" else group
                runs = [r for r in results if r["task"][:3] == (name, variant, g)]
                curve = np.mean([r["curve"] for r in runs], axis=0)
                ax.plot(
                    runs[0]["epochs"],
                    curve,
                    color=colors[variant],
                    linestyle="--" if variant == "reference" else "-",
                    label=LABELS[variant].format(g=group),
                )
            ax.set_title(f"{name.upper()}, normalization groups of {group}")
            ax.set_ylim(0.5, 1.0)
            ax.grid(alpha=0.3)
            ax.set_xlabel("epoch")
            if col == 0:
                ax.set_ylabel("test accuracy (running statistics)")
            ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Small batches on the digits (mean of {len(SEEDS)} seeds)")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)


def main() -> None:
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, _tasks()))
    elapsed = time.perf_counter() - start
    print(
        f"# batchnorm {batchnorm.__version__}, numpy {np.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}; {elapsed:.0f} s"
    )
    print(
        f"# final test accuracy after {EPOCHS} epochs, mean ± std over seeds "
        f"{list(SEEDS)}"
    )
    print(
        "model  group  variant                    lr       EMA stats       recalibrated"
    )
    for name in MODELS:
        for group in (*GROUPS, 32):
            variants = ("reference",) if group == 32 else ("BN", "renorm", "ghost")
            for variant in variants:
                runs = [r for r in results if r["task"][:3] == (name, variant, group)]
                ema = np.array([r["ema"] for r in runs])
                recal = np.array([r["recalibrated"] for r in runs])
                label = LABELS[variant].format(g=group)
                lr = 0.1 * runs[0]["batch"] / 32
                print(
                    f"{name:5}  {group:5}  {label:24}  {lr:6.4f}   "
                    f"{ema.mean():.3f} ± {ema.std():.3f}   "
                    f"{recal.mean():.3f} ± {recal.std():.3f}"
                )
    _plot(results)
    print(f"# figure: {FIGURE}")


if __name__ == "__main__":
    main()
