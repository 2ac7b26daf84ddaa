"""Where the time of each Numba loop goes: memory or arithmetic (one thread).

For every loop of :mod:`batchnorm.kernels.numba._loops` and every floor stream, time
(1) one pass over the benchmark's tensor (51 MB: DRAM) and (2) the same loop on a
512 KiB slice that stays in L2, scaled to the tensor's size: the time the
arithmetic alone would take. A loop whose in-cache time is close to its full time
is compute-bound; one whose full time is close to the floor's is memory-bound.

Run::

    python benchmarks/lab/kernel_profile.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from paired_paths import float64_sum  # run as a script: lab/ is on the path

from batchnorm.app.bench import floor as _floor
from batchnorm.kernels.numba import _loops


def median_ms(call: Callable[[], Any], repeats: int = 15) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def vectors(channels: int) -> list[np.ndarray]:
    """Four distinct per-channel float64 vectors, as the backend passes them.

    Not one array passed four times: at C = 1024 three distinct vectors are 24 KiB
    that compete with the rows for the 32 KiB L1, one array is 8 KiB, and
    the channels-last ``normalize`` on (4096, 1024) measured 2.2 ms against 1.2 ms.
    """
    rng = np.random.default_rng(1)
    return [rng.uniform(0.5, 1.5, channels) for _ in range(4)]


def loops_for(x: np.ndarray, layout: str) -> dict[str, Callable[[], Any]]:
    """One serial call per loop on ``x`` (NCHW 4-D, or channels-last 2-D (M, W))."""
    dy = np.ones_like(x)
    out = np.empty_like(x)
    flat, dy_flat, out_flat = x.reshape(-1), dy.reshape(-1), out.reshape(-1)
    calls: dict[str, Callable[[], Any]] = {
        "floor read": lambda: _floor.read.serial(flat, 1),
        "floor copy": lambda: _floor.copy.serial(flat, out_flat, 1),
        "floor read2": lambda: _floor.read2.serial(flat, dy_flat, 1),
        "floor add": lambda: _floor.add.serial(flat, dy_flat, out_flat, 1),
        # Σ float64(x): a read that converts every value, as the float64 loops must
        "float64 sum": lambda: float64_sum.serial(flat, 1),
    }
    none = [np.empty(0)] * 4  # vectors an operation does not use

    def ncs(op: int, *arrays: Any) -> Any:
        return _loops.launch.serial(op, *arrays, 1)

    def mc(op: int, *arrays: Any) -> Any:  # channels-last (M, W): as (1, M, W)
        wide = [a[None] if a.ndim == 2 else a for a in arrays]
        return _loops.launch.serial(op + _loops.CHANNELS_LAST, *wide, 1)

    if layout == "nchw":
        x3, dy3, out3 = (a.reshape(a.shape[0], a.shape[1], -1) for a in (x, dy, out))
        c = vectors(x3.shape[1])
        calls |= {
            "moments": lambda: ncs(_loops.MOMENTS, x3, x3, out3, *none),
            "normalize": lambda: ncs(_loops.NORMALIZE, x3, x3, out3, *c[:3], none[0]),
            "grad sums": lambda: ncs(_loops.GRAD_SUMS, x3, dy3, out3, c[0], *none[1:]),
            "dx": lambda: ncs(_loops.DX, x3, dy3, out3, *c),
        }
    else:
        w = vectors(x.shape[1])
        calls |= {
            "moments": lambda: mc(_loops.MOMENTS, x, x, out, w[0], *none[1:]),
            "normalize": lambda: mc(_loops.NORMALIZE, x, x, out, *w[:3], none[0]),
            "grad sums": lambda: mc(_loops.GRAD_SUMS, x, dy, out, w[0], *none[1:]),
            "dx": lambda: mc(_loops.DX, x, dy, out, *w),
        }
    return calls


CASES = [
    ("NCHW 64×64×56×56", "nchw", (64, 64, 56, 56), (1, 2, 256, 256)),
    # channels-last C = 64 as the backend runs it: 8 rows folded into 512 columns
    ("channels-last 64×56×56×64", "mc", (25088, 512), (256, 512)),
    ("(4096, 1024)", "mc", (4096, 1024), (128, 1024)),
]


STREAMS = {
    "read": 1,
    "copy": 2,
    "read2": 2,
    "add": 3,
    "float64 sum": 1,
    "moments": 1,
    "normalize": 2,
    "grad sums": 2,
    "dx": 3,
}  # arrays read or written


def main() -> None:
    rng = np.random.default_rng(0)
    print("| case | loop | full ms | GB/s | in-cache ms (scaled) | in-cache share |")
    print("|---|---|---|---|---|---|")
    for label, layout, shape, small_shape in CASES:
        x = rng.normal(3.0, 2.0, shape).astype(np.float32)
        small = x.reshape(-1)[: int(np.prod(small_shape))].reshape(small_shape).copy()
        full, cached = loops_for(x, layout), loops_for(small, layout)
        scale = x.size / small.size
        for name in full:
            t_full = median_ms(full[name])
            t_cache = median_ms(cached[name], repeats=101) * scale
            streams = STREAMS[name.removeprefix("floor ")]
            gbs = streams * x.nbytes / t_full / 1e6
            print(
                f"| {label} | {name} | {t_full:.2f} | {gbs:.1f} | {t_cache:.2f} "
                f"| {t_cache / t_full:.0%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
