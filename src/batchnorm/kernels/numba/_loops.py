"""The Numba backend's launcher and its (A, C, S) loops: one fused pass per operation.

Two layouts cover every C-contiguous array (:mod:`batchnorm.kernels.numba` makes
the views and falls back to the reference for everything else):

- ``(A, C, S)``, rows of ``S`` contiguous values per (outer index, channel): NCHW
  and any channel axis with something after it. Work is split into contiguous
  ranges of the ``A·C`` rows, one range per thread. Its row bodies are here.
- ``(M, W)``, channels last: every row holds one value of each channel (or of
  ``k`` consecutive rows side by side, ``W = k·C``, with the per-channel vectors
  tiled ``k`` times: the caller folds short rows). Work is split into ranges of
  rows; each range keeps float64 partial sums per column, filled four (moments
  on wide rows: eight) rows at a time. Its row bodies are in
  :mod:`batchnorm.kernels.numba._loops_channels_last`.

One entry point, :func:`launch`, runs every operation (``MOMENTS``,
``NORMALIZE``, ``GRAD_SUMS``, ``DX``, plus ``CHANNELS_LAST`` for the channels-last
layout) on each of ``num_chunks`` row ranges: one ``prange`` build per dtype
instead of one per operation and layout, because most of what a parallel build
costs in cold compilation is fixed (parfor lowering, the gufunc).
``num_chunks`` is the number of threads to split the work into (never
``numba.get_num_threads()`` inside a kernel: that defeats caching). The launcher
exists twice: ``.parallel`` (``prange``) and ``.serial`` (the same code compiled
without threads, for tensors too small to pay for a parallel launch). Each range
goes to :func:`rows`, the dispatch over the row bodies, compiled once per dtype
and called by address (:mod:`batchnorm.kernels.numba._indirect`): linked into
both launchers, the bodies would be optimized again in each.
The compile options and decorators are in :mod:`batchnorm.kernels.numba._jit`.

Statistics are shifted sums in float64: with ``p`` the first value of the channel,
``mean = p + Σd/m`` and ``M2 = Σd² − (Σd)²/m`` for ``d = x − p``. Because ``p`` is
a sample of the channel, ``|mean − p|`` is a few standard deviations at most and
the subtraction loses almost nothing, at any mean (never ``E[x²] − E[x]²``).
Only the reductions over values use ``fastmath`` (reassociation, so that they
vectorize); the elementwise loops evaluate in exactly the reference's order, in
float64, and so do the per-channel sums of partials and ``finish_moments``, so
that ``train_ncs`` and the launcher agree bit for bit.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import prange

from batchnorm.kernels.numba import _indirect
from batchnorm.kernels.numba._jit import (
    KernelPair as KernelPair,  # re-export: _numba, tests
)
from batchnorm.kernels.numba._jit import (
    _helper,
    _helper_exact,
    _jit_entry_reassoc,
    _jit_serial_exact,
    serial_and_parallel,
)
from batchnorm.kernels.numba._loops_channels_last import (
    _dx_mc_rows,
    _normalize_mc_rows,
    _reduce_mc_rows,
)


@_helper_exact
def column_sums(partials):
    """Sum a (K, C) float64 array over K, in row order (as ``train_ncs`` does)."""
    total = np.zeros(partials.shape[1])
    for i in range(partials.shape[0]):
        total += partials[i]
    return total


@_helper_exact
def _finish_channel(pivot, total, squares, count):
    """``(mean, M2)`` of one channel from its shifted sums ``Σd`` and ``Σd²``."""
    m2 = squares - total * total / count
    if 0.0 > m2 > -np.inf:  # rounding below an exact 0; NaN stays NaN
        m2 = 0.0  # and so does -inf (an overflow): the caller checks for it
    return pivot + total / count, m2


@_jit_serial_exact
def finish_moments(pivot, sums, squares, count):
    """``(mean, M2)`` per channel from the shifted sums ``Σd`` and ``Σd²``.

    Channel by channel with ``_finish_channel``, as ``train_ncs`` does.
    """
    mean = np.empty(pivot.shape[0])
    m2 = np.empty(pivot.shape[0])
    for c in range(pivot.shape[0]):
        mean[c], m2[c] = _finish_channel(pivot[c], sums[c], squares[c], count)
    return mean, m2


@_jit_entry_reassoc
def all_finite(a, b):
    """Whether every value of the float64 vectors ``a`` and ``b`` is finite.

    ``v − v`` is 0 for a finite ``v`` and NaN for NaN or ±inf, so the sum is 0
    exactly when all are finite; unlike a product or a plain sum it cannot
    overflow (NumPy would warn), and it costs one C-value pass.
    """
    total = 0.0
    for i in range(a.shape[0]):
        total += (a[i] - a[i]) + (b[i] - b[i])
    return total == 0.0


# The operations a launcher runs (its first argument).
MOMENTS, NORMALIZE, GRAD_SUMS, DX = 0, 1, 2, 3


# ---- (A, C, S): bodies over the rows lo:hi of the A·C rows ----------------------


@_helper
def _moments_rows(x, pivot, lo, hi, sums, squares):
    """``Σd``, ``Σd²`` (``d = x − pivot``) of each row into ``sums[a, c]`` etc."""
    channels, inner = x.shape[1], x.shape[2]
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


@_helper_exact
def _normalize_rows(x, mean, scale, shift, out, lo, hi):
    """``out = (x − mean) · scale + shift`` on rows lo:hi."""
    channels, inner = x.shape[1], x.shape[2]
    for r in range(lo, hi):
        a, c = r // channels, r % channels
        src, dst = x[a, c], out[a, c]
        m, k, b = mean[c], scale[c], shift[c]
        for j in range(inner):
            dst[j] = (np.float64(src[j]) - m) * k + b


@_helper
def _grad_sums_rows(dy, x, mean, lo, hi, sum_dy, sum_dy_xmu):
    """``Σ dy`` and ``Σ dy·(x − mean)`` of each row."""
    channels, inner = x.shape[1], x.shape[2]
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


@_helper_exact
def _dx_rows(dy, x, mean, slope, dbeta_mean, gain, out, lo, hi):
    """``dx = ((x − mean)·slope + dy − dbeta_mean)·gain`` on rows lo:hi.

    ``slope = inv_std·k·dgamma`` per channel: ``x̂·k·dgamma`` with one product
    fewer per value (and one vector fewer to keep in L1 in the channels-last
    ``_dx_mc_rows``).
    """
    channels, inner = x.shape[1], x.shape[2]
    for r in range(lo, hi):
        a, c = r // channels, r % channels
        g, src, dst = dy[a, c], x[a, c], out[a, c]
        m, k, v, w = mean[c], slope[c], dbeta_mean[c], gain[c]
        for j in range(inner):
            dst[j] = ((np.float64(src[j]) - m) * k + np.float64(g[j]) - v) * w


@_helper_exact
def _finite_channel(x, c):
    """Whether every value of channel ``c`` of the (A, C, S) ``x`` is finite."""
    for a in range(x.shape[0]):
        for j in range(x.shape[2]):
            if not np.isfinite(x[a, c, j]):
                return False
    return True


@_jit_serial_exact
def train_ncs(x, gamma, beta, eps, inside, ddof, out, stats):
    """The whole training forward pass of a small (A, C, S) ``x``, on one thread.

    ``(mean, M2)`` as ``launch(MOMENTS)``, then in float64 in the reference's order
    ``var = M2/(m − ddof)``, ``inv_std = 1/√(var + ε)`` (``inside``) or
    ``1/(√var + ε)``, ``scale = inv_std·γ`` and ``out = (x − mean)·scale + β`` as
    ``launch(NORMALIZE)``: the same row bodies and the same values as those calls
    made one by one, without a dispatch and five NumPy calls on C-value vectors in
    between, which on a small tensor cost as much as the loops. ``gamma`` and
    ``beta`` are float64 (ones and zeros for None). Writes ``mean``, ``M2`` and
    ``inv_std`` into the rows of the (3, C) float64 ``stats``, per channel in one
    scalar loop: no arrays handed back to Python and no C-sized temporaries.
    Returns False when a channel of finite values got a ``mean`` or ``M2`` that
    is not (an overflow on the way): the caller redoes the statistics (see
    ``reference.rescue_overflow``), and the ``out`` written here is not the
    result. NaN or inf in the data stays in its channel's results, as in the
    reference.
    """
    outer, channels, inner = x.shape
    count = outer * channels
    n = outer * inner
    zero = np.int64(0)  # not the literal 0: that would compile the bodies again
    pivot = np.empty(channels)
    for c in range(channels):
        pivot[c] = x[0, c, 0]
    sums = np.empty((outer, channels))
    squares = np.empty((outer, channels))
    # Read-only types, as ``rows`` passes them: the same compiled bodies.
    x_in, ro = _indirect.readonly(x), _indirect.readonly
    _moments_rows(x_in, ro(pivot), zero, count, sums, squares)
    scale = np.empty(channels)
    finite = True  # no channel of finite values overflowed
    for c in range(channels):
        s = 0.0  # in row order, as column_sums adds them
        q = 0.0
        for a in range(outer):
            s += sums[a, c]
            q += squares[a, c]
        mean, m2 = _finish_channel(pivot[c], s, q, n)
        if not (np.isfinite(mean) and np.isfinite(m2)):
            finite = finite and not _finite_channel(x, c)
        var = m2 / (n - ddof)
        if inside:
            inv_std = 1.0 / np.sqrt(var + eps)
        else:
            inv_std = 1.0 / (np.sqrt(var) + eps)
        stats[0, c] = mean
        stats[1, c] = m2
        stats[2, c] = inv_std
        scale[c] = inv_std * gamma[c]
    _normalize_rows(x_in, ro(stats[0]), ro(scale), ro(beta), out, zero, count)
    return finite


# Added to an operation: the same operation on channels-last (1, M, W) arrays.
CHANNELS_LAST = 4


@_helper
def rows(op, x, dy, out, v0, v1, v2, v3, pivot, p0, p1, lo, hi, chunk):
    """Operation ``op`` (see :func:`launch`) on the rows lo:hi of chunk ``chunk``.

    Compiled once per dtype for ``_indirect.rows_signature`` and called by
    address from both builds of :func:`launch` (see :mod:`._indirect`).
    """
    if op == MOMENTS:
        _moments_rows(x, pivot, lo, hi, p0, p1)
    elif op == NORMALIZE:
        _normalize_rows(x, v0, v1, v2, out, lo, hi)
    elif op == GRAD_SUMS:
        _grad_sums_rows(dy, x, v0, lo, hi, p0, p1)
    elif op == DX:
        _dx_rows(dy, x, v0, v1, v2, v3, out, lo, hi)
    elif op == NORMALIZE + CHANNELS_LAST:
        _normalize_mc_rows(x[0], out[0], v0, v1, v2, v3, lo, hi)
    elif op == DX + CHANNELS_LAST:
        _dx_mc_rows(dy[0], x[0], out[0], v0, v1, v2, v3, lo, hi)
    else:
        moments = op == MOMENTS + CHANNELS_LAST
        _reduce_mc_rows(moments, dy[0], x[0], v0, lo, hi, p0[chunk], p1[chunk])


_addresses: dict[np.dtype, int] = {}


def _call_rows_python(address: int, *args: Any) -> None:
    rows(*args)


#: ``call_rows(address, op, x, dy, out, v0, v1, v2, v3, pivot, p0, p1, lo, hi,
#: chunk)``: the compiled ``rows`` at ``address``, or ``rows`` itself as Python
#: under ``NUMBA_DISABLE_JIT`` (where the launchers run as Python too).
call_rows: Any = (
    _call_rows_python if _indirect.JIT_DISABLED else _indirect.call_rows_jit
)


def rows_address(dtype: np.dtype) -> int:
    """Where :func:`rows` for ``dtype`` arrays is, compiled (or loaded) on first use.

    0 under ``NUMBA_DISABLE_JIT``, where the launchers run as Python and call
    :func:`rows` itself (:data:`call_rows`).
    """
    address = _addresses.get(dtype)
    if address is None:
        if _indirect.JIT_DISABLED:
            return 0
        signature = _indirect.rows_signature(numba.from_dtype(dtype))
        rows.compile(signature)
        compiled = rows.overloads[signature]
        name = compiled.fndesc.llvm_func_name
        address = _addresses[dtype] = compiled.library.get_pointer_to_function(name)
    return address


@serial_and_parallel()
def _launch(op, x, dy, out, v0, v1, v2, v3, num_chunks, rows_at):
    """Run operation ``op`` on one layout's views, split into ``num_chunks`` ranges.

    Operations ``MOMENTS``, ``NORMALIZE``, ``GRAD_SUMS``, ``DX`` on (A, C, S)
    views, or the same plus ``CHANNELS_LAST`` on channels-last (M, W) arrays passed as
    (1, M, W):

    ========= ========================= ========================================
    op        arguments used            result
    ========= ========================= ========================================
    MOMENTS   x (channels last: v0 =    ``(mean, M2)`` per channel (channels
              the pivot)                last: per-column ``(Σd, Σd²)``)
    NORMALIZE x, out, v0-v2 = mean,     ``out = (x − v0)·v1 + v2``; empty arrays
              scale, shift (channels
              last: or v2 empty and v3
              a float32 shift's bytes,
              or v0 and v2 empty and v3
              the float32 mean's and
              then shift's bytes)
    GRAD_SUMS dy, x, v0 = mean          ``(Σ dy, Σ dy·(x − mean))`` per channel
                                        (channels last: per column)
    DX        dy, x, out, v0-v3 = mean, ``out = ((x − v0)·v1 + dy − v2)·v3``;
              slope, dbeta_mean, gain   empty arrays
    ========= ========================= ========================================

    Unused arguments take any array of their type. Each chunk runs :func:`rows`
    through ``rows_at``, its address for ``x``'s dtype, so that neither build
    carries the row bodies (see :mod:`._indirect`); :data:`launch` passes it.
    One parallel build serves every operation and layout. (A, C, S) reductions
    keep partial sums per row and add them in row order, so they do not depend
    on ``num_chunks``; channels-last ones keep them per chunk, and the caller
    adds per-column sums per channel when it has folded rows.
    """
    last = op >= CHANNELS_LAST
    body = op - CHANNELS_LAST if last else op
    reduce = body == MOMENTS or body == GRAD_SUMS
    if last:
        num_rows, width = x.shape[1], x.shape[2]
        parts0 = (num_chunks if reduce else 0, width)
        parts1 = parts0
    else:
        num_rows, width = x.shape[0] * x.shape[1], x.shape[1]
        parts0 = (x.shape[0] if reduce else 0, width)
        parts1 = parts0
    p0 = np.zeros(parts0)
    p1 = np.zeros(parts1)
    pivot = np.empty(width if op == MOMENTS else 0)
    for c in range(pivot.size):
        pivot[c] = x[0, c, 0]
    for chunk in prange(num_chunks):
        k = np.int64(chunk)  # prange counts in uint64
        lo, hi = k * num_rows // num_chunks, (k + 1) * num_rows // num_chunks
        call_rows(rows_at, op, x, dy, out, v0, v1, v2, v3, pivot, p0, p1, lo, hi, k)
    if op == MOMENTS:
        count = x.shape[0] * x.shape[2]
        return finish_moments(pivot, column_sums(p0), column_sums(p1), count)
    if reduce:
        return column_sums(p0), column_sums(p1)
    return np.empty(0), np.empty(0)


def _with_rows(build: Any) -> Any:
    def run(op: Any, x: Any, dy: Any, out: Any, *vectors_and_chunks: Any) -> Any:
        address = rows_address(x.dtype)
        return build(op, x, dy, out, *vectors_and_chunks, address)

    run.__doc__ = build.__doc__
    return run


#: ``launch.serial(op, x, dy, out, v0, v1, v2, v3, num_chunks)`` and
#: ``launch.parallel(...)``: the two builds of :func:`_launch`, given the address
#: of :func:`rows` for ``x``'s dtype, so that no call can pass another dtype's.
launch = KernelPair(_with_rows(_launch.serial), _with_rows(_launch.parallel))
