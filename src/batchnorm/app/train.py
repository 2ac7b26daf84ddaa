"""``batchnorm train``: data-parallel training on the digits, under mpiexec or alone.

    mpiexec --allow-run-as-root --oversubscribe -n 2 batchnorm train --model cnn

Every rank trains on its shard of each global mini-batch with synchronized batch
normalization; rank 0 prints time per step, bytes sent per step and the final
test accuracy, and checks that every rank ended with the same parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=["mlp", "cnn"], default="cnn")
    parser.add_argument("--steps", type=int, default=100, help="SGD steps (100)")
    parser.add_argument(
        "--batch-size", type=int, default=60, help="global mini-batch, split (60)"
    )
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate (0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-sync",
        action="store_true",
        help="plain BatchNorm on each shard (shows what synchronization buys)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds a rank waits (60)"
    )
    parser.add_argument(
        "--backend",
        choices=["numpy", "numba"],
        default="numpy",
        help="BN kernels (numpy: these tensors are tiny, and no JIT warm-up)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS threads per rank (1: these matrices are too small to share)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from batchnorm.app.main import missing_modules

    needs = {
        "mpi4py": "mpi4py",
        "sklearn": "scikit-learn",
        "threadpoolctl": "threadpoolctl",
    }
    if args.backend == "numba":
        needs["numba"] = "numba"
    missing = missing_modules(
        "train", needs, "pip install 'batchnorm[demo,distributed]'"
    )
    if missing is not None:
        print(missing, file=sys.stderr)
        return 2
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits

    if args.steps < 1 or args.batch_size < 2 or args.threads < 1:
        print("--steps and --threads must be >= 1, --batch-size >= 2")
        return 2
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    threads = args.threads
    # Ranks share the machine's cores: unlimited BLAS pools oversubscribe them.
    with threadpool_limits(threads):
        return _train(args, comm, rank, size, threads)


def _train(
    args: argparse.Namespace, comm: Any, rank: int, size: int, threads: int
) -> int:
    import numpy as np

    from batchnorm.distributed import data_parallel as dp
    from batchnorm.nn import SGD, accuracy, cnn, load_digits, mlp

    data = load_digits(seed=args.seed, dtype=np.float32)
    if args.model == "cnn":
        data = data.reshape(1, 8, 8)
    build: Any = {"mlp": mlp, "cnn": cnn}[args.model]
    model = build(
        batch_norm=True, rng=np.random.default_rng(args.seed), backend=args.backend
    )
    if not args.no_sync:
        model = dp.convert_sync_batchnorm(model, comm, timeout=args.timeout)
    optimizer = SGD(model, lr=args.lr, momentum=0.9)
    stats = dp.fit_data_parallel(
        model,
        optimizer,
        data,
        steps=args.steps,
        batch_size=args.batch_size,
        rng=np.random.default_rng(args.seed + 1),
        comm=comm,
    )
    agree = dp.parameters_agree(model, comm)
    model.eval()
    test_accuracy = accuracy(model, data.x_test, data.y_test)
    warm = stats.seconds[min(5, len(stats.seconds) - 1) :]
    report = {
        "ranks": size,
        "model": args.model,
        "sync_batchnorm": not args.no_sync,
        "global_batch": args.batch_size,
        "blas_threads_per_rank": threads,
        "shard_sizes": [
            hi - lo
            for lo, hi in (
                dp.shard_bounds(args.batch_size, r, size) for r in range(size)
            )
        ],
        "steps": args.steps,
        "median_step_seconds": float(np.median(warm)),
        "bn_bytes_per_step": stats.bn_bytes / args.steps,
        "bn_collectives_per_step": stats.bn_collectives / args.steps,
        "gradient_bytes_per_step": stats.gradient_bytes / args.steps,
        "final_loss": stats.loss[-1],
        "test_accuracy": test_accuracy,
        "parameters_identical_on_all_ranks": agree,
    }
    if rank == 0:
        if args.json:
            print(json.dumps(report))
        else:
            for key, value in report.items():
                print(f"{key:>34}: {value}")
    return 0 if agree else 1
