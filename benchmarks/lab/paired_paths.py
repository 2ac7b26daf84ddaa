"""Paired timings of two loop paths in one process.

Each experiment times one operation two or more ways, alternated call by call
so that the machine's noise hits all alike, at 1 and 2 threads. ``eval-mean``
and ``float64-floor`` check the values of each way against the NumPy reference
first, the ``*-in-cache`` experiments check each loop's output once against
NumPy, ``moments-wide`` and ``narrow-size`` time backend calls that the test
suite holds to the reference.

``eval-mean``
    ``forward_eval`` on (4096, 1024) float32, channels last, with ``out=``: the
    running mean of float32 parameters (float32 holds it bit for bit, so the
    wide channels-last loop gets it as float32 beside the float32 shift) against
    the same mean plus 1e-12 (not a float32: the loop gets it as float64).

``float64-floor``
    ``forward_train`` on (4096, 1024) float32, channels last, with ``out=``,
    against the benchmark's floor (a float32 read, then a copy) and a float64
    floor: the same two passes with the float64 arithmetic of our loops, but one
    pivot, mean, scale and shift for the whole tensor, as an NCHW row has them
    (``Σd`` and ``Σd²`` of ``d = float64(x) − p``, then
    ``y = (float64(x) − m)·k + b``). Then each pass three ways: that float64
    loop, our loop launched alone, and our backend call (with its Python). It
    separates what the float64 arithmetic costs from what a channels-last row's
    per-channel work (vectors beside every value, partial sums per column) and
    the calls around the loops cost.

``moments-wide``
    ``batch_moments`` of wide (N, C) float32 tensors, (4096, 1024) to
    (16384, 4096), against a plain float64 read of the same tensor (``Σ
    float64(x)``) as a yardstick for the machine's speed in that moment: run it
    on two commits to compare their moments loops.

``narrow-size``
    ``forward_eval`` (float32 running mean and β: both vectors float32-exact) and
    ``forward_train`` (float32 β) with ``out=`` on (N, 1024) float32 channels
    last, N from 4 to 8192, with ``normalize``'s float32 vectors as the backend
    picks them (only from ``_numba.NARROW_MIN_BYTES`` on) against always
    narrowed (``NARROW_MIN_BYTES = 0``, what every size got before). Calls are
    repeated up to 4096 rows a timing, so small sizes run from the caches.

``normalize-in-cache``
    Our channels-last ``normalize`` row body on 4M values (the (4096, 1024)
    case) streamed (from memory, partly L3), against the same body passing 64
    times over 64 rows that L2 holds, in one launch: there the time is the
    loop's own work. With eval's vectors (float32 mean and shift) and train's
    (float64 mean), packed as the backend packs them. Beside it, both ways: the
    float64 affine with one m, k, b, the folded ``float64(x)·k + (β − μ·k)``
    (not what the backends compute: for comparison), and the floor's copy.

``moments-in-cache``
    The same for the moments pass: our channels-last moments row body (eight
    rows a sweep on these rows) against the float64 moments with one pivot and
    the floor's read, from L3 (``x`` alone stays there between calls) and from
    L2.

Run::

    chrt -f 1 python benchmarks/lab/paired_paths.py eval-mean
    chrt -f 1 python benchmarks/lab/paired_paths.py float64-floor
    chrt -f 1 python benchmarks/lab/paired_paths.py moments-wide
    chrt -f 1 python benchmarks/lab/paired_paths.py narrow-size
    chrt -f 1 python benchmarks/lab/paired_paths.py normalize-in-cache
    chrt -f 1 python benchmarks/lab/paired_paths.py moments-in-cache
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numba
import numpy as np
from numba import prange

import batchnorm
from batchnorm import functional as F
from batchnorm.app.bench import floor as _floor
from batchnorm.kernels import numba as _numba
from batchnorm.kernels.numba import _loops
from batchnorm.kernels.numba._jit import serial_and_parallel
from batchnorm.kernels.numba._loops_channels_last import (
    _normalize_mc_rows,
    _reduce_mc_rows,
)


def paired(calls: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each call, alternated, after two untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(2):
        for call in calls.values():
            call()
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def report(label: str, medians: dict[str, float]) -> None:
    (a, ta), (b, tb) = medians.items()
    print(f"{label}: {a} {ta:.3f} ms, {b} {tb:.3f} ms, ratio {ta / tb:.2f}")


CHANNELS = 1024


def wide_batch() -> tuple[np.random.Generator, np.ndarray, np.ndarray, np.ndarray]:
    """The generator, then (4096, 1024) float32 ``x``, ``gamma`` and ``beta``."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (4096, CHANNELS)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32)
    beta = rng.normal(0.0, 1.0, CHANNELS).astype(np.float32)
    return rng, x, gamma, beta


def eval_mean(args: argparse.Namespace) -> None:
    rng, x, gamma, beta = wide_batch()
    channels = CHANNELS
    running_var = rng.uniform(3.0, 5.0, channels).astype(np.float32)
    running_mean = rng.normal(3.0, 0.1, channels).astype(np.float32)
    means: dict[str, np.ndarray] = {
        "float32 mean": running_mean,
        "float64 mean": running_mean.astype(np.float64) + 1e-12,
    }
    out = np.empty_like(x)

    def call(mean: np.ndarray, backend: str = "numba") -> np.ndarray:
        return F.forward_eval(
            x, gamma, beta, mean, running_var, axis=-1, backend=backend, out=out
        )

    for name, mean in means.items():
        got = call(mean).copy()
        np.testing.assert_array_equal(got, call(mean, "numpy"), err_msg=name)
    for threads in (1, 2):
        batchnorm.set_num_threads(threads)
        calls = {name: partial(call, mean) for name, mean in means.items()}
        report(f"forward_eval, threads {threads}", paired(calls, args.repeats))


@serial_and_parallel(fastmath=True)
def float64_sum(x, num_chunks):
    """``Σ float64(x)`` of a flat array: a read that converts every value."""
    totals = np.zeros(num_chunks)
    for chunk in prange(num_chunks):
        part = x[chunk * x.size // num_chunks : (chunk + 1) * x.size // num_chunks]
        total = 0.0
        for i in range(part.size):
            total += np.float64(part[i])
        totals[chunk] = total
    return totals.sum()


@serial_and_parallel(fastmath=True)
def float64_moments(x, pivot, repeats, num_chunks):
    """``(Σd, Σd²)``, ``d = float64(x) − pivot``, with one pivot for the whole array,
    over ``x`` ``repeats`` times in one launch (no launch between the passes).

    The moments pass's arithmetic (as in ``_shifted_sums_4``), without a pivot
    and two partial sums per channel.
    """
    sums = np.zeros(num_chunks)
    squares = np.zeros(num_chunks)
    for chunk in prange(num_chunks):
        part = x[chunk * x.size // num_chunks : (chunk + 1) * x.size // num_chunks]
        s = 0.0
        q = 0.0
        for _ in range(repeats):
            for i in range(part.size):
                d = np.float64(part[i]) - pivot
                s += d
                q += d * d
        sums[chunk] = s
        squares[chunk] = q
    return sums.sum(), squares.sum()


@serial_and_parallel()
def float64_affine(x, out, m, k, b, repeats, num_chunks):
    """``out = (float64(x) − m)·k + b`` with one m, k, b, ``repeats`` times in one
    launch: the normalize pass's arithmetic, evaluated as the kernels do, without
    per-channel vectors."""
    for chunk in prange(num_chunks):
        lo, hi = chunk * x.size // num_chunks, (chunk + 1) * x.size // num_chunks
        src, dst = x[lo:hi], out[lo:hi]
        for _ in range(repeats):
            for i in range(src.size):
                dst[i] = (np.float64(src[i]) - m) * k + b


def _build(pair: Any, threads: int) -> Any:
    return pair.serial if threads == 1 else pair.parallel


def float64_floor(args: argparse.Namespace) -> None:
    _, x, gamma, beta = wide_batch()
    out = np.empty_like(x)
    flat, flat_out = x.reshape(-1), out.reshape(-1)
    count, mean, m2 = _numba.batch_moments(x, 1)
    scale = gamma / np.sqrt(m2 / count + 1e-6)  # float64, as forward_train's
    shift = beta.astype(np.float64)
    x64 = flat.astype(np.float64)
    sums = float64_moments.parallel(flat, 3.0, 1, 2)
    np.testing.assert_allclose(sums, ((x64 - 3.0).sum(), ((x64 - 3.0) ** 2).sum()))
    float64_affine.serial(flat, flat_out, 3.0, 0.5, 0.25, 1, 1)
    expected = ((x64 - 3.0) * 0.5 + 0.25).astype(np.float32)
    np.testing.assert_array_equal(flat_out, expected)
    # Our two loops as forward_train launches them, without the Python around.
    last = _loops.CHANNELS_LAST
    moments_op, normalize_op = _loops.MOMENTS + last, _loops.NORMALIZE + last
    pivot = x[0].astype(np.float64)
    narrow = x.nbytes >= _numba.NARROW_MIN_BYTES  # as the backend decides
    moments_vectors = _numba._launch_vectors(moments_op, (pivot,), 1, narrow)
    normalize_vectors = _numba._launch_vectors(
        normalize_op, (mean, scale, shift), 1, narrow
    )
    nothing = np.empty((1, 0, 0), x.dtype)

    def floor(n: int) -> None:
        _build(_floor.read, n)(flat, n)
        _build(_floor.copy, n)(flat, flat_out, n)

    def float64_affine_pass(n: int) -> None:
        _build(float64_affine, n)(flat, flat_out, 3.0, 0.5, 0.25, 1, n)

    def float64_passes(n: int) -> None:
        _build(float64_moments, n)(flat, 3.0, 1, n)
        float64_affine_pass(n)

    def ours() -> None:
        F.forward_train(x, gamma, beta, axis=-1, backend="numba", out=out)

    def our_normalize() -> None:
        _numba.normalize(x, 1, mean, scale, shift, x.dtype, out=out)

    def moments_loop(n: int) -> None:
        _build(_loops.launch, n)(
            moments_op, x[None], x[None], nothing, *moments_vectors, n
        )

    def normalize_loop(n: int) -> None:
        _build(_loops.launch, n)(
            normalize_op, x[None], x[None], out[None], *normalize_vectors, n
        )

    for threads in (1, 2):
        batchnorm.set_num_threads(threads)
        numba.set_num_threads(threads)
        n = threads
        t = paired(
            {
                "floor": partial(floor, n),
                "float64 floor": partial(float64_passes, n),
                "ours": ours,
            },
            args.repeats,
        )
        print(
            f"forward_train (4096, 1024), threads {threads}: "
            + ", ".join(f"{name} {ms:.3f} ms" for name, ms in t.items())
            + f"; float64 floor ÷ floor {t['float64 floor'] / t['floor']:.2f}, "
            f"ours ÷ floor {t['ours'] / t['floor']:.2f}, "
            f"ours ÷ float64 floor {t['ours'] / t['float64 floor']:.2f}"
        )
        # Each pass: the float64 loop, our loop alone, our backend call.
        t = paired(
            {
                "float64 moments": partial(_build(float64_moments, n), flat, 3.0, 1, n),
                "moments loop": partial(moments_loop, n),
                "moments call": partial(_numba.batch_moments, x, 1),
                "float64 affine": partial(float64_affine_pass, n),
                "normalize loop": partial(normalize_loop, n),
                "normalize call": our_normalize,
            },
            args.repeats,
        )
        print(
            "  passes: "
            + ", ".join(f"{name} {ms:.3f} ms" for name, ms in t.items())
            + "; loop ÷ float64: moments "
            f"{t['moments loop'] / t['float64 moments']:.2f}, normalize "
            f"{t['normalize loop'] / t['float64 affine']:.2f}"
        )


@serial_and_parallel()
def normalize_rows_again(x, out, v0, v1, v2, v3, repeats, num_chunks):
    """Our channels-last normalize row body (``_normalize_mc_rows``, with the
    launcher's ``v0``-``v3`` as the backend packs them) over the rows of ``x``,
    ``repeats`` times in one launch: no launch between the passes."""
    rows = x.shape[0]
    for chunk in prange(num_chunks):
        lo, hi = chunk * rows // num_chunks, (chunk + 1) * rows // num_chunks
        for _ in range(repeats):
            _normalize_mc_rows(x, out, v0, v1, v2, v3, lo, hi)


@serial_and_parallel()
def folded_rows_again(x, out, scale, offset, repeats, num_chunks):
    """``out = float64(x)·k + c`` per channel (``c = β − μ·k``): the folded
    formula the backends do not use, timed for comparison."""
    rows, width = x.shape
    for chunk in prange(num_chunks):
        lo, hi = chunk * rows // num_chunks, (chunk + 1) * rows // num_chunks
        for _ in range(repeats):
            for r in range(lo, hi):
                src, dst = x[r], out[r]
                for c in range(width):
                    dst[c] = np.float64(src[c]) * scale[c] + offset[c]


@serial_and_parallel()
def copy_again(x, out, repeats, num_chunks):
    """The floor's copy ``repeats`` times in one launch."""
    for chunk in prange(num_chunks):
        lo, hi = chunk * x.size // num_chunks, (chunk + 1) * x.size // num_chunks
        src, dst = x[lo:hi], out[lo:hi]
        for _ in range(repeats):
            for i in range(src.size):
                dst[i] = src[i]


def _check_once(
    calls: Mapping[str, Callable[[], Any]], check: Callable[[str], None]
) -> None:
    for name, call in calls.items():
        call()
        check(name)


def normalize_in_cache(args: argparse.Namespace) -> None:
    """Our normalize loop where memory cannot be what limits it.

    The same 4M values (4096 rows of 1024) either streamed once (from memory,
    partly from L3: ``x`` and ``out`` together fill it) or as the first 64 rows
    (256 KiB of ``x`` and as much of ``out``: half of this machine's 1 MiB L2)
    passed over 64 times in one launch. From L2 the time is the loop's own work:
    the float64 arithmetic with its per-channel vectors, packed as the backend
    packs them for forward_eval (float32 mean and shift) and forward_train
    (float64 mean, float32 shift). Beside it, the float64 affine with one m, k, b,
    the folded formula with vectors, and the floor's copy.
    """
    rng, x, gamma, beta = wide_batch()
    out = np.empty_like(x)
    rows, repeats = 64, x.shape[0] // 64
    small, small_out = (
        np.ascontiguousarray(x[:rows]),
        np.empty((rows, CHANNELS), x.dtype),
    )
    scale = rng.uniform(0.5, 1.5, CHANNELS)
    batch_mean = x.mean(axis=0, dtype=np.float64)
    shift = beta.astype(np.float64)
    op = _loops.NORMALIZE + _loops.CHANNELS_LAST
    means = {
        "eval": batch_mean.astype(np.float32).astype(np.float64),
        "train": batch_mean,
    }
    packed = {
        name: _numba._launch_vectors(op, (m, scale, shift), 1, True)
        for name, m in means.items()
    }
    assert packed["eval"][0].size == 0 and packed["train"][2].size == 0  # narrowed
    offset = shift - batch_mean * scale
    x64 = x.astype(np.float64)
    flat, flat_out = x.reshape(-1), out.reshape(-1)
    small_flat, small_flat_out = small.reshape(-1), small_out.reshape(-1)
    for threads in (1, 2):
        numba.set_num_threads(threads)
        n = threads
        calls: dict[str, Callable[[], Any]] = {}
        expected: dict[str, np.ndarray] = {}
        for where, (a, o, r) in {
            "streamed": (x, out, 1),
            "L2": (small, small_out, repeats),
        }.items():
            a64 = x64[: a.shape[0]]
            for name, v in packed.items():
                calls[f"ours, {name} vectors, {where}"] = partial(
                    _build(normalize_rows_again, n), a, o, *v, r, n
                )
                expected[f"ours, {name} vectors, {where}"] = (
                    (a64 - means[name]) * scale + shift
                ).astype(np.float32)
            calls[f"folded, {where}"] = partial(
                _build(folded_rows_again, n), a, o, scale, offset, r, n
            )
            expected[f"folded, {where}"] = (a64 * scale + offset).astype(np.float32)
            calls[f"float64 affine, {where}"] = partial(
                _build(float64_affine, n),
                a.reshape(-1),
                o.reshape(-1),
                3.0,
                0.5,
                0.25,
                r,
                n,
            )
            expected[f"float64 affine, {where}"] = ((a64 - 3.0) * 0.5 + 0.25).astype(
                np.float32
            )
        calls["copy, streamed"] = partial(_build(copy_again, n), flat, flat_out, 1, n)
        calls["copy, L2"] = partial(
            _build(copy_again, n), small_flat, small_flat_out, repeats, n
        )
        expected["copy, streamed"], expected["copy, L2"] = x, small

        def check(name: str, expected: dict[str, np.ndarray] = expected) -> None:
            got = small_out if name.endswith("L2") else out
            np.testing.assert_array_equal(got, expected[name], err_msg=name)

        _check_once(calls, check)
        t = paired(calls, args.repeats)
        print(f"4M values, {threads} thread(s), ms:")
        base = t["copy, streamed"]
        for name, ms in t.items():
            print(f"  {name:32s} {ms:.3f}  (÷ copy streamed {ms / base:.2f})")


@serial_and_parallel()
def moments_rows_again(x, pivot, sums, squares, repeats, num_chunks):
    """Our channels-last moments row body (``_reduce_mc_rows``) over the rows of
    ``x`` into per-chunk partials, ``repeats`` times in one launch."""
    rows = x.shape[0]
    for chunk in prange(num_chunks):
        lo, hi = chunk * rows // num_chunks, (chunk + 1) * rows // num_chunks
        for _ in range(repeats):
            _reduce_mc_rows(True, x, x, pivot, lo, hi, sums[chunk], squares[chunk])


@serial_and_parallel(fastmath=True)
def read_again(x, repeats, num_chunks):
    """The floor's read (a float32 sum) ``repeats`` times in one launch."""
    total = np.zeros(num_chunks, dtype=x.dtype)
    for chunk in prange(num_chunks):
        xs = x[chunk * x.size // num_chunks : (chunk + 1) * x.size // num_chunks]
        s = total[chunk]
        for _ in range(repeats):
            for i in range(xs.size):
                s += xs[i]
        total[chunk] = s
    return total.sum()


def moments_in_cache(args: argparse.Namespace) -> None:
    """Our moments loop where memory cannot be what limits it.

    As ``normalize_in_cache``: the 4M values of (4096, 1024) read once (``x``
    alone, 16 MiB, stays in the 32 MiB L3 between calls: read at L3 speed), or
    the first 64 rows (256 KiB) read 64 times in one launch, by our
    channels-last moments row body (eight rows a sweep, a pivot and two float64
    partial sums per column), by the float64 moments with one pivot, and by the
    floor's read.
    """
    _, x, _, _ = wide_batch()
    rows, repeats = 64, x.shape[0] // 64
    small = np.ascontiguousarray(x[:rows])
    pivot = x[0].astype(np.float64)
    sums, squares = np.zeros((1, CHANNELS)), np.zeros((1, CHANNELS))
    moments_rows_again.serial(x, pivot, sums, squares, 1, 1)
    d = x.astype(np.float64) - pivot
    np.testing.assert_allclose(sums[0], d.sum(axis=0), rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(squares[0], (d * d).sum(axis=0), rtol=1e-12)
    e = x.reshape(-1).astype(np.float64) - 3.0
    got = float64_moments.parallel(x.reshape(-1), 3.0, 1, 2)
    np.testing.assert_allclose(got, (e.sum(), (e * e).sum()), rtol=1e-12)
    twice = 2 * d[:rows].sum(axis=0)
    for threads in (1, 2):
        sums = np.zeros((threads, CHANNELS))
        squares = np.zeros((threads, CHANNELS))
        moments_rows_again.parallel(small, pivot, sums, squares, 2, threads)
        np.testing.assert_allclose(sums.sum(axis=0), twice, atol=1e-6)
        numba.set_num_threads(threads)
        n = threads
        calls = {}
        for where, (a, r) in {"L3": (x, 1), "L2": (small, repeats)}.items():
            calls[f"ours, {where}"] = partial(
                _build(moments_rows_again, n), a, pivot, sums, squares, r, n
            )
            calls[f"float64 moments, {where}"] = partial(
                _build(float64_moments, n), a.reshape(-1), 3.0, r, n
            )
            calls[f"read, {where}"] = partial(
                _build(read_again, n), a.reshape(-1), r, n
            )
        t = paired(calls, args.repeats)
        print(f"4M values, {threads} thread(s), ms:")
        base = t["read, L3"]
        for name, ms in t.items():
            print(f"  {name:32s} {ms:.3f}  (÷ read from L3 {ms / base:.2f})")


SHAPES = ((4096, 1024), (12544, 1024), (2048, 2048), (16384, 4096))


def moments_wide(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        x = rng.normal(3.0, 2.0, shape).astype(np.float32)
        flat = x.reshape(-1)
        line = []
        for threads in (1, 2):
            batchnorm.set_num_threads(threads)
            numba.set_num_threads(threads)
            t = paired(
                {
                    "float64 sum": partial(_build(float64_sum, threads), flat, threads),
                    "moments": partial(_numba.batch_moments, x, 1),
                },
                args.repeats,
            )
            ratio = t["moments"] / t["float64 sum"]
            line.append(f"{threads} thread(s) {t['moments']:.3f} ms, ÷ sum {ratio:.2f}")
        print(f"batch_moments {shape}: " + "; ".join(line))


def narrow_size(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    default = _numba.NARROW_MIN_BYTES
    print(f"NARROW_MIN_BYTES = {default} ({default / 2**20:.0f} MiB)")

    def with_threshold(threshold: int, call: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> None:
            _numba.NARROW_MIN_BYTES = threshold
            call()

        return run

    for threads in (1, 2):
        batchnorm.set_num_threads(threads)
        for rows in (4, 64, 256, 1024, 2048, 4096, 8192):
            x = rng.normal(3.0, 2.0, (rows, CHANNELS)).astype(np.float32)
            out = np.empty_like(x)
            gamma = rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32)
            beta = rng.normal(0.0, 1.0, CHANNELS).astype(np.float32)
            mean = rng.normal(3.0, 0.1, CHANNELS).astype(np.float32)
            var = rng.uniform(3.0, 5.0, CHANNELS).astype(np.float32)
            reps = max(1, 4096 // rows)
            ops = {
                "forward_eval": partial(
                    F.forward_eval, x, gamma, beta, mean, var, out=out
                ),
                "forward_train": partial(F.forward_train, x, gamma, beta, out=out),
            }
            line = []
            for name, op in ops.items():

                def repeated(op: Callable[[], Any] = op, reps: int = reps) -> None:
                    for _ in range(reps):
                        op()

                t = paired(
                    {
                        "by size": with_threshold(default, repeated),
                        "always": with_threshold(0, repeated),
                    },
                    args.repeats,
                )
                per_call = {k: v / reps for k, v in t.items()}
                line.append(
                    f"{name} {per_call['by size']:.4f} / {per_call['always']:.4f} ms "
                    f"({t['by size'] / t['always']:.2f})"
                )
            print(
                f"({rows}, {CHANNELS}) x{reps}, {threads} thread(s): " + "; ".join(line)
            )
    _numba.NARROW_MIN_BYTES = default


EXPERIMENTS: dict[str, Callable[[argparse.Namespace], None]] = {
    "eval-mean": eval_mean,
    "float64-floor": float64_floor,
    "moments-wide": moments_wide,
    "narrow-size": narrow_size,
    "normalize-in-cache": normalize_in_cache,
    "moments-in-cache": moments_in_cache,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=list(EXPERIMENTS))
    parser.add_argument("--repeats", type=int, default=100, help="timed calls each")
    args = parser.parse_args()
    EXPERIMENTS[args.experiment](args)


if __name__ == "__main__":
    main()
