"""The training loop: seeded mini-batch SGD, periodic test accuracy, divergence as data.

A run whose loss is not finite (or above ``max_loss``), or whose BatchNorm layers
meet non-finite batch statistics (:class:`batchnorm.NonFiniteStatisticsError`,
raised by layers built with the default ``on_nonfinite="raise"``), stops there and
is recorded as diverged instead of raising: in a learning-rate sweep divergence is
a result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchnorm.functional import NonFiniteStatisticsError
from batchnorm.nn.data import Split, minibatches
from batchnorm.nn.loss import SoftmaxCrossEntropy
from batchnorm.nn.walk import batch_norms

__all__ = ["History", "accuracy", "fit", "statistics_mode"]


class _NonFiniteLoss(FloatingPointError):
    """The loss of a step was NaN, infinite, or above ``max_loss``."""


@dataclass
class History:
    """What a run produced.

    Attributes
    ----------
    loss : list of float
        Training loss of every step (the mini-batch's, before the update).
    eval_steps, test_accuracy : list
        Test accuracy (running statistics) after ``eval_steps[i]`` updates.
    diverged_at : int or None
        The step whose loss or statistics were not finite.
    """

    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    diverged_at: int | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    def steps_to(self, target: float) -> int | None:
        """First evaluated step with test accuracy ≥ ``target`` (None: never)."""
        for step, acc in zip(self.eval_steps, self.test_accuracy, strict=True):
            if acc >= target:
                return step
        return None

    def roughness(self) -> float:
        """Standard deviation of step-to-step loss changes over the second half.

        The second half, where the trend is small, so the number measures the
        fluctuation the seed talks about rather than the descent. NaN if diverged.
        """
        if self.diverged or len(self.loss) < 4:
            return float("nan")
        tail = np.asarray(self.loss[len(self.loss) // 2 :])
        return float(np.diff(tail).std())


@contextmanager
def statistics_mode(
    model: Any, *, use_batch_stats: bool, update_running_stats: bool
) -> Iterator[None]:
    """Temporarily set every BatchNorm's mode; restore it afterwards.

    ``use_batch_stats=True, update_running_stats=False`` normalizes a probe batch
    with its own statistics without touching the running ones.
    """
    layers = batch_norms(model)
    saved = [(lay.use_batch_stats, lay.update_running_stats) for lay in layers]
    try:
        for layer in layers:
            layer.use_batch_stats = use_batch_stats
            layer.update_running_stats = update_running_stats
        yield
    finally:
        for layer, (use, update) in zip(layers, saved, strict=True):
            layer.use_batch_stats, layer.update_running_stats = use, update


def accuracy(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    use_batch_stats: bool = False,
    batch_size: int | None = None,
) -> float:
    """Fraction of ``x`` classified as ``y``; updates no running statistics.

    ``use_batch_stats=False`` is test time as the seed prescribes (running
    statistics); ``True`` normalizes each test batch of ``batch_size`` (default:
    all of ``x`` at once) with its own statistics.
    """
    size = batch_size or len(x)
    correct = 0
    with (
        statistics_mode(
            model, use_batch_stats=use_batch_stats, update_running_stats=False
        ),
        np.errstate(all="ignore"),
    ):
        for start in range(0, len(x), size):
            logits = model.forward(x[start : start + size])
            correct += int((logits.argmax(axis=1) == y[start : start + size]).sum())
    return correct / len(x)


def fit(
    model: Any,
    optimizer: Any,
    data: Split,
    *,
    steps: int,
    batch_size: int,
    rng: np.random.Generator,
    eval_every: int = 0,
    loss_fn: SoftmaxCrossEntropy | None = None,
    max_loss: float | None = None,
    on_eval: Callable[[int], None] | None = None,
) -> History:
    """Train ``model`` for ``steps`` SGD steps on shuffled mini-batches of ``data``.

    Parameters
    ----------
    model : Sequential (or any layer with forward, backward, parameters)
    optimizer : object with ``step()``, e.g. :class:`batchnorm.nn.SGD`
    data : Split
    steps, batch_size : int
    rng : numpy Generator
        Draws the mini-batch order; seed it for reproducible runs.
    eval_every : int, default 0
        Evaluate test accuracy (running statistics) at step 0 and every
        ``eval_every`` steps and at the end; 0 evaluates only at the end.
    loss_fn : SoftmaxCrossEntropy, optional
        Default: mean softmax cross-entropy.
    max_loss : float, optional
        A training loss above this also counts as divergence (a finite loss of
        hundreds of nats per sample means the weights have blown up).
    on_eval : callable(step), optional
        Called after each evaluation, e.g. to record a hidden layer's statistics.

    Returns
    -------
    History
    """
    loss_fn = loss_fn or SoftmaxCrossEntropy()
    history = History()
    batches = minibatches(data.x_train, data.y_train, batch_size, rng)

    def evaluate(step: int) -> None:
        history.eval_steps.append(step)
        history.test_accuracy.append(accuracy(model, data.x_test, data.y_test))
        if on_eval is not None:
            on_eval(step)

    if eval_every:
        evaluate(0)
    for step in range(1, steps + 1):
        xb, yb = next(batches)
        try:
            with np.errstate(all="ignore"):
                loss = loss_fn(model.forward(xb), yb)
                if not np.isfinite(loss) or (max_loss is not None and loss > max_loss):
                    raise _NonFiniteLoss(f"loss is {loss}")
                model.backward(loss_fn.backward())
                optimizer.step()
        except (NonFiniteStatisticsError, _NonFiniteLoss):
            history.diverged_at = step
            history.loss.append(float("nan"))
            break
        history.loss.append(loss)
        if eval_every and (step % eval_every == 0 or step == steps):
            evaluate(step)
    if not eval_every and not history.diverged:
        evaluate(steps)
    return history
