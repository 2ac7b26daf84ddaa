"""The BatchNorm layer's persistent state: the rule that updates it, and state dicts.

The layer keeps γ, β, the running statistics and their counters as attributes; the
functions here change or copy them as a whole, never in part. The state dict's
layout and checks are in :mod:`batchnorm.presets`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from batchnorm import functional as F
from batchnorm.moments import Moments
from batchnorm.presets import check_state_dict

if TYPE_CHECKING:
    from batchnorm.layer import BatchNorm


def reset_running_stats(layer: BatchNorm) -> None:
    """Running statistics back to their initial values; counters to 0."""
    layer.running_mean = np.full(
        layer.num_features, layer.initial_running_mean, layer.dtype
    )
    layer.running_var = np.full(
        layer.num_features, layer.initial_running_var, layer.dtype
    )
    layer.num_batches_tracked = 0
    layer.num_values_seen = 0


def absorb(layer: BatchNorm, moments: Moments) -> None:
    """Fold one batch into the layer's running statistics (all or nothing)."""
    update = updated_running_stats(
        layer, layer.running_mean, layer.running_var, layer.num_values_seen, moments
    )
    if update is not None:
        layer.running_mean, layer.running_var = update
        layer.num_batches_tracked += 1
        layer.num_values_seen += moments.count


def updated_running_stats(
    layer: BatchNorm,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    num_values_seen: int,
    moments: Moments,
) -> tuple[np.ndarray, np.ndarray] | None:
    """New running statistics after ``moments``, or None for a skipped batch.

    :func:`functional.update_running_stats` decides what is non-finite (batch
    statistics, or results that overflow the parameter dtype); the layer's
    ``on_nonfinite`` decides between raising and skipping with a warning.
    """
    try:
        return F.update_running_stats(
            running_mean,
            running_var,
            moments,
            momentum=layer.momentum,
            running_var_kind=layer.running_var_kind,
            num_values_seen=num_values_seen,
            on_nonfinite="raise",
        )
    except F.NonFiniteStatisticsError as error:
        if layer.on_nonfinite == "raise":
            raise
        warnings.warn(str(error), RuntimeWarning, stacklevel=4)
        return None


def state_dict(layer: BatchNorm) -> dict[str, Any]:
    """Copies of γ, β (when affine), running statistics and counters."""
    state: dict[str, Any] = {
        "running_mean": layer.running_mean.copy(),
        "running_var": layer.running_var.copy(),
        "num_batches_tracked": layer.num_batches_tracked,
        "num_values_seen": layer.num_values_seen,
    }
    if layer.affine:
        assert layer.gamma is not None and layer.beta is not None
        state["gamma"] = layer.gamma.copy()
        state["beta"] = layer.beta.copy()
    return state


def load_state_dict(layer: BatchNorm, state: Mapping[str, Any]) -> None:
    """Replace the layer's state with ``state`` after checking all of it first."""
    arrays, counters = check_state_dict(
        state, layer.num_features, layer.dtype, affine=layer.affine
    )
    layer.running_mean = arrays["running_mean"]
    layer.running_var = arrays["running_var"]
    if layer.affine:
        layer.gamma, layer.beta = arrays["gamma"], arrays["beta"]
    layer.num_batches_tracked = counters["num_batches_tracked"]
    layer.num_values_seen = counters["num_values_seen"]
