"""Thread counts of the Numba kernels: the setting, its checks, and the fork rule.

:func:`set_num_threads`, else ``$BATCHNORM_NUM_THREADS``, else Numba's
``NUMBA_NUM_THREADS`` (the number of cores, fixed when numba is imported).
:func:`_chunks` turns that into the number of ranges an operation is split into:
1 (the serial loops) under ``PARALLEL_MIN_SIZE`` values, and in a ``fork()``-ed
child of a process whose GNU OpenMP threads had started (it would be terminated;
see :mod:`batchnorm.kernels._fork`).
:mod:`batchnorm.kernels.numba` re-exports the public names.
"""

from __future__ import annotations

import os

import numba
import numpy as np

from batchnorm.kernels import _fork

#: Below this many values an operation runs on one thread: one core streams them
#: in about the time a parallel launch takes (and a launch on a busy machine can
#: wait for a scheduler tick).
PARALLEL_MIN_SIZE = 1 << 16

_num_threads: int | None = None


def max_threads() -> int:
    """Numba's thread pool size, fixed at import (``$NUMBA_NUM_THREADS``, or cores)."""
    return int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]


def _check_num_threads(value: object, source: str) -> int:
    limit = max_threads()
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{source} must be an int; got {type(value).__name__}.")
    if not 1 <= value <= limit:
        raise ValueError(
            f"{source} must be between 1 and {limit} (NUMBA_NUM_THREADS, fixed when "
            f"numba is imported); got {value}."
        )
    return int(value)


def set_num_threads(num_threads: int | None) -> None:
    """Threads for the Numba kernels of this process; ``None`` restores the default.

    >>> set_num_threads(1); get_num_threads()
    1
    >>> set_num_threads(None)
    """
    global _num_threads
    if num_threads is None:
        _num_threads = None
        return
    _num_threads = _check_num_threads(num_threads, "num_threads")


def get_num_threads() -> int:
    """:func:`set_num_threads`, else ``$BATCHNORM_NUM_THREADS``, else every core."""
    if _num_threads is not None:
        return _num_threads
    env = os.environ.get("BATCHNORM_NUM_THREADS")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(
                f"BATCHNORM_NUM_THREADS must be an int; got {env!r}."
            ) from None
        return _check_num_threads(value, "BATCHNORM_NUM_THREADS")
    return max_threads()


def _chunks(size: int) -> int:
    """Threads for an operation on ``size`` values (1: the serial loops)."""
    if size < PARALLEL_MIN_SIZE or _fork.parallel_unusable:
        return 1
    return get_num_threads()
