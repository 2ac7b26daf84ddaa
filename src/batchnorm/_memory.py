"""Output memory: cached blocks for large kernel outputs, and the arrays a layer reuses.

The block cache:


A new array of tens of megabytes comes from ``mmap``: the operating system maps
and zeroes every page on first touch, and ``free`` unmaps it again (glibc never
keeps blocks over 32 MB). For a 51 MB float32 tensor that is about 5 ms on one
thread, half the time of a whole memory-bound pass. The fast kernels therefore
take their outputs from :func:`empty`, which hands out blocks that earlier
outputs gave back:

- A block goes back to the cache only when the last array using it is gone (the
  returned array, every view of it, anything that holds its buffer): the array's
  ``base`` is a lease whose finalizer returns the block. So no later call ever
  writes into an array the caller still holds. The caller sees a writable,
  C-contiguous ndarray that does not own its data (``owndata`` is False, as for
  a view, so ``ndarray.resize`` refuses it).
- Only blocks of at least :data:`MIN_BYTES` are cached. A block given back is
  kept only while the idle blocks stay within ``$BATCHNORM_POOL_BYTES`` bytes
  (default :data:`DEFAULT_MAX_BYTES`; 0 turns the cache off), else it is freed as
  usual. The variable is read, and a bad value reported, whenever an output of
  that size is made (small outputs never read it: a microsecond per call).
  Lowering the limit frees nothing by itself: :func:`release_buffers` frees
  every idle block now.
- Like the thread count, the cache is per process; it holds memory, never a
  result: every output's values are the kernel's, whatever block it lands in.

Finalizers may run at any point, inside a garbage collection triggered while
this module holds its lock, so they never take it: a lease puts its block on a
queue (``SimpleQueue.put`` is safe in ``__del__``), and the next call here moves
queued blocks to the cache under the lock.

Contents are whatever the last user left, as with ``np.empty``: the kernels
write every value of their output.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections import defaultdict
from typing import Any, NoReturn

import numpy as np

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MIN_BYTES",
    "OutputBuffers",
    "empty",
    "idle_bytes",
    "release_buffers",
]

#: Smaller arrays come from ``np.empty``: malloc reuses them without page faults.
MIN_BYTES = 1 << 20
#: Idle bytes kept when ``$BATCHNORM_POOL_BYTES`` is not set: five 51 MB tensors.
DEFAULT_MAX_BYTES = 256 << 20
_ENV = "BATCHNORM_POOL_BYTES"

_lock = threading.Lock()
_returned: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
_idle: defaultdict[int, list[np.ndarray]] = defaultdict(list)
_idle_bytes = 0
_parsed: tuple[str | None, int] = (None, DEFAULT_MAX_BYTES)


def _new_lock_in_child() -> None:
    global _lock
    _lock = threading.Lock()


# Fork only between two uses of the lock, so that the child's books are whole.
os.register_at_fork(
    before=lambda: _lock.acquire(),
    after_in_parent=lambda: _lock.release(),
    after_in_child=_new_lock_in_child,
)


def max_bytes() -> int:
    """``$BATCHNORM_POOL_BYTES``, read on every call, else the default."""
    global _parsed
    env = os.environ.get(_ENV)
    if env == _parsed[0]:
        return _parsed[1]
    if env is None or env == "":
        value = DEFAULT_MAX_BYTES
    else:
        try:
            value = int(env)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(
                f"the environment variable {_ENV} must be a whole number of bytes "
                f">= 0 (0 turns the output cache off); got {env!r}. Set it to e.g. "
                f"{DEFAULT_MAX_BYTES}, or unset it for that default."
            )
    _parsed = (env, value)
    return value


class _Lease:
    """Owner of one block while arrays use it; gives it back when they are gone.

    Neither copied nor pickled: two leases of one block would return it twice.
    """

    __slots__ = ("__array_interface__", "_block")

    def __init__(self, block: np.ndarray, shape: tuple[int, ...], dtype: np.dtype):
        self._block = block
        self.__array_interface__ = {
            "shape": shape,
            "typestr": dtype.str,
            "data": (block.ctypes.data, False),
            "version": 3,
        }

    def __del__(self) -> None:
        _returned.put(self._block)

    def _refuse(self, *args: Any) -> NoReturn:
        raise TypeError(
            "a batchnorm output block's lease cannot be copied or pickled; copy or "
            "pickle the array itself."
        )

    __copy__ = __deepcopy__ = __reduce__ = __reduce_ex__ = _refuse


def _take_returned(limit: float) -> None:
    """Move blocks that leases gave back into the cache (the lock is held)."""
    global _idle_bytes
    while True:
        try:
            block = _returned.get_nowait()
        except queue.Empty:
            return
        if _idle_bytes + block.nbytes <= limit:
            _idle[block.nbytes].append(block)
            _idle_bytes += block.nbytes


def empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialized C-contiguous array, from an idle block when one fits exactly."""
    global _idle_bytes
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES:  # before reading the environment: ~1 µs a call
        return np.empty(shape, dtype)
    limit = max_bytes()
    if limit == 0:
        return np.empty(shape, dtype)
    with _lock:
        _take_returned(limit)
        free = _idle.get(nbytes)
        block = free.pop() if free else None
        if block is not None:
            _idle_bytes -= nbytes
    if block is None:
        block = np.empty(nbytes, np.uint8)
    return np.asarray(_Lease(block, tuple(shape), dtype))


def idle_bytes() -> int:
    """Bytes of idle blocks the cache holds now."""
    with _lock:
        _take_returned(max_bytes())
        return _idle_bytes


def release_buffers() -> int:
    """Free every idle output block now; returns the bytes released.

    >>> release_buffers() >= 0
    True
    """
    global _idle_bytes
    with _lock:
        _take_returned(math.inf)  # all of them: they are freed just below
        released = _idle_bytes
        _idle.clear()
        _idle_bytes = 0
    return released


class OutputBuffers:
    """Named output arrays, each reused while it fits the next call's output."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, like: np.ndarray, *inputs: Any) -> np.ndarray:
        """The array ``name``, shaped like ``like``: the kept one, or a new one.

        Replaced when its shape or dtype no longer fits, or when it shares memory
        with ``like`` or ``inputs`` (a caller feeding an earlier output back in).
        """
        buffer = self._arrays.get(name)
        if (
            buffer is None
            or buffer.shape != like.shape
            or buffer.dtype != like.dtype
            or any(np.shares_memory(buffer, a) for a in (like, *inputs))
        ):
            buffer = np.empty(like.shape, like.dtype)
            self._arrays[name] = buffer
        return buffer
