"""Channels-last loops of the Numba backend: the (M, W) row bodies of the launcher.

:func:`batchnorm.kernels.numba._loops.launch` runs these on channels-last arrays, ``M``
rows of ``W`` values (one per channel, or ``k`` rows folded side by side), each
call on the rows lo:hi of one chunk. The reductions keep float64 partial sums
per column and add four rows a sweep, taken a quarter of the range apart (eight
an eighth apart for moments on wide rows; see ``_reduce_mc_rows``). The
elementwise bodies evaluate in exactly the reference's order.
"""

from __future__ import annotations

import numpy as np

from batchnorm.kernels.numba._jit import _helper, _helper_exact


@_helper
def _shifted_sums_4(x, pivot, r0, r1, r2, r3, sums, squares):
    """Add ``Σd``, ``Σd²`` (``d = x − pivot``) of rows r0-r3 to the partials."""
    x0, x1, x2, x3 = x[r0], x[r1], x[r2], x[r3]
    for j in range(x.shape[1]):
        p = pivot[j]
        d0, d1 = np.float64(x0[j]) - p, np.float64(x1[j]) - p
        d2, d3 = np.float64(x2[j]) - p, np.float64(x3[j]) - p
        sums[j] += (d0 + d1) + (d2 + d3)
        squares[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)


@_helper
def _shifted_sums_8(x, pivot, r0, step, sums, squares):
    """Add ``Σd``, ``Σd²`` of rows ``r0 + k·step``, k = 0..7, to the partials."""
    x0, x1, x2, x3 = x[r0], x[r0 + step], x[r0 + 2 * step], x[r0 + 3 * step]
    x4, x5 = x[r0 + 4 * step], x[r0 + 5 * step]
    x6, x7 = x[r0 + 6 * step], x[r0 + 7 * step]
    for j in range(x.shape[1]):
        p = pivot[j]
        d0, d1 = np.float64(x0[j]) - p, np.float64(x1[j]) - p
        d2, d3 = np.float64(x2[j]) - p, np.float64(x3[j]) - p
        d4, d5 = np.float64(x4[j]) - p, np.float64(x5[j]) - p
        d6, d7 = np.float64(x6[j]) - p, np.float64(x7[j]) - p
        sums[j] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
        squares[j] += ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) + (
            (d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)
        )


@_helper
def _shifted_sums_1(x, pivot, r, sums, squares):
    """Add ``Σd``, ``Σd²`` of row r to the partials."""
    row = x[r]
    for j in range(x.shape[1]):
        d = np.float64(row[j]) - pivot[j]
        sums[j] += d
        squares[j] += d * d


@_helper
def _grad_sums_4(dy, x, mean, r0, r1, r2, r3, sum_dy, sum_dy_xmu):
    """Add ``Σdy``, ``Σdy·(x − mean)`` of rows r0-r3 to the partials."""
    g0, g1, g2, g3 = dy[r0], dy[r1], dy[r2], dy[r3]
    x0, x1, x2, x3 = x[r0], x[r1], x[r2], x[r3]
    for j in range(x.shape[1]):
        m = mean[j]
        a0, a1 = np.float64(g0[j]), np.float64(g1[j])
        a2, a3 = np.float64(g2[j]), np.float64(g3[j])
        sum_dy[j] += (a0 + a1) + (a2 + a3)
        sum_dy_xmu[j] += (
            a0 * (np.float64(x0[j]) - m) + a1 * (np.float64(x1[j]) - m)
        ) + (a2 * (np.float64(x2[j]) - m) + a3 * (np.float64(x3[j]) - m))


@_helper
def _grad_sums_1(dy, x, mean, r, sum_dy, sum_dy_xmu):
    """Add ``Σdy``, ``Σdy·(x − mean)`` of row r to the partials."""
    g, src = dy[r], x[r]
    for j in range(x.shape[1]):
        a = np.float64(g[j])
        sum_dy[j] += a
        sum_dy_xmu[j] += a * (np.float64(src[j]) - mean[j])


@_helper
def _reduce_mc_rows(moments, dy, x, v0, lo, hi, s, q):
    """Per-column sums of rows lo:hi into ``s`` and ``q``.

    ``moments`` true (the launcher's MOMENTS): ``Σd``, ``Σd²`` of ``d = x − v0``;
    false (GRAD_SUMS): ``Σ dy``, ``Σ dy·(x − v0)``. Each sweep adds four rows, so
    the float64 partials are loaded and stored once per four values: rows
    ``lo + i`` and the rows a quarter, a half and three quarters of the range
    further, then the up to three rows left over. Four rows that far apart are
    four linear streams the hardware prefetcher follows; four consecutive rows
    under a page long share pages, and the prefetcher loses track of them.

    Moments on rows of ``WIDE_ROW`` values or more first sweep eight rows, an
    eighth of the range apart (the pivot and the partials loaded once per eight
    values), and the rows left over go through the four-row sweep. Narrower rows
    keep the four-row sweep (eight cost more there), and so do the gradient sums:
    eight rows of two inputs are sixteen streams. Measurements: docs/KERNELS.md.
    """
    done = lo
    if moments and x.shape[1] >= WIDE_ROW:
        eighth = (hi - lo) // 8
        for i in range(eighth):
            _shifted_sums_8(x, v0, lo + i, eighth, s, q)
        done = lo + 8 * eighth
    quarter = (hi - done) // 4
    for i in range(quarter):
        r0 = done + i
        r1, r2, r3 = r0 + quarter, r0 + 2 * quarter, r0 + 3 * quarter
        if moments:
            _shifted_sums_4(x, v0, r0, r1, r2, r3, s, q)
        else:
            _grad_sums_4(dy, x, v0, r0, r1, r2, r3, s, q)
    for r in range(done + 4 * quarter, hi):
        if moments:
            _shifted_sums_1(x, v0, r, s, q)
        else:
            _grad_sums_1(dy, x, v0, r, s, q)


#: Rows from this many columns on no longer fit the 32 KiB L1 data cache with
#: their float64 per-channel vectors. ``_dx_mc_rows`` takes them two at a time:
#: its four vectors alone fill L1 at 1024 columns, and a pair of rows loads each
#: of their values once (on narrower rows vectors and rows fit in L1, and pairs
#: gain nothing). ``normalize`` gets its shift, and then its mean too, as float32
#: when exact and the tensor streams from memory (see ``_normalize_mc_rows``;
#: under this width the check costs more than it saves). Moments sweep eight
#: rows at a time from this width on (see ``_reduce_mc_rows``).
WIDE_ROW = 1024


@_helper_exact
def _normalize_mc_rows(x, out, mean, scale, shift, narrow, lo, hi):
    """``out = (x − mean) · scale + shift`` per channel on rows lo:hi.

    ``shift`` empty: the shift is float32, ``narrow.view(float32)``, passed that
    way only when float32 holds every value exactly (β of float32 parameters), so
    the results are the same; ``mean`` empty as well: the mean is float32 too, the
    first ``W`` of those values, and the shift the next ``W`` (a running mean of
    float32 parameters). At 1024 channels the three float64 vectors are 24 KiB:
    with a row of ``x`` and one of ``out`` they fill the 32 KiB L1 and are
    reloaded on every row; each float32 vector leaves 4 KiB more to the streams.
    Only on rows from memory: on rows the caches hold, the loop is bound by its
    arithmetic, and converting the float32 vectors costs more than it saves, so
    the caller narrows them only on large tensors
    (``batchnorm.kernels.numba.NARROW_MIN_BYTES``).
    """
    if shift.size != 0:
        _affine_rows(x, out, mean, scale, shift, lo, hi)
    elif mean.size != 0:
        _affine_rows(x, out, mean, scale, narrow.view(np.float32), lo, hi)
    else:
        width = x.shape[1]
        values = narrow.view(np.float32)
        _affine_rows(x, out, values[:width], scale, values[width:], lo, hi)


@_helper_exact
def _affine_rows(x, out, mean, scale, shift, lo, hi):
    """The loop of ``_normalize_mc_rows``, for float64 or float32 vectors.

    A float32 value widens to float64 exactly: the same arithmetic either way.
    """
    for r in range(lo, hi):
        src, dst = x[r], out[r]
        for c in range(x.shape[1]):
            m, b = np.float64(mean[c]), np.float64(shift[c])
            dst[c] = (np.float64(src[c]) - m) * scale[c] + b


@_helper_exact
def _dx_mc_rows(dy, x, out, mean, slope, dbeta_mean, gain, lo, hi):
    """``dx = ((x − mean)·slope + dy − dbeta_mean)·gain`` on rows lo:hi.

    From ``WIDE_ROW`` columns on, rows ``lo + i`` and ``lo + pairs + i``
    share a sweep (half the range apart: two independent streams), so each
    per-channel value is loaded once for two rows; each value is the same
    expression.
    """
    channels = x.shape[1]
    pairs = (hi - lo) // 2 if channels >= WIDE_ROW else 0
    for i in range(pairs):
        a, b = lo + i, lo + pairs + i
        g0, g1, x0, x1, d0, d1 = dy[a], dy[b], x[a], x[b], out[a], out[b]
        for c in range(channels):
            m, s, k, q = mean[c], slope[c], dbeta_mean[c], gain[c]
            e0 = (np.float64(x0[c]) - m) * s + np.float64(g0[c])
            e1 = (np.float64(x1[c]) - m) * s + np.float64(g1[c])
            d0[c] = (e0 - k) * q
            d1[c] = (e1 - k) * q
    for r in range(lo + 2 * pairs, hi):
        g, src, dst = dy[r], x[r], out[r]
        for c in range(channels):
            dx = (np.float64(src[c]) - mean[c]) * slope[c] + np.float64(g[c])
            dst[c] = (dx - dbeta_mean[c]) * gain[c]
