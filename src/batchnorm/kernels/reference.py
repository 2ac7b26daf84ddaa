"""Reference kernels in NumPy: the seed's math on validated arrays, computed in float64.

These functions hold no state and check nothing: :mod:`batchnorm.functional`
validates, chooses dtypes and calls them. Every channel axis and every stride
works through broadcasting, so there is one code path for all layouts. The ones
that return an array of the input's size take ``out=``, an array of that shape
and dtype to write it into.

Derivation of the training-mode gradient
-----------------------------------------
Per channel, with ``m`` values ``x_i``, the forward pass computes

    μ = Σ x_i / m,   v = Σ (x_i − μ)² / (m − ddof),   s = f(v),
    x̂_i = (x_i − μ) · s,   y_i = γ x̂_i + β,

with ``f(v) = (v + ε)^(−1/2)`` (ε inside the root: the seed, PyTorch, Keras, ONNX)
or ``f(v) = 1 / (√v + ε)`` (ε outside: darknet's CPU code), and ``ddof`` 0 (the
seed) or 1 (darknet). With ``g_i = ∂L/∂y_i`` the chain rule over the three paths
of the seed (direct, through μ, through v) gives

    ∂L/∂x_i = γ s [ g_i − Σg/m + k · x̂_i · Σ(g x̂) ],
    k = 2 f'(v) / (s³ (m − ddof)).

For ε inside, ``f' = −s³/2`` and ``k = −1/(m − ddof)``; with ``ddof = 0`` this is the
familiar ``dx = γ s (g − mean(g) − x̂ · mean(g x̂))``. For ε outside,
``f' = −s²/(2√v)`` and ``k = −(1 + ε/√v)/(m − ddof)``; at ``v = 0`` every ``x̂_i`` is
zero, the term vanishes and we take ``k = 0`` (√v has no derivative there).
The seed's remark that ``Σ(x_i − μ) = 0`` is what removes the second part of
``∂v/∂x_i``. The parameter gradients are ``∂L/∂γ = Σ g x̂`` and ``∂L/∂β = Σ g``.

In eval mode μ and v are constants (the running statistics), so
``∂L/∂x_i = γ s g_i`` and the parameter gradients keep their form.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from batchnorm.kernels._layout import channel_shape, reduce_axes

_F = TypeVar("_F", bound=Callable[..., Any])


def quiet_nonfinite(func: _F) -> _F:
    """NaN/inf in the data propagate to the result without NumPy warnings.

    Non-finite input is the caller's to see in the output; the guard that matters,
    keeping it out of the running statistics, is in ``update_running_stats``.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def channel_gain(inv_std: np.ndarray, gamma: np.ndarray | None) -> np.ndarray:
    """``γ · inv_std`` per channel in float64 (``inv_std`` itself when γ is None).

    The scale of the output (``y = (x − mean)·gain + β``) and of ``dx``.
    """
    return inv_std if gamma is None else inv_std * np.asarray(gamma, np.float64)


def _per_channel(vec: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    return vec.reshape(channel_shape(ndim, axis, vec.shape[0]))


@quiet_nonfinite
def batch_moments(x: np.ndarray, axis: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Two-pass ``(count, mean, M2)`` per channel, in float64.

    Raises ValueError where finite data has an ``M2`` beyond float64 (see
    :func:`rescue_overflow`).
    """
    num_channels = x.shape[axis]
    count = x.size // num_channels if num_channels else 0
    if count == 0:
        zeros = np.zeros(num_channels, dtype=np.float64)
        return 0, zeros, zeros.copy()
    axes = reduce_axes(x.ndim, axis)
    x64 = np.asarray(x, dtype=np.float64)
    mean = x64.mean(axis=axes)
    centered = x64 - _per_channel(mean, x.ndim, axis)
    m2 = np.square(centered, out=centered).sum(axis=axes)
    if not math.isfinite(m2 @ mean):  # one C-value dot: NaN or inf if any is
        mean, m2 = rescue_overflow(x, axis, mean, m2)
    return int(count), mean, m2


#: Data scaled down to values of about this size in the error's advice: ``M2``
#: stays far inside float64 for any count of values.
_ADVISED_MAGNITUDE = 100


@quiet_nonfinite
def rescue_overflow(
    x: np.ndarray, axis: int, mean: np.ndarray, m2: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``mean`` and ``M2`` with every channel that overflowed on finite data redone.

    Sums of finite float64 values can overflow on the way (a channel's plain sum
    near 1e308, or squares from 1.3e154 on) although the statistics themselves
    are representable: such a channel is computed again exactly on its values
    scaled by a power of two, ``mean = x₀ + mean(x − x₀)`` (exact on a constant
    channel) and ``M2 = Σ(x − mean)²``, and scaled back. Both backends call this
    when their result is not finite, so they agree on that data; the normal path
    costs one check of the C-value result. Channels with NaN or inf in the data
    keep the values given: the caller sees them in the output.

    Raises
    ------
    ValueError
        When a channel of finite values has an ``M2`` beyond float64's range
        (about 1.8e308): no float64 variance can describe it.
    """
    bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(m2)))
    if bad.size == 0:
        return mean, m2
    values = np.moveaxis(np.take(x, bad, axis=axis), axis, 0).reshape(bad.size, -1)
    values = values.astype(np.float64)
    finite = np.isfinite(values).all(axis=1)
    bad, values = bad[finite], values[finite]
    if bad.size == 0:
        return mean, m2
    exponent = np.frexp(np.abs(values).max(axis=1))[1]
    scaled = np.ldexp(values, -exponent[:, None])
    first = scaled[:, 0]
    scaled_mean = first + (scaled - first[:, None]).mean(axis=1)
    scaled_mean = np.clip(scaled_mean, scaled.min(axis=1), scaled.max(axis=1))
    scaled_m2 = np.square(scaled - scaled_mean[:, None]).sum(axis=1)
    new_m2 = np.ldexp(scaled_m2, 2 * exponent)
    too_large = np.flatnonzero(~np.isfinite(new_m2))
    if too_large.size:
        _raise_beyond_float64(x, axis, bad[too_large[0]], values[too_large[0]])
    mean, m2 = mean.copy(), m2.copy()
    mean[bad] = np.ldexp(scaled_mean, exponent)
    m2[bad] = new_m2
    return mean, m2


def _raise_beyond_float64(
    x: np.ndarray, axis: int, channel: int, values: np.ndarray
) -> None:
    largest = float(np.abs(values).max())
    power = max(1, math.ceil(math.log10(largest)) - _ADVISED_MAGNITUDE)
    raise ValueError(
        f"x has finite values whose variance is beyond float64's range: channel "
        f"{channel} (axis {axis}) holds values up to {largest:.3g} in magnitude, and "
        "the sum of their squared deviations from the mean exceeds 1.8e308. Batch "
        "normalization does not change under a per-channel scale (except through "
        f"eps): normalize x / 1e{power} instead."
    )


@quiet_nonfinite
def normalize(
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray | None,
    out_dtype: np.dtype,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``y = (x − mean) · scale + shift`` per channel; the subtraction comes first.

    Subtracting the mean before scaling keeps float32 exact for large means, where
    the folded ``x·a + (β − mean·a)`` loses whole digits to cancellation.
    """
    y = np.asarray(x, dtype=np.float64) - _per_channel(mean, x.ndim, axis)
    y *= _per_channel(scale, x.ndim, axis)
    if shift is not None:
        y += _per_channel(np.asarray(shift, dtype=np.float64), x.ndim, axis)
    return _finish(y, out_dtype, out)


def forward_train(
    x: np.ndarray,
    axis: int,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    eps_placement: str,
    ddof: int,
    out: np.ndarray | None = None,
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """None: the reference has no fused training pass.

    ``functional.forward_train`` then composes :func:`batch_moments` and
    :func:`normalize`; a fast backend may return ``(count, mean, M2, inv_std, y)``
    computed in one call instead.
    """
    return None


def _finish(result: np.ndarray, dtype: np.dtype, out: np.ndarray | None) -> np.ndarray:
    """``result`` (float64) cast to ``dtype``, or written into ``out``."""
    if out is None:
        return result.astype(dtype, copy=False)
    out[...] = result.astype(out.dtype, copy=False)
    return out


def _x_hat(
    x: np.ndarray, axis: int, mean: np.ndarray, inv_std: np.ndarray
) -> np.ndarray:
    """``x̂ = (x − mean) · inv_std`` per channel, a new float64 array."""
    x_hat = np.asarray(x, dtype=np.float64) - _per_channel(mean, x.ndim, axis)
    x_hat *= _per_channel(inv_std, x.ndim, axis)
    return x_hat


@quiet_nonfinite
def param_grads(
    dy: np.ndarray, x: np.ndarray, axis: int, mean: np.ndarray, inv_std: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x̂, Σ dy·x̂, Σ dy)`` per channel, all float64."""
    axes = reduce_axes(x.ndim, axis)
    x_hat = _x_hat(x, axis, mean, inv_std)
    dy64 = np.asarray(dy, dtype=np.float64)
    return x_hat, (dy64 * x_hat).sum(axis=axes), dy64.sum(axis=axes)


def grad_sums(
    dy: np.ndarray, x: np.ndarray, axis: int, mean: np.ndarray, inv_std: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(Σ dy·x̂, Σ dy)`` per channel, float64: the reductions of the gradient."""
    _, dgamma, dbeta = param_grads(dy, x, axis, mean, inv_std)
    return dgamma, dbeta


@quiet_nonfinite
def backward_train(
    dy: np.ndarray,
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    gamma: np.ndarray | None,
    k: np.ndarray,
    count: int,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact training-mode gradient (see the module docstring for ``k``)."""
    x_hat, dgamma, dbeta = param_grads(dy, x, axis, mean, inv_std)
    dx = _apply_train(dy, x_hat, axis, inv_std, gamma, k, count, dgamma, dbeta)
    return _finish(dx, x.dtype, out), dgamma, dbeta


@quiet_nonfinite
def backward_apply(
    dy: np.ndarray,
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    gamma: np.ndarray | None,
    k: np.ndarray,
    count: int,
    dgamma: np.ndarray,
    dbeta: np.ndarray,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``dx`` of the training gradient from sums ``Σ dy·x̂``, ``Σ dy`` given.

    The sums and ``count`` may cover more data than ``x`` (a batch split across
    processes): this is the second half of :func:`backward_train`.
    """
    x_hat = _x_hat(x, axis, mean, inv_std)
    dx = _apply_train(dy, x_hat, axis, inv_std, gamma, k, count, dgamma, dbeta)
    return _finish(dx, x.dtype, out)


def _apply_train(
    dy: np.ndarray,
    x_hat: np.ndarray,
    axis: int,
    inv_std: np.ndarray,
    gamma: np.ndarray | None,
    k: np.ndarray,
    count: int,
    dgamma: np.ndarray,
    dbeta: np.ndarray,
) -> np.ndarray:
    """``γ s (dy − Σdy/m + k x̂ Σ(dy x̂))``, overwriting ``x_hat``."""
    ndim = x_hat.ndim
    gain = channel_gain(inv_std, gamma)
    dx = x_hat
    dx *= _per_channel(k * dgamma, ndim, axis)
    dx += np.asarray(dy, dtype=np.float64)
    dx -= _per_channel(dbeta / count, ndim, axis)
    dx *= _per_channel(gain, ndim, axis)
    return dx


@quiet_nonfinite
def backward_eval(
    dy: np.ndarray,
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    gamma: np.ndarray | None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact gradient when the statistics are constants (eval mode)."""
    _, dgamma, dbeta = param_grads(dy, x, axis, mean, inv_std)
    gain = channel_gain(inv_std, gamma)
    dx = np.asarray(dy, dtype=np.float64) * _per_channel(gain, x.ndim, axis)
    return _finish(dx, x.dtype, out), dgamma, dbeta
