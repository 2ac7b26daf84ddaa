"""Paired timings of two loop paths in one process.

Each experiment times one operation two ways, alternated call by call so that
the machine's noise hits both alike, at 1 and 2 threads; the values of each way
are checked against the NumPy reference first.

``eval-mean``
    ``forward_eval`` on (4096, 1024) float32, channels last, with ``out=``: the
    running mean of float32 parameters (float32 holds it bit for bit, so the
    wide channels-last loop gets it as float32 beside the float32 shift) against
    the same mean plus 1e-12 (not a float32: the loop gets it as float64).

Run::

    chrt -f 1 python benchmarks/paired_paths.py eval-mean
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import batchnorm
from batchnorm import functional as F


def paired(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
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


def eval_mean(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    channels = 1024
    x = rng.normal(3.0, 2.0, (4096, channels)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    beta = rng.normal(0.0, 1.0, channels).astype(np.float32)
    running_var = rng.uniform(3.0, 5.0, channels).astype(np.float32)
    running_mean = rng.normal(3.0, 0.1, channels).astype(np.float32)
    means = {
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
        calls = {name: (lambda m=mean: call(m)) for name, mean in means.items()}
        report(f"forward_eval, threads {threads}", paired(calls, args.repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["eval-mean"])
    parser.add_argument("--repeats", type=int, default=100, help="timed calls each")
    args = parser.parse_args()
    {"eval-mean": eval_mean}[args.experiment](args)


if __name__ == "__main__":
    main()
