"""``convert`` / ``revert``: swap torch's batch-norm modules for ours and back."""

from __future__ import annotations

from typing import Any

import torch

from batchnorm.torch._swap import OURS, moved, walk
from batchnorm.torch.sync import SyncBatchNorm

__all__ = ["convert", "revert"]


def convert(
    module: torch.nn.Module, *, sync: bool = False, process_group: Any = None
) -> torch.nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm``
    in ``module`` by ours, in place; return ``module`` (or the new layer when
    ``module`` is itself one of them), like ``convert_sync_batchnorm``.

    The new modules share the old ones' parameters and buffers (an optimizer
    built before still updates them) and keep their ``training`` flag.
    ``sync=True`` gives :class:`batchnorm.torch.SyncBatchNorm` (over
    ``process_group``, the default group when None) for every batch norm, ours
    included; a ``torch.nn.SyncBatchNorm`` always becomes ours, which runs on
    the CPU, keeping its process group.
    Subclasses of torch's modules other than these are left alone.

    >>> import torch
    >>> from batchnorm.torch import convert
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    >>> type(convert(net)[1]).__module__
    'batchnorm.torch.modules'
    """

    if sync:
        return SyncBatchNorm.convert_sync_batchnorm(module, process_group)

    def swap(m: Any) -> Any:
        kind = type(m)
        if kind is torch.nn.SyncBatchNorm:
            return moved(m, SyncBatchNorm, process_group=m.process_group)
        if kind in OURS:
            return moved(m, OURS[kind])
        return m

    return walk(module, swap)


def revert(module: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`convert`: our modules become torch's again (in place)."""
    back = {ours: theirs for theirs, ours in OURS.items()}

    def swap(m: Any) -> Any:
        kind = type(m)
        if kind is SyncBatchNorm:
            return moved(m, torch.nn.SyncBatchNorm, process_group=m.process_group)
        if kind in back:
            return moved(m, back[kind])
        return m

    return walk(module, swap)
