"""A rank that stalls or dies must not hang the others: run under mpiexec -n 2.

``python stalled_rank.py stall``: rank 1 never joins the second forward; rank 0
must raise SyncError after its 2 s deadline (it then aborts the job).
``python stalled_rank.py die``: rank 1 exits abruptly; the job must end promptly.
Importing this file (pytest's doctest collection does) runs nothing.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np


def main(mode: str) -> None:
    from mpi4py import MPI

    from batchnorm.distributed import SyncBatchNorm, SyncError

    comm = MPI.COMM_WORLD
    layer = SyncBatchNorm(3, timeout=2.0, backend="numpy")
    x = np.random.default_rng(comm.Get_rank()).normal(size=(4, 3))
    layer(x)
    if comm.Get_rank() == 1:
        if mode == "die":
            os._exit(1)
        time.sleep(60)
        sys.exit(0)
    start = time.monotonic()
    try:
        layer(x)
    except SyncError as error:
        print(f"SyncError after {time.monotonic() - start:.1f} s: {error}", flush=True)
        comm.Abort(3)
    print("no error", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
