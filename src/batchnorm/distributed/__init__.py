"""Synchronized batch statistics over MPI: the layer and a data-parallel trainer.

:class:`SyncBatchNorm` merges every rank's exact ``(count, mean, M2)``;
:mod:`batchnorm.distributed.data_parallel` trains a harness network with it.
Needs ``pip install 'batchnorm[distributed]'`` (mpi4py) at call time only.
"""

from batchnorm.distributed._collective import SyncError
from batchnorm.distributed.sync import SyncBatchNorm

__all__ = ["SyncBatchNorm", "SyncError"]
