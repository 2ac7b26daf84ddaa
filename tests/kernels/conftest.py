"""Fixtures of the kernel tests. Numba is imported only when a fixture runs,
so that test files here that skip without Numba still collect."""

from __future__ import annotations

import pytest

from helpers.launcher_spy import spy_on_launcher


@pytest.fixture(params=[1, 2], ids=["threads=1", "threads=2"])
def threads(request):
    from batchnorm.kernels import numba as _numba

    _numba.set_num_threads(min(request.param, _numba.max_threads()))
    yield request.param
    _numba.set_num_threads(None)


@pytest.fixture
def loops(monkeypatch):
    """The launcher calls that ran, as ``(build, operation)`` (see launcher_spy).

    So that a test that asks for it also checks which path it exercised: the
    Numba loops, for each operation, for what they cover; the NumPy reference (no
    launcher) for the rest.
    """
    return spy_on_launcher(monkeypatch)
