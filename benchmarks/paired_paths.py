"""Paired timings of two loop paths in one process.

Each experiment times one operation two ways, alternated call by call so that
the machine's noise hits both alike, at 1 and 2 threads; the values of each way
are checked against the NumPy reference first.

``eval-mean``
    ``forward_eval`` on (4096, 1024) float32, channels last, with ``out=``: the
    running mean of float32 parameters (float32 holds it bit for bit, so the
    wide channels-last loop gets it as float32 beside the float32 shift) against
    the same mean plus 1e-12 (not a float32: the loop gets it as float64).

``float64-floor``
    ``forward_train`` on (4096, 1024) float32, channels last, with ``out=``,
    against the benchmark's floor (a float32 read, then a copy) and a float64
    floor: the same two passes with the arithmetic the accuracy rule asks for,
    but with one mean, scale and shift for the whole tensor, as an NCHW row gets
    them (``Σ float64(x)``, then ``y = (float64(x) − m)·k + b``). It separates
    the cost of the float64 arithmetic from that of the per-channel vectors that
    a channels-last row needs beside every value.

Run::

    chrt -f 1 python benchmarks/paired_paths.py eval-mean
    chrt -f 1 python benchmarks/paired_paths.py float64-floor
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
from batchnorm.kernels import _floor, _numba


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


@numba.njit(parallel=True, fastmath={"reassoc", "contract"})
def float64_read(x: np.ndarray, num_chunks: int) -> float:
    """``Σ float64(x)`` of a flat array in ``num_chunks`` ranges (the floor's read)."""
    totals = np.zeros(num_chunks)
    for chunk in prange(num_chunks):
        part = x[chunk * x.size // num_chunks : (chunk + 1) * x.size // num_chunks]
        total = 0.0
        for i in range(part.size):
            total += np.float64(part[i])
        totals[chunk] = total
    return totals.sum()


@numba.njit(parallel=True, error_model="numpy")
def float64_affine(
    x: np.ndarray, out: np.ndarray, m: float, k: float, b: float, num_chunks: int
) -> None:
    """``out = (float64(x) − m)·k + b`` with one m, k, b (the floor's copy)."""
    for chunk in prange(num_chunks):
        lo, hi = chunk * x.size // num_chunks, (chunk + 1) * x.size // num_chunks
        src, dst = x[lo:hi], out[lo:hi]
        for i in range(src.size):
            dst[i] = (np.float64(src[i]) - m) * k + b


def float64_floor(args: argparse.Namespace) -> None:
    _, x, gamma, beta = wide_batch()
    out = np.empty_like(x)
    flat, flat_out = x.reshape(-1), out.reshape(-1)
    count, mean, m2 = _numba.batch_moments(x, 1)
    scale = gamma / np.sqrt(m2 / count + 1e-6)  # float64, as forward_train's
    shift = beta.astype(np.float64)
    total = np.sum(flat, dtype=np.float64)
    assert np.isclose(float64_read(flat, 2), total, rtol=1e-12, atol=0.0)
    expected = (np.float64(flat[:5]) - 3.0) * 0.5 + 0.25
    float64_affine(flat, flat_out, 3.0, 0.5, 0.25, 2)
    np.testing.assert_array_equal(flat_out[:5], expected.astype(np.float32))

    def floor(n: int) -> None:
        build = "serial" if n == 1 else "parallel"
        getattr(_floor.read, build)(flat, n)
        getattr(_floor.copy, build)(flat, flat_out, n)

    def float64_pass(n: int) -> None:
        float64_affine(flat, flat_out, 3.0, 0.5, 0.25, n)

    def float64_passes(n: int) -> None:
        float64_read(flat, n)
        float64_pass(n)

    def ours() -> None:
        F.forward_train(x, gamma, beta, axis=-1, backend="numba", out=out)

    def our_normalize() -> None:
        _numba.normalize(x, 1, mean, scale, shift, x.dtype, out=out)

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
        # The two passes one by one: each float64 pass against our loop for it.
        t = paired(
            {
                "float64 read": partial(float64_read, flat, n),
                "our moments": partial(_numba.batch_moments, x, 1),
                "float64 affine": partial(float64_pass, n),
                "our normalize": our_normalize,
            },
            args.repeats,
        )
        print(
            "  passes: "
            + ", ".join(f"{name} {ms:.3f} ms" for name, ms in t.items())
            + f"; moments ÷ float64 read {t['our moments'] / t['float64 read']:.2f}, "
            f"normalize ÷ float64 affine "
            f"{t['our normalize'] / t['float64 affine']:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["eval-mean", "float64-floor"])
    parser.add_argument("--repeats", type=int, default=100, help="timed calls each")
    args = parser.parse_args()
    experiments = {"eval-mean": eval_mean, "float64-floor": float64_floor}
    experiments[args.experiment](args)


if __name__ == "__main__":
    main()
