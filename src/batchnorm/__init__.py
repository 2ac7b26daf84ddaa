"""batchnorm: exact batch normalization for NumPy, as the darknet seed describes it.

>>> import numpy as np, batchnorm as bn
>>> x = np.random.default_rng(0).normal(3.0, 2.0, size=(16, 4)).astype(np.float32)
>>> y, cache = bn.functional.forward_train(x, None, None)
>>> np.allclose(y.mean(axis=0), 0, atol=1e-6)
True
"""

from batchnorm import functional
from batchnorm._memory import release_buffers
from batchnorm.functional import NonFiniteStatisticsError
from batchnorm.layer import BatchNorm
from batchnorm.moments import Moments
from batchnorm.presets import PRESETS

__all__ = [
    "PRESETS",
    "BatchNorm",
    "Moments",
    "NonFiniteStatisticsError",
    "functional",
    "release_buffers",
    "set_num_threads",
]
__version__ = "0.1.0"


def set_num_threads(num_threads: int | None) -> None:
    """Threads for the Numba kernels (None: ``$BATCHNORM_NUM_THREADS`` or all cores).

    Imports Numba; the NumPy backend is unaffected.
    """
    from batchnorm.kernels import numba as _numba

    _numba.set_num_threads(num_threads)
