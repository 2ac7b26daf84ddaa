"""A cache of large output blocks, so that a fresh output does not cost page faults.

A new array of tens of megabytes comes from ``mmap``: the operating system maps
and zeroes every page on first touch, and ``free`` unmaps it again (glibc never
keeps blocks over 32 MB). For a 51 MB float32 tensor that is about 5 ms, half the
time of a whole memory-bound pass. The fast kernels therefore take their outputs
from :func:`empty`, which hands out blocks that earlier outputs gave back:

- A block goes back to the cache only when the last array using it is gone (the
  returned array, every view of it, anything that holds its buffer): the array's
  ``base`` is a lease whose finalizer returns the block. So no later call ever
  writes into an array the caller still holds; the caller sees a normal,
  writable, C-contiguous array (``owndata`` is False, as for any view).
- Only blocks of at least :data:`MIN_BYTES` are cached, and idle blocks never
  exceed ``$BATCHNORM_POOL_BYTES`` in all (default :data:`DEFAULT_MAX_BYTES`; 0
  turns the cache off). A block that would exceed it is freed as usual.
- :func:`release_buffers` frees every idle block now.

Contents are whatever the last user left, as with ``np.empty``: the kernels
write every value of their output.
"""

from __future__ import annotations

import math
import os
import threading
from collections import defaultdict
from typing import Any

import numpy as np

__all__ = ["DEFAULT_MAX_BYTES", "MIN_BYTES", "empty", "idle_bytes", "release_buffers"]

#: Smaller arrays come from ``np.empty``: malloc reuses them without page faults.
MIN_BYTES = 1 << 20
#: Idle bytes kept when ``$BATCHNORM_POOL_BYTES`` is not set: five 51 MB tensors.
DEFAULT_MAX_BYTES = 256 << 20

_lock = threading.Lock()
_idle: defaultdict[int, list[np.ndarray]] = defaultdict(list)
_idle_bytes = 0


def _reset_lock_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it


os.register_at_fork(after_in_child=_reset_lock_after_fork)


def max_bytes() -> int:
    """``$BATCHNORM_POOL_BYTES`` (read on every call), else the default."""
    env = os.environ.get("BATCHNORM_POOL_BYTES")
    if env is None or env == "":
        return DEFAULT_MAX_BYTES
    try:
        value = int(env)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            "BATCHNORM_POOL_BYTES must be a whole number of bytes >= 0 (0 turns the "
            f"output cache off); got {env!r}. Set it to e.g. {DEFAULT_MAX_BYTES} or "
            "unset it."
        )
    return value


class _Lease:
    """Owner of one block while arrays use it; gives it back when they are gone."""

    def __init__(self, block: np.ndarray, shape: tuple[int, ...], dtype: np.dtype):
        self._block = block
        self.__array_interface__ = {
            "shape": shape,
            "typestr": dtype.str,
            "data": (block.ctypes.data, False),
            "version": 3,
        }

    def __del__(self) -> None:
        _give_back(self._block)


def _give_back(block: np.ndarray) -> None:
    global _idle_bytes
    try:
        limit = max_bytes()
    except ValueError:
        return  # reported by the next empty(); a finalizer must not raise
    with _lock:
        if _idle_bytes + block.nbytes <= limit:
            _idle[block.nbytes].append(block)
            _idle_bytes += block.nbytes


def empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialized C-contiguous array, from an idle block when one fits exactly."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or max_bytes() == 0:  # small: no environment lookup
        return np.empty(shape, dtype)
    global _idle_bytes
    with _lock:
        free = _idle.get(nbytes)
        block = free.pop() if free else None
        if block is not None:
            _idle_bytes -= nbytes
    if block is None:
        block = np.empty(nbytes, np.uint8)
    return np.asarray(_Lease(block, tuple(shape), dtype))


def idle_bytes() -> int:
    """Bytes of idle blocks the cache holds now."""
    return _idle_bytes


def release_buffers() -> int:
    """Free every idle output block now; returns the bytes released.

    >>> release_buffers() >= 0
    True
    """
    global _idle_bytes
    with _lock:
        released = _idle_bytes
        _idle.clear()
        _idle_bytes = 0
    return released
