"""What a ``fork()``-ed child may run of the Numba kernels: the at-fork hooks.

Two states of a parent break Numba in a child that ``fork()`` copies from it:

- Another thread makes the first Numba call: it imports the backend (holding
  Python's lock of each module it imports) and then compiles or loads from the
  cache (holding Numba's compiler lock). The child inherits those locks held by a
  thread it does not have, and its own first call waits for them forever. So
  the fork waits for both first (:data:`import_lock`, held by
  ``batchnorm.kernels`` while it imports a backend, and the compiler lock; up to
  :data:`COMPILE_WAIT_S` seconds in all): the child starts with them free. When
  the wait runs out, the child sets :data:`numba_unusable`, and the Numba backend
  computes everything with the NumPy reference there (the same values).
- Numba's threading layer is GNU OpenMP (``"omp"``, its choice on Linux without
  the ``tbb`` package) and its threads have started: a child that starts a
  parallel region is terminated ("fork() called from a process already using
  GNU OpenMP"), and a ``multiprocessing`` pool waits forever for that worker.
  The child sets :data:`parallel_unusable`, and the kernels run their serial
  loops there (the same values). The ``tbb`` and ``workqueue`` layers survive a
  fork and keep their threads.

The hooks are registered when :mod:`batchnorm.kernels` is imported and never
import Numba themselves; ``spawn`` and ``forkserver`` children start fresh.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

#: Seconds a ``fork()`` waits for another thread's import of a backend and its
#: Numba compilation to finish.
COMPILE_WAIT_S = 30.0

#: Held while :mod:`batchnorm.kernels` imports a backend module.
import_lock = threading.RLock()

#: In this process (a forked child), Numba's parallel loops must not start.
parallel_unusable = False

#: In this process (a forked child), Numba's compiler lock may be held forever.
numba_unusable = False

_held: list[Any] = []  # the locks this thread's fork holds, in order
_gave_up: list[bool] = []  # the fork did not get them all
_registered = threading.Lock()
_hooks: list[bool] = []


def _compiler_lock() -> Any:
    """Numba's compiler lock (an RLock), or None when Numba was not imported."""
    module = sys.modules.get("numba.core.compiler_lock")
    return None if module is None else module.global_compiler_lock._lock


def _openmp_started() -> bool:
    """Whether Numba's threading layer has started, and is OpenMP."""
    numba = sys.modules.get("numba")
    if numba is None:
        return False
    try:
        return bool(numba.threading_layer() == "omp")
    except ValueError:  # no parallel code has run: the layer is not chosen yet
        return False


def _before_fork() -> None:
    # In the order a first call takes them: the import, then the compilation.
    deadline = time.monotonic() + COMPILE_WAIT_S
    for lock in (import_lock, _compiler_lock()):
        if lock is None:
            continue
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            _gave_up.append(True)
            return
        _held.append(lock)


def _after_fork_in_parent() -> None:
    _gave_up.clear()
    while _held:
        _held.pop().release()


def _after_fork_in_child() -> None:
    global numba_unusable, parallel_unusable
    if _gave_up:
        numba_unusable = True
    _after_fork_in_parent()  # the forking thread is the child's: it can release
    if _openmp_started():
        parallel_unusable = True


def register() -> None:
    """Install the hooks once per process (where ``os.fork`` exists)."""
    with _registered:
        if _hooks or not hasattr(os, "register_at_fork"):
            return
        os.register_at_fork(
            before=_before_fork,
            after_in_parent=_after_fork_in_parent,
            after_in_child=_after_fork_in_child,
        )
        _hooks.append(True)
