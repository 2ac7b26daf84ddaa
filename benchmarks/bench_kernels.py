"""Full kernel benchmark of issue 3; writes benchmarks/RESULTS.md.

Every shape at 1 and 2 threads (``batchnorm bench`` is the quick subset): ours
(Numba with ``out=``, Numba allocating, the NumPy reference) against an in-run
floor (plain Numba streams with the same memory traffic) and torch 2.13 at the
same thread count, interleaved in one process, medians after a warm-up. Then the
JIT costs in fresh processes: import time, cold compilation of every float32
kernel into an empty cache, first call with a warm cache.

Run::

    python benchmarks/bench_kernels.py              # about 3 minutes on 2 cores
    python benchmarks/bench_kernels.py --json       # also print the rows as JSON

Everything below the "## Analysis" heading of an existing RESULTS.md is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from batchnorm.app import bench

HERE = Path(__file__).resolve().parent
ANALYSIS = "## Analysis"

# (label, shape, layout, ops, ours-with-out ÷ floor bound, ours-allocating ÷ torch)
TARGETS = [
    ("NCHW forward_train", (64, 64, 56, 56), "nchw", ("forward_train",), 1.3, 0.35),
    ("NCHW forward_eval", (64, 64, 56, 56), "nchw", ("forward_eval",), 1.15, 1.0),
    ("NCHW backward", (64, 64, 56, 56), "nchw", ("backward",), 1.2, 0.6),
    (
        "channels-last forward_train, backward",
        (64, 64, 56, 56),
        "channels_last",
        ("forward_train", "backward"),
        1.6,
        0.4,
    ),
    ("(4096, 1024) every op", (4096, 1024), "nc", bench.OPS, 1.5, 1.0),
    (
        "(8,16,16,16) forward_train",
        (8, 16, 16, 16),
        "nchw",
        ("forward_train",),
        None,
        0.5,
    ),
]

_STARTUP = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import batchnorm as bn
t1 = time.perf_counter()
F = bn.functional
first = None
for shape, axis in [((8, 4, 6, 6), 1), ((64, 32, 32, 16), 1), ((6, 4, 5, 3), -1),
                    ((64, 32, 32, 16), -1)]:
    x = np.ones(shape, np.float32); x.flat[::3] = 2.0
    start = time.perf_counter()
    y, cache = F.forward_train(x, None, None, axis=axis, backend="numba", out=None)
    if first is None:
        first = time.perf_counter() - start
    F.backward(x, cache, backend="numba")
    c = x.shape[axis]
    F.forward_eval(x, None, None, np.zeros(c), np.ones(c), axis=axis, backend="numba")
    F.backward_eval(x, x, None, np.zeros(c), np.ones(c), axis=axis, backend="numba")
    if not "--all" in sys.argv:
        break
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_call_s": first, "all_s": t2 - t1}))
"""


COLD_RUNS = 3


def startup() -> dict[str, Any]:
    """Import time, cold compilation of every float32 kernel, warm first call.

    Cold compilation is timed ``COLD_RUNS`` times, each in a new empty cache (it
    varies by a second or more on a shared machine); the table gives the median
    and every run.
    """

    def child(cache: str, *flags: str) -> dict[str, float]:
        out = subprocess.run(
            [sys.executable, "-c", _STARTUP, *flags],
            env={**os.environ, "NUMBA_CACHE_DIR": cache},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return json.loads(out)  # type: ignore[no-any-return]

    cold: list[float] = []
    for _ in range(COLD_RUNS):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(child(cache, "--all")["all_s"])
            warm = [child(cache) for _ in range(3)]
    runs = ", ".join(f"{t:.2f}" for t in cold)
    return {
        "import batchnorm (s)": min(w["import_s"] for w in warm),
        f"cold compile, every float32 kernel (s), median of {COLD_RUNS} ({runs})": (
            statistics.median(cold)
        ),
        "first call, warm cache, new process (s)": min(w["first_call_s"] for w in warm),
    }


def target_rows(rows: list[dict[str, Any]]) -> list[str]:
    index = {
        (tuple(r["shape"]), r["layout"], r["op"], r["threads"], r["implementation"]): r
        for r in rows
    }
    threads = sorted({r["threads"] for r in rows})
    lines = [
        "| target | threads | ours out= ÷ floor (bound) "
        "| ours alloc ÷ torch (bound) | met |",
        "|---|---|---|---|---|",
    ]
    for label, shape, layout, ops, floor_bound, torch_bound in TARGETS:
        for t in threads:
            found = [
                (
                    index.get((shape, layout, op, t, "numba_out")),
                    index.get((shape, layout, op, t, "numba")),
                )
                for op in ops
            ]
            if any(a is None or b is None for a, b in found):
                continue
            if any(a.get("busy") for a, _ in found):  # scheduler noise, see the table
                lines.append(f"| {label} | {t} | busy | busy | not measured |")
                continue
            worst_floor = max(a["ratio_floor"] for a, _ in found)
            worst_torch = max(b["ratio_torch"] for _, b in found)
            met = (floor_bound is None or worst_floor <= floor_bound) and (
                worst_torch <= torch_bound
            )
            floor_text = (
                "—" if floor_bound is None else f"{worst_floor:.2f} (≤ {floor_bound})"
            )
            lines.append(
                f"| {label} | {t} | {floor_text} | {worst_torch:.2f} (≤ {torch_bound}) "
                f"| {'yes' if met else '**no**'} |"
            )
    return lines


def write_results(
    path: Path,
    rows: list[dict[str, Any]],
    info: dict[str, Any],
    jit: dict[str, float],
    command: str,
    seconds: float,
    load_before: list[float],
) -> None:
    kept = ""
    if path.exists():
        text = path.read_text()
        if ANALYSIS in text:
            kept = text[text.index(ANALYSIS) :]
    floor_bw = [
        r
        for r in rows
        if r["implementation"] == "floor"
        and r["op"] == "forward_eval"
        and tuple(r["shape"]) == (64, 64, 56, 56)
        and r["layout"] == "nchw"
    ]
    bandwidth = ", ".join(
        f"{2 * 64 * 64 * 56 * 56 * 4 / r['median_s'] / 1e9:.1f} GB/s at {r['threads']} "
        "thread(s)"
        for r in floor_bw
    )
    machine_lines = [f"| {k} | {v} |" for k, v in info.items()]
    parts = [
        "# Kernel benchmark results",
        "",
        f"Made by `{command}` in {seconds:.0f} s (load average before the run: "
        f"{', '.join(f'{v:.2f}' for v in load_before)}; after: "
        f"{', '.join(f'{v:.2f}' for v in info['load_average'])}).",
        "",
        "float32; medians after 2 warm-up calls each; implementations interleaved "
        f"in rotating order, {bench.BLOCK} timed calls per visit after one untimed "
        "call that wakes the thread pool (see `batchnorm.app.bench._time`); "
        f"{rows[0]['repeats']} timed calls per implementation, NumPy "
        f"{max(r['repeats'] for r in rows if r['implementation'] == 'numpy')} "
        "(at 1 thread only: it is single-threaded). *floor* is a plain Numba stream "
        "with the operation's memory traffic (forward_train: read x, then copy x → "
        "y; forward_eval: copy; backward: read x and dy, then x + dy → dx) into a "
        "preallocated output; *ours out=* writes into a preallocated array too; "
        "*ours alloc* returns a new array on every call, from the output block "
        "cache (`batchnorm._memory`: the block of a result the caller has dropped, "
        "here the previous call's); *no cache* is the same with "
        "`BATCHNORM_POOL_BYTES=0`, a fresh `mmap` faulted in on every call, as "
        "torch's result is. Torch: "
        "`F.batch_norm` (training and eval) and `aten.native_batch_norm_backward`, "
        "channels-last as a `channels_last` tensor, `torch.set_num_threads` = ours.",
        "",
        f"Floor copy bandwidth (read + write, 51 MB each way): {bandwidth}.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *machine_lines,
        "",
        "## Table (milliseconds; ratios in parentheses)",
        "",
        bench.format_table(rows),
        "",
        "## Targets of issue 3 (worst op of the row)",
        "",
        *target_rows(rows),
        "",
        "## JIT (fresh processes; cache in a new empty directory)",
        "",
        "| | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in jit.items()],
        "",
    ]
    text = "\n".join(parts)
    path.write_text(text + ("\n" + kept if kept else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--numpy-repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    command = (
        "python benchmarks/bench_kernels.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) == os.SCHED_FIFO:
        command = f"chrt -f {os.sched_getparam(0).sched_priority} {command}"
    load_before = list(os.getloadavg())
    start = time.perf_counter()
    rows = bench.measure(
        bench.FULL_CASES,
        [int(t) for t in args.threads.split(",")],
        args.repeats,
        args.numpy_repeats,
        progress=lambda line: print(line, flush=True),
    )
    jit = startup()
    seconds = time.perf_counter() - start
    info = bench.machine()
    print(bench.format_table(rows))
    print("\n".join(target_rows(rows)))
    print(json.dumps(jit, indent=1))
    if args.json:
        print(json.dumps({"machine": info, "jit": jit, "rows": rows}, indent=1))
    write_results(args.out, rows, info, jit, command.strip(), seconds, load_before)
    print(f"wrote {args.out} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
