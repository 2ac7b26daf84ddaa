"""The memory-traffic floor of the benchmark: plain Numba streams, no math.

Batch normalization is memory-bound, so the fastest any implementation can be is
the time to stream its data once per required pass. These kernels do exactly that
traffic with trivial arithmetic, on flat C-contiguous arrays, split into
``num_chunks`` contiguous ranges (one per thread) and compiled serial and parallel
(:mod:`batchnorm.kernels.numba._jit`) like the real kernels in
:mod:`batchnorm.kernels.numba._loops`:

- ``forward_train``: :data:`read` ``x`` (statistics), then :data:`copy` ``x → y``;
- ``forward_eval``: :data:`copy` ``x → y``;
- ``backward``: :data:`read2` ``x, dy`` (reductions), then :data:`add` ``x + dy → dx``.

Used only by :mod:`batchnorm.app.bench`.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from batchnorm.kernels.numba import serial_and_parallel


@serial_and_parallel(fastmath=True)
def read(x, num_chunks):
    """One read pass: the sum of a flat array (in its own dtype, reassociated)."""
    total = np.zeros(num_chunks, dtype=x.dtype)
    for chunk in prange(num_chunks):
        lo, hi = chunk * x.size // num_chunks, (chunk + 1) * x.size // num_chunks
        xs = x[lo:hi]
        s = total[chunk]
        for i in range(xs.size):
            s += xs[i]
        total[chunk] = s
    return total.sum()


@serial_and_parallel(fastmath=True)
def read2(x, dy, num_chunks):
    """One read pass over two flat arrays."""
    total = np.zeros(num_chunks, dtype=x.dtype)
    for chunk in prange(num_chunks):
        lo, hi = chunk * x.size // num_chunks, (chunk + 1) * x.size // num_chunks
        xs, dys = x[lo:hi], dy[lo:hi]
        s = total[chunk]
        for i in range(xs.size):
            s += xs[i] + dys[i]
        total[chunk] = s
    return total.sum()


@serial_and_parallel()
def copy(x, out, num_chunks):
    """Read ``x`` once and write ``out`` once."""
    for chunk in prange(num_chunks):
        lo, hi = chunk * x.size // num_chunks, (chunk + 1) * x.size // num_chunks
        xs, outs = x[lo:hi], out[lo:hi]
        for i in range(xs.size):
            outs[i] = xs[i]


@serial_and_parallel()
def add(x, dy, out, num_chunks):
    """Read ``x`` and ``dy`` once, write ``out`` once."""
    for chunk in prange(num_chunks):
        lo, hi = chunk * x.size // num_chunks, (chunk + 1) * x.size // num_chunks
        xs, outs = x[lo:hi], out[lo:hi]
        for i in range(xs.size):
            outs[i] = xs[i] + dy[i]
