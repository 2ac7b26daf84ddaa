"""``convert`` / ``revert``: swap torch's batch-norm modules for ours and back."""

from __future__ import annotations

from typing import Any

import torch

from batchnorm.torch.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["convert", "revert"]

_OURS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _sync_class() -> type:
    from batchnorm.torch.sync import SyncBatchNorm

    return SyncBatchNorm


def _moved(old: Any, cls: type, **extra: Any) -> Any:
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


def _walk(module: Any, swap: Any) -> Any:
    out = swap(module)
    for name, child in module.named_children():
        replaced = _walk(child, swap)
        if replaced is not child:
            setattr(out, name, replaced)
    return out


def convert(
    module: torch.nn.Module, *, sync: bool = False, process_group: Any = None
) -> torch.nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm``
    in ``module`` by ours, in place; return ``module`` (or the new layer when
    ``module`` is itself one of them), like ``convert_sync_batchnorm``.

    The new modules share the old ones' parameters and buffers (an optimizer
    built before still updates them) and keep their ``training`` flag.
    ``sync=True`` gives :class:`batchnorm.torch.SyncBatchNorm` (over
    ``process_group``, the default group when None) for every batch norm; a
    ``torch.nn.SyncBatchNorm`` always becomes ours, which runs on the CPU.
    Subclasses of torch's modules other than these are left alone.

    >>> import torch
    >>> from batchnorm.torch import convert
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    >>> type(convert(net)[1]).__module__
    'batchnorm.torch.modules'
    """

    def swap(m: Any) -> Any:
        kind = type(m)
        if kind is torch.nn.SyncBatchNorm or (sync and kind in _OURS):
            group = process_group if sync else getattr(m, "process_group", None)
            return _moved(m, _sync_class(), process_group=group)
        if kind in _OURS:
            return _moved(m, _OURS[kind])
        return m

    return _walk(module, swap)


def revert(module: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`convert`: our modules become torch's again (in place)."""
    sync = _sync_class()
    back = {ours: theirs for theirs, ours in _OURS.items()}

    def swap(m: Any) -> Any:
        kind = type(m)
        if kind is sync:
            return _moved(m, torch.nn.SyncBatchNorm, process_group=m.process_group)
        if kind in back:
            return _moved(m, back[kind])
        return m

    return _walk(module, swap)
