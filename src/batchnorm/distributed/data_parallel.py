"""Data-parallel training of a harness network over MPI, with synchronized BN.

Every rank holds the same parameters and draws the same seeded global mini-batch;
each trains on its own contiguous shard of it (shards may be uneven or empty).
The loss is the mean over the *global* batch, so every rank scales its summed
loss gradient by ``1 / N_global``; BatchNorm statistics span all shards
(:class:`~batchnorm.distributed.SyncBatchNorm`); parameter gradients are summed
across ranks, reduced to rank 0 and broadcast, so every rank applies bitwise the
same update and the parameters stay identical. The result equals one process
training on the whole batch (tests/distributed/mpi_suite/check_data_parallel.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchnorm.distributed.sync import SyncBatchNorm
from batchnorm.layer import BatchNorm
from batchnorm.nn.data import Split, minibatches
from batchnorm.nn.loss import SoftmaxCrossEntropy
from batchnorm.nn.walk import replace_batch_norms

__all__ = [
    "StepStats",
    "convert_sync_batchnorm",
    "fit_data_parallel",
    "parameters_agree",
    "revert_sync_batchnorm",
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


def _sum_gradients(model: Any, comm: Any) -> int:
    """Sum every parameter gradient over ranks, identically on every rank.

    Reduce to rank 0, then broadcast: unlike an all-reduce, whose summation order
    may differ between ranks, every rank receives the same bits. Returns the
    payload size in bytes.
    """
    params = list(model.parameters())
    flat = np.concatenate([np.ravel(grad).astype(np.float64) for _, _, grad in params])
    total = np.empty_like(flat)
    from mpi4py import MPI

    comm.Reduce(flat, total, op=MPI.SUM, root=0)
    comm.Bcast(total, root=0)
    start = 0
    for _, _, grad in params:
        grad[...] = total[start : start + grad.size].reshape(grad.shape)
        start += grad.size
    return int(flat.nbytes)


def parameters_agree(model: Any, comm: Any) -> bool:
    """True when every rank holds bitwise the same parameters and BN statistics."""
    blobs = [value.tobytes() for _, value, _ in model.parameters()]
    for layer in getattr(model, "layers", [model]):
        if isinstance(layer, BatchNorm):
            blobs += [layer.running_mean.tobytes(), layer.running_var.tobytes()]
    everyone = comm.allgather(b"".join(blobs))
    return all(blob == everyone[0] for blob in everyone)


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

    Returns
    -------
    StepStats
        Global mean loss of every step, step times, bytes this rank sent.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    lo, hi = shard_bounds(batch_size, rank, size)
    loss_fn = SoftmaxCrossEntropy(reduction="sum")
    stats = StepStats()
    sync_layers = [
        layer
        for layer in getattr(model, "layers", [model])
        if isinstance(layer, SyncBatchNorm)
    ]
    sent_before = sum(layer.bytes_sent for layer in sync_layers)
    calls_before = sum(layer.collectives for layer in sync_layers)
    batches = minibatches(data.x_train, data.y_train, batch_size, rng)
    for _ in range(steps):
        xb, yb = next(batches)
        start = time.perf_counter()
        local_loss = loss_fn(model.forward(xb[lo:hi]), yb[lo:hi])
        model.backward(loss_fn.backward() / batch_size)
        stats.gradient_bytes += _sum_gradients(model, comm)
        optimizer.step()
        stats.seconds.append(time.perf_counter() - start)
        stats.loss.append(comm.allreduce(local_loss) / batch_size)
    stats.bn_bytes = sum(layer.bytes_sent for layer in sync_layers) - sent_before
    stats.bn_collectives = (
        sum(layer.collectives for layer in sync_layers) - calls_before
    )
    return stats
