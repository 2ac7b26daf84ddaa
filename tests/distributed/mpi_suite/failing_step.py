"""A rank whose optimizer step fails must not hang the others: mpiexec -n 2.

``python failing_step.py raise``: rank 1's optimizer raises in step 3; rank 0 must
raise SyncError at once, naming rank 1 and the step.
``python failing_step.py stall``: rank 1's optimizer sleeps 60 s in step 3; rank 0
must raise SyncError after the trainer's 2 s deadline.

Each rank prints what it raised and exits (rank 0 aborts the job when rank 1 is
stalled). A watchdog alarm ends every rank after 40 s, so the run is bounded
even when the trainer hangs. Importing this file (pytest's doctest collection
does) runs nothing.
"""

from __future__ import annotations

import signal
import sys
import time

import numpy as np

from batchnorm.nn import SGD, Split, mlp


class FailingSGD(SGD):
    """SGD whose step 3 fails on rank 1."""

    def __init__(self, model, mode, rank):
        super().__init__(model, lr=0.1)
        self.mode, self.rank, self.steps = mode, rank, 0

    def step(self):
        self.steps += 1
        if self.rank == 1 and self.steps == 3:
            if self.mode == "raise":
                raise FloatingPointError("injected: the update overflowed")
            time.sleep(60)
        super().step()


def main(mode: str) -> None:
    from mpi4py import MPI

    from batchnorm.distributed import SyncError
    from batchnorm.distributed import data_parallel as dp

    signal.alarm(40)  # default action: the process ends, even inside an MPI wait
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), rng.integers(0, 3, 40)
    model = mlp(
        batch_norm=True,
        rng=np.random.default_rng(1),
        in_features=6,
        hidden=(5,),
        num_classes=3,
        dtype=np.float64,
        backend="numpy",
    )
    model = dp.convert_sync_batchnorm(model, comm, timeout=2.0)
    start = time.monotonic()
    try:
        dp.fit_data_parallel(
            model,
            FailingSGD(model, mode, rank),
            Split(x[:30], y[:30], x[30:], y[30:]),
            steps=6,
            batch_size=10,
            rng=np.random.default_rng(2),
            comm=comm,
            timeout=2.0,
        )
    except SyncError as error:
        elapsed = time.monotonic() - start
        print(f"rank {rank}: SyncError after {elapsed:.1f} s: {error}", flush=True)
        if mode == "stall":
            comm.Abort(3)  # rank 1 sleeps on: only the abort ends it
        sys.exit(3)  # every collective completed: both ranks can finalize
    except FloatingPointError as error:
        print(f"rank {rank}: raised {error}", flush=True)
        sys.exit(1)
    print(f"rank {rank}: no error", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
