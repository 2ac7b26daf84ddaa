"""Digits test accuracy: EMA running statistics vs exact recalibrated ones; fold.

For the demo's BN MLP and CNN (``batchnorm.nn.mlp`` / ``cnn``), trained with SGD
(lr 0.1, momentum 0.9, weight decay 5e-4, batches of 32), at several steps: test
accuracy with the layers' running statistics (EMA, momentum 0.9 and 0.99) and after
``batchnorm.inference.recalibrate`` on the training set (batches of 32, in order);
then the recalibrated network folded with ``batchnorm.inference.fold``: prediction
agreement and the largest logit difference.

    python benchmarks/recalibrate_digits.py            # ~1 min on 2 cores
"""

from __future__ import annotations

import copy
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

import batchnorm
from batchnorm import nn
from batchnorm.inference import fold, recalibrate

CHECKPOINTS = (5, 10, 20, 50, 100, 400, 1500)
SEEDS = (0, 1, 2)
BATCH = 32


def _single_thread() -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return
    threadpool_limits(1)


def run(task: tuple[str, float, int]) -> dict[str, Any]:
    """One training run; the numbers at every checkpoint."""
    _single_thread()
    name, momentum, seed = task
    data = nn.load_digits(seed=0)
    if name == "cnn":
        data = data.reshape(1, 8, 8)
    build = {"mlp": nn.mlp, "cnn": nn.cnn}[name]
    model = build(
        batch_norm=True, rng=np.random.default_rng(seed), bn_momentum=momentum
    )
    optimizer = nn.SGD(model, 0.1, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.SoftmaxCrossEntropy()
    batches = nn.minibatches(
        data.x_train, data.y_train, BATCH, np.random.default_rng(1000 + seed)
    )
    calibration = [
        data.x_train[i : i + BATCH] for i in range(0, len(data.x_train), BATCH)
    ]
    rows = []
    for step in range(1, max(CHECKPOINTS) + 1):
        xb, yb = next(batches)
        loss_fn(model.forward(xb), yb)
        model.backward(loss_fn.backward())
        optimizer.step()
        if step not in CHECKPOINTS:
            continue
        ema = nn.accuracy(model, data.x_test, data.y_test)
        calibrated = copy.deepcopy(model)
        recalibrate(calibrated, calibration)
        exact = nn.accuracy(calibrated, data.x_test, data.y_test)
        calibrated.eval()
        folded = fold(calibrated)
        logits, folded_logits = calibrated(data.x_test), folded(data.x_test)
        rows.append(
            {
                "step": step,
                "ema": ema,
                "recalibrated": exact,
                "folded": nn.accuracy(folded, data.x_test, data.y_test),
                "agree": float(
                    np.mean(logits.argmax(axis=1) == folded_logits.argmax(axis=1))
                ),
                "max_logit_diff": float(np.abs(logits - folded_logits).max()),
            }
        )
    return {"model": name, "momentum": momentum, "seed": seed, "rows": rows}


def main() -> None:
    start = time.perf_counter()
    tasks = [(m, mom, s) for m in ("mlp", "cnn") for mom in (0.9, 0.99) for s in SEEDS]
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, tasks))
    print(
        f"# batchnorm {batchnorm.__version__}, numpy {np.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}; "
        f"{time.perf_counter() - start:.0f} s"
    )
    print(f"# test accuracy, mean ± std over seeds {list(SEEDS)}; 360 test images")
    header = (
        "model  BN momentum  step   EMA stats        recalibrated     folded"
        "           agree   max|Δlogit|"
    )
    print(header)
    for name in ("mlp", "cnn"):
        for momentum in (0.9, 0.99):
            runs = [
                r for r in results if (r["model"], r["momentum"]) == (name, momentum)
            ]
            for i, step in enumerate(CHECKPOINTS):
                cells = {
                    key: np.array([r["rows"][i][key] for r in runs])
                    for key in runs[0]["rows"][i]
                }
                line = f"{name:5}  {momentum:11}  {step:4}"
                for key in ("ema", "recalibrated", "folded"):
                    line += f"   {cells[key].mean():.3f} ± {cells[key].std():.3f}"
                line += f"   {cells['agree'].min():.4f}"
                line += f"   {cells['max_logit_diff'].max():.1e}"
                print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
