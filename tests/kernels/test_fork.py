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
