"""PyTorch drop-ins: our exact, fast kernels as ``torch.nn`` batch-norm modules.

- :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: subclasses of
  torch's with the same constructor, parameters, buffers and state dicts,
  computed by ``torch.ops.batchnorm.*`` on the CPU;
- :class:`SyncBatchNorm`: synchronized statistics over ``torch.distributed``,
  on the CPU (gloo), with each rank's exact ``(count, mean, M2)`` merged;
- :func:`convert` / :func:`revert`: swap a model's batch norms for ours and back.

Needs torch (``pip install 'batchnorm[torch]'``).
"""

from batchnorm.torch.convert import convert, revert
from batchnorm.torch.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.torch.sync import SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "convert",
    "revert",
]
