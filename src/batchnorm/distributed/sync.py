"""Synchronized batch normalization over MPI: statistics of the global batch.

When data-parallel training splits a batch across processes, each process holds a
shard; :class:`SyncBatchNorm` normalizes with the statistics of the union of all
shards, exactly as one process would on the concatenated batch.

Communication per layer and step (training mode only; eval mode sends nothing):

- forward: one all-gather of ``2C + 1`` float64 per rank, each rank's exact
  ``(count, mean, M2)``, merged with Chan's update in rank order;
- backward: one all-gather of ``2C + 1`` float64 per rank, a phase marker and each
  rank's ``Σ dy`` and ``Σ dy·x̂``, summed in rank order.

All-gather rather than all-reduce: the merge is not a sum, and reducing in the
same order on every rank makes running statistics and gradients bitwise identical
across ranks (an all-reduce may add in a different order on each rank). The
marker lets every rank detect a rank that is in the other pass; a one-time check
of C on first use, and a deadline on every wait, turn mismatches and dead ranks
into errors instead of hangs.

``grad_gamma`` and ``grad_beta`` hold this rank's sums, as PyTorch's SyncBatchNorm
does: the data-parallel trainer sums parameter gradients across ranks once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batchnorm import functional as F
from batchnorm import kernels
from batchnorm._validation import check_dy, check_input
from batchnorm.distributed._collective import SyncError, wait
from batchnorm.layer import BatchNorm
from batchnorm.moments import Moments

_BACKWARD = -1.0
_ABORT = -2.0
_INVALID = -3.0


def _world() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - exercised only without mpi4py
        raise ImportError(
            "SyncBatchNorm needs mpi4py and an MPI library: pip install "
            "'batchnorm[distributed]'"
        ) from exc
    return MPI.COMM_WORLD


class SyncBatchNorm(BatchNorm):
    """:class:`~batchnorm.BatchNorm` whose batch statistics span every rank of ``comm``.

    Parameters
    ----------
    num_features : int
    comm : mpi4py communicator, optional
        ``None`` means ``MPI.COMM_WORLD``.
    timeout : float, default 60
        Seconds to wait in a collective before raising :class:`SyncError`.
    **options
        Everything :class:`~batchnorm.BatchNorm` accepts.

    Notes
    -----
    Shards may have different sizes, and a rank may hold an empty shard, as long
    as the global batch has at least 2 values per channel. Both passes run on the
    layer's backend: local sums, one collective, then the local ``dx``.

    Attributes
    ----------
    bytes_sent : int
        float64 payload this rank has contributed to collectives so far.
    collectives : int
        Collectives this layer has taken part in.
    """

    def __init__(
        self,
        num_features: int,
        comm: Any = None,
        *,
        timeout: float = 60.0,
        **options: Any,
    ) -> None:
        super().__init__(num_features, **options)
        if self.virtual_batch_size is not None or self.renorm:
            raise ValueError(
                "SyncBatchNorm does not support virtual_batch_size or renorm (got "
                f"virtual_batch_size={self.virtual_batch_size}, renorm={self.renorm})"
                ": ghost batches and renormalization are per-process ideas. Use "
                "BatchNorm for them, or drop the options to synchronize."
            )
        self.comm = _world() if comm is None else comm
        if isinstance(timeout, bool) or not (
            isinstance(timeout, int | float) and timeout > 0
        ):
            raise ValueError(
                f"timeout must be a number of seconds > 0; got {timeout!r}."
            )
        self.timeout = float(timeout)
        self.bytes_sent = 0
        self.collectives = 0
        self._agreed = False

    @classmethod
    def from_layer(
        cls, layer: BatchNorm, comm: Any = None, **options: Any
    ) -> SyncBatchNorm:
        """A synchronized copy of ``layer`` with its configuration and state."""
        sync = cls(**{**layer.config(), **options}, comm=comm)
        sync.load_state_dict(layer.state_dict())
        sync.use_batch_stats = layer.use_batch_stats
        sync.update_running_stats = layer.update_running_stats
        sync.trainable = layer.trainable
        return sync

    def to_layer(self) -> BatchNorm:
        """A plain :class:`~batchnorm.BatchNorm` with this layer's config and state."""
        layer = BatchNorm(**self.config())
        layer.load_state_dict(self.state_dict())
        layer.use_batch_stats = self.use_batch_stats
        layer.update_running_stats = self.update_running_stats
        layer.trainable = self.trainable
        return layer

    # -- communication -------------------------------------------------------------
    def _gather(self, payload: np.ndarray, where: str) -> np.ndarray:
        """All-gather ``payload`` (same length on every rank) within the deadline."""
        size = self.comm.Get_size()
        received = np.empty((size, payload.size), dtype=np.float64)
        request = self.comm.Iallgather(payload, received)
        wait(
            request,
            self.comm,
            self.timeout,
            f"SyncBatchNorm.{where}",
            "a rank died or took a different code path (e.g. skipped this layer)",
        )
        self.bytes_sent += payload.nbytes
        self.collectives += 1
        return received

    def _agree_on_shape(self) -> None:
        if self._agreed:
            return
        sizes = self._gather(np.array([float(self.num_features)]), "forward")[:, 0]
        if np.any(sizes != self.num_features):
            raise SyncError(
                f"ranks disagree on num_features: {sizes.astype(int).tolist()} (one "
                "per rank). Every rank must build the same network."
            )
        self._agreed = True

    def _send_marker(self, marker: float, where: str) -> None:
        """Take part in the collective the other ranks are in, carrying ``marker``.

        Lets a rank that fails locally make every other rank fail at once with
        the reason, instead of leaving them to wait for the deadline.
        """
        self._agree_on_shape()
        payload = np.zeros(2 * self.num_features + 1)
        payload[0] = marker
        self._gather(payload, where)

    def _check_phase(self, markers: np.ndarray, expected: str) -> None:
        invalid = np.flatnonzero(markers == _INVALID)
        if invalid.size:
            raise SyncError(
                f"rank(s) {invalid.tolist()} rejected their input to {expected}() "
                "(see the error raised there); no rank changed its state."
            )
        aborted = np.flatnonzero(markers == _ABORT)
        if aborted.size:
            raise SyncError(
                f"rank(s) {aborted.tolist()} called backward() without a forward "
                "pass; every rank must run forward, then backward."
            )
        in_backward = markers == _BACKWARD
        wrong = np.flatnonzero(~in_backward if expected == "backward" else in_backward)
        if wrong.size:
            other = "forward" if expected == "backward" else "backward"
            raise SyncError(
                f"rank(s) {wrong.tolist()} are in {other}() while this rank is in "
                f"{expected}(); every rank must call the layer in the same order."
            )

    # -- forward / backward ----------------------------------------------------------
    # BatchNorm.forward and .backward hold the layer for the calling thread and
    # call these.
    def _forward(self, x: Any) -> np.ndarray:
        """Normalize with the global batch's statistics (training) or running ones."""
        communicating = self.use_batch_stats or self.update_running_stats
        try:
            x, _ = check_input(x, self.axis)
            self._check_channels(x)
        except (TypeError, ValueError):
            if communicating:
                self._send_marker(_INVALID, "forward")
            raise
        if not communicating:
            return self._forward_eval(x)
        self._agree_on_shape()
        local = Moments.from_array(x, self.axis)
        payload = np.concatenate([[float(local.count)], local.mean, local.m2])
        gathered = self._gather(payload, "forward")
        self._check_phase(gathered[:, 0], "forward")
        total = Moments.empty(self.num_features)
        for row in gathered:
            c = self.num_features
            total = total.merge(Moments(int(row[0]), row[1 : 1 + c], row[1 + c :]))
        if total.count == 1:  # 0: every shard is empty, an empty global batch
            raise ValueError(
                f"training needs at least 2 values per channel over all ranks; the "
                f"global batch has m = N · ∏ spatial = {total.count} (per rank: "
                f"{gathered[:, 0].astype(int).tolist()}). Use a larger global batch, "
                "or normalize with the running statistics (layer.eval())."
            )
        if self.update_running_stats:
            self.absorb_moments(total)
        if not self.use_batch_stats:
            return self._forward_eval(x)
        y, self._cache = F.forward_from_moments(
            x,
            total,
            self.gamma,
            self.beta,
            out=self._buffer("y", x),
            **self.options.train_arguments(),
        )
        self._eval_input = None
        return y

    def _backward(self, dy: Any) -> np.ndarray:
        """Exact gradient of the synchronized forward; one all-gather of sums."""
        c = self.num_features
        cache = self._cache
        if cache is None:
            if self._eval_input is not None:
                return super()._backward(dy)  # eval mode: local, no communication
            # Tell the other ranks (waiting in their forward) before failing here.
            self._send_marker(_ABORT, "backward")
            raise RuntimeError(
                "backward() called before forward(): run layer(x) first, then "
                "layer.backward(dy) with dy shaped like the output."
            )
        x, axis = cache.x, cache.axis
        try:
            dy = check_dy(dy, x)
        except (TypeError, ValueError):
            self._send_marker(_INVALID, "backward")
            raise
        ops = kernels.resolve(self.backend)
        if x.size:
            dgamma, dbeta = ops.grad_sums(dy, x, axis, cache.mean, cache.inv_std)
        else:
            dgamma, dbeta = np.zeros(c), np.zeros(c)
        payload = np.concatenate([[_BACKWARD], dbeta, dgamma])
        gathered = self._gather(payload, "backward")
        self._check_phase(gathered[:, 0], "backward")
        sum_dbeta = np.zeros(c)
        sum_dgamma = np.zeros(c)
        for row in gathered:
            sum_dbeta += row[1 : 1 + c]
            sum_dgamma += row[1 + c :]
        if x.size:
            k = F.gradient_k(cache.moments, cache.eps, cache.eps_placement, cache.ddof)
            dx = ops.backward_apply(
                dy,
                x,
                axis,
                cache.mean,
                cache.inv_std,
                cache.gamma,
                k,
                cache.count,
                sum_dgamma,
                sum_dbeta,
                out=self._buffer("dx", x, dy),
            )
        else:  # an empty shard (or an empty global batch): nothing to differentiate
            dx = np.empty(x.shape, x.dtype)
        if self.affine:
            self.grad_gamma = dgamma.astype(self.dtype)
            self.grad_beta = dbeta.astype(self.dtype)
        return dx
