"""Eval-mode normalize on wide channels-last rows: a float32 mean against float64.

``forward_eval`` on (4096, 1024) float32, channels last, with ``out=``: the
running mean of float32 parameters (float32 holds it bit for bit, so the loop
gets it as float32 beside the float32 shift) against the same mean plus 1e-12
(not a float32: the loop gets it as float64). Both run in one process,
alternated call by call, so the machine's noise hits both alike; the outputs
are checked to be what the reference computes for each mean.

Run::

    chrt -f 1 python benchmarks/eval_mean_ab.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import batchnorm
from batchnorm import functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="timed calls each")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (4096, 1024)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, 1024).astype(np.float32)
    beta = rng.normal(0.0, 1.0, 1024).astype(np.float32)
    running_var = rng.uniform(3.0, 5.0, 1024).astype(np.float32)
    running_mean = rng.normal(3.0, 0.1, 1024).astype(np.float32)
    means: dict[str, np.ndarray] = {
        "float32 mean": running_mean,
        "float64 mean": running_mean.astype(np.float64) + 1e-12,
    }
    out = np.empty_like(x)

    def call(mean: np.ndarray, backend: str = "numba") -> np.ndarray:
        return F.forward_eval(
            x, gamma, beta, mean, running_var, axis=-1, backend=backend, out=out
        ).copy()

    for name, mean in means.items():
        np.testing.assert_array_equal(call(mean), call(mean, "numpy"), err_msg=name)
    for threads in (1, 2):
        batchnorm.set_num_threads(threads)
        times: dict[str, list[float]] = {name: [] for name in means}
        for _ in range(3):
            for mean in means.values():
                call(mean)
        for _ in range(args.calls):
            for name, mean in means.items():
                start = time.perf_counter()
                F.forward_eval(
                    x, gamma, beta, mean, running_var, axis=-1, backend="numba", out=out
                )
                times[name].append(time.perf_counter() - start)
        a, b = (np.median(times[name]) * 1e3 for name in means)
        print(
            f"threads {threads}: float32 mean {a:.3f} ms, float64 mean {b:.3f} ms, "
            f"ratio {a / b:.2f}"
        )
    batchnorm.set_num_threads(None)


if __name__ == "__main__":
    main()
