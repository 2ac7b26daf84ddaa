"""Input checks shared by the functional API and the layer, in one message style.

Every error names the parameter, what was expected, what was received and a fix.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

EPS_PLACEMENTS = ("inside", "outside")
RUNNING_VAR_KINDS = ("unbiased", "biased")
ON_NONFINITE = ("raise", "skip")
# NumPy's own float16, float32, float64 and longdouble: floating without asking
# np.issubdtype (a fast path of as_float_array; anything else takes the full check).
_FLOAT_CHARS = "efdg"


def is_float_dtype(dtype: np.dtype) -> bool:
    """True for float16/32/64 (and longdouble) and for ml_dtypes' bfloat16."""
    return bool(np.issubdtype(dtype, np.floating)) or dtype.name == "bfloat16"


def as_float_array(value: Any, name: str) -> np.ndarray:
    """Return ``value`` as an ndarray of a floating dtype, or raise ``TypeError``."""
    if type(value) is np.ndarray and value.dtype.char in _FLOAT_CHARS:
        return value  # the common case, without np.asarray and np.issubdtype
    if value is None:
        raise TypeError(f"{name} must be an array of floats; got None.")
    arr = np.asarray(value)
    if not is_float_dtype(arr.dtype):
        hint = (
            f" Cast it first, for example {name}.astype(np.float32)."
            if arr.dtype.kind in "biu"
            else " Only real floating-point data can be normalized."
        )
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or "
            f"float64); got dtype {arr.dtype}.{hint}"
        )
    return arr


def check_input(x: Any, axis: int) -> tuple[np.ndarray, int]:
    """Validate the data array and the channel axis; return (x, axis >= 0)."""
    x = as_float_array(x, "x")
    if type(axis) is int and -x.ndim <= axis < x.ndim and x.ndim >= 2:
        return x, axis % x.ndim  # the common case
    if x.ndim < 2:
        raise ValueError(
            f"x must have at least 2 dimensions (N, C, ...); got shape {x.shape}. "
            "For one feature vector use x[None, :]; for a batch of scalars use "
            "x[:, None]."
        )
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis must be an int; got {type(axis).__name__}.")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"axis must be in [{-x.ndim}, {x.ndim - 1}] for x of shape {x.shape}; "
            f"got axis={axis}. Use axis=1 for (N, C, ...) or axis=-1 for "
            "channels-last."
        )
    return x, int(axis) % x.ndim


def check_channel_vector(
    value: Any, name: str, num_channels: int, *, optional: bool = False
) -> np.ndarray | None:
    """Validate a per-channel vector of shape (C,)."""
    if value is None:
        if optional:
            return None
        raise TypeError(
            f"{name} must be an array of shape ({num_channels},); got None."
        )
    arr = as_float_array(value, name)
    if arr.shape != (num_channels,):
        raise ValueError(
            f"{name} must have shape ({num_channels},), one value per channel of x; "
            f"got shape {arr.shape}. Check the channel axis (axis=) and the layer "
            "size."
        )
    return arr


def require_channel_vector(value: Any, name: str, num_channels: int) -> np.ndarray:
    """Like :func:`check_channel_vector` for a vector that may not be None."""
    arr = check_channel_vector(value, name, num_channels)
    if arr is None:  # unreachable: check_channel_vector raises on None
        raise TypeError(f"{name} must not be None.")
    return arr


def check_eps(eps: Any) -> float:
    if type(eps) is float and 0.0 < eps < math.inf:
        return eps  # the common case (NaN fails the comparison)
    if isinstance(eps, bool) or not isinstance(eps, int | float | np.floating):
        raise TypeError(f"eps must be a positive float; got {type(eps).__name__}.")
    eps = float(eps)
    if not (np.isfinite(eps) and eps > 0.0):
        raise ValueError(
            f"eps must be a finite float > 0; got {eps}. With eps = 0 a constant "
            "channel has variance 0 and normalizes to NaN (0/0). The seed uses 1e-6; "
            "for a negligible ε pass a tiny one, e.g. 1e-30."
        )
    return eps


def check_momentum(momentum: Any) -> float | None:
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(
        momentum, int | float | np.floating
    ):
        raise TypeError(
            f"momentum must be a float in [0, 1] or None; got "
            f"{type(momentum).__name__}."
        )
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        hint = ""
        if momentum > 1.0:
            hint = " It is a weight, not a percentage."
        raise ValueError(
            f"momentum must be in [0, 1] (the weight on the OLD running value; "
            f"0.99 is the seed's choice, PyTorch's momentum=0.1 is our 0.9) or None "
            f"for exact cumulative statistics; got {momentum}.{hint}"
        )
    if momentum == 1.0:
        warnings.warn(
            "momentum=1.0 keeps the running statistics at their initial values "
            "forever: momentum is the weight on the OLD value here. PyTorch's "
            "momentum=1.0 (keep only the last batch) is our momentum=0.0.",
            UserWarning,
            stacklevel=3,
        )
    return momentum


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {listed}; got {value!r}.")
    return str(value)


def check_ddof(ddof: Any) -> int:
    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise ValueError(
            f"ddof must be 0 (biased variance, the seed) or 1 (darknet's m-1); "
            f"got {ddof!r}."
        )
    return int(ddof)


def check_normalization(
    x: Any, axis: int, gamma: Any, beta: Any, eps: Any, eps_placement: Any
) -> tuple[np.ndarray, int, np.ndarray | None, np.ndarray | None, float, str]:
    """The arguments every normalizing function takes, checked in one order.

    Returns ``(x, axis, gamma, beta, eps, eps_placement)`` with ``axis`` >= 0 and
    ``gamma``/``beta`` as float arrays of shape (C,) or None.
    """
    x, axis = check_input(x, axis)
    num_channels = x.shape[axis]
    gamma = check_channel_vector(gamma, "gamma", num_channels, optional=True)
    beta = check_channel_vector(beta, "beta", num_channels, optional=True)
    eps = check_eps(eps)
    eps_placement = check_choice(eps_placement, "eps_placement", EPS_PLACEMENTS)
    return x, axis, gamma, beta, eps, eps_placement


def statistic_requirement(name: str) -> str:
    """What a stored statistic or parameter must be: a variance is also >= 0."""
    return "finite and >= 0" if name.endswith("running_var") else "finite"


def bad_channels(values: Any, name: str) -> np.ndarray:
    """Channels where ``values`` breaks :func:`statistic_requirement` of ``name``.

    The one check of "finite, and >= 0 for a running variance": functional
    arguments, state dicts and files all call it.
    """
    as64 = np.asarray(values, np.float64)
    bad = ~np.isfinite(as64)
    if name.endswith("running_var"):
        bad |= as64 < 0
    return np.flatnonzero(bad)


def bad_statistic_message(
    label: str, name: str, values: Any, bad: np.ndarray, fix: str
) -> str:
    """The message for :func:`bad_channels`: what is required, where, the fix."""
    values = np.asarray(values)
    where, indices = (
        ("channel", "channels") if values.ndim <= 1 else ("value", "flat indices")
    )
    shown = values.reshape(-1)[bad[:8]].tolist()
    return (
        f"{label} must be {statistic_requirement(name)} in every {where}; "
        f"{bad.size} of {values.size} {'is' if bad.size == 1 else 'are'} not: "
        f"{indices} {bad[:8].tolist()} hold {shown}. {fix}"
    )


def check_running(
    running_mean: Any, running_var: Any, num_channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate running statistics: shape (C,), finite, ``running_var >= 0``."""
    running_mean = require_channel_vector(running_mean, "running_mean", num_channels)
    running_var = require_channel_vector(running_var, "running_var", num_channels)
    for name, values in (("running_mean", running_mean), ("running_var", running_var)):
        bad = bad_channels(values, name)
        if bad.size:
            raise ValueError(
                bad_statistic_message(
                    name,
                    name,
                    values,
                    bad,
                    "Reset the running statistics (layer.reset_running_stats()) or "
                    "reload a good checkpoint.",
                )
            )
    return running_mean, running_var


def training_count_error(x: np.ndarray, axis: int, count: int) -> ValueError:
    """The error for fewer than 2 values per channel in training (spells out m)."""
    sizes = [str(s) for a, s in enumerate(x.shape) if a != axis]
    product = " · ".join(sizes) + (f" = {count}" if len(sizes) > 1 else "")
    return ValueError(
        f"training needs at least 2 values per channel to estimate a variance, but x "
        f"of shape {x.shape} with channel axis {axis} has m = N · ∏ spatial = "
        f"{product}. Use a batch of 2 or more samples, or normalize with the running "
        "statistics instead (forward_eval, or layer.eval())."
    )


def check_out(
    out: Any, x: np.ndarray, *inputs: tuple[str, np.ndarray | None]
) -> np.ndarray | None:
    """Validate an ``out=`` array for a result shaped like ``x``.

    ``inputs`` are every array the operation reads (None for an absent one): the
    kernels read them while they write ``out``, so none may share its memory.
    """
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(
            f"out must be a numpy.ndarray or None; got {type(out).__name__}. "
            "Allocate one with np.empty_like(x)."
        )
    if out.shape != x.shape:
        raise ValueError(
            f"out must have the shape of x {x.shape}; got {out.shape}. Allocate it "
            "with np.empty_like(x)."
        )
    if out.dtype != x.dtype:
        raise TypeError(
            f"out must have the dtype of x ({x.dtype}); got {out.dtype}. Allocate it "
            "with np.empty_like(x)."
        )
    if not out.flags.writeable:
        raise ValueError(
            "out must be writeable; got a read-only array. Pass a fresh array "
            "(np.empty_like(x)) or out=None."
        )
    for name, array in inputs:
        if array is None:
            continue
        if np.may_share_memory(out, array) and np.shares_memory(out, array):
            raise ValueError(
                f"out must not share memory with {name}: the kernels read {name} "
                "while they write out. Pass a separate array (np.empty_like(x))."
            )
    return out


def check_dy(dy: Any, x: np.ndarray) -> np.ndarray:
    """Validate ``dy = ∂L/∂y``: floating, with the shape of the forward input ``x``."""
    dy = as_float_array(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(
            f"dy must have the shape of the forward input {x.shape}; got {dy.shape}. "
            "Pass the gradient of the loss with respect to y."
        )
    return dy
