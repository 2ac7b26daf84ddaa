"""Exact, mergeable per-channel statistics: ``(count, mean, M2)`` with Chan's merge.

Batch normalization needs the mean and variance of every channel over every other
axis. ``E[x²] − E[x]²`` loses every significant digit when the mean is large
compared with the spread (float32 data with mean 1e4 and unit spread already has
no correct digit left), so we keep the sum of squared deviations ``M2`` instead
and merge partial results with the update of Chan, Golub and LeVeque (1979):

    n = n_a + n_b,  δ = mean_b − mean_a,
    mean = mean_a + δ · n_b / n,
    M2 = M2_a + M2_b + δ² · n_a · n_b / n.

Means and ``M2`` are float64 whatever the input dtype. Also :class:`Cache`, the
training forward pass's record (public as :class:`batchnorm.functional.Cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchnorm._validation import check_input
from batchnorm.kernels import reference


@dataclass(frozen=True)
class Moments:
    """Per-channel ``count``, ``mean`` and sum of squared deviations ``m2``.

    Parameters
    ----------
    count : int
        Values per channel, ``m = N · ∏ spatial sizes`` (the same for every channel).
    mean : ndarray, shape (C,), float64
    m2 : ndarray, shape (C,), float64
        ``Σ (x − mean)²`` per channel.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(12.0).reshape(3, 2, 2)      # (N, C, L)
    >>> a = Moments.from_array(x[:1]); b = Moments.from_array(x[1:])
    >>> whole = Moments.from_array(x)
    >>> merged = a.merge(b)
    >>> bool(np.allclose(merged.mean, whole.mean) and np.allclose(merged.m2, whole.m2))
    True
    >>> whole.var(ddof=0).round(4)  # channel 0 holds 0, 1, 4, 5, 8, 9
    array([10.9167, 10.9167])
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, num_channels: int) -> Moments:
        """Statistics of no data: the identity of :meth:`merge`."""
        zeros = np.zeros(num_channels, dtype=np.float64)
        return cls(0, zeros, zeros.copy())

    @classmethod
    def from_array(cls, x: np.ndarray, axis: int = 1) -> Moments:
        """Exact two-pass statistics of ``x`` per channel along ``axis``.

        Parameters
        ----------
        x : ndarray, shape (N, C, *) with C at ``axis``
            Any floating dtype, any strides.
        axis : int
            The channel axis; negative values count from the end.
        """
        x, axis = check_input(x, axis)
        return cls(*reference.batch_moments(x, axis))

    @property
    def num_channels(self) -> int:
        return int(self.mean.shape[0])

    def merge(self, other: Moments) -> Moments:
        """Exact statistics of the union of both data sets (Chan et al.)."""
        if not isinstance(other, Moments):
            raise TypeError(f"other must be Moments; got {type(other).__name__}.")
        if other.num_channels != self.num_channels:
            raise ValueError(
                f"cannot merge Moments of {self.num_channels} channels with Moments "
                f"of {other.num_channels} channels; they describe different layers."
            )
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        total = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / total)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / total)
        return Moments(total, mean, m2)

    def var(self, ddof: int = 0) -> np.ndarray:
        """Per-channel variance ``m2 / (count − ddof)`` as float64.

        Raises
        ------
        ValueError
            When ``count <= ddof``: the variance is undefined.
        """
        if self.count <= ddof:
            raise ValueError(
                f"var(ddof={ddof}) needs more than {ddof} values per channel; these "
                f"Moments hold count={self.count}. Merge more data first, or use "
                "ddof=0."
            )
        return self.m2 / (self.count - ddof)


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
