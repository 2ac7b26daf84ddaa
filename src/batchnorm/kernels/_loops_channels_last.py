"""Channels-last loops of the Numba backend: the (M, W) row bodies of the launcher.

:func:`batchnorm.kernels._loops.launch` runs these on channels-last arrays, ``M``
rows of ``W`` values (one per channel, or ``k`` rows folded side by side), each
call on the rows lo:hi of one chunk. The reductions keep float64 partial sums
per column: each block of rows is first streamed into L2 (``_stream``), then
added one tile of ``_TILE`` columns and four rows at a time so that the partials
stay in L1. The elementwise bodies evaluate in exactly the reference's order.
"""

from __future__ import annotations

import numpy as np

from batchnorm.kernels._jit import _helper, _helper_exact

# Columns per tile in the channels-last reductions: 2 float64 partials per column
# (16 KiB at 1024) stay in L1 while the rows stream through; narrower tiles read
# each row in short strided pieces, which measured slower.
_TILE = 1024
# Values per array in a block of rows that the channels-last reductions first
# stream into L2 (256 KiB of float32; see _stream).
_BLOCK_VALUES = 65536


@_helper
def _shifted_sums_tile(x, pivot, lo, hi, c0, c1, sums, squares):
    """Add ``Σd``, ``Σd²`` (``d = x − pivot``) of rows lo:hi, columns c0:c1.

    Four rows per sweep, so the float64 partials are loaded and stored once per
    four values instead of once per value.
    """
    p, s, q = pivot[c0:c1], sums[c0:c1], squares[c0:c1]
    r = lo
    while r + 4 <= hi:
        x0, x1, x2, x3 = x[r, c0:c1], x[r + 1, c0:c1], x[r + 2, c0:c1], x[r + 3, c0:c1]
        for j in range(c1 - c0):
            d0, d1 = np.float64(x0[j]) - p[j], np.float64(x1[j]) - p[j]
            d2, d3 = np.float64(x2[j]) - p[j], np.float64(x3[j]) - p[j]
            s[j] += (d0 + d1) + (d2 + d3)
            q[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += 4
    for rest in range(r, hi):
        row = x[rest, c0:c1]
        for j in range(c1 - c0):
            d = np.float64(row[j]) - p[j]
            s[j] += d
            q[j] += d * d


@_helper
def _grad_sums_tile(dy, x, mean, lo, hi, c0, c1, sum_dy, sum_dy_xmu):
    """Add ``Σdy``, ``Σdy·(x − mean)`` of rows lo:hi, columns c0:c1 (4 rows a sweep)."""
    m, s, t = mean[c0:c1], sum_dy[c0:c1], sum_dy_xmu[c0:c1]
    r = lo
    while r + 4 <= hi:
        g0, g1, g2, g3 = (
            dy[r, c0:c1],
            dy[r + 1, c0:c1],
            dy[r + 2, c0:c1],
            dy[r + 3, c0:c1],
        )
        x0, x1, x2, x3 = x[r, c0:c1], x[r + 1, c0:c1], x[r + 2, c0:c1], x[r + 3, c0:c1]
        for j in range(c1 - c0):
            a0, a1 = np.float64(g0[j]), np.float64(g1[j])
            a2, a3 = np.float64(g2[j]), np.float64(g3[j])
            s[j] += (a0 + a1) + (a2 + a3)
            t[j] += (
                a0 * (np.float64(x0[j]) - m[j]) + a1 * (np.float64(x1[j]) - m[j])
            ) + (a2 * (np.float64(x2[j]) - m[j]) + a3 * (np.float64(x3[j]) - m[j]))
        r += 4
    for rest in range(r, hi):
        g, src = dy[rest, c0:c1], x[rest, c0:c1]
        for j in range(c1 - c0):
            s[j] += np.float64(g[j])
            t[j] += np.float64(g[j]) * (np.float64(src[j]) - m[j])


@_helper
def _stream(x, lo, hi):
    """Read rows lo:hi once, as a plain sum, so that the next loop finds them in L2.

    The partial-sum loops above store to L1 every few values; measured on a 51 MB
    tensor they then stream DRAM at a third of a plain read's speed, while from L2
    they run at full speed. Reading each block first restores the streaming.
    """
    flat = x[lo:hi].reshape(-1)
    total = np.float32(0.0)
    for i in range(flat.size):
        total += flat[i]
    return total


@_helper
def _reduce_mc_rows(moments, dy, x, v0, lo, hi, s, q):
    """Per-column sums of rows lo:hi into ``s[:W]`` and ``q``, a block at a time.

    ``moments`` true (the launcher's MOMENTS): ``Σd``, ``Σd²`` of ``d = x − v0``;
    false (GRAD_SUMS): ``Σ dy``, ``Σ dy·(x − v0)``. Each block of rows is first
    streamed into L2 (``_stream``, whose sum sinks into ``s[W]``), then added one
    tile of ``_TILE`` columns at a time, so that the float64 partials stay in L1.
    """
    width = x.shape[1]
    block = max(4, _BLOCK_VALUES // width // 4 * 4)
    for r0 in range(lo, hi, block):
        r1 = min(r0 + block, hi)
        if moments:
            s[width] += _stream(x, r0, r1)
        else:
            s[width] += _stream(dy, r0, r1) + _stream(x, r0, r1)
        for c0 in range(0, width, _TILE):
            c1 = min(c0 + _TILE, width)
            if moments:
                _shifted_sums_tile(x, v0, r0, r1, c0, c1, s, q)
            else:
                _grad_sums_tile(dy, x, v0, r0, r1, c0, c1, s, q)


#: Rows from this many columns on no longer fit the 32 KiB L1 data cache with
#: their float64 per-channel vectors. ``_dx_mc_rows`` takes them two at a time:
#: its four vectors alone fill L1 at 1024 columns, and a pair of rows loads each
#: of their values once (measured on rows from L3 and DRAM: 0.73-0.76 x the time
#: at 1024 and 2048 columns; at 256 and 512 columns, where vectors and rows fit
#: in L1, pairs took 1.0-1.2 x). ``normalize`` gets its shift as float32 when
#: exact (see ``_normalize_mc_rows``; under this width the check costs more than
#: it saves).
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
    share a sweep (half the range apart: as fast as adjacent rows at 1024
    columns, and two independent streams); each value is the same expression.
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
