"""Per-channel views and sums of N-d arrays (not used by src/)."""

from __future__ import annotations

import numpy as np


def per_channel(vec: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """``vec`` (one value per channel) shaped to broadcast against ``x``."""
    shape = [1] * x.ndim
    shape[axis] = -1
    return np.asarray(vec).reshape(shape)


def channel_sums(values: np.ndarray, axis: int) -> np.ndarray:
    """The float64 sum of every channel of ``values``."""
    axes = tuple(a for a in range(values.ndim) if a != axis)
    return np.asarray(values, np.float64).sum(axis=axes)


def first_per_channel(x: np.ndarray, axis: int) -> np.ndarray:
    """The first value of every channel in memory order: the kernels' pivot."""
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])[0]
