"""Central-difference numerical gradients, to check the harness's backward passes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["numerical_gradient"]


def numerical_gradient(
    f: Callable[[], float], array: np.ndarray, eps: float = 1e-6
) -> np.ndarray:
    """``∂f/∂array`` by central differences, perturbing ``array`` in place.

    ``f`` takes no arguments and must read ``array`` (a parameter of a model, or
    its input); every element is restored after its two evaluations. Use float64:
    the truncation error is O(eps²) and the rounding error O(1e-16/eps).

    Examples
    --------
    >>> import numpy as np
    >>> w = np.array([1.0, 2.0])
    >>> np.round(numerical_gradient(lambda: float((w ** 2).sum()), w), 6)
    array([2., 4.])
    """
    if array.dtype != np.float64:
        raise TypeError(
            f"numerical gradients need float64 arrays; got {array.dtype}. Build the "
            "model with dtype=np.float64."
        )
    grad = np.empty_like(array)
    flat, grad_flat = array.reshape(-1), grad.reshape(-1)
    if not np.shares_memory(flat, array):
        raise ValueError("array must be contiguous so it can be perturbed in place.")
    for i in range(flat.size):
        original = flat[i]
        flat[i] = original + eps
        up = f()
        flat[i] = original - eps
        down = f()
        flat[i] = original
        grad_flat[i] = (up - down) / (2 * eps)
    return grad
