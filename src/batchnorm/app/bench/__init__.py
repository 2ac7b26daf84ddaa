"""Kernel benchmark: ours against the memory-traffic floor and PyTorch, in one process.

Batch normalization is memory-bound, so each operation is timed beside a plain
Numba kernel with the same memory traffic (:mod:`batchnorm.app.bench.floor`) and
beside PyTorch's CPU kernel at the same thread count. Implementations are timed
interleaved (a few calls of each per visit, in rotating order) after a warm-up;
the table reports medians and ratios from the same run.

``batchnorm bench`` runs a quick subset (under a minute); the full table is
``python benchmarks/bench_kernels.py``, which also writes
``benchmarks/RESULTS.md``. NumPy is single-threaded and slow on large tensors:
it is timed with fewer repeats, at one thread only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchnorm.app.machine import machine

OPS = ("forward_train", "forward_eval", "backward")
IMPLEMENTATIONS = ("floor", "numba_out", "numba", "numba_fresh", "numpy", "torch")
EPS = 1e-5
BLOCK = 3  # timed calls per visit to an implementation (see _time)


@dataclass(frozen=True)
class Case:
    """One input: NCHW-ordered ``shape``, stored channels-first or channels-last."""

    shape: tuple[int, ...]
    layout: str  # "nchw" (or "nc" for 2-D) with axis=1, or "channels_last", axis=-1

    @property
    def axis(self) -> int:
        return -1 if self.layout == "channels_last" else 1

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))


FULL_CASES = (
    Case((64, 64, 56, 56), "nchw"),
    Case((64, 64, 56, 56), "channels_last"),
    Case((32, 256, 28, 28), "nchw"),
    Case((4096, 1024), "nc"),
    Case((8, 16, 16, 16), "nchw"),
)
QUICK_CASES = (FULL_CASES[2], FULL_CASES[3], FULL_CASES[4])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--full", action="store_true", help="every shape of the issue (a few minutes)"
    )
    parser.add_argument(
        "--threads", default=None, help="comma-separated thread counts (default 1,all)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls each")
    parser.add_argument(
        "--numpy-repeats",
        type=int,
        default=3,
        help="timed calls of the NumPy reference",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")


def _floor_ops(floor: Any, x: np.ndarray, dy: np.ndarray, out: np.ndarray) -> dict:
    xf, dyf, outf = x.reshape(-1), dy.reshape(-1), out.reshape(-1)

    def pick(pair: Any, n: int) -> Any:
        return pair.serial if n == 1 else pair.parallel

    return {
        "forward_train": lambda n: (
            pick(floor.read, n)(xf, n),
            pick(floor.copy, n)(xf, outf, n),
        ),
        "forward_eval": lambda n: pick(floor.copy, n)(xf, outf, n),
        "backward": lambda n: (
            pick(floor.read2, n)(xf, dyf, n),
            pick(floor.add, n)(xf, dyf, outf, n),
        ),
    }


def _make_calls(
    case: Case, seed: int = 0
) -> dict[str, dict[str, Callable[[int], Any]]]:
    """``calls[op][implementation](threads)`` for one case, data prepared once."""
    import torch

    from batchnorm import functional as F
    from batchnorm.app.bench import floor as _floor

    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, case.shape).astype(np.float32)
    dy = rng.normal(0.0, 1.0, case.shape).astype(np.float32)
    if case.layout == "channels_last":
        x, dy = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
    axis, channels = case.axis, case.shape[1]
    gamma = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    beta = rng.normal(0.0, 1.0, channels).astype(np.float32)
    out = np.empty_like(x)
    _, cache = F.forward_train(x, gamma, beta, axis=axis, eps=EPS, backend="numba")
    running_mean, running_var = (
        cache.mean.astype(np.float32),
        cache.var.astype(np.float32),
    )

    def torch_view(a: np.ndarray) -> Any:
        t = torch.from_numpy(a)
        return t.permute(0, 3, 1, 2) if case.layout == "channels_last" else t

    xt, dyt = torch_view(x), torch_view(dy)
    wt, bt = torch.from_numpy(gamma), torch.from_numpy(beta)
    rmt, rvt = torch.from_numpy(running_mean), torch.from_numpy(running_var)
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        xt, wt, bt, None, None, True, 0.1, EPS
    )
    tf = torch.nn.functional

    def ours(backend: str, use_out: bool) -> dict[str, Callable[[], Any]]:
        target = out if use_out else None
        return {
            "forward_train": lambda: F.forward_train(
                x, gamma, beta, axis=axis, eps=EPS, backend=backend, out=target
            ),
            "forward_eval": lambda: F.forward_eval(
                x,
                gamma,
                beta,
                running_mean,
                running_var,
                axis=axis,
                eps=EPS,
                backend=backend,
                out=target,
            ),
            "backward": lambda: F.backward(dy, cache, backend=backend, out=target),
        }

    torch_ops = {
        "forward_train": lambda: tf.batch_norm(xt, None, None, wt, bt, True, 0.1, EPS),
        "forward_eval": lambda: tf.batch_norm(xt, rmt, rvt, wt, bt, False, 0.1, EPS),
        "backward": lambda: torch.ops.aten.native_batch_norm_backward(
            dyt,
            xt,
            wt,
            None,
            None,
            save_mean,
            save_invstd,
            True,
            EPS,
            [True, True, True],
        ),
    }
    floor = _floor_ops(_floor, x, dy, out)
    numba_out, numba_alloc, numpy_ref = (
        ours("numba", True),
        ours("numba", False),
        ours("numpy", False),
    )
    return {
        op: {
            "floor": floor[op],
            "numba_out": _any_threads(numba_out[op]),
            "numba": _any_threads(numba_alloc[op]),
            "numba_fresh": _any_threads(_without_cache(numba_alloc[op])),
            "numpy": _any_threads(numpy_ref[op]),
            "torch": _any_threads(torch_ops[op]),
        }
        for op in OPS
    }


def _without_cache(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` with the output block cache off (:mod:`batchnorm._memory`).

    Every large output is then a fresh ``mmap`` that the kernel faults in, as
    torch's are: the cost the cache saves, shown beside it.
    """

    def fresh() -> Any:
        before = os.environ.get("BATCHNORM_POOL_BYTES")
        os.environ["BATCHNORM_POOL_BYTES"] = "0"
        try:
            return call()
        finally:
            if before is None:
                del os.environ["BATCHNORM_POOL_BYTES"]
            else:
                os.environ["BATCHNORM_POOL_BYTES"] = before

    return fresh


def _any_threads(call: Callable[[], Any]) -> Callable[[int], Any]:
    """A call that takes its thread count from the global settings."""
    return lambda threads: call()


def _time(
    calls: dict[str, Callable[[int], Any]],
    threads: int,
    repeats: dict[str, int],
    warmup: int,
    block: int = BLOCK,
) -> dict[str, float]:
    """Median seconds per implementation, interleaved in rotating order.

    Each visit to an implementation makes one untimed call, then times ``block``
    calls back to back. The untimed call wakes its thread pool: idle OpenMP
    workers go to sleep, and waking a sleeping CPU of a virtual machine can take
    milliseconds (measured here: a 2-thread copy of 25 MB took a median 8 ms
    called every few milliseconds, 1.3 ms called back to back), which would time
    the hypervisor, not the kernel. NumPy has no pool and skips that call.
    """
    names = [name for name in calls if repeats[name] > 0]
    for name in names:
        for _ in range(warmup):
            calls[name](threads)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.disable()
    try:
        for visit in range(-(-max(repeats.values()) // block)):
            shift = visit % len(names)
            for name in names[shift:] + names[:shift]:
                todo = min(block, repeats[name] - len(times[name]))
                if todo <= 0:
                    continue
                if name != "numpy":
                    calls[name](threads)
                for _ in range(todo):
                    start = time.perf_counter()
                    calls[name](threads)
                    times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return {name: statistics.median(t) for name, t in times.items()}


def measure(
    cases: tuple[Case, ...],
    thread_counts: list[int],
    repeats: int,
    numpy_repeats: int,
    *,
    numpy_cases: tuple[Case, ...] | None = None,
    warmup: int = 2,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every case, thread count and operation; return one row per result."""
    import torch

    from batchnorm.kernels import numba as _numba

    rows: list[dict[str, Any]] = []
    try:
        for case in cases:
            table = _make_calls(case)
            for threads in thread_counts:
                _numba.set_num_threads(threads)
                torch.set_num_threads(threads)
                with_numpy = threads == thread_counts[0] and (
                    numpy_cases is None or case in numpy_cases
                )
                plan = dict.fromkeys(IMPLEMENTATIONS, repeats)
                plan["numpy"] = numpy_repeats if with_numpy else 0
                for op in OPS:
                    medians = _time(table[op], threads, plan, warmup)
                    rows.extend(_rows(case, op, threads, medians, plan))
                    if progress:
                        progress(_progress_line(case, op, threads, medians))
            del table
    finally:
        _numba.set_num_threads(None)
    return rows


def _rows(
    case: Case, op: str, threads: int, medians: dict[str, float], plan: dict[str, int]
) -> Iterator[dict[str, Any]]:
    for name, seconds in medians.items():
        yield {
            "shape": list(case.shape),
            "layout": case.layout,
            "op": op,
            "threads": threads,
            "implementation": name,
            "median_s": seconds,
            "repeats": plan[name],
            "ratio_floor": seconds / medians["floor"],
            "ratio_torch": seconds / medians["torch"],
        }


def _progress_line(case: Case, op: str, threads: int, medians: dict[str, float]) -> str:
    parts = " ".join(f"{k}={v * 1e3:.2f}ms" for k, v in medians.items())
    return f"{case.label} {case.layout} {op} t={threads}: {parts}"


def run(args: argparse.Namespace) -> int:
    """Entry point of ``batchnorm bench``."""
    from batchnorm.kernels import numba as _numba

    full = bool(args.full)
    cases = FULL_CASES if full else QUICK_CASES
    all_threads = _numba.max_threads()
    if args.threads:
        thread_counts = [int(t) for t in args.threads.split(",")]
    else:
        thread_counts = sorted({1, all_threads})
    repeats = args.repeats or (21 if full else 7)
    numpy_cases = None if full else (FULL_CASES[4],)
    log = None if args.json else (lambda line: print(line, flush=True))
    start = time.perf_counter()
    rows = measure(
        cases,
        thread_counts,
        repeats,
        args.numpy_repeats,
        numpy_cases=numpy_cases,
        progress=log,
    )
    elapsed = time.perf_counter() - start
    info = machine()
    if args.json:
        print(json.dumps({"machine": info, "seconds": elapsed, "rows": rows}, indent=1))
    else:
        print(format_table(rows))
        print(f"({elapsed:.0f} s; full table: python benchmarks/bench_kernels.py)")
    return 0


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per case, op and threads; ms and ratios."""
    keyed: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for row in rows:
        key = (tuple(row["shape"]), row["layout"], row["op"], row["threads"])
        keyed.setdefault(key, {})[row["implementation"]] = row
    lines = [
        "| shape | layout | op | threads | floor ms | ours out= ms (÷floor) "
        "| ours alloc ms (÷torch) | ours alloc, no cache ms (÷torch) | numpy ms "
        "| torch ms (÷floor) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (shape, layout, op, threads), by_impl in keyed.items():
        floor, out, alloc, torch = (
            by_impl[k] for k in ("floor", "numba_out", "numba", "torch")
        )
        numpy, fresh = by_impl.get("numpy"), by_impl.get("numba_fresh")
        fresh_text = (
            "—"
            if fresh is None
            else f"{fresh['median_s'] * 1e3:.2f} ({fresh['ratio_torch']:.2f})"
        )
        lines.append(
            f"| {'×'.join(map(str, shape))} | {layout} | {op} | {threads} "
            f"| {floor['median_s'] * 1e3:.2f} "
            f"| {out['median_s'] * 1e3:.2f} ({out['ratio_floor']:.2f}) "
            f"| {alloc['median_s'] * 1e3:.2f} ({alloc['ratio_torch']:.2f}) "
            f"| {fresh_text} "
            f"| {'—' if numpy is None else format(numpy['median_s'] * 1e3, '.1f')} "
            f"| {torch['median_s'] * 1e3:.2f} ({torch['ratio_floor']:.1f}) |"
        )
    return "\n".join(lines)
