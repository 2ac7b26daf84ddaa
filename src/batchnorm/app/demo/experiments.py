"""The demo's experiments as picklable tasks: one training run in, plain numbers out.

Each task is a dict naming an experiment (``"sweep"``, ``"paper"``, ``"ema"``) and
its settings; :func:`run_task` trains and returns lists and floats only, so tasks can
run in worker processes. The data are set once per process by :func:`init_worker`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batchnorm import nn
from batchnorm.nn.layers import ReLU, Sigmoid

_DATA: dict[str, nn.Split] = {}


def init_worker(data: nn.Split, single_thread_blas: bool = True) -> None:
    """Keep the data for this process; limit BLAS to one thread.

    The matrices here are tiny: BLAS threads only fight each other (and the other
    worker) for the two cores, which made runs 3× slower and erratic.
    """
    _DATA["flat"] = data
    _DATA["image"] = data.reshape(1, 8, 8)
    if single_thread_blas:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - comes with scikit-learn
            return
        threadpool_limits(1)


def _build(name: str, batch_norm: bool, seed: int, task: dict[str, Any]) -> Any:
    rng = np.random.default_rng(seed)
    kw: dict[str, Any] = {
        "batch_norm": batch_norm,
        "rng": rng,
        "backend": task["backend"],
    }
    if "bn_momentum" in task:
        kw["bn_momentum"] = task["bn_momentum"]
    builders: dict[str, Any] = {"mlp": nn.mlp, "cnn": nn.cnn, "paper": nn.paper_mlp}
    return builders[name](**kw)


def _forward_collect(model: Any, x: np.ndarray) -> list[np.ndarray]:
    """Every layer's output for ``x``, normalizing with the probe's own statistics
    and leaving the running statistics alone."""
    outputs = []
    with nn.statistics_mode(model, use_batch_stats=True, update_running_stats=False):
        with np.errstate(all="ignore"):
            for layer in model.layers:
                x = layer.forward(x)
                outputs.append(x)
    return outputs


def _activation_indices(model: Any) -> list[int]:
    return [i for i, lay in enumerate(model.layers) if isinstance(lay, ReLU | Sigmoid)]


def _finite_or_none(values: list[float]) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


def sweep_run(task: dict[str, Any]) -> dict[str, Any]:
    """One model × BN × lr × seed run; with ``task["drift"]``, also the per-unit
    mean and variance of the second hidden layer's pre-activations at every
    evaluation (before BN, and the activation's input)."""
    data = _DATA["image" if task["model"] == "cnn" else "flat"]
    model = _build(task["model"], task["batch_norm"], task["seed"], task)
    optimizer = nn.SGD(
        model, task["lr"], momentum=task["momentum"], weight_decay=task["weight_decay"]
    )
    drift: dict[str, list[Any]] = {"steps": [], "linear": [], "pre_activation": []}
    probe = data.x_train[: task.get("probe_size", 512)]

    def record(step: int) -> None:
        outputs = _forward_collect(model, probe)
        act = _activation_indices(model)[1]  # second hidden layer
        linear = act - 2 if task["batch_norm"] else act - 1
        drift["steps"].append(step)
        for key, index in (("linear", linear), ("pre_activation", act - 1)):
            values = outputs[index].astype(np.float64)
            drift[key].append(
                [values.mean(axis=0).tolist(), values.var(axis=0).tolist()]
            )

    history = nn.fit(
        model,
        optimizer,
        data,
        steps=task["steps"],
        batch_size=task["batch_size"],
        rng=np.random.default_rng(1000 + task["seed"]),
        eval_every=task["eval_every"],
        max_loss=task["max_loss"],
        on_eval=record if task.get("drift") else None,
    )
    result = {
        "loss": _finite_or_none(history.loss),
        "eval_steps": history.eval_steps,
        "test_accuracy": history.test_accuracy,
        "diverged_at": history.diverged_at,
        "steps_to_target": history.steps_to(task["target_accuracy"]),
        "roughness": history.roughness(),
    }
    if task.get("drift"):
        result["drift"] = drift
    return result


def paper_run(task: dict[str, Any]) -> dict[str, Any]:
    """Ioffe & Szegedy's Figure 1 network: test accuracy and the 15/50/85th
    percentiles of one last-hidden-layer unit's sigmoid input over training."""
    data = _DATA["flat"]
    model = _build("paper", task["batch_norm"], task["seed"], task)
    optimizer = nn.SGD(model, task["lr"])
    percentiles: list[list[float]] = []
    last_act = _activation_indices(model)[-1]

    def record(step: int) -> None:
        sigmoid_input = _forward_collect(model, data.x_test)[last_act - 1]
        column = sigmoid_input[:, task["unit"]].astype(np.float64)
        percentiles.append(np.percentile(column, [15, 50, 85]).tolist())

    history = nn.fit(
        model,
        optimizer,
        data,
        steps=task["steps"],
        batch_size=60,
        rng=np.random.default_rng(1000 + task["seed"]),
        eval_every=task["eval_every"],
        max_loss=task["max_loss"],
        on_eval=record,
    )
    return {
        "eval_steps": history.eval_steps,
        "test_accuracy": history.test_accuracy,
        "percentiles_15_50_85": percentiles,
        "diverged_at": history.diverged_at,
    }


def ema_run(task: dict[str, Any]) -> dict[str, Any]:
    """Train the BN MLP twice, with running-statistics momentum 0.99 and 0.9, and
    evaluate test accuracy with each set of running statistics and with batch
    statistics of test batches. Momentum does not touch training (batch
    statistics are used there), so both runs have the same parameters."""
    data = _DATA["flat"]
    models, optimizers, rngs = {}, {}, {}
    for momentum in (0.99, 0.9):
        models[momentum] = _build(
            "mlp", True, task["seed"], {**task, "bn_momentum": momentum}
        )
        optimizers[momentum] = nn.SGD(
            models[momentum], task["lr"], momentum=task["momentum"]
        )
        rngs[momentum] = np.random.default_rng(1000 + task["seed"])
    curves: dict[str, list[float]] = {
        "running_momentum_0.99": [],
        "running_momentum_0.9": [],
        f"batch_stats_batch_{task['batch_size']}": [],
        "batch_stats_whole_test_set": [],
    }
    steps: list[int] = []
    loss_fn = nn.SoftmaxCrossEntropy()
    batches = {
        m: nn.minibatches(data.x_train, data.y_train, task["batch_size"], rngs[m])
        for m in models
    }

    def evaluate(step: int) -> None:
        steps.append(step)
        x, y = data.x_test, data.y_test
        curves["running_momentum_0.99"].append(nn.accuracy(models[0.99], x, y))
        curves["running_momentum_0.9"].append(nn.accuracy(models[0.9], x, y))
        key = f"batch_stats_batch_{task['batch_size']}"
        curves[key].append(
            nn.accuracy(
                models[0.9], x, y, use_batch_stats=True, batch_size=task["batch_size"]
            )
        )
        curves["batch_stats_whole_test_set"].append(
            nn.accuracy(models[0.9], x, y, use_batch_stats=True)
        )

    evaluate(0)
    for step in range(1, task["steps"] + 1):
        for momentum, model in models.items():
            xb, yb = next(batches[momentum])
            loss_fn(model.forward(xb), yb)
            model.backward(loss_fn.backward())
            optimizers[momentum].step()
        if step % task["eval_every"] == 0:
            evaluate(step)
    same = all(
        np.array_equal(a[1], b[1])
        for a, b in zip(
            models[0.99].parameters(), models[0.9].parameters(), strict=True
        )
    )
    return {"eval_steps": steps, "test_accuracy": curves, "identical_parameters": same}


def run_task(task: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one task; returns ``(task, result)``."""
    runner = {"sweep": sweep_run, "paper": paper_run, "ema": ema_run}[task["kind"]]
    return task, runner(task)
