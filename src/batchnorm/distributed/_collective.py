"""Collectives with a deadline: every MPI wait of SyncBatchNorm and the trainer.

A blocking collective waits forever for a rank that failed, stalled or died
outside it; these poll a nonblocking request instead and raise at the deadline.
"""

from __future__ import annotations

import time
from typing import Any


class SyncError(RuntimeError):
    """Ranks disagree (layer size, pass) or one never joined the collective."""

    __module__ = "batchnorm.distributed"  # its public name


def wait(request: Any, comm: Any, timeout: float, where: str, cause: str) -> None:
    """Complete the nonblocking collective ``request`` within ``timeout`` seconds.

    ``where`` names the call for the message and ``cause`` says what the other
    ranks probably did. Raises :class:`SyncError` at the deadline.
    """
    deadline = time.monotonic() + timeout
    spins = 0
    while not request.Test():
        spins += 1
        if spins > 1000:  # the first polls are cheap; then check the clock, doze
            if time.monotonic() > deadline:
                raise SyncError(
                    f"{where} on rank {comm.Get_rank()} waited {timeout:g} s for "
                    f"the other {comm.Get_size() - 1} rank(s), which never joined: "
                    f"{cause}. The communicator is unusable; end the job "
                    "(comm.Abort())."
                )
            time.sleep(1e-4)
