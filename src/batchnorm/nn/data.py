"""Data for the harness: any (X, y) arrays, a seeded split, seeded mini-batches.

:func:`load_digits` reads scikit-learn's bundled handwritten digits (1797 grey 8×8
images, no download).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Split", "load_digits", "minibatches", "train_test_split"]


@dataclass(frozen=True)
class Split:
    """Train/test arrays: ``x_train`` (N, *), integer ``y_train`` (N,), and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def reshape(self, *shape: int) -> Split:
        """The same split with every sample reshaped (e.g. ``(1, 8, 8)`` for convs)."""
        return Split(
            self.x_train.reshape(len(self.x_train), *shape),
            self.y_train,
            self.x_test.reshape(len(self.x_test), *shape),
            self.y_test,
        )


def train_test_split(
    x: Any, y: Any, *, test_fraction: float = 0.2, seed: int = 0
) -> Split:
    """Split ``(x, y)`` so every class keeps its share in both halves.

    The split depends only on ``seed`` (a ``numpy.random.Generator``), never on
    global random state.

    Examples
    --------
    >>> import numpy as np
    >>> split = train_test_split(np.arange(20.0)[:, None], np.arange(20) % 2,
    ...                          test_fraction=0.25, seed=0)
    >>> len(split.x_train), len(split.x_test), int(split.y_test.sum())
    (16, 4, 2)
    """
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y) or y.ndim != 1:
        raise ValueError(
            f"x and y must hold the same number of samples and y must be 1-D; got "
            f"shapes {x.shape} and {y.shape}."
        )
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}.")
    rng = np.random.default_rng(seed)
    test_parts = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test_parts.append(members[: int(round(test_fraction * len(members)))])
    is_test = np.zeros(len(y), bool)
    is_test[np.concatenate(test_parts)] = True
    train_idx = rng.permutation(np.flatnonzero(~is_test))
    test_idx = np.flatnonzero(is_test)
    return Split(x[train_idx], y[train_idx], x[test_idx], y[test_idx])


def load_digits(
    *, test_fraction: float = 0.2, seed: int = 0, dtype: Any = np.float32
) -> Split:
    """scikit-learn's digits as rows of 64 pixels scaled to [0, 1], split by seed.

    Use ``.reshape(1, 8, 8)`` on the result for convolutional networks.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (bunch.data / 16.0).astype(dtype)
    return train_test_split(x, bunch.target, test_fraction=test_fraction, seed=seed)


def minibatches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    *,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless shuffled mini-batches: a new permutation from ``rng`` every epoch.

    ``drop_last`` skips each epoch's short tail, so every batch has ``batch_size``
    samples (BatchNorm statistics of a 3-sample batch are a different thing).

    Examples
    --------
    >>> import numpy as np
    >>> batches = minibatches(np.arange(5), np.arange(5), 2, np.random.default_rng(0))
    >>> [xb.tolist() for xb, _ in (next(batches) for _ in range(3))]
    [[2, 4], [3, 0], [4, 1]]
    """
    if not 1 <= batch_size <= len(x):
        raise ValueError(
            f"batch_size must be between 1 and the {len(x)} samples; got {batch_size}."
        )
    while True:
        order = rng.permutation(len(x))
        stop = len(x) - len(x) % batch_size if drop_last else len(x)
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]
