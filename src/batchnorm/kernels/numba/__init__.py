"""Fast kernels in Numba: the reference's operations, fused and parallel.

Same functions and arguments as :mod:`batchnorm.kernels.reference` and the same
results to float64 rounding (the tests hold them equal). What is covered:

- float32 and float64 ``x`` (and ``dy`` of the same dtype) that is C-contiguous,
  with the channel axis anywhere: ``x`` is viewed without a copy as (A, C, S)
  (NCHW is ``(N, C, H·W)``) or, when nothing follows the channel axis, as
  channels-last ``(M, C)``. The loops are in
  :mod:`batchnorm.kernels.numba._loops` and
  :mod:`batchnorm.kernels.numba._loops_channels_last`.
- Everything else (float16, bfloat16, strided or Fortran-ordered views, an ``out``
  of another dtype, empty arrays) is computed by the NumPy reference: slower,
  never a different answer.

Threads (:mod:`batchnorm.kernels.numba._threads`, re-exported here):
:func:`set_num_threads`, else ``$BATCHNORM_NUM_THREADS``, else Numba's
``NUMBA_NUM_THREADS`` (the number of cores). Tensors under ``PARALLEL_MIN_SIZE``
values run on one thread, where a parallel launch costs more than it saves, and
so does a ``fork()``-ed child of a process whose GNU OpenMP threads had started
(OpenMP would terminate it); a child forked while another thread compiled
computes with the reference (:mod:`batchnorm.kernels._fork`).

Compilation is lazy (on the first call per dtype and layout) and cached on disk
with ``cache=True``. Numba picks the cache directory: ``$NUMBA_CACHE_DIR`` when set,
else the ``__pycache__`` next to this file, else, when site-packages is read-only,
the user-wide ``~/.cache/numba``; with none writable, kernels compile in each
process instead of failing. A cache that cannot be read or written (corrupt
files, a full disk) costs a compilation, never a call: one :class:`CacheWarning`
per process, and a broken entry is replaced by the code compiled instead.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from batchnorm import _memory
from batchnorm.kernels import _fork, reference
from batchnorm.kernels.numba import _loops
from batchnorm.kernels.numba._jit import CacheWarning, serial_and_parallel
from batchnorm.kernels.numba._loops_channels_last import WIDE_ROW
from batchnorm.kernels.numba._threads import (
    PARALLEL_MIN_SIZE,
    _chunks,
    get_num_threads,
    max_threads,
    set_num_threads,
)

__all__ = [
    "PARALLEL_MIN_SIZE",
    "CacheWarning",
    "backward_apply",
    "backward_eval",
    "backward_train",
    "batch_moments",
    "forward_train",
    "get_num_threads",
    "grad_sums",
    "max_threads",
    "normalize",
    "serial_and_parallel",
    "set_num_threads",
]

#: Channels-last rows shorter than this are folded together (see ``_folds``).
_FOLD_WIDTH = 512
_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _pick(pair: _loops.KernelPair, num_chunks: int) -> Any:
    return pair.serial if num_chunks == 1 else pair.parallel


def _fast_view(x: np.ndarray, axis: int) -> np.ndarray | None:
    """``x`` as (A, C, S) without a copy when the loops cover it, else None.

    None for every ``x`` in a forked child that must not touch Numba (see
    :mod:`batchnorm.kernels._fork`): every operation then runs the reference.
    """
    if x.dtype not in _FAST_DTYPES or not x.flags.c_contiguous or x.size == 0:
        return None
    if _fork.numba_unusable:
        return None
    outer = math.prod(x.shape[:axis])
    return x.reshape(outer, x.shape[axis], x.size // (outer * x.shape[axis]))


def _pair_views(
    dy: np.ndarray, x: np.ndarray, axis: int
) -> tuple[np.ndarray, np.ndarray] | None:
    x3 = _fast_view(x, axis)
    if x3 is None or dy.dtype != x.dtype or not dy.flags.c_contiguous:
        return None
    return dy.reshape(x3.shape), x3


def _vec(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float64)


def _in_place(out: np.ndarray | None, dtype: np.dtype) -> bool:
    """Whether the loops can write into ``out`` itself (else a temporary)."""
    return out is not None and out.flags.c_contiguous and out.dtype == dtype


def _target(x3: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """Where the loops write: ``out`` itself when it is C-contiguous and of x's dtype.

    Otherwise a new array from :mod:`batchnorm._memory`, which reuses the blocks of
    large outputs the caller has let go of (no page faults on every call).
    """
    if out is not None and _in_place(out, x3.dtype):
        return out.reshape(x3.shape)
    return _memory.empty(x3.shape, x3.dtype)


def _result(
    written: np.ndarray, shape: tuple[int, ...], out: np.ndarray | None
) -> np.ndarray:
    if out is None:
        return written.reshape(shape)
    if not _in_place(out, written.dtype):  # the loops wrote a temporary (_target)
        out[...] = written.reshape(shape)
    return out


def _folds(rows: int, channels: int, size: int) -> tuple[int, int]:
    """``(k, main)``: rows ``:main`` of an (M, C) array run as (main/k, k·C).

    Short channels-last rows (C = 64 is 256 bytes) cost a loop start each; ``k``
    consecutive rows side by side form rows of ``_FOLD_WIDTH`` or more values,
    with the per-channel vectors tiled ``k`` times. Small tensors are not folded.
    """
    if size < PARALLEL_MIN_SIZE or channels >= _FOLD_WIDTH:
        return 1, rows
    k = min(rows, _FOLD_WIDTH // channels)
    return k, rows - rows % k


_NONE = np.empty(0)  # a per-channel vector that an operation does not use


def _run_ncs(
    op: int,
    n: int,
    x3: np.ndarray,
    dy: np.ndarray | None = None,
    out: np.ndarray | None = None,
    *vectors: np.ndarray,
) -> Any:
    """``_loops.launch`` on (A, C, S) views: the arrays ``op`` uses, up to 4 vectors.

    Unused arrays are stand-ins of the right type (``x`` for ``dy``, an empty
    array for ``out``), so that every operation shares one compiled build.
    """
    return _pick(_loops.launch, n)(
        op,
        x3,
        x3 if dy is None else dy,
        np.empty((0, 0, 0), x3.dtype) if out is None else out,
        *vectors,
        *(_NONE,) * (4 - len(vectors)),
        n,
    )


def _exact_float32(values: np.ndarray) -> np.ndarray | None:
    """``values`` as float32 when float32 holds every value bit for bit, else None.

    Bit for bit: NaN payloads too (a float32 NaN widens to another payload).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        narrow = values.astype(np.float32)
    wide = narrow.astype(np.float64)
    same = np.array_equal(wide.view(np.uint64), values.view(np.uint64))
    return narrow if same else None


def _last_level_cache_bytes(
    caches: Path = Path("/sys/devices/system/cpu/cpu0/cache"),
) -> int:
    """The largest CPU cache of this machine (Linux sysfs), else 32 MiB.

    Runs at import: an entry it cannot read or parse is skipped, never raised.
    """
    sizes = []
    for path in caches.glob("index*/size"):
        try:
            text = path.read_text().strip()
            unit = {"K": 10, "M": 20}[text[-1]]
            sizes.append(int(text[:-1]) << unit)
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return max(sizes, default=32 << 20)


#: Channels-last ``normalize`` narrows its exact float32 vectors (see
#: ``_launch_vectors``) only on an ``x`` of this many bytes or more: with ``out``,
#: half the last-level cache or more, which other cores and programs share, so
#: the rows come at least partly from memory from call to call. There the smaller
#: vectors leave more of L1 to the rows; on data the caches hold, the loop is
#: bound by its arithmetic, and converting the float32 vectors (and checking that
#: they are exact) costs more than it saves. Measurements: docs/KERNELS.md.
NARROW_MIN_BYTES = _last_level_cache_bytes() // 4


def _launch_vectors(
    op: int, vectors: tuple[np.ndarray, ...], k: int, narrow: bool
) -> tuple:
    """The launcher's ``v0``-``v3`` for channels-last ``op`` on rows folded ``k`` times.

    Each vector tiled ``k`` times, empty arrays for the unused ones. With
    ``narrow`` (a large ``x``: see ``NARROW_MIN_BYTES``), on rows of ``WIDE_ROW``
    values or more, ``NORMALIZE`` takes its shift as float32 when
    float32 holds every value bit for bit, as it does β of float32 parameters:
    its bytes go in ``v3`` and ``v2`` is empty. When the mean is exact in float32
    too (the running mean of float32 parameters, in eval mode), ``v3`` holds the
    mean's float32 values and then the shift's, and ``v0`` is empty. The same
    values, and 4 KiB less per 1024 channels in L1 for each vector so narrowed
    (see ``_normalize_mc_rows``).
    """
    tiled = [np.tile(v, k) if k > 1 and v.size else v for v in vectors]
    normalize = op == _loops.NORMALIZE + _loops.CHANNELS_LAST
    if narrow and normalize and tiled[2].size >= WIDE_ROW:
        shift = _exact_float32(tiled[2])
        if shift is not None:
            mean = _exact_float32(tiled[0])
            values = shift if mean is None else np.concatenate((mean, shift))
            if values.size % 2:
                values = np.append(values, np.float32(0.0))
            tiled[2:] = [_NONE, values.view(np.float64)]
            if mean is not None:
                tiled[0] = _NONE
    return (*tiled, *(_NONE,) * (4 - len(tiled)))


def _channels_last(
    op: int,
    n: int,
    x: np.ndarray,
    dy: np.ndarray | None,
    out: np.ndarray | None,
    vectors: tuple[np.ndarray, ...],
) -> Any:
    """``_loops.launch`` on (M, C) arrays; reductions come back per channel.

    Short rows are folded (see ``_folds``): the loop sees (M/k, k·C) arrays and
    per-channel vectors tiled ``k`` times, and per-column sums are added back per
    channel; the rows that do not fill a fold run on one thread.
    """
    rows, channels = x.shape
    dy = x if dy is None else dy
    out = np.empty((0, 0), x.dtype) if out is None else out
    op += _loops.CHANNELS_LAST
    narrow = x.nbytes >= NARROW_MIN_BYTES
    k, main = _folds(rows, channels, x.size)
    if k == 1:
        arrays = (x[None], dy[None], out[None])
        padded = _launch_vectors(op, vectors, 1, narrow)
        return _pick(_loops.launch, n)(op, *arrays, *padded, n)
    folded = [
        a[:main].reshape(1, main // k, k * channels) if a.size else a[None]
        for a in (x, dy, out)
    ]
    tiled = _launch_vectors(op, vectors, k, narrow)
    result = _pick(_loops.launch, n)(op, *folded, *tiled, n)
    reduce = op - _loops.CHANNELS_LAST in (_loops.MOMENTS, _loops.GRAD_SUMS)
    if reduce:
        result = [r.reshape(k, channels).sum(axis=0) for r in result]
    if main < rows:
        rest = [a[None, main:] if a.size else a[None] for a in (x, dy, out)]
        padded = _launch_vectors(op, vectors, 1, narrow)
        extra = _loops.launch.serial(op, *rest, *padded, 1)
        if reduce:
            result = [r + e for r, e in zip(result, extra, strict=True)]
    return result


def _run(
    op: int,
    n: int,
    x3: np.ndarray,
    dy3: np.ndarray | None,
    out3: np.ndarray | None,
    *vectors: np.ndarray,
) -> Any:
    """Operation ``op`` on (A, C, S) views: as channels-last (M, C) when S is 1."""
    if x3.shape[2] != 1:
        return _run_ncs(op, n, x3, dy3, out3, *vectors)
    shape2 = x3.shape[:2]
    dy2, out2 = (None if a is None else a.reshape(shape2) for a in (dy3, out3))
    return _channels_last(op, n, x3.reshape(shape2), dy2, out2, vectors)


def batch_moments(x: np.ndarray, axis: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Shifted one-pass ``(count, mean, M2)`` per channel, float64 partials."""
    x3 = _fast_view(x, axis)
    if x3 is None:
        return reference.batch_moments(x, axis)
    outer, _, inner = x3.shape
    n = _chunks(x.size)
    if inner == 1:
        x2 = x3.reshape(x3.shape[:2])
        pivot = x2[0].astype(np.float64)
        sums, squares = _channels_last(_loops.MOMENTS, n, x2, None, None, (pivot,))
        mean, m2 = _loops.finish_moments(pivot, sums, squares, outer)
    else:
        mean, m2 = _run_ncs(_loops.MOMENTS, n, x3)
    if not _loops.all_finite(mean, m2):
        mean, m2 = reference.rescue_overflow(x, axis, mean, m2)
    return outer * inner, mean, m2


def normalize(
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray | None,
    out_dtype: np.dtype,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``y = (x − mean) · scale + shift`` per channel in one pass (mean first)."""
    x3 = _fast_view(x, axis)
    if x3 is None or np.dtype(out_dtype) != x.dtype:
        return reference.normalize(x, axis, mean, scale, shift, out_dtype, out=out)
    shift = np.zeros(x3.shape[1]) if shift is None else shift
    y3 = _target(x3, out)
    n = _chunks(x.size)
    _run(_loops.NORMALIZE, n, x3, None, y3, _vec(mean), _vec(scale), _vec(shift))
    return _result(y3, x.shape, out)


def forward_train(
    x: np.ndarray,
    axis: int,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    eps_placement: str,
    ddof: int,
    out: np.ndarray | None = None,
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """``(count, mean, M2, inv_std, y)`` in one compiled call for a small tensor.

    Covers what runs on one thread anyway (under ``PARALLEL_MIN_SIZE`` values)
    with something after the channel axis (NCHW); returns None for everything
    else, and for statistics that are not finite, and the caller composes
    :func:`batch_moments` and :func:`normalize`.
    The values are those of that composition (``_loops.train_ncs``).
    """
    if x.size >= PARALLEL_MIN_SIZE or axis == x.ndim - 1:
        return None
    x3 = _fast_view(x, axis)
    if x3 is None or x3.shape[2] == 1:
        return None
    channels = x3.shape[1]
    gamma = np.ones(channels) if gamma is None else _vec(gamma)
    beta = np.zeros(channels) if beta is None else _vec(beta)
    y3 = _target(x3, out)
    stats = np.empty((3, channels))
    inside = eps_placement == "inside"
    if not _loops.train_ncs(x3, gamma, beta, float(eps), inside, ddof, y3, stats):
        return None  # statistics that overflowed: batch_moments redoes them
    mean, m2, inv_std = stats
    return x3.shape[0] * x3.shape[2], mean, m2, inv_std, _result(y3, x.shape, out)


def _grad_sums(
    dy3: np.ndarray, x3: np.ndarray, mean: Any, inv_std: Any, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(Σ dy·x̂, Σ dy)`` of the views: ``inv_std·Σ dy·(x − mean)`` in one pass.

    ``Σ dy·(x − mean)`` overflows where the reference's ``Σ dy·x̂`` need not (x
    about 1e307 with a running variance that scales it down): a result that is
    not finite is the reference's instead.
    """
    dbeta, sum_dy_xmu = _run(_loops.GRAD_SUMS, n, x3, dy3, None, _vec(mean))
    if not _loops.all_finite(sum_dy_xmu, dbeta):
        return reference.grad_sums(dy3, x3, 1, mean, inv_std)
    return sum_dy_xmu * _vec(inv_std), dbeta


@reference.quiet_nonfinite
def _apply(
    dy3: np.ndarray,
    x3: np.ndarray,
    shape: tuple[int, ...],
    mean: Any,
    inv_std: Any,
    gamma: np.ndarray | None,
    k: np.ndarray,
    count: int,
    dgamma: np.ndarray,
    dbeta: np.ndarray,
    out: np.ndarray | None,
    n: int,
) -> np.ndarray:
    """``dx`` of the views from the sums, in one pass, shaped ``shape``."""
    inv_std = _vec(inv_std)
    gain = reference.channel_gain(inv_std, gamma)
    dx3 = _target(x3, out)
    slope = _vec(inv_std * (k * dgamma))
    _run(_loops.DX, n, x3, dy3, dx3, _vec(mean), slope, _vec(dbeta / count), gain)
    return _result(dx3, shape, out)


def grad_sums(
    dy: np.ndarray, x: np.ndarray, axis: int, mean: np.ndarray, inv_std: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(Σ dy·x̂, Σ dy)`` per channel in one pass: ``inv_std·Σ dy·(x − mean)``."""
    views = _pair_views(dy, x, axis)
    if views is None:
        return reference.grad_sums(dy, x, axis, mean, inv_std)
    return _grad_sums(*views, mean, inv_std, _chunks(x.size))


def backward_apply(
    dy: np.ndarray,
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    gamma: np.ndarray | None,
    k: np.ndarray,
    count: int,
    dgamma: np.ndarray,
    dbeta: np.ndarray,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``dx`` of the training gradient from given sums, in one pass.

    As the reference's: the sums and ``count`` may cover more data than ``x``.
    """
    views = _pair_views(dy, x, axis)
    if views is None:
        return reference.backward_apply(
            dy, x, axis, mean, inv_std, gamma, k, count, dgamma, dbeta, out=out
        )
    dy3, x3 = views
    n = _chunks(x.size)
    return _apply(
        dy3, x3, x.shape, mean, inv_std, gamma, k, count, dgamma, dbeta, out, n
    )


def backward_train(
    dy: np.ndarray,
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    gamma: np.ndarray | None,
    k: np.ndarray,
    count: int,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact training-mode gradient: one reduction pass, then one pass for ``dx``."""
    views = _pair_views(dy, x, axis)
    if views is None:
        return reference.backward_train(
            dy, x, axis, mean, inv_std, gamma, k, count, out=out
        )
    dy3, x3 = views
    n = _chunks(x.size)
    dgamma, dbeta = _grad_sums(dy3, x3, mean, inv_std, n)
    dx = _apply(dy3, x3, x.shape, mean, inv_std, gamma, k, count, dgamma, dbeta, out, n)
    return dx, dgamma, dbeta


@reference.quiet_nonfinite
def backward_eval(
    dy: np.ndarray,
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    gamma: np.ndarray | None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eval-mode gradient: one reduction pass, then ``dx = dy · γ · inv_std``."""
    views = _pair_views(dy, x, axis)
    if views is None:
        return reference.backward_eval(dy, x, axis, mean, inv_std, gamma, out=out)
    dgamma, dbeta = _grad_sums(*views, mean, inv_std, _chunks(x.size))
    gain = reference.channel_gain(_vec(inv_std), gamma)
    zeros = np.zeros(x.shape[axis])
    dx = normalize(dy, axis, zeros, gain, None, x.dtype, out=out)
    return dx, dgamma, dbeta
