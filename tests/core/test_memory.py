"""The output block cache: reuse only after release, bounded, never shared."""

from __future__ import annotations

import copy
import gc
import pickle
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _memory

F = bn.functional
BIG = (16, 8, 64, 64)  # 2 MiB of float32: above MIN_BYTES


@pytest.fixture(autouse=True)
def clean_pool(monkeypatch):
    monkeypatch.delenv("BATCHNORM_POOL_BYTES", raising=False)
    _memory.release_buffers()
    yield
    _memory.release_buffers()


def test_block_is_reused_only_after_every_user_is_gone():
    a = _memory.empty(BIG, np.float32)
    address = a.ctypes.data
    view = a[3:5]
    del a
    b = _memory.empty(BIG, np.float32)
    assert b.ctypes.data != address  # the view still uses the first block
    del view
    c = _memory.empty(BIG, np.float32)
    assert c.ctypes.data == address
    assert not np.shares_memory(b, c)


def test_arrays_are_plain_writable_c_contiguous():
    a = _memory.empty(BIG, np.float64)
    assert type(a) is np.ndarray
    assert a.shape == BIG and a.dtype == np.float64
    assert a.flags.c_contiguous and a.flags.writeable and a.flags.aligned
    a[...] = 7.0
    assert np.all(a == 7.0)


def test_small_arrays_bypass_the_cache():
    a = _memory.empty((4, 4), np.float32)
    assert a.base is None
    del a
    assert _memory.idle_bytes() == 0


def test_idle_bytes_are_bounded_and_released(monkeypatch):
    nbytes = int(np.prod(BIG)) * 4
    monkeypatch.setenv("BATCHNORM_POOL_BYTES", str(2 * nbytes))
    arrays = [_memory.empty(BIG, np.float32) for _ in range(3)]
    del arrays
    gc.collect()
    assert _memory.idle_bytes() == 2 * nbytes  # the third block was freed
    assert _memory.release_buffers() == 2 * nbytes
    assert _memory.idle_bytes() == 0


def test_zero_turns_the_cache_off(monkeypatch):
    monkeypatch.setenv("BATCHNORM_POOL_BYTES", "0")
    a = _memory.empty(BIG, np.float32)
    assert a.base is None
    del a
    assert _memory.idle_bytes() == 0


@pytest.mark.parametrize("value", ["-1", "lots", "1.5"])
def test_bad_setting_is_named(monkeypatch, value):
    monkeypatch.setenv("BATCHNORM_POOL_BYTES", value)
    assert _memory.empty((4, 4), np.float32).shape == (4, 4)  # small: not read
    with pytest.raises(ValueError) as info:
        _memory.empty(BIG, np.float32)
    message = str(info.value)
    assert "environment variable BATCHNORM_POOL_BYTES" in message
    assert ">= 0" in message and f"got {value!r}" in message
    assert "unset it" in message


def test_lease_cannot_be_copied_or_pickled():
    """Two leases of one block would give it back twice: refused."""
    a = _memory.empty(BIG, np.float32)
    a[...] = 1.5
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="lease cannot be copied or pickled"):
            attempt(a.base)
    b = pickle.loads(pickle.dumps(a))  # the array itself: its values, copied
    assert not isinstance(b.base, _memory._Lease) and np.array_equal(b, a)


def test_public_release_buffers():
    a = _memory.empty(BIG, np.float32)
    del a
    assert _memory.idle_bytes() == a_bytes()
    assert bn.release_buffers() == a_bytes()
    assert _memory.idle_bytes() == 0


def a_bytes():
    return int(np.prod(BIG)) * 4


def test_collecting_a_cycle_inside_the_cache_does_not_deadlock(tmp_path):
    """A garbage collection can run while the cache holds its lock (any
    allocation may trigger one) and free a cycle that holds an output: the
    lease's finalizer then runs inside the cache's own call. It must not wait for
    the lock (it did once; this loop hung within seconds)."""
    script = textwrap.dedent(
        """
        import faulthandler, sys
        import numpy as np
        from batchnorm import _memory
        faulthandler.dump_traceback_later(60, exit=True)

        class Holder:
            pass

        for trial in range(20000):
            h = Holder()
            h.me = h
            h.arr = _memory.empty((1 << 18,), np.float32)
            del h
            _memory.release_buffers()
            pad = [[] for _ in range(trial % 7)]
            b = _memory.empty((1 << 19,), np.float32)
            del b
        print("done")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr


def test_kernel_outputs_stay_independent():
    """A later call never writes into an output the caller still holds."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=BIG).astype(np.float32)
    x2 = rng.normal(5.0, 3.0, size=BIG).astype(np.float32)
    y1, cache = F.forward_train(x1, None, None, backend="numba")
    kept = y1.copy()
    for _ in range(3):
        y2, _ = F.forward_train(x2, None, None, backend="numba")
        dx, _, _ = F.backward(y2, cache, backend="numba")
        del y2, dx
    np.testing.assert_array_equal(y1, kept)
    reference, _ = F.forward_train(x1, None, None, backend="numpy")
    np.testing.assert_array_equal(y1, reference)


def test_reused_block_gets_fully_overwritten():
    pytest.importorskip("numba")
    x = np.random.default_rng(1).normal(size=BIG).astype(np.float32)
    stale = _memory.empty(BIG, np.float32)
    stale[...] = np.nan
    address = stale.ctypes.data
    del stale
    y = F.forward_eval(x, None, None, np.zeros(8), np.ones(8), backend="numba")
    assert y.ctypes.data == address  # the stale block was reused
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(
        y, F.forward_eval(x, None, None, np.zeros(8), np.ones(8), backend="numpy")
    )


def test_threads_never_share_a_block():
    done: list[int] = []
    errors: list[BaseException] = []

    def work(tag: int) -> None:
        try:
            for _ in range(200):
                a = _memory.empty(BIG, np.float32)
                a[:] = tag
                if not np.all(a == tag):
                    raise AssertionError("another thread wrote into a leased block")
                done.append(tag)
                del a
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(done) == 800
