"""Running statistics after one batch: the EMA or exact cumulative update, guarded.

A batch whose statistics, or whose updated running statistics, are not finite never
reaches the running statistics. Public through :mod:`batchnorm.functional`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchnorm._validation import (
    ON_NONFINITE,
    RUNNING_VAR_KINDS,
    check_choice,
    check_momentum,
    check_running,
)
from batchnorm.moments import Cache, Moments

__all__ = ["NonFiniteStatisticsError", "RunningState", "update_running_stats"]


class NonFiniteStatisticsError(FloatingPointError, ValueError):
    """A batch produced NaN or infinite statistics; running statistics were kept."""

    __module__ = "batchnorm.functional"  # its public name, in tracebacks too


@dataclass(frozen=True)
class RunningState:
    """A layer's running statistics and their counters, as one value."""

    mean: np.ndarray
    var: np.ndarray
    num_batches_tracked: int
    num_values_seen: int

    def absorbed(
        self,
        moments: Moments,
        *,
        momentum: float | None,
        running_var_kind: str,
        on_nonfinite: str,
    ) -> RunningState:
        """The state after one batch's ``moments``; ``self`` for a skipped batch.

        :func:`update_running_stats` decides what is non-finite (batch statistics,
        or results that overflow the parameter dtype); ``on_nonfinite`` decides
        between raising and skipping the batch with a warning.
        """
        if moments.count == 0:  # an empty batch: nothing to learn, nothing counted
            return self
        try:
            mean, var = update_running_stats(
                self.mean,
                self.var,
                moments,
                momentum=momentum,
                running_var_kind=running_var_kind,
                num_values_seen=self.num_values_seen,
                on_nonfinite="raise",
            )
        except NonFiniteStatisticsError as error:
            if on_nonfinite == "raise":
                raise
            warnings.warn(str(error), RuntimeWarning, stacklevel=4)
            return self
        return RunningState(
            mean,
            var,
            self.num_batches_tracked + 1,
            self.num_values_seen + moments.count,
        )


def update_running_stats(
    running_mean: Any,
    running_var: Any,
    cache: Cache | Moments,
    *,
    momentum: float | None = 0.99,
    running_var_kind: str = "unbiased",
    num_values_seen: int | None = None,
    on_nonfinite: str = "raise",
) -> tuple[np.ndarray, np.ndarray]:
    """New running statistics after one batch; the inputs are not modified.

    Parameters
    ----------
    running_mean, running_var : ndarray, shape (C,)
    cache : Cache or Moments
        The batch's statistics (from :func:`~batchnorm.functional.forward_train` or
        :class:`Moments`).
    momentum : float in [0, 1] or None, default 0.99
        Weight on the OLD value: ``run ← momentum · run + (1 − momentum) · batch``
        (the seed's text; its formula puts β on the new sample, a typo). PyTorch's
        ``momentum=0.1`` is ``0.9`` here. ``None`` keeps the exact statistics of every
        value seen so far (count-weighted merge, not PyTorch's equal weight per
        batch) and needs ``num_values_seen``.
    running_var_kind : {"unbiased", "biased"}
        Store ``M2/(m − 1)`` (darknet, PyTorch) or ``M2/m`` (Keras, ONNX).
    num_values_seen : int, optional
        Values per channel already summarized by the running statistics; only for
        ``momentum=None``.
    on_nonfinite : {"raise", "skip"}
        A batch with NaN or infinite statistics never reaches the running
        statistics: ``"raise"`` raises :class:`NonFiniteStatisticsError`, ``"skip"``
        warns and returns copies of the old values.

    Returns
    -------
    new_mean, new_var : ndarray, shape (C,), dtypes of the inputs

    Examples
    --------
    >>> import numpy as np
    >>> m = Moments(2, np.array([10.0]), np.array([2.0]))   # batch var 1, unbiased 2
    >>> update_running_stats(np.zeros(1), np.ones(1), m, momentum=0.9)
    (array([1.]), array([1.1]))
    """
    moments = cache.moments if isinstance(cache, Cache) else cache
    if not isinstance(moments, Moments):
        raise TypeError(
            f"cache must be a Cache from forward_train or a Moments; got "
            f"{type(cache).__name__}."
        )
    running_mean, running_var = check_running(
        running_mean, running_var, moments.num_channels
    )
    momentum = check_momentum(momentum)
    kind = check_choice(running_var_kind, "running_var_kind", RUNNING_VAR_KINDS)
    on_nonfinite = check_choice(on_nonfinite, "on_nonfinite", ON_NONFINITE)
    ddof = 1 if kind == "unbiased" else 0
    if moments.count == 0:  # an empty batch leaves the running statistics be
        return running_mean.copy(), running_var.copy()
    if moments.count <= ddof:
        raise ValueError(
            f"running_var_kind={kind!r} needs more than {ddof} value per channel in "
            f"the batch; got count={moments.count}. Use a larger batch, or "
            "running_var_kind='biased'."
        )
    bad = np.flatnonzero(~(np.isfinite(moments.mean) & np.isfinite(moments.m2)))
    if bad.size:
        message = (
            f"batch statistics are not finite in channels {bad[:8].tolist()}; the "
            "running statistics were left unchanged. Look for NaN/inf in the input "
            "or an exploding learning rate; pass on_nonfinite='skip' to skip such "
            "batches with a warning."
        )
    else:
        new_mean, new_var = _blend(
            running_mean, running_var, moments, momentum, ddof, num_values_seen
        )
        bad = np.flatnonzero(~(np.isfinite(new_mean) & np.isfinite(new_var)))
        if not bad.size:
            return new_mean, new_var
        message = (
            f"the updated running statistics overflow {running_var.dtype} in "
            f"channels {bad[:8].tolist()} (batch variance "
            f"{moments.var(ddof)[bad[:8]].tolist()}); they were left unchanged. "
            f"{_wider_dtype_advice(running_var.dtype)}"
        )
    if on_nonfinite == "raise":
        raise NonFiniteStatisticsError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return running_mean.copy(), running_var.copy()


def _wider_dtype_advice(dtype: np.dtype) -> str:
    """How to store statistics that overflow ``dtype``."""
    wider = {"float16": "float32 or float64", "float32": "float64"}.get(dtype.name)
    if wider is None:
        return "Rescale the input: the statistics overflow even float64."
    return (
        f"Keep the running statistics in {wider} (BatchNorm dtype=), or rescale "
        "the input."
    )


def _blend(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    moments: Moments,
    momentum: float | None,
    ddof: int,
    num_values_seen: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The EMA (or exact cumulative) update, cast to the running dtypes."""
    if momentum is None:
        new_mean, new_var = _cumulative(
            running_mean, running_var, moments, ddof, num_values_seen
        )
    else:
        old_mean = running_mean.astype(np.float64)
        old_var = running_var.astype(np.float64)
        new_mean = momentum * old_mean + (1.0 - momentum) * moments.mean
        new_var = momentum * old_var + (1.0 - momentum) * moments.var(ddof)
    with np.errstate(over="ignore"):  # an overflow becomes inf, which is checked
        return new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)


def _cumulative(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    batch: Moments,
    ddof: int,
    num_values_seen: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    if (
        num_values_seen is None
        or isinstance(num_values_seen, bool)
        or not isinstance(num_values_seen, int | np.integer)
        or num_values_seen < 0
    ):
        raise ValueError(
            "momentum=None (exact cumulative statistics) needs num_values_seen, the "
            "number of values per channel the running statistics already hold, as "
            f"an int >= 0; got {num_values_seen!r}. The BatchNorm layer tracks it "
            "for you."
        )
    seen = int(num_values_seen)
    if seen == 0:
        previous = Moments.empty(batch.num_channels)
    else:
        m2 = running_var.astype(np.float64) * max(seen - ddof, 0)
        previous = Moments(seen, running_mean.astype(np.float64), m2)
    total = previous.merge(batch)
    return total.mean, total.var(ddof)
