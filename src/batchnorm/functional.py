"""The seed's batch normalization as stateless functions: validation, dtypes, dispatch.

This module is the single source of truth for the math; nothing here mutates its
arguments. The derivation of the gradient lives in
:mod:`batchnorm.kernels._numpy`.

Conventions (see the README's table):

- statistics per channel over every axis except ``axis``; ``m = N · ∏ spatial``;
- ``y = γ (x − μ) / √(σ² + ε) + β`` with the biased σ² and ε = 1e-6 (the seed);
  ``eps_placement="outside"`` gives darknet's ``(x − μ)/(√σ² + ε)`` and ``ddof=1``
  its ``m − 1`` variance;
- statistics are float64; ``y`` and ``dx`` have the dtype of ``x``;
- running statistics: ``run ← momentum · run + (1 − momentum) · batch``, momentum on
  the OLD value (PyTorch's ``momentum=0.1`` is our 0.9).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchnorm import _backend
from batchnorm._validation import (
    EPS_PLACEMENTS,
    ON_NONFINITE,
    RUNNING_VAR_KINDS,
    as_float_array,
    check_channel_vector,
    check_choice,
    check_ddof,
    check_eps,
    check_input,
    check_momentum,
    require_channel_vector,
)
from batchnorm.moments import Moments

__all__ = [
    "Cache",
    "NonFiniteStatisticsError",
    "backward",
    "backward_eval",
    "forward_eval",
    "forward_train",
    "inv_std_of",
    "update_running_stats",
]


class NonFiniteStatisticsError(FloatingPointError, ValueError):
    """A batch produced NaN or infinite statistics; running statistics were kept."""


@dataclass(frozen=True)
class Cache:
    """What :func:`backward` needs from :func:`forward_train`.

    ``x`` is a reference to the input, not a copy (the backward pass recomputes
    ``x̂`` from it instead of storing a second array of the input's size): do not
    modify ``x`` in place between the forward and the backward pass.

    Attributes
    ----------
    x : ndarray, shape (N, C, *)
    moments : Moments
        Exact ``(count, mean, M2)`` of the batch, float64.
    inv_std : ndarray, shape (C,), float64
        ``1/√(var + ε)`` (or ``1/(√var + ε)`` for ``eps_placement="outside"``), where
        ``var = M2 / (m − ddof)``.
    gamma : ndarray of shape (C,) or None
    axis, eps, eps_placement, ddof
        The options of the forward pass.
    """

    x: np.ndarray
    moments: Moments
    inv_std: np.ndarray
    gamma: np.ndarray | None
    axis: int
    eps: float
    eps_placement: str
    ddof: int

    @property
    def mean(self) -> np.ndarray:
        """Per-channel batch mean, float64, shape (C,)."""
        return self.moments.mean

    @property
    def var(self) -> np.ndarray:
        """Per-channel biased batch variance ``M2 / m``, float64, shape (C,)."""
        return self.moments.var(0)

    @property
    def count(self) -> int:
        """Values per channel, ``m = N · ∏ spatial``."""
        return self.moments.count


def inv_std_of(
    var: np.ndarray, eps: float, eps_placement: str = "inside"
) -> np.ndarray:
    """``1/√(var + ε)`` or, for darknet's ``"outside"``, ``1/(√var + ε)``, float64.

    ``var`` is >= 0 (or NaN); only ε = 0 can divide by zero, so only then is the
    warning silenced (``np.errstate`` costs 1.5 µs, a lot for a small batch).
    """
    var = np.asarray(var, dtype=np.float64)
    if eps == 0.0:
        with np.errstate(divide="ignore"):
            return 1.0 / np.sqrt(var)
    if eps_placement == "inside":
        return 1.0 / np.sqrt(var + eps)
    return 1.0 / (np.sqrt(var) + eps)


def _training_count_error(x: np.ndarray, axis: int, count: int) -> ValueError:
    spatial = [s for a, s in enumerate(x.shape) if a not in (0, axis)]
    product = " · ".join(str(s) for s in [x.shape[0], *spatial])
    return ValueError(
        f"training needs at least 2 values per channel to estimate a variance, but x "
        f"of shape {x.shape} with channel axis {axis} has m = N · ∏ spatial = "
        f"{product} = {count}. Use a batch of 2 or more samples, or normalize with "
        "the running statistics instead (forward_eval, or layer.eval())."
    )


def forward_train(
    x: Any,
    gamma: Any,
    beta: Any,
    *,
    axis: int = 1,
    eps: float = 1e-6,
    eps_placement: str = "inside",
    ddof: int = 0,
    backend: str | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, Cache]:
    """Normalize ``x`` with its own per-channel batch statistics.

    Parameters
    ----------
    x : ndarray, shape (N, C, *) with C at ``axis``
        float16, bfloat16, float32 or float64; any strides.
    gamma, beta : ndarray, shape (C,), or None
        Scale and shift; ``None`` means 1 and 0.
    axis : int, default 1
        The channel axis (``-1`` for channels-last). Not 0: that is the batch.
    eps : float, default 1e-6
        Added to the variance inside the square root (the seed).
    eps_placement : {"inside", "outside"}
        ``"outside"`` reproduces darknet: ``(x − μ) / (√var + ε)``.
    ddof : {0, 1}
        Normalizing variance ``M2/(m − ddof)``: 0 is the seed, 1 is darknet.
    backend : {"numpy", "numba"} or None
        Kernel implementation; ``None`` uses ``$BATCHNORM_BACKEND`` or the fastest
        installed.
    out : ndarray, optional
        Where to write ``y`` (then ``y is out``): the shape and dtype of ``x``,
        writeable, sharing no memory with ``x``. Saves an allocation per call.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
        ``(x − mean) · (γ · inv_std) + β``.
    cache : Cache
        Batch statistics (``cache.mean``, ``cache.var`` biased, ``cache.count``)
        and what :func:`backward` needs.

    Raises
    ------
    TypeError
        Non-floating ``x``, ``gamma`` or ``beta``.
    ValueError
        Fewer than 2 dimensions, a bad axis, parameter shapes that do not match C,
        or fewer than 2 values per channel (the variance is undefined).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, cache = forward_train(x, None, None, backend="numpy")
    >>> cache.mean, cache.var, cache.count
    (array([ 2., 20.]), array([  1., 100.]), 2)
    >>> np.round(y, 6)
    array([[-1., -1.],
           [ 1.,  1.]])
    """
    x, axis = check_input(x, axis)
    num_channels = x.shape[axis]
    gamma = check_channel_vector(gamma, "gamma", num_channels, optional=True)
    beta = check_channel_vector(beta, "beta", num_channels, optional=True)
    eps = check_eps(eps)
    eps_placement = check_choice(eps_placement, "eps_placement", EPS_PLACEMENTS)
    ddof = check_ddof(ddof)
    out = _check_out(out, x, ("x", x))
    count = x.size // num_channels if num_channels else 0
    if x.size == 0:
        raise ValueError(
            f"cannot compute batch statistics of an empty batch (x shape {x.shape}). "
            "Skip the step, or use forward_eval, which accepts empty input."
        )
    if count < 2:
        raise _training_count_error(x, axis, count)
    kernels = _backend.resolve(backend)
    # A small tensor in one compiled call where the backend has one (the same
    # values as the composition below), else statistics, then normalize.
    fused = kernels.forward_train(x, axis, gamma, beta, eps, eps_placement, ddof, out)
    if fused is not None:
        count, mean, m2, inv_std, y = fused
        moments = Moments(count, mean, m2)
    else:
        moments = Moments(*kernels.batch_moments(x, axis))
        var = moments.m2 / (count - ddof)  # moments.var(ddof); count >= 2 > ddof
        inv_std = inv_std_of(var, eps, eps_placement)
        scale = inv_std if gamma is None else inv_std * gamma.astype(np.float64)
        y = kernels.normalize(x, axis, moments.mean, scale, beta, x.dtype, out=out)
    return y, Cache(x, moments, inv_std, gamma, axis, eps, eps_placement, ddof)


def _check_out(
    out: Any, x: np.ndarray, *inputs: tuple[str, np.ndarray]
) -> np.ndarray | None:
    """Validate an ``out=`` array for a result shaped like ``x``."""
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
        if np.may_share_memory(out, array) and np.shares_memory(out, array):
            raise ValueError(
                f"out must not share memory with {name}: the kernels read {name} "
                "while they write out. Pass a separate array (np.empty_like(x))."
            )
    return out


def _check_dy(dy: Any, x: np.ndarray) -> np.ndarray:
    dy = as_float_array(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(
            f"dy must have the shape of the forward input {x.shape}; got {dy.shape}. "
            "Pass the gradient of the loss with respect to y."
        )
    return dy


def backward(
    dy: Any,
    cache: Cache,
    *,
    backend: str | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact gradient of :func:`forward_train` (batch statistics depend on ``x``).

    Parameters
    ----------
    dy : ndarray, shape of ``x``
        ``∂L/∂y``.
    cache : Cache
        From the matching :func:`forward_train` call.
    backend : {"numpy", "numba"} or None
    out : ndarray, optional
        Where to write ``dx``: the shape and dtype of ``x``, writeable, sharing no
        memory with ``x`` or ``dy``.

    Returns
    -------
    dx : ndarray, shape and dtype of ``x``
    dgamma, dbeta : ndarray, shape (C,), float64
        ``Σ dy · x̂`` and ``Σ dy`` per channel (returned even when ``gamma`` or
        ``beta`` was ``None``: they are the gradients at γ = 1, β = 0).

    Notes
    -----
    ``dx = γ · inv_std · (dy − Σdy/m + k · x̂ · Σ(dy·x̂))`` with ``k = −1/(m − ddof)``
    for ε inside the root; the derivation, including darknet's ε outside, is in
    :mod:`batchnorm.kernels._numpy`. Darknet's own ``backward_batchnorm_layer`` is
    not the gradient of its forward (it differentiates the ε-inside formula with
    the biased ``1/m`` while its forward uses ε outside and ``m − 1``); this is.
    """
    if not isinstance(cache, Cache):
        raise TypeError(
            f"cache must be the Cache returned by forward_train; got "
            f"{type(cache).__name__}."
        )
    x, axis = cache.x, cache.axis
    dy = _check_dy(dy, x)
    out = _check_out(out, x, ("x", x), ("dy", dy))
    k = gradient_k(cache.moments, cache.eps, cache.eps_placement, cache.ddof)
    kernels = _backend.resolve(backend)
    return kernels.backward_train(
        dy, x, axis, cache.mean, cache.inv_std, cache.gamma, k, cache.count, out=out
    )


def gradient_k(
    moments: Moments, eps: float, eps_placement: str, ddof: int
) -> np.ndarray:
    """Per-channel ``k`` of the training gradient (see :mod:`batchnorm.kernels._numpy`).

    ``−1/(m − ddof)`` for ε inside the root; ``−(1 + ε/√v)/(m − ddof)`` for ε
    outside, and 0 where ``v = 0`` (every ``x̂`` is then 0).
    """
    count = moments.count
    if eps_placement == "inside":
        return np.full(moments.num_channels, -1.0 / (count - ddof))
    std = np.sqrt(moments.var(ddof))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(std > 0, -(1.0 + eps / std) / (count - ddof), 0.0)


def _check_running(
    running_mean: Any, running_var: Any, num_channels: int
) -> tuple[np.ndarray, np.ndarray]:
    running_mean = require_channel_vector(running_mean, "running_mean", num_channels)
    running_var = require_channel_vector(running_var, "running_var", num_channels)
    for name, values in (("running_mean", running_mean), ("running_var", running_var)):
        as64 = np.asarray(values, np.float64)
        ok = np.isfinite(as64) & ((as64 >= 0) if name == "running_var" else True)
        bad = np.flatnonzero(~ok)
        if bad.size:
            need = "finite and >= 0" if name == "running_var" else "finite"
            raise ValueError(
                f"{name} must be {need} in every channel; channels "
                f"{bad[:8].tolist()} hold {as64[bad[:8]].tolist()}. Reset the "
                "running statistics (layer.reset_running_stats()) or reload a good "
                "checkpoint."
            )
    return running_mean, running_var


def forward_eval(
    x: Any,
    gamma: Any,
    beta: Any,
    running_mean: Any,
    running_var: Any,
    *,
    axis: int = 1,
    eps: float = 1e-6,
    eps_placement: str = "inside",
    backend: str | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Normalize ``x`` with fixed (running) statistics: test time in the seed.

    Parameters
    ----------
    x : ndarray, shape (N, C, *); an empty batch gives an empty output
    gamma, beta : ndarray, shape (C,), or None
    running_mean, running_var : ndarray, shape (C,)
        ``running_var`` is used as stored (unbiased or biased, whatever was kept).
    axis, eps, eps_placement, backend, out
        As in :func:`forward_train`.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
        ``(x − running_mean) · (γ · inv_std) + β``.

    Examples
    --------
    >>> import numpy as np
    >>> forward_eval(np.array([[4.0], [6.0]]), None, None, np.array([5.0]),
    ...              np.array([4.0]), eps=0.0, backend="numpy")
    array([[-0.5],
           [ 0.5]])
    """
    x, axis = check_input(x, axis)
    num_channels = x.shape[axis]
    gamma = check_channel_vector(gamma, "gamma", num_channels, optional=True)
    beta = check_channel_vector(beta, "beta", num_channels, optional=True)
    running_mean, running_var = _check_running(running_mean, running_var, num_channels)
    eps = check_eps(eps)
    eps_placement = check_choice(eps_placement, "eps_placement", EPS_PLACEMENTS)
    out = _check_out(out, x, ("x", x))
    inv_std = inv_std_of(running_var, eps, eps_placement)
    scale = inv_std if gamma is None else inv_std * gamma.astype(np.float64)
    mean = running_mean.astype(np.float64)
    if x.size == 0:
        return np.empty(x.shape, dtype=x.dtype) if out is None else out
    kernels = _backend.resolve(backend)
    return kernels.normalize(x, axis, mean, scale, beta, x.dtype, out=out)


def backward_eval(
    dy: Any,
    x: Any,
    gamma: Any,
    running_mean: Any,
    running_var: Any,
    *,
    axis: int = 1,
    eps: float = 1e-6,
    eps_placement: str = "inside",
    backend: str | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact gradient of :func:`forward_eval`: the statistics are constants.

    ``out``, optional, is where to write ``dx``: the shape and dtype of ``x``,
    writeable, sharing no memory with ``x`` or ``dy``.

    Returns
    -------
    dx : ndarray, shape and dtype of ``x``
        ``dy · γ · inv_std``.
    dgamma, dbeta : ndarray, shape (C,), float64
        ``Σ dy · x̂`` and ``Σ dy`` with ``x̂ = (x − running_mean) · inv_std``.
    """
    x, axis = check_input(x, axis)
    dy = _check_dy(dy, x)
    num_channels = x.shape[axis]
    gamma = check_channel_vector(gamma, "gamma", num_channels, optional=True)
    running_mean, running_var = _check_running(running_mean, running_var, num_channels)
    eps = check_eps(eps)
    eps_placement = check_choice(eps_placement, "eps_placement", EPS_PLACEMENTS)
    out = _check_out(out, x, ("x", x), ("dy", dy))
    inv_std = inv_std_of(running_var, eps, eps_placement)
    kernels = _backend.resolve(backend)
    return kernels.backward_eval(
        dy, x, axis, running_mean.astype(np.float64), inv_std, gamma, out=out
    )


def update_running_stats(
    running_mean: Any,
    running_var: Any,
    cache: Cache | Moments,
    *,
    momentum: float | None = 0.99,
    running_var_kind: str = "unbiased",
    num_values_seen: int | None = None,
    on_nonfinite: str = "raise",
) -> tuple[np.ndarray, np.ndarray]:
    """New running statistics after one batch; the inputs are not modified.

    Parameters
    ----------
    running_mean, running_var : ndarray, shape (C,)
    cache : Cache or Moments
        The batch's statistics (from :func:`forward_train` or :class:`Moments`).
    momentum : float in [0, 1] or None, default 0.99
        Weight on the OLD value: ``run ← momentum · run + (1 − momentum) · batch``
        (the seed's text; its formula puts β on the new sample, a typo). PyTorch's
        ``momentum=0.1`` is ``0.9`` here. ``None`` keeps the exact statistics of every
        value seen so far (count-weighted merge, not PyTorch's equal weight per
        batch) and needs ``num_values_seen``.
    running_var_kind : {"unbiased", "biased"}
        Store ``M2/(m − 1)`` (darknet, PyTorch) or ``M2/m`` (Keras, ONNX).
    num_values_seen : int, optional
        Values per channel already summarized by the running statistics; only for
        ``momentum=None``.
    on_nonfinite : {"raise", "skip"}
        A batch with NaN or infinite statistics never reaches the running
        statistics: ``"raise"`` raises :class:`NonFiniteStatisticsError`, ``"skip"``
        warns and returns copies of the old values.

    Returns
    -------
    new_mean, new_var : ndarray, shape (C,), dtypes of the inputs

    Examples
    --------
    >>> import numpy as np
    >>> m = Moments(2, np.array([10.0]), np.array([2.0]))   # batch var 1, unbiased 2
    >>> update_running_stats(np.zeros(1), np.ones(1), m, momentum=0.9)
    (array([1.]), array([1.1]))
    """
    moments = cache.moments if isinstance(cache, Cache) else cache
    if not isinstance(moments, Moments):
        raise TypeError(
            f"cache must be a Cache from forward_train or a Moments; got "
            f"{type(cache).__name__}."
        )
    running_mean, running_var = _check_running(
        running_mean, running_var, moments.num_channels
    )
    momentum = check_momentum(momentum)
    kind = check_choice(running_var_kind, "running_var_kind", RUNNING_VAR_KINDS)
    on_nonfinite = check_choice(on_nonfinite, "on_nonfinite", ON_NONFINITE)
    ddof = 1 if kind == "unbiased" else 0
    if moments.count <= ddof:
        raise ValueError(
            f"running_var_kind={kind!r} needs more than {ddof} value per channel in "
            f"the batch; got count={moments.count}. Use a larger batch, or "
            "running_var_kind='biased'."
        )
    bad = np.flatnonzero(~(np.isfinite(moments.mean) & np.isfinite(moments.m2)))
    if bad.size:
        message = (
            f"batch statistics are not finite in channels {bad[:8].tolist()}; the "
            "running statistics were left unchanged. Look for NaN/inf in the input "
            "or an exploding learning rate; pass on_nonfinite='skip' to skip such "
            "batches with a warning."
        )
    else:
        new_mean, new_var = _blend(
            running_mean, running_var, moments, momentum, ddof, num_values_seen
        )
        bad = np.flatnonzero(~(np.isfinite(new_mean) & np.isfinite(new_var)))
        if not bad.size:
            return new_mean, new_var
        message = (
            f"the updated running statistics overflow {running_var.dtype} in "
            f"channels {bad[:8].tolist()} (batch variance "
            f"{moments.var(ddof)[bad[:8]].tolist()}); they were left unchanged. "
            "Keep the running statistics in float32 or float64 (BatchNorm dtype=), "
            "or rescale the input."
        )
    if on_nonfinite == "raise":
        raise NonFiniteStatisticsError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return running_mean.copy(), running_var.copy()


def _blend(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    moments: Moments,
    momentum: float | None,
    ddof: int,
    num_values_seen: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The EMA (or exact cumulative) update, cast to the running dtypes."""
    if momentum is None:
        new_mean, new_var = _cumulative(
            running_mean, running_var, moments, ddof, num_values_seen
        )
    else:
        old_mean = running_mean.astype(np.float64)
        old_var = running_var.astype(np.float64)
        new_mean = momentum * old_mean + (1.0 - momentum) * moments.mean
        new_var = momentum * old_var + (1.0 - momentum) * moments.var(ddof)
    with np.errstate(over="ignore"):  # an overflow becomes inf, which is checked
        return new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)


def _cumulative(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    batch: Moments,
    ddof: int,
    num_values_seen: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    if (
        num_values_seen is None
        or isinstance(num_values_seen, bool)
        or not isinstance(num_values_seen, int | np.integer)
        or num_values_seen < 0
    ):
        raise ValueError(
            "momentum=None (exact cumulative statistics) needs num_values_seen, the "
            "number of values per channel the running statistics already hold, as "
            f"an int >= 0; got {num_values_seen!r}. The BatchNorm layer tracks it "
            "for you."
        )
    seen = int(num_values_seen)
    if seen == 0:
        previous = Moments.empty(batch.num_channels)
    else:
        m2 = running_var.astype(np.float64) * max(seen - ddof, 0)
        previous = Moments(seen, running_mean.astype(np.float64), m2)
    total = previous.merge(batch)
    return total.mean, total.var(ddof)
