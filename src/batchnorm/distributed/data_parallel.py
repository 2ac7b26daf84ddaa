"""Data-parallel training of a harness network over MPI, with synchronized BN.

Every rank holds the same parameters and draws the same seeded global mini-batch;
each trains on its own contiguous shard of it (shards may be uneven or empty).
The loss is the mean over the *global* batch, so every rank scales its summed
loss gradient by ``1 / N_global``; BatchNorm statistics span all shards
(:class:`~batchnorm.distributed.SyncBatchNorm`); parameter gradients are summed
across ranks, reduced to rank 0 and broadcast, so every rank applies bitwise the
same update and the parameters stay identical. The result equals one process
training on the whole batch (tests/distributed/mpi_suite/check_data_parallel.py).

Every collective of the trainer waits at most ``timeout`` seconds, as
SyncBatchNorm's own do, and raises :class:`~batchnorm.distributed.SyncError`
instead of hanging when a rank never joins. A rank whose optimizer step raises
still joins the step's last collective, with a failure marker, so every other
rank raises at once rather than at its deadline.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchnorm.distributed._collective import SyncError, wait
from batchnorm.distributed.sync import SyncBatchNorm
from batchnorm.layer import BatchNorm
from batchnorm.nn.data import Split, minibatches
from batchnorm.nn.loss import SoftmaxCrossEntropy
from batchnorm.nn.walk import batch_norms, replace_batch_norms

__all__ = [
    "StepStats",
    "convert_sync_batchnorm",
    "fit_data_parallel",
    "parameters_agree",
    "revert_sync_batchnorm",
    "running_statistics_agree",
    "shard_bounds",
]


def convert_sync_batchnorm(model: Any, comm: Any = None, **options: Any) -> Any:
    """Replace every :class:`BatchNorm` in ``model`` by a :class:`SyncBatchNorm`.

    Configuration, parameters, running statistics and mode carry over. ``model``
    is changed in place and returned (a bare BatchNorm is returned converted).
    """

    def convert(layer: BatchNorm) -> BatchNorm:
        if isinstance(layer, SyncBatchNorm):
            return layer
        return SyncBatchNorm.from_layer(layer, comm, **options)

    return replace_batch_norms(model, convert)


def revert_sync_batchnorm(model: Any) -> Any:
    """Replace every :class:`SyncBatchNorm` in ``model`` by a plain BatchNorm."""

    def revert(layer: BatchNorm) -> BatchNorm:
        return layer.to_layer() if isinstance(layer, SyncBatchNorm) else layer

    return replace_batch_norms(model, revert)


def shard_bounds(total: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous ``[lo, hi)`` of ``total`` items for ``rank``; sizes differ by ≤ 1.

    >>> [shard_bounds(7, r, 3) for r in range(3)]
    [(0, 3), (3, 5), (5, 7)]
    """
    base, extra = divmod(total, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _check_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(
            f"timeout must be a number of seconds; got {type(timeout).__name__} "
            f"{timeout!r}. Pass e.g. timeout=60."
        )
    if not timeout > 0:
        raise ValueError(
            f"timeout must be a number of seconds > 0; got {timeout!r}. Pass e.g. "
            "timeout=60."
        )
    return float(timeout)


def _wait(request: Any, comm: Any, timeout: float, where: str) -> None:
    """:func:`~batchnorm.distributed._collective.wait` for the trainer's calls."""
    wait(
        request,
        comm,
        timeout,
        where,
        "a rank died, stalled, or failed outside a collective (see its error)",
    )


def _sum_gradients(model: Any, comm: Any, timeout: float) -> int:
    """Sum every parameter gradient over ranks, identically on every rank.

    Reduce to rank 0, then broadcast: unlike an all-reduce, whose summation order
    may differ between ranks, every rank receives the same bits. Returns the
    payload size in bytes.
    """
    from mpi4py import MPI

    params = list(model.parameters())
    flat = np.concatenate([np.ravel(grad).astype(np.float64) for _, _, grad in params])
    total = np.empty_like(flat)
    where = "fit_data_parallel (gradient sum)"
    _wait(comm.Ireduce(flat, total, op=MPI.SUM, root=0), comm, timeout, where)
    _wait(comm.Ibcast(total, root=0), comm, timeout, where)
    start = 0
    for _, _, grad in params:
        grad[...] = total[start : start + grad.size].reshape(grad.shape)
        start += grad.size
    return int(flat.nbytes)


def _same_on_every_rank(blobs: list[bytes], comm: Any, timeout: float) -> bool:
    """Whether ``blobs`` are bitwise the same on every rank (their SHA-256 is)."""
    digest = np.frombuffer(hashlib.sha256(b"".join(blobs)).digest(), dtype=np.uint8)
    everyone = np.empty((comm.Get_size(), digest.size), dtype=np.uint8)
    request = comm.Iallgather(digest, everyone)
    _wait(request, comm, timeout, "parameters_agree")
    return bool(np.all(everyone == everyone[0]))


def parameters_agree(
    model: Any, comm: Any, *, running_stats: bool = True, timeout: float = 60.0
) -> bool:
    """True when every rank holds bitwise the same parameters.

    With ``running_stats`` (the default), every BatchNorm's running statistics
    must agree too. Raises SyncError when a rank does not join within
    ``timeout`` seconds.
    """
    blobs = [value.tobytes() for _, value, _ in model.parameters()]
    if running_stats:
        blobs += _running_statistics(model)
    return _same_on_every_rank(blobs, comm, _check_timeout(timeout))


def running_statistics_agree(model: Any, comm: Any, *, timeout: float = 60.0) -> bool:
    """True when every BatchNorm's running statistics are bitwise the same on
    every rank: always with SyncBatchNorm, rarely with plain layers on shards."""
    return _same_on_every_rank(
        _running_statistics(model), comm, _check_timeout(timeout)
    )


def _running_statistics(model: Any) -> list[bytes]:
    return [
        stat.tobytes()
        for layer in batch_norms(model)
        for stat in (layer.running_mean, layer.running_var)
    ]


@dataclass
class StepStats:
    """Per-step measurements of :func:`fit_data_parallel` on this rank."""

    loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    bn_bytes: int = 0
    gradient_bytes: int = 0
    bn_collectives: int = 0


def fit_data_parallel(
    model: Any,
    optimizer: Any,
    data: Split,
    *,
    steps: int,
    batch_size: int,
    rng: np.random.Generator,
    comm: Any,
    timeout: float = 60.0,
) -> StepStats:
    """Train ``model`` on shards of seeded global mini-batches of ``batch_size``.

    Parameters
    ----------
    model : Sequential
        Its BatchNorm layers should be :class:`SyncBatchNorm` (see
        :func:`convert_sync_batchnorm`); plain ones would use shard statistics.
    optimizer : object with ``step()``, e.g. :class:`batchnorm.nn.SGD`
    data : Split
    steps, batch_size : int
        ``batch_size`` is the global batch, split over ``comm``'s ranks.
    rng : numpy Generator
        Seeded identically on every rank: it draws the global batches.
    comm : mpi4py communicator
    timeout : float, default 60
        Seconds each of the trainer's collectives waits for the other ranks.

    Returns
    -------
    StepStats
        Global mean loss of every step, step times, bytes this rank sent.

    Raises
    ------
    SyncError
        A rank did not join a collective within ``timeout`` seconds, or another
        rank's optimizer step raised (that rank raises its own error).
    """
    timeout = _check_timeout(timeout)
    rank, size = comm.Get_rank(), comm.Get_size()
    lo, hi = shard_bounds(batch_size, rank, size)
    loss_fn = SoftmaxCrossEntropy(reduction="sum")
    stats = StepStats()
    sync_layers = [
        layer for layer in batch_norms(model) if isinstance(layer, SyncBatchNorm)
    ]
    sent_before = sum(layer.bytes_sent for layer in sync_layers)
    calls_before = sum(layer.collectives for layer in sync_layers)
    batches = minibatches(data.x_train, data.y_train, batch_size, rng)
    for step in range(1, steps + 1):
        xb, yb = next(batches)
        start = time.perf_counter()
        local_loss = loss_fn(model.forward(xb[lo:hi]), yb[lo:hi])
        model.backward(loss_fn.backward() / batch_size)
        stats.gradient_bytes += _sum_gradients(model, comm, timeout)
        failure = None
        try:
            optimizer.step()
        except Exception as error:  # told to the other ranks, then raised here
            failure = error
        stats.seconds.append(time.perf_counter() - start)
        total_loss = _sum_losses(local_loss, failure is not None, step, comm, timeout)
        if failure is not None:
            raise failure
        stats.loss.append(total_loss / batch_size)
    stats.bn_bytes = sum(layer.bytes_sent for layer in sync_layers) - sent_before
    stats.bn_collectives = (
        sum(layer.collectives for layer in sync_layers) - calls_before
    )
    return stats


def _sum_losses(
    local_loss: float, failed: bool, step: int, comm: Any, timeout: float
) -> float:
    """The step's summed loss over ranks (in rank order, the same bits on every
    rank), gathered with each rank's failure marker; raises SyncError on the
    ranks that did not fail when one did."""
    mine = np.array([1.0 if failed else 0.0, local_loss])
    everyone = np.empty((comm.Get_size(), 2))
    request = comm.Iallgather(mine, everyone)
    _wait(request, comm, timeout, "fit_data_parallel (loss)")
    failed_ranks = np.flatnonzero(everyone[:, 0]).tolist()
    if failed_ranks and not failed:
        raise SyncError(
            f"rank(s) {failed_ranks} failed in optimizer.step() at step {step} (see "
            "the error raised there); this rank stops too, since its parameters "
            "no longer match theirs."
        )
    return float(sum(everyone[:, 1]))
