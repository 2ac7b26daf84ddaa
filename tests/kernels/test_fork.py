"""A child forked after the parent ran the parallel loops computes as the parent."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("numba")

from batchnorm.kernels import numba as _numba  # noqa: E402
from helpers.channels import channel_sums, first_per_channel, per_channel  # noqa: E402
from helpers.kernel_cases import assert_sums_close  # noqa: E402


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_after_parallel_parent_gets_the_same_result():
    """GNU OpenMP aborts such a child if it starts a parallel region."""
    x = np.random.default_rng(0).normal(size=(64, 8, 32, 32)).astype(np.float32)
    _numba.set_num_threads(_numba.max_threads())
    try:
        _, mean, m2 = _numba.batch_moments(x, 1)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report its result through the pipe, then exit
            status = 1
            try:
                _, child_mean, child_m2 = _numba.batch_moments(x, 1)
                os.write(write, np.concatenate([child_mean, child_m2]).tobytes())
                status = 0
            finally:
                os._exit(status)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
    finally:
        _numba.set_num_threads(None)
    assert status == 0
    child_mean, child_m2 = np.frombuffer(data, np.float64).reshape(2, -1)
    count = x.size // x.shape[1]
    x64 = x.astype(np.float64)
    d = x64 - per_channel(first_per_channel(x64, 1), x64, 1)
    abs_terms = channel_sums(np.abs(x64), 1) + channel_sums(np.abs(d), 1)
    assert_sums_close(child_mean * count, mean * count, abs_terms, count)
    assert_sums_close(child_m2, m2, channel_sums(d * d, 1), count)


def run_bounded(code: str, seconds: float, **env: str) -> str:
    """Run ``code`` in a fresh interpreter killed after ``seconds``: a deadlock
    fails the test instead of hanging it. Its stripped stdout; raises on failure."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=seconds,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


# Forks while another thread holds Numba's compiler lock, as a first call does
# while it compiles or loads kernels, for HOLD seconds; the child makes its own
# first call (it needs that lock) and exits 0 with the reference's result. The
# parent gives the child CHILD_S seconds (a compilation of the small kernels
# included), then kills it.
_FORK_WHILE_COMPILING = """
import os, sys, threading, time
import numpy as np
import batchnorm as bn
from numba.core.compiler_lock import global_compiler_lock
{setup}
x = np.arange(96, dtype=np.float32).reshape(4, 2, 12) % 7
held = threading.Event()
def first_call():
    with global_compiler_lock:
        held.set()
        time.sleep({hold})
    bn.functional.forward_train(x, None, None, backend="numba")
thread = threading.Thread(target=first_call)
thread.start()
held.wait()
pid = os.fork()
if pid == 0:
    y, _ = bn.functional.forward_train(x, None, None, backend="numba")
    ref, _ = bn.functional.forward_train(x, None, None, backend="numpy")
    os._exit(0 if np.allclose(y, ref, rtol=0, atol=1e-6) and {child_check} else 3)
deadline = time.monotonic() + {child_s}
while not os.waitpid(pid, os.WNOHANG)[0]:
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        sys.exit("the child deadlocked")
    time.sleep(0.02)
thread.join()
print("child done")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_while_another_thread_compiles_waits_for_it():
    """The child inherited the compiler lock held by a thread it does not have,
    and its first Numba call waited for it forever."""
    code = _FORK_WHILE_COMPILING.format(
        setup="", hold=0.5, child_s=30, child_check="True"
    )
    assert run_bounded(code, 60) == "child done"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_that_cannot_wait_for_the_compiler_uses_the_reference_in_the_child():
    """A compilation that outlasts the fork's wait: the child does not touch
    Numba (it would wait for a lock no thread of it holds) and computes with the
    NumPy reference, the same values."""
    setup = (
        "from batchnorm.kernels import _fork, numba as _numba, reference;"
        "_fork.COMPILE_WAIT_S = 0.1"
    )
    # The backend module is loaded, its loops not compiled: in the child every
    # operation must take the reference's path (no launcher call, no compile).
    check = "_fork.numba_unusable and _numba._fast_view(x, 1) is None"
    code = _FORK_WHILE_COMPILING.format(
        setup=setup, hold=3.0, child_s=20, child_check=check
    )
    assert run_bounded(code, 60) == "child done"


_POOL_AFTER_PARALLEL_NUMBA = """
import multiprocessing, numba, numpy as np
import batchnorm as bn

@numba.njit(parallel=True)
def total(a):
    s = 0.0
    for i in numba.prange(a.size):
        s += a[i]
    return s

total(np.ones(1000))  # Numba's threads start in this process ({layer})
x = np.random.default_rng(0).normal(size=(64, 8, 32, 32)).astype(np.float32)

def step(_):
    return bn.functional.forward_train(x, None, None, backend="numba")[1].mean

if __name__ == "__main__":
    with multiprocessing.get_context("fork").Pool(2) as pool:
        means = pool.map_async(step, range(2)).get(timeout=30)
    print(numba.threading_layer(), all(np.allclose(m, step(0)) for m in means))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_pool_forked_after_other_numba_parallel_code_returns():
    """GNU OpenMP's threads started in the parent by someone else's parallel code
    (so batchnorm's own record of its parallel loops did not know): the workers
    aborted ("fork() called from a process already using GNU OpenMP") and
    ``Pool.map`` never returned."""
    code = _POOL_AFTER_PARALLEL_NUMBA.format(layer="the default layer")
    layer, same = run_bounded(code, 90, NUMBA_NUM_THREADS="2").split()
    assert same == "True", layer
