"""The training forward pass's record: what the backward pass and the update need.

Public as :class:`batchnorm.functional.Cache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchnorm.moments import Moments

__all__ = ["Cache"]


@dataclass(frozen=True)
class Cache:
    """What ``backward`` needs from ``forward_train`` (:mod:`batchnorm.functional`).

    ``x`` is a reference to the input, not a copy (the backward pass recomputes
    ``x̂`` from it instead of storing a second array of the input's size): do not
    modify ``x`` in place between the forward and the backward pass.

    Attributes
    ----------
    x : ndarray, shape (N, C, *)
    moments : Moments
        Exact ``(count, mean, M2)`` of the batch, float64.
    inv_std : ndarray, shape (C,), float64
        ``1/√(var + ε)`` (or ``1/(√var + ε)`` for ``eps_placement="outside"``), where
        ``var = M2 / (m − ddof)``.
    gamma : ndarray of shape (C,) or None
    axis, eps, eps_placement, ddof
        The options of the forward pass.
    """

    x: np.ndarray
    moments: Moments
    inv_std: np.ndarray
    gamma: np.ndarray | None
    axis: int
    eps: float
    eps_placement: str
    ddof: int

    __module__ = "batchnorm.functional"  # its public name, in reprs and pickles

    @property
    def mean(self) -> np.ndarray:
        """Per-channel batch mean, float64, shape (C,)."""
        return self.moments.mean

    @property
    def var(self) -> np.ndarray:
        """Per-channel biased batch variance ``M2 / m``, float64, shape (C,)."""
        return self.moments.var(0)

    @property
    def count(self) -> int:
        """Values per channel, ``m = N · ∏ spatial``."""
        return self.moments.count
