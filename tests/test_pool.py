"""The output block cache: reuse only after release, bounded, never shared."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _pool

F = bn.functional
BIG = (16, 8, 64, 64)  # 2 MiB of float32: above MIN_BYTES


@pytest.fixture(autouse=True)
def clean_pool(monkeypatch):
    monkeypatch.delenv("BATCHNORM_POOL_BYTES", raising=False)
    _pool.release_buffers()
    yield
    _pool.release_buffers()


def test_block_is_reused_only_after_every_user_is_gone():
    a = _pool.empty(BIG, np.float32)
    address = a.ctypes.data
    view = a[3:5]
    del a
    b = _pool.empty(BIG, np.float32)
    assert b.ctypes.data != address  # the view still uses the first block
    del view
    c = _pool.empty(BIG, np.float32)
    assert c.ctypes.data == address
    assert not np.shares_memory(b, c)


def test_arrays_are_plain_writable_c_contiguous():
    a = _pool.empty(BIG, np.float64)
    assert type(a) is np.ndarray
    assert a.shape == BIG and a.dtype == np.float64
    assert a.flags.c_contiguous and a.flags.writeable and a.flags.aligned
    a[...] = 7.0
    assert np.all(a == 7.0)


def test_small_arrays_bypass_the_cache():
    a = _pool.empty((4, 4), np.float32)
    assert a.base is None
    del a
    assert _pool.idle_bytes() == 0


def test_idle_bytes_are_bounded_and_released(monkeypatch):
    nbytes = int(np.prod(BIG)) * 4
    monkeypatch.setenv("BATCHNORM_POOL_BYTES", str(2 * nbytes))
    arrays = [_pool.empty(BIG, np.float32) for _ in range(3)]
    del arrays
    gc.collect()
    assert _pool.idle_bytes() == 2 * nbytes  # the third block was freed
    assert _pool.release_buffers() == 2 * nbytes
    assert _pool.idle_bytes() == 0


def test_zero_turns_the_cache_off(monkeypatch):
    monkeypatch.setenv("BATCHNORM_POOL_BYTES", "0")
    a = _pool.empty(BIG, np.float32)
    assert a.base is None
    del a
    assert _pool.idle_bytes() == 0


@pytest.mark.parametrize("value", ["-1", "lots", "1.5"])
def test_bad_setting_is_named(monkeypatch, value):
    monkeypatch.setenv("BATCHNORM_POOL_BYTES", value)
    with pytest.raises(ValueError, match=r"BATCHNORM_POOL_BYTES .*got '") as info:
        _pool.empty(BIG, np.float32)
    assert repr(value) in str(info.value)


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
    stale = _pool.empty(BIG, np.float32)
    stale[...] = np.nan
    del stale
    y = F.forward_eval(x, None, None, np.zeros(8), np.ones(8), backend="numba")
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(
        y, F.forward_eval(x, None, None, np.zeros(8), np.ones(8), backend="numpy")
    )


def test_threads_never_share_a_block():
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def work(tag: int) -> None:
        try:
            for _ in range(200):
                a = _pool.empty(BIG, np.float32)
                a[:] = tag
                if not np.all(a == tag):
                    raise AssertionError("another thread wrote into a leased block")
                seen.append((tag, a.ctypes.data))
                del a
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(seen) == 800
