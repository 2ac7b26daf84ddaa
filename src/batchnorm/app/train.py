"""``batchnorm train``: data-parallel training on the digits, under mpiexec or alone.

    mpiexec --allow-run-as-root --oversubscribe -n 2 batchnorm train --model cnn

Every rank trains on its shard of each global mini-batch with synchronized batch
normalization; rank 0 prints time per step, bytes sent per step and the final
test accuracy, and checks that every rank ended with the same parameters and
running statistics. With ``--no-sync`` each rank normalizes with its own shard's
statistics: the parameters still agree (gradients are summed over ranks) but the
running statistics drift apart, which is what the run shows; it exits 0 then.
A rank that fails ends the whole job (``comm.Abort``) instead of leaving the
others waiting.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
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


def _check(args: argparse.Namespace) -> str | None:
    """The first thing wrong with the arguments, as a one-line error; else None."""
    for flag, value, least in (
        ("--steps", args.steps, 1),
        ("--batch-size", args.batch_size, 2),
        ("--threads", args.threads, 1),
    ):
        if value < least:
            return f"{flag} must be at least {least}; got {value}."
    if not args.timeout > 0:
        return f"--timeout must be a number of seconds > 0; got {args.timeout}."
    return None


def run(args: argparse.Namespace) -> int:
    from batchnorm.app.main import missing_modules

    error = _check(args)
    if error is not None:
        print(f"batchnorm train: error: {error}", file=sys.stderr)
        return 2

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

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    threads = args.threads
    try:
        # Ranks share the machine's cores: unlimited BLAS pools oversubscribe them.
        with threadpool_limits(threads):
            return _train(args, comm, rank, size, threads)
    except Exception:
        if size == 1:
            raise
        # The other ranks may be waiting in a collective this rank will never
        # join: end the job rather than leave them to their deadline.
        print(f"batchnorm train: rank {rank} of {size} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
        raise


def _train(
    args: argparse.Namespace, comm: Any, rank: int, size: int, threads: int
) -> int:
    import numpy as np

    from batchnorm.distributed import data_parallel as dp
    from batchnorm.nn import SGD, accuracy, cnn, load_digits, mlp

    data = load_digits(seed=args.seed, dtype=np.float32)
    if args.batch_size > len(data.x_train):
        if rank == 0:  # every rank finds the same; one line is enough
            print(
                f"batchnorm train: error: --batch-size must be at most the "
                f"{len(data.x_train)} training images; got {args.batch_size}.",
                file=sys.stderr,
            )
        return 2
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
        timeout=args.timeout,
    )
    same_parameters = dp.parameters_agree(
        model, comm, running_stats=False, timeout=args.timeout
    )
    same_statistics = dp.running_statistics_agree(model, comm, timeout=args.timeout)
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
        "parameters_identical_on_all_ranks": same_parameters,
        "running_statistics_identical_on_all_ranks": same_statistics,
    }
    if rank == 0:
        if args.json:
            print(json.dumps(report))
        else:
            for key, value in report.items():
                print(f"{key:>41}: {value}")
            if args.no_sync and not same_statistics:
                print(
                    "Without synchronization each rank's BatchNorm saw only its "
                    "shard: the running statistics differ between ranks, so each "
                    "rank's model predicts differently in eval mode. Drop --no-sync "
                    "to keep them identical."
                )
    # The parameters agree in both modes (gradients are summed over ranks); the
    # running statistics agree only when BatchNorm is synchronized.
    worked = same_parameters and (args.no_sync or same_statistics)
    return 0 if worked else 1
