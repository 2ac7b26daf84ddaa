"""The Numba backend's thread count: ``set_num_threads`` and
``$BATCHNORM_NUM_THREADS``."""

from __future__ import annotations

import pytest

pytest.importorskip("numba")

from batchnorm.kernels import numba as _numba  # noqa: E402


def test_thread_count_from_env_and_setter(monkeypatch):
    monkeypatch.setenv("BATCHNORM_NUM_THREADS", "1")
    assert _numba.get_num_threads() == 1
    _numba.set_num_threads(_numba.max_threads())
    try:
        assert _numba.get_num_threads() == _numba.max_threads()
    finally:
        _numba.set_num_threads(None)
    monkeypatch.delenv("BATCHNORM_NUM_THREADS")
    assert _numba.get_num_threads() == _numba.max_threads()


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, r"num_threads must be between 1 and \d+"),
        (10**6, ValueError, r"num_threads must be between 1 and \d+ \(NUMBA_NUM"),
        ("2", TypeError, "num_threads must be an int; got str"),
        (True, TypeError, "num_threads must be an int; got bool"),
    ],
)
def test_bad_thread_count_raises(value, error, match):
    with pytest.raises(error, match=match):
        _numba.set_num_threads(value)


def test_bad_thread_env_raises(monkeypatch):
    monkeypatch.setenv("BATCHNORM_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="BATCHNORM_NUM_THREADS must be an int"):
        _numba.get_num_threads()
    monkeypatch.setenv("BATCHNORM_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="BATCHNORM_NUM_THREADS must be between 1"):
        _numba.get_num_threads()
