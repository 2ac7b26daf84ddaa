"""``BatchNorm1d/2d/3d``: ``torch.nn.BatchNorm*d`` with our kernels.

Subclasses of torch's own classes: the same constructor, parameters, buffers,
state dicts, ``train()``/``eval()`` behaviour and ``isinstance`` checks; only
``forward`` differs. On the CPU it calls ``torch.ops.batchnorm.*``
(:mod:`batchnorm.torch._ops`); on other devices it is torch's forward.

Where we differ from torch, deliberately:

- the batch statistics are exact: ``(count, mean, M2)`` in float64 per channel
  (two passes), where torch's CPU kernel accumulates ``Σx`` and ``Σx²``-style
  sums in the input's precision; with float32 data of mean 1e6 torch's batch
  variance is off by orders of magnitude, ours by float64 rounding;
- the running statistics are updated from those float64 values and rounded once
  to the buffers' dtype (torch updates in the buffers' precision);
- float16 and bfloat16 inputs are normalized with float64 statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from batchnorm.torch import _ops

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "forward", "update_running"]


def _verify_batch_size(x: Tensor) -> None:
    """torch's check: training needs more than one value per channel."""
    size = x.shape[0]
    for n in x.shape[2:]:
        size *= n
    if size == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{x.size()}"
        )


def _check_arguments(module: Any, x: Tensor, use_batch: bool) -> None:
    """torch's checks, in its order, with its exceptions and messages:
    ``F.batch_norm``'s (more than one value per channel and ε > 0 when
    normalizing with the batch's statistics, which torch calls training even in
    eval without running statistics; ε ≥ 0 otherwise), then ATen's per-channel
    sizes (``RuntimeError``, skipped for an empty batch as ATen does)."""
    if use_batch:
        _verify_batch_size(x)
        if module.eps <= 0:
            raise ValueError(
                f"batch_norm eps must be positive during training, but got {module.eps}"
            )
    elif module.eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {module.eps}")
    if x.numel() == 0:
        return
    channels = x.shape[1]
    stats = not module.training or module.track_running_stats  # as torch passes
    for name in ("running_mean", "running_var", "weight", "bias"):
        value = getattr(module, name)
        if value is None or (name.startswith("running") and not stats):
            continue
        if value.numel() != channels:
            raise RuntimeError(
                f"{name} should contain {channels} elements not {value.numel()}"
            )


def forward(module: Any, x: Tensor) -> Tensor:
    """torch's ``_BatchNorm.forward`` with our operators (CPU), for ``module``."""
    module._check_input_dim(x)
    if x.device.type != "cpu" or x.numel() == 0:
        # other devices, and an empty batch (nothing to compute; torch's rules
        # for it, wrong channel counts included, are then exactly torch's)
        return torch.nn.modules.batchnorm._BatchNorm.forward(module, x)
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats:
        if module.num_batches_tracked is not None:
            module.num_batches_tracked.add_(1)
            if module.momentum is None:  # cumulative moving average
                factor = 1.0 / float(module.num_batches_tracked)
    use_batch = module.training or (
        module.running_mean is None and module.running_var is None
    )
    _check_arguments(module, x, use_batch)
    if not use_batch:
        if module.eps == 0:  # torch allows ε = 0 with running statistics; we don't
            return torch.nn.functional.batch_norm(
                x,
                module.running_mean,
                module.running_var,
                module.weight,
                module.bias,
                False,
                0.0,
                module.eps,
            )
        return _ops.evaluate(
            x,
            module.weight,
            module.bias,
            module.running_mean,
            module.running_var,
            module.eps,
        )
    y, mean, m2, _ = _ops.train(x, module.weight, module.bias, module.eps)
    update = module.training and module.track_running_stats
    if update and module.running_mean is not None and x.numel() > 0:
        count = x.numel() // x.shape[1]
        update_running(module.running_mean, module.running_var, mean, m2, count, factor)
    return y


def update_running(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    m2: Tensor,
    count: int,
    factor: float,
) -> None:
    """torch's update (``factor`` on the new value, the unbiased variance
    ``M2 / (count − 1)``) from float64 ``mean`` and ``M2`` of ``count`` values
    per channel, computed in float64 and rounded once to the buffers' dtype."""
    if not _ops._compiling() and running_mean.dtype in (torch.float32, torch.float64):
        # eager: the same float64 arithmetic on NumPy views, a few µs instead of
        # ten small torch operations; copy_ keeps torch's version counters
        keep = 1.0 - factor
        old_mean = running_mean.detach().numpy().astype(np.float64)
        old_var = running_var.detach().numpy().astype(np.float64)
        fresh_mean = old_mean * keep + mean.numpy() * factor
        fresh_var = old_var * keep + (m2.numpy() / (count - 1)) * factor
        with torch.no_grad():
            running_mean.copy_(torch.from_numpy(fresh_mean))
            running_var.copy_(torch.from_numpy(fresh_var))
        return
    with torch.no_grad():
        unbiased = m2 / (count - 1)
        new_mean = running_mean.double() * (1.0 - factor) + mean * factor
        new_var = running_var.double() * (1.0 - factor) + unbiased * factor
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)


class BatchNorm1d(torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by our kernels (see the module docs).

    >>> import torch
    >>> from batchnorm.torch import BatchNorm1d
    >>> layer = BatchNorm1d(3)
    >>> y = layer(torch.randn(8, 3))
    >>> tuple(y.shape), sorted(layer.state_dict())
    ((8, 3), ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight'])
    """

    def forward(self, input: Tensor) -> Tensor:
        return forward(self, input)


class BatchNorm2d(torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by our kernels (see the module docs)."""

    def forward(self, input: Tensor) -> Tensor:
        return forward(self, input)


class BatchNorm3d(torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by our kernels (see the module docs)."""

    def forward(self, input: Tensor) -> Tensor:
        return forward(self, input)
