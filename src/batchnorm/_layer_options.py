"""The BatchNorm layer's own constructor options: their checks and the config.

Options the layer shares with the functional API (``eps``, ``momentum``, ...) are
checked by :mod:`batchnorm._validation`; ``virtual_batch_size`` by
:mod:`batchnorm._groups`; ``rmax`` and ``dmax`` by :mod:`batchnorm.renorm`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from batchnorm import _backend
from batchnorm.presets import PARAMETER_DTYPES

if TYPE_CHECKING:
    from batchnorm.layer import BatchNorm


def check_num_features(num_features: Any) -> int:
    """C, the number of channels: an int >= 1."""
    if isinstance(num_features, bool) or not isinstance(num_features, int | np.integer):
        raise TypeError(
            f"num_features must be an int (the number of channels C); got "
            f"{type(num_features).__name__}."
        )
    if num_features < 1:
        raise ValueError(
            f"num_features must be >= 1; got {num_features}. Pass the number of "
            "channels C of the input (x.shape[axis])."
        )
    return int(num_features)


def check_layer_axis(axis: Any) -> int:
    """The channel axis: an int other than 0 (each input checks it against its rank)."""
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis must be an int; got {type(axis).__name__}.")
    if axis == 0:
        raise ValueError(
            "axis=0 is the batch axis; use axis=1 for (N, C, ...) or axis=-1 for "
            "channels-last."
        )
    return int(axis)


def check_parameter_dtype(dtype: Any) -> np.dtype:
    """The dtype of γ, β and the running statistics: float16, float32 or float64."""
    dtype = np.dtype(dtype)
    if dtype not in PARAMETER_DTYPES:
        raise TypeError(
            f"dtype (of γ, β and the running statistics) must be float16, "
            f"float32 or float64; got {dtype}. Inputs may be bfloat16; "
            "parameters stay in a NumPy float dtype (float32 is the default)."
        )
    return dtype


def check_backend(backend: str | None) -> str | None:
    """A backend name, or None (``$BATCHNORM_BACKEND``, else the fastest installed)."""
    if backend is not None and backend not in _backend.BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(map(repr, _backend.BACKENDS))} "
            f"or None (use $BATCHNORM_BACKEND, else the fastest); got {backend!r}."
        )
    return backend


def check_initial_running_stats(mean: Any, var: Any) -> tuple[float, float]:
    """Floats: a finite initial running mean, a finite initial running var >= 0."""
    mean, var = float(mean), float(var)
    if not (np.isfinite(mean) and np.isfinite(var) and var >= 0):
        raise ValueError(
            "initial_running_mean must be finite and initial_running_var finite "
            f"and >= 0; got {mean} and {var}. The defaults are 0 and 1 (darknet: 0 "
            "and 0)."
        )
    return mean, var


def config(layer: BatchNorm) -> dict[str, Any]:
    """The constructor arguments that rebuild ``layer`` (without its state)."""
    return {
        "num_features": layer.num_features,
        "axis": layer.axis,
        "eps": layer.eps,
        "momentum": layer.momentum,
        "running_var_kind": layer.running_var_kind,
        "affine": layer.affine,
        "eps_placement": layer.eps_placement,
        "ddof": layer.ddof,
        "on_nonfinite": layer.on_nonfinite,
        "initial_running_mean": layer.initial_running_mean,
        "initial_running_var": layer.initial_running_var,
        "dtype": layer.dtype.name,
        "backend": layer.backend,
        "reuse_buffers": layer.reuse_buffers,
        "virtual_batch_size": layer.virtual_batch_size,
        "renorm": layer.renorm,
        "rmax": layer.rmax,
        "dmax": layer.dmax,
    }
