"""Compiled loops of the Numba backend: one fused pass per operation, per layout.

Two layouts cover every C-contiguous array (:mod:`batchnorm.kernels._numba` makes
the views and falls back to the reference for everything else):

- ``(A, C, S)``, rows of ``S`` contiguous values per (outer index, channel): NCHW
  and any channel axis with something after it. Work is split into contiguous
  ranges of the ``A·C`` rows, one range per thread.
- ``(M, C)``, channels last: every row holds one value of each channel. Work is
  split into ranges of rows; each range keeps float64 partial sums per channel,
  filled one tile of ``_TILE`` channels at a time so that they stay in L1.

Every entry point takes ``num_chunks``, the number of threads to split the work
into (never ``numba.get_num_threads()`` inside a kernel: that defeats caching),
and exists twice: ``.parallel`` (``prange``) and ``.serial`` (the same code
compiled without threads, for tensors too small to pay for a parallel launch).

Statistics are shifted sums in float64: with ``p`` the first value of the channel,
``mean = p + Σd/m`` and ``M2 = Σd² − (Σd)²/m`` for ``d = x − p``. Because ``p`` is
a sample of the channel, ``|mean − p|`` is a few standard deviations at most and
the subtraction loses almost nothing, at any mean (never ``E[x²] − E[x]²``).
Only the reductions use ``fastmath`` (reassociation, so that they vectorize);
the elementwise loops evaluate in exactly the reference's order, in float64.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, NamedTuple

import numba
import numpy as np
from numba import prange

# Channels per tile in the channels-last reductions: 2 float64 partials per channel
# (8 KiB at 512) stay in L1 while the rows stream through.
_TILE = 512
_REASSOC = ("reassoc", "contract")


class KernelPair(NamedTuple):
    """One loop compiled twice: without threads and with ``prange``."""

    serial: Any
    parallel: Any


def _jit(fn: Callable[..., Any], *, parallel: bool, fastmath: bool) -> Any:
    flags: bool | set[str] = set(_REASSOC) if fastmath else False
    try:
        return numba.njit(fn, cache=True, nogil=True, parallel=parallel, fastmath=flags)
    except RuntimeError:
        # No writable cache directory anywhere (numba tries $NUMBA_CACHE_DIR, the
        # package's __pycache__, then ~/.cache/numba): compile in every process.
        return numba.njit(fn, nogil=True, parallel=parallel, fastmath=flags)


def _serial_and_parallel(
    *, fastmath: bool = False
) -> Callable[[Callable[..., Any]], KernelPair]:
    def compile_both(fn: Callable[..., Any]) -> KernelPair:
        # Numba's on-disk cache keys a function by its qualified name and line,
        # not by its options, so the serial build must have a name of its own.
        serial = types.FunctionType(
            fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__
        )
        serial.__qualname__ = fn.__qualname__ + "_serial"
        serial.__module__ = fn.__module__
        return KernelPair(
            _jit(serial, parallel=False, fastmath=fastmath),
            _jit(fn, parallel=True, fastmath=fastmath),
        )

    return compile_both


def _serial(fn: Callable[..., Any]) -> Any:
    return _jit(fn, parallel=False, fastmath=True)


@_serial
def column_sums(partials):
    """Sum a (K, C) float64 array over K."""
    total = np.zeros(partials.shape[1])
    for i in range(partials.shape[0]):
        total += partials[i]
    return total


@_serial
def finish_moments(pivot, sums, squares, count):
    """``(mean, M2)`` from shifted partial sums, shape (K, C) each."""
    s, q = column_sums(sums), column_sums(squares)
    mean = pivot + s / count
    m2 = q - s * s / count
    for c in range(m2.shape[0]):
        if m2[c] < 0.0:  # rounding below an exact 0; NaN stays NaN
            m2[c] = 0.0
    return mean, m2


@_serial_and_parallel(fastmath=True)
def moments_ncs(x, num_chunks):
    """Per-channel ``(mean, M2)`` of ``x`` viewed as (A, C, S), float64."""
    outer, channels, inner = x.shape
    pivot = np.empty(channels)
    for c in range(channels):
        pivot[c] = x[0, c, 0]
    sums = np.empty((outer, channels))
    squares = np.empty((outer, channels))
    rows = outer * channels
    for chunk in prange(num_chunks):
        lo, hi = chunk * rows // num_chunks, (chunk + 1) * rows // num_chunks
        for r in range(lo, hi):
            a, c = r // channels, r % channels
            row, p = x[a, c], pivot[c]
            s = 0.0
            q = 0.0
            for j in range(inner):
                d = np.float64(row[j]) - p
                s += d
                q += d * d
            sums[a, c] = s
            squares[a, c] = q
    return finish_moments(pivot, sums, squares, outer * inner)


@_serial_and_parallel(fastmath=True)
def moments_mc(x, num_chunks):
    """Per-channel ``(mean, M2)`` of channels-last ``x``, shape (M, C), float64."""
    rows, channels = x.shape
    pivot = np.empty(channels)
    for c in range(channels):
        pivot[c] = x[0, c]
    sums = np.zeros((num_chunks, channels))
    squares = np.zeros((num_chunks, channels))
    for chunk in prange(num_chunks):
        s, q = sums[chunk], squares[chunk]
        for c0 in range(0, channels, _TILE):
            c1 = min(c0 + _TILE, channels)
            lo, hi = chunk * rows // num_chunks, (chunk + 1) * rows // num_chunks
            for r in range(lo, hi):
                row = x[r]
                for c in range(c0, c1):
                    d = np.float64(row[c]) - pivot[c]
                    s[c] += d
                    q[c] += d * d
    return finish_moments(pivot, sums, squares, rows)


@_serial_and_parallel()
def normalize_ncs(x, mean, scale, shift, out, num_chunks):
    """``out = (x − mean) · scale + shift`` per channel, x viewed as (A, C, S)."""
    outer, channels, inner = x.shape
    rows = outer * channels
    for chunk in prange(num_chunks):
        lo, hi = chunk * rows // num_chunks, (chunk + 1) * rows // num_chunks
        for r in range(lo, hi):
            a, c = r // channels, r % channels
            src, dst = x[a, c], out[a, c]
            m, k, b = mean[c], scale[c], shift[c]
            for j in range(inner):
                dst[j] = (np.float64(src[j]) - m) * k + b


@_serial_and_parallel()
def normalize_mc(x, mean, scale, shift, out, num_chunks):
    """``out = (x − mean) · scale + shift`` per channel, channels-last (M, C)."""
    rows, channels = x.shape
    for chunk in prange(num_chunks):
        lo, hi = chunk * rows // num_chunks, (chunk + 1) * rows // num_chunks
        for r in range(lo, hi):
            src, dst = x[r], out[r]
            for c in range(channels):
                dst[c] = (np.float64(src[c]) - mean[c]) * scale[c] + shift[c]


@_serial_and_parallel(fastmath=True)
def grad_sums_ncs(dy, x, mean, num_chunks):
    """Per-channel ``(Σ dy, Σ dy·(x − mean))`` for (A, C, S) views, float64."""
    outer, channels, inner = x.shape
    sum_dy = np.empty((outer, channels))
    sum_dy_xmu = np.empty((outer, channels))
    rows = outer * channels
    for chunk in prange(num_chunks):
        lo, hi = chunk * rows // num_chunks, (chunk + 1) * rows // num_chunks
        for r in range(lo, hi):
            a, c = r // channels, r % channels
            g, src, m = dy[a, c], x[a, c], mean[c]
            s = 0.0
            t = 0.0
            for j in range(inner):
                gj = np.float64(g[j])
                s += gj
                t += gj * (np.float64(src[j]) - m)
            sum_dy[a, c] = s
            sum_dy_xmu[a, c] = t
    return column_sums(sum_dy), column_sums(sum_dy_xmu)


@_serial_and_parallel(fastmath=True)
def grad_sums_mc(dy, x, mean, num_chunks):
    """Per-channel ``(Σ dy, Σ dy·(x − mean))`` for channels-last (M, C), float64."""
    rows, channels = x.shape
    sum_dy = np.zeros((num_chunks, channels))
    sum_dy_xmu = np.zeros((num_chunks, channels))
    for chunk in prange(num_chunks):
        s, t = sum_dy[chunk], sum_dy_xmu[chunk]
        for c0 in range(0, channels, _TILE):
            c1 = min(c0 + _TILE, channels)
            lo, hi = chunk * rows // num_chunks, (chunk + 1) * rows // num_chunks
            for r in range(lo, hi):
                g, src = dy[r], x[r]
                for c in range(c0, c1):
                    gc = np.float64(g[c])
                    s[c] += gc
                    t[c] += gc * (np.float64(src[c]) - mean[c])
    return column_sums(sum_dy), column_sums(sum_dy_xmu)


@_serial_and_parallel()
def dx_ncs(dy, x, mean, inv_std, k_dgamma, dbeta_mean, gain, out, num_chunks):
    """``dx = ((x − mean)·inv_std·k_dgamma + dy − dbeta_mean)·gain``, (A, C, S)."""
    outer, channels, inner = x.shape
    rows = outer * channels
    for chunk in prange(num_chunks):
        lo, hi = chunk * rows // num_chunks, (chunk + 1) * rows // num_chunks
        for r in range(lo, hi):
            a, c = r // channels, r % channels
            g, src, dst = dy[a, c], x[a, c], out[a, c]
            m, s, kd, v, w = mean[c], inv_std[c], k_dgamma[c], dbeta_mean[c], gain[c]
            for j in range(inner):
                x_hat = (np.float64(src[j]) - m) * s
                dst[j] = (x_hat * kd + np.float64(g[j]) - v) * w


@_serial_and_parallel()
def dx_mc(dy, x, mean, inv_std, k_dgamma, dbeta_mean, gain, out, num_chunks):
    """``dx = ((x − mean)·inv_std·k_dgamma + dy − dbeta_mean)·gain``, (M, C)."""
    rows, channels = x.shape
    for chunk in prange(num_chunks):
        lo, hi = chunk * rows // num_chunks, (chunk + 1) * rows // num_chunks
        for r in range(lo, hi):
            g, src, dst = dy[r], x[r], out[r]
            for c in range(channels):
                x_hat = (np.float64(src[c]) - mean[c]) * inv_std[c]
                dx = x_hat * k_dgamma[c] + np.float64(g[c]) - dbeta_mean[c]
                dst[c] = dx * gain[c]
