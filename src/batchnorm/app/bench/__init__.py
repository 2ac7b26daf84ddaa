"""Kernel benchmark: ours against the memory-traffic floor and PyTorch, in one process.

Batch normalization is memory-bound, so each operation is timed beside a plain
Numba kernel with the same memory traffic (:mod:`batchnorm.app.bench.floor`) and
beside PyTorch's CPU kernel at the same thread count. Implementations are timed
interleaved (a few calls of each per visit, in rotating order) after a warm-up;
the table reports medians and ratios from the same run.

``batchnorm bench`` runs a quick subset (under a minute); the full table is
``python benchmarks/bench_kernels.py`` in a clone of the repository (pip does not
install it), which also writes ``benchmarks/RESULTS.md``. NumPy is
single-threaded and slow on large tensors: it is timed with fewer repeats, at one
thread only.

On a busy machine the timings are the scheduler's, not the kernels': a call that
waits for a core lasts a time slice (milliseconds) whatever it computes. Every
call is therefore timed twice, by the wall clock and by the process's CPU time,
and a row whose calls waited off the CPU, or whose floor kernel spread across its
repeats, is marked busy (:func:`busy_reason`) instead of being reported as a
result.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
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
# A kernel on a core of its own keeps each of its threads on a CPU for all of its
# wall time; below these fractions a call waited for a core. The floor's repeats
# stream the same bytes, so a spread above MAX_FLOOR_SPREAD is the machine's.
MIN_CPU_PER_WALL = 0.75
MAX_FLOOR_SPREAD = 0.5


@dataclass(frozen=True)
class Timing:
    """One implementation's timed calls.

    ``spread`` is the interquartile range over the median (the full range below
    4 calls); ``cpu_per_wall`` is the median over calls of the process's CPU time
    over the call's wall time: about the number of threads the call kept busy.
    """

    median_s: float
    spread: float
    cpu_per_wall: float

    @classmethod
    def of(cls, wall: list[float], cpu: list[float]) -> Timing:
        """From each call's wall-clock and CPU seconds."""
        median = statistics.median(wall)
        if len(wall) >= 4:
            low, _, high = statistics.quantiles(wall, n=4)
        else:
            low, high = min(wall), max(wall)
        return cls(
            median_s=median,
            spread=(high - low) / median,
            cpu_per_wall=statistics.median(
                c / max(w, 1e-9) for c, w in zip(cpu, wall, strict=True)
            ),
        )


def busy_reason(timings: dict[str, Timing], threads: int) -> str | None:
    """Why these timings are the scheduler's rather than the kernels'; else None.

    - the floor kernel's repeats spread by more than ``MAX_FLOOR_SPREAD`` of their
      median: every ratio is divided by it;
    - the floor kernel, parallel at ``threads`` > 1, kept fewer than
      ``MIN_CPU_PER_WALL · threads`` cores busy: another process held the others;
    - a call was on a CPU for less than ``MIN_CPU_PER_WALL`` of its wall time: it
      waited for a core.
    """
    reasons = []
    floor = timings.get("floor")
    if floor is not None and floor.spread > MAX_FLOOR_SPREAD:
        reasons.append(
            f"the floor kernel's calls spread by {floor.spread:.0%} of their median"
        )
    if (
        floor is not None
        and threads > 1
        and floor.cpu_per_wall < MIN_CPU_PER_WALL * threads
    ):
        reasons.append(
            f"the floor kernel's {threads} threads ran on {floor.cpu_per_wall:.1f} "
            f"of {threads} cores"
        )
    starved = {
        name: t.cpu_per_wall
        for name, t in timings.items()
        if t.cpu_per_wall < MIN_CPU_PER_WALL
    }
    if starved:
        listed = ", ".join(f"{name} {share:.0%}" for name, share in starved.items())
        reasons.append(f"calls were on a CPU for only part of their time ({listed})")
    return "; ".join(reasons) or None


def load_note(load: float, cores: int, threads: int) -> str | None:
    """A note when the load average leaves fewer than ``threads`` idle cores."""
    if load + threads <= cores + 0.5:
        return None
    return (
        f"the machine was busy: load average {load:.2f} over the minute before the "
        f"run, on {cores} cores, where the benchmark needs {threads} idle"
    )


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
) -> dict[str, Timing]:
    """Timings per implementation, interleaved in rotating order.

    Each visit to an implementation makes one untimed call, then times ``block``
    calls back to back. The untimed call wakes its thread pool: idle OpenMP
    workers go to sleep, and waking a sleeping CPU of a virtual machine can take
    milliseconds (measured here: a 2-thread copy of 25 MB took a median 8 ms
    called every few milliseconds, 1.3 ms called back to back), which would time
    the hypervisor, not the kernel. NumPy has no pool and skips that call.

    The process's CPU time is read around each timed call too (outside the wall
    clock's window), for :func:`busy_reason`.
    """
    names = [name for name in calls if repeats[name] > 0]
    for name in names:
        for _ in range(warmup):
            calls[name](threads)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
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
                    cpu_start = time.process_time()
                    start = time.perf_counter()
                    calls[name](threads)
                    times[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - cpu_start)
    finally:
        gc.enable()
    return {name: Timing.of(times[name], cpu[name]) for name in names}


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
    """Time every case, thread count and operation; return one row per result.

    Each row's ``busy`` is None, or why its group (case, operation, threads) was
    timed on a busy machine (:func:`busy_reason`): its ratios are then noise.
    """
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
                    timings = _time(table[op], threads, plan, warmup)
                    rows.extend(_rows(case, op, threads, timings, plan))
                    if progress:
                        progress(_progress_line(case, op, threads, timings))
            del table
    finally:
        _numba.set_num_threads(None)
    return rows


def _rows(
    case: Case,
    op: str,
    threads: int,
    timings: dict[str, Timing],
    plan: dict[str, int],
) -> Iterator[dict[str, Any]]:
    busy = busy_reason(timings, threads)
    floor, torch = timings["floor"].median_s, timings["torch"].median_s
    for name, timing in timings.items():
        yield {
            "shape": list(case.shape),
            "layout": case.layout,
            "op": op,
            "threads": threads,
            "implementation": name,
            "median_s": timing.median_s,
            "repeats": plan[name],
            "ratio_floor": timing.median_s / floor,
            "ratio_torch": timing.median_s / torch,
            "spread": timing.spread,
            "cpu_per_wall": timing.cpu_per_wall,
            "busy": busy,
        }


def _progress_line(
    case: Case, op: str, threads: int, timings: dict[str, Timing]
) -> str:
    parts = " ".join(f"{k}={v.median_s * 1e3:.2f}ms" for k, v in timings.items())
    busy = busy_reason(timings, threads)
    note = f" (busy: {busy})" if busy else ""
    return f"{case.label} {case.layout} {op} t={threads}: {parts}{note}"


def _thread_counts(text: str | None, cores: int) -> list[int] | str:
    """``--threads`` as a list, or the one-line error that says what is wrong."""
    if text is None:
        return sorted({1, cores})
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        return (
            "--threads must be comma-separated thread counts of at least 1, such "
            f"as 1,{cores}; got {text!r}."
        )
    over = [t for t in counts if t > cores]
    if over:
        return (
            f"--threads {over[0]}: this machine has {cores} cores for this process; "
            f"got {text!r}, and threads beyond the cores time the scheduler, not the "
            f"kernels. Pass thread counts up to {cores}."
        )
    return counts


def run(args: argparse.Namespace) -> int:
    """Entry point of ``batchnorm bench``."""
    from batchnorm.app.main import missing_modules

    def fail(message: str) -> int:
        print(f"batchnorm bench: error: {message}", file=sys.stderr)
        return 2

    for flag, value, least in (
        ("--repeats", args.repeats, 1),
        ("--numpy-repeats", args.numpy_repeats, 0),
    ):
        if value is not None and value < least:
            return fail(f"{flag} must be at least {least}; got {value}.")
    cores = usable_cores()
    thread_counts = _thread_counts(args.threads, cores)
    if isinstance(thread_counts, str):
        return fail(thread_counts)
    missing = missing_modules(
        "bench",
        {"numba": "numba", "torch": "torch"},
        "pip install 'batchnorm[fast]' 'torch==2.13.0'",
    )
    if missing is not None:
        print(missing, file=sys.stderr)
        return 2
    from batchnorm.kernels import numba as _numba

    pool = _numba.max_threads()
    if max(thread_counts) > pool:
        return fail(
            f"--threads {max(thread_counts)}: Numba's thread pool has {pool} "
            f"threads (NUMBA_NUM_THREADS); got {args.threads!r}. Pass thread counts "
            f"up to {pool}, or set NUMBA_NUM_THREADS."
        )
    if args.threads is None:
        thread_counts = sorted({1, min(cores, pool)})

    full = bool(args.full)
    cases = FULL_CASES if full else QUICK_CASES
    repeats = args.repeats or (21 if full else 7)
    numpy_cases = None if full else (FULL_CASES[4],)
    log = None if args.json else (lambda line: print(line, flush=True))
    load = os.getloadavg()[0]
    note = load_note(load, cores, max(thread_counts))
    if note and log:
        log(f"note: {note}; rows marked busy below are not results.")
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
        report = {
            "machine": info,
            "seconds": elapsed,
            "load_average_before": load,
            "busy": note,
            "rows": rows,
        }
        print(json.dumps(report, indent=1))
    else:
        if note:
            print(f"note: {note}.")
        print(format_table(rows))
        print(
            f"({elapsed:.0f} s. The full table is python benchmarks/bench_kernels.py, "
            "a script in a clone of the repository: pip does not install it.)"
        )
    return 0


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per case, op and threads; ms and ratios.

    A row timed on a busy machine (its ``busy`` reason) keeps its milliseconds but
    shows no ratios, and says why in a last column.
    """
    keyed: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for row in rows:
        key = (tuple(row["shape"]), row["layout"], row["op"], row["threads"])
        keyed.setdefault(key, {})[row["implementation"]] = row
    any_busy = any(row.get("busy") for row in rows)
    lines = [
        "| shape | layout | op | threads | floor ms | ours out= ms (÷floor) "
        "| ours alloc ms (÷torch) | ours alloc, no cache ms (÷torch) | numpy ms "
        "| torch ms (÷floor) |" + (" note |" if any_busy else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if any_busy else ""),
    ]
    for (shape, layout, op, threads), by_impl in keyed.items():
        floor, out, alloc, torch = (
            by_impl[k] for k in ("floor", "numba_out", "numba", "torch")
        )
        numpy, fresh = by_impl.get("numpy"), by_impl.get("numba_fresh")
        busy = floor.get("busy")

        def cell(row: dict[str, Any] | None, ratio: str, digits: int = 2) -> str:
            if row is None:
                return "—"
            ms = f"{row['median_s'] * 1e3:.2f}"
            return ms if row.get("busy") else f"{ms} ({row[ratio]:.{digits}f})"

        numpy_text = "—" if numpy is None else format(numpy["median_s"] * 1e3, ".1f")
        note = f" busy: {busy} |" if busy else " |" if any_busy else ""
        lines.append(
            f"| {'×'.join(map(str, shape))} | {layout} | {op} | {threads} "
            f"| {floor['median_s'] * 1e3:.2f} "
            f"| {cell(out, 'ratio_floor')} "
            f"| {cell(alloc, 'ratio_torch')} "
            f"| {cell(fresh, 'ratio_torch')} "
            f"| {numpy_text} "
            f"| {cell(torch, 'ratio_floor', 1)} |" + note
        )
    if any_busy:
        lines += [
            "",
            "Rows marked busy were timed while other processes held the cores: "
            "their milliseconds are the scheduler's, so their ratios are not "
            "results. Rerun them on an idle machine (or under chrt -f 1).",
        ]
    return "\n".join(lines)
