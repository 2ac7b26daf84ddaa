"""Swapping batch-norm modules in a model: shared by ``convert`` and
``SyncBatchNorm.convert_sync_batchnorm``."""

from __future__ import annotations

from typing import Any

import torch

from batchnorm.torch.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["OURS", "moved", "walk"]

#: torch's module -> ours
OURS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def moved(old: Any, cls: type, **extra: Any) -> Any:
    """A ``cls`` with ``old``'s configuration sharing its parameters and buffers
    (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does)."""
    if old.affine and old.bias is None:  # built with bias=False: a scale, no shift
        extra["bias"] = False
    new = cls(
        old.num_features,
        old.eps,
        old.momentum,
        old.affine,
        old.track_running_stats,
        device="meta",
        **extra,
    )
    for name in ("weight", "bias"):
        setattr(new, name, getattr(old, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new.register_buffer(name, getattr(old, name))
    new.training = old.training
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def walk(module: Any, swap: Any) -> Any:
    out = swap(module)
    for name, child in module.named_children():
        replaced = walk(child, swap)
        if replaced is not child:
            setattr(out, name, replaced)
    return out
