"""``SyncBatchNorm``: batch statistics of the global batch over ``torch.distributed``.

``torch.nn.SyncBatchNorm`` with our kernels, working on the CPU (gloo), where
torch's refuses to. Per call, in training mode, with a process group of more
than one rank:

- forward: each rank computes the exact ``(count, mean, M2)`` of its shard per
  channel in float64; one ``all_gather`` of ``2C + 1`` float64 per rank; every
  rank merges the rows with Chan's update **in rank order** (never
  ``E[x²] − E[x]²``), so every rank holds bitwise the same global statistics;
  the shard is normalized with them (biased variance, ε inside the root); the
  running statistics follow torch's rules (``momentum`` on the new value,
  ``momentum=None`` a cumulative average, the unbiased variance over the
  global count), computed in float64 and rounded once: bitwise equal on
  every rank;
- backward: each rank's ``Σ dy`` and ``Σ dy·x̂`` per channel, one
  ``all_gather`` of ``2C + 1`` float64, summed in rank order; ``dx`` from
  the global sums and the global count, the exact gradient of the forward.

All-gather rather than all-reduce for the backward's sums too: the sum is then
taken in the same order on every rank whatever algorithm the backend uses
(what torch's CUDA version does with an all-reduce). The first element of each
row is a marker (a count in the forward, −1 in the backward, −2 for a rank that
rejected its input), so a rank that took another path, or failed its checks,
makes every rank raise at once instead of waiting.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from batchnorm import functional as F
from batchnorm import kernels
from batchnorm.moments import Moments
from batchnorm.torch import modules
from batchnorm.torch._ops import _np, _order, _output, _param
from batchnorm.torch._swap import OURS, moved, walk

__all__ = ["SyncBatchNorm"]

_MINE = frozenset(OURS.values())

_BACKWARD = -1.0
_INVALID = -2.0
_PATH = (
    "every rank of the process group must call the layer, in the same mode and "
    "order, with input of num_features channels"
)


def _gather(payload: Tensor, group: Any, world: int, where: str) -> Tensor:
    """All-gather ``payload`` (float64, the same length on every rank) as a
    (world, length) tensor in group-rank order."""
    rows = [torch.empty_like(payload) for _ in range(world)]
    try:
        dist.all_gather(rows, payload, group=group)
    except RuntimeError as exc:
        raise RuntimeError(
            f"SyncBatchNorm.{where}: the all_gather of the statistics failed ({exc})."
            " A rank of the process group failed, stalled beyond the group's "
            f"timeout or took another code path: {_PATH}."
        ) from exc
    return torch.stack(rows)


def _check_rows(rows: Tensor, where: str) -> None:
    """Raise on every rank when a rank rejected its input or is in the other pass."""
    markers = rows[:, 0]
    invalid = torch.nonzero(markers == _INVALID).flatten().tolist()
    if invalid:
        raise RuntimeError(
            f"SyncBatchNorm.{where}: rank(s) {invalid} of the process group "
            "rejected their input (see the error raised there); no rank changed "
            "its running statistics or num_batches_tracked."
        )
    in_backward = markers == _BACKWARD
    wrong = in_backward if where == "forward" else ~in_backward
    ranks = torch.nonzero(wrong).flatten().tolist()
    if ranks:
        other = "backward" if where == "forward" else "forward"
        raise RuntimeError(
            f"SyncBatchNorm.{where}: rank(s) {ranks} of the process group are in "
            f"the {other} pass while this rank is in the {where} pass; {_PATH}."
        )


def _merge(rows: Tensor, channels: int) -> Moments:
    """Chan's merge of every rank's ``(count, mean, M2)``, in rank order."""
    total = Moments.empty(channels)
    for row in rows.numpy():
        count = int(row[0])
        mean, m2 = row[1 : 1 + channels].copy(), row[1 + channels :].copy()
        total = total.merge(Moments(count, mean, m2))
    return total


def _sums(rows: Tensor, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's ``(Σ dy·x̂, Σ dy)`` added in rank order."""
    sum_dgamma = np.zeros(channels)
    sum_dbeta = np.zeros(channels)
    for row in rows.numpy():
        sum_dbeta += row[1 : 1 + channels]
        sum_dgamma += row[1 + channels :]
    return sum_dgamma, sum_dbeta


def _count_error(x: Tensor, rows: Tensor) -> ValueError:
    counts = [int(c) for c in rows[:, 0].tolist()]
    return ValueError(
        "Expected more than 1 value per channel when training, got input size "
        f"{x.size()} on this rank and {sum(counts)} value(s) per channel over the "
        f"process group (per rank: {counts})"
    )


def _local_moments(x: np.ndarray, axis: int, channels: int) -> Moments:
    if x.size == 0:
        return Moments.empty(channels)
    return Moments(*kernels.resolve(None).batch_moments(x, axis))


def _dy_view(x: Tensor, order: tuple[int, ...] | None, t: Tensor) -> np.ndarray:
    """``t`` (``dy``) as a NumPy array laid out as ``x`` is (the kernels' fast
    path needs both contiguous in the same order)."""
    view = _np(t, order)
    if not view.flags.c_contiguous and (x.is_contiguous() or order is not None):
        view = np.ascontiguousarray(view)
    return view


class _SyncFunction(torch.autograd.Function):
    """The synchronized training pass (see the module docs)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        tracked: Tensor | None,
        eps: float,
        momentum: float | None,
        group: Any,
        world: int,
    ) -> Tensor:
        channels = x.shape[1]
        order = _order(x)
        axis = x.dim() - 1 if order else 1
        xn = _np(x, order)
        local = _local_moments(xn, axis, channels)
        payload = torch.cat(
            [
                torch.tensor([float(local.count)], dtype=torch.float64),
                torch.from_numpy(np.asarray(local.mean, np.float64)),
                torch.from_numpy(np.asarray(local.m2, np.float64)),
            ]
        )
        rows = _gather(payload, group, world, "forward")
        _check_rows(rows, "forward")
        factor = 0.0 if momentum is None else momentum
        if tracked is not None:  # as torch: counted even when the batch is refused
            tracked.add_(1)
            if momentum is None:  # cumulative moving average
                factor = 1.0 / float(tracked)
        total = _merge(rows, channels)
        if total.count == 1:
            raise _count_error(x, rows)
        ctx.group, ctx.world, ctx.order, ctx.axis = group, world, order, axis
        ctx.total, ctx.eps = total, eps
        ctx.save_for_backward(x, weight)
        y, target = _output(x)
        if total.count == 0:  # every shard is empty: nothing to normalize
            ctx.inv_std = None
            return y
        if running_mean is not None and running_var is not None:
            modules.update_running(
                running_mean,
                running_var,
                torch.from_numpy(total.mean),
                torch.from_numpy(total.m2),
                total.count,
                factor,
            )
        _, cache = F.forward_from_moments(
            xn,
            total,
            _param(weight),
            _param(bias),
            axis=axis,
            eps=eps,
            out=_np(target, order),
        )
        if target is not y:
            y.copy_(target)
        ctx.inv_std = cache.inv_std
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        total: Moments = ctx.total
        channels = x.shape[1]
        dgamma, dbeta = np.zeros(channels), np.zeros(channels)
        dx: Tensor | None = None
        if ctx.inv_std is not None:  # a global batch that is not empty
            order, axis = ctx.order, ctx.axis
            xn, dyn = _np(x, order), _dy_view(x, order, dy)
            ops = kernels.resolve(None)
            if x.numel():
                dgamma, dbeta = ops.grad_sums(dyn, xn, axis, total.mean, ctx.inv_std)
            if ctx.needs_input_grad[0]:
                payload = torch.from_numpy(
                    np.concatenate([[_BACKWARD], dbeta, dgamma]).astype(np.float64)
                )
                rows = _gather(payload, ctx.group, ctx.world, "backward")
                _check_rows(rows, "backward")
                sum_dgamma, sum_dbeta = _sums(rows, channels)
                dx, target = _output(x)
                if x.numel():
                    k = F.gradient_k(total, ctx.eps, "inside", 0)
                    ops.backward_apply(
                        dyn,
                        xn,
                        axis,
                        total.mean,
                        ctx.inv_std,
                        _param(weight),
                        k,
                        total.count,
                        sum_dgamma,
                        sum_dbeta,
                        out=_np(target, order),
                    )
                    if target is not dx:
                        dx.copy_(target)
        elif ctx.needs_input_grad[0]:
            dx = torch.zeros_like(x)
        dtype = weight.dtype if weight is not None else x.dtype
        dweight = (
            torch.from_numpy(dgamma).to(dtype) if ctx.needs_input_grad[1] else None
        )
        dbias = torch.from_numpy(dbeta).to(dtype) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None, None, None, None, None


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` computed by our kernels, on the CPU over gloo.

    The constructor, parameters, buffers, state dict and ``process_group``
    attribute are torch's (``None`` means the default group). The forward:

    - training, on the CPU, inside an initialized process group of more than
      one rank: the statistics of the global batch (see the module docs);
      shards may differ in size and be empty, as long as the global batch has
      more than one value per channel (else every rank raises torch's
      ``Expected more than 1 value per channel when training``);
    - eval mode: never any communication, as torch's (the running statistics,
      or the local batch's statistics when there are none);
    - a group of one rank, or no initialized process group:
      :class:`batchnorm.torch.BatchNorm2d`'s forward, no communication;
    - other devices: ``torch.nn.SyncBatchNorm.forward``.

    ``input.grad`` is the exact gradient of the synchronized forward, from the
    sums of every rank. ``weight.grad`` and ``bias.grad`` are this rank's own
    ``Σ dy·x̂`` and ``Σ dy`` (zero on an empty shard), as torch's
    SyncBatchNorm returns them: ``DistributedDataParallel`` averages parameter
    gradients over the ranks itself, so with a loss per rank scaled to make
    the average of the ranks' gradients the gradient of the whole batch's
    loss, the parameter gradients equal one process's on the whole batch.
    The backward exchanges nothing when ``input`` needs no gradient (as
    torch's); it cannot be differentiated again (as torch's).

    A rank that fails, stalls or skips the layer makes the others raise within
    the process group's timeout (the ``timeout`` given to
    ``init_process_group``): collectives never wait forever.

    Not a subclass of ``torch.nn.SyncBatchNorm``: ``DistributedDataParallel``
    refuses every instance of that class on the CPU ("SyncBatchNorm layers
    only work with GPU modules"). It subclasses torch's ``_BatchNorm``, as
    torch's SyncBatchNorm does, with the same constructor and attributes.

    >>> import torch
    >>> from batchnorm.torch import SyncBatchNorm
    >>> layer = SyncBatchNorm(3)  # no process group: plain batch norm
    >>> y = layer(torch.randn(8, 3, 4, 4))
    >>> tuple(y.shape), int(layer.num_batches_tracked)
    ((8, 3, 4, 4), 1)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            bias=bias,
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError(
                "SyncBatchNorm number of input channels should be non-zero"
            )

    def _sync_group(self) -> tuple[Any, int] | None:
        """``(group, world size)`` when training must synchronize, else None."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD if self.process_group is None else self.process_group
        world = dist.get_world_size(group)
        return (group, world) if world > 1 else None

    def _check_local(self, input: Tensor) -> None:
        """The checks that precede communication (each rank's own input)."""
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if not input.is_floating_point():
            raise TypeError(
                f"SyncBatchNorm expects floating-point input; got {input.dtype}."
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"SyncBatchNorm({self.num_features}) got input of "
                f"{input.shape[1]} channels (shape {tuple(input.shape)})."
            )
        if self.eps <= 0:
            raise ValueError(
                f"batch_norm eps must be positive during training, but got {self.eps}"
            )

    def forward(self, input: Tensor) -> Tensor:
        if input.device.type != "cpu":
            return torch.nn.SyncBatchNorm.forward(self, input)  # type: ignore[arg-type]
        sync = self._sync_group()
        if sync is None:
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            return modules.forward(self, input)
        group, world = sync
        try:
            self._check_local(input)
        except (TypeError, ValueError):
            # Join the collective the other ranks wait in, so that they fail now.
            payload = torch.zeros(2 * self.num_features + 1, dtype=torch.float64)
            payload[0] = _INVALID
            _gather(payload, group, world, "forward")
            raise
        # The buffers change only once every rank has joined the collective.
        track = self.track_running_stats
        return _SyncFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.num_batches_tracked if track else None,
            self.eps,
            self.momentum,
            group,
            world,
        )

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: Any = None
    ) -> torch.nn.Module:
        """Every batch norm of ``module`` as this class, sharing parameters and
        buffers (:func:`batchnorm.torch.convert` with ``sync=True``)."""

        def swap(m: Any) -> Any:
            kind = type(m)
            if kind is torch.nn.SyncBatchNorm or kind in OURS or kind in _MINE:
                return moved(m, cls, process_group=process_group)
            return m

        return walk(module, swap)
