"""What benchmark figures depend on: CPU, cores, memory, versions, scheduling.

Used by :mod:`batchnorm.app.bench` and ``benchmarks/bench_kernels.py``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def machine() -> dict[str, Any]:
    """CPU, cores, memory, versions: what the numbers depend on."""
    import platform

    import numba
    import torch

    import batchnorm

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if "model name" in line),
                model,
            )
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": torch.__version__,
        "batchnorm": batchnorm.__version__,
        "numba_threading_layer": _threading_layer(numba),
        "load_average": list(os.getloadavg()),
        "scheduling": _scheduling(),
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            info["transparent_hugepages"] = f.read().strip()
    except OSError:
        pass
    return info


def _threading_layer(numba: Any) -> str:
    """Numba's threading layer, chosen when the first parallel kernel runs."""
    try:
        return str(numba.threading_layer())
    except ValueError:  # nothing ran in parallel (one thread, or only small tensors)
        return "none started"


def _scheduling() -> str:
    """This process's scheduling policy, as ``chrt`` or ``nice`` left it.

    On a shared machine the benchmark can run under ``chrt -f 1`` so that other
    processes cannot delay its threads; the report says whether it did.
    """
    try:
        policy = os.sched_getscheduler(0)
        priority = os.sched_getparam(0).sched_priority
    except (AttributeError, OSError):
        return "unknown"
    names = {os.SCHED_OTHER: "SCHED_OTHER", os.SCHED_FIFO: "SCHED_FIFO"}
    name = names.get(policy, str(policy))
    return f"{name} priority {priority}, nice {os.nice(0)}"
