"""The seed's batch normalization as stateless functions: validation, dtypes, dispatch.

This module is the single source of truth for the math; nothing here mutates its
arguments. The derivation of the gradient lives in
:mod:`batchnorm.kernels.reference`. :class:`Cache` (:mod:`batchnorm.moments`), the
running-statistics update (:mod:`batchnorm.running_stats`) and the argument checks
(:mod:`batchnorm._validation`) live in private modules; this is their public face.

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

from typing import Any

import numpy as np

from batchnorm import kernels
from batchnorm._validation import (
    check_ddof,
    check_dy,
    check_normalization,
    check_out,
    check_running,
    training_count_error,
)
from batchnorm.kernels.reference import channel_gain
from batchnorm.moments import Cache, Moments
from batchnorm.running_stats import NonFiniteStatisticsError, update_running_stats

__all__ = [
    "Cache",
    "NonFiniteStatisticsError",
    "backward",
    "backward_eval",
    "forward_eval",
    "forward_from_moments",
    "forward_train",
    "inv_std_of",
    "update_running_stats",
]


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
        float16, bfloat16, float32 or float64; any strides. An empty batch
        (``x.size == 0``) gives an empty ``y`` and a cache of count 0, whose
        :func:`backward` is an empty ``dx`` and zero parameter gradients, and
        which :func:`update_running_stats` leaves the running statistics by.
    gamma, beta : ndarray, shape (C,), or None
        Scale and shift; ``None`` means 1 and 0.
    axis : int, default 1
        The channel axis (``-1`` for channels-last, ``0`` for (C, N, ...)).
    eps : float > 0, default 1e-6
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
        ``eps <= 0``, or 1 value per channel (the variance is undefined).

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
    x, axis, gamma, beta, eps, eps_placement = check_normalization(
        x, axis, gamma, beta, eps, eps_placement
    )
    ddof = check_ddof(ddof)
    out = check_out(out, x, ("x", x), ("gamma", gamma), ("beta", beta))
    num_channels = x.shape[axis]
    count = x.size // num_channels if num_channels else 0
    if x.size == 0:
        return empty_pass(x, gamma, axis, eps, eps_placement, ddof, out)
    if count < 2:
        raise training_count_error(x, axis, count)
    ops = kernels.resolve(backend)
    # A small tensor in one compiled call where the backend has one (the same
    # values as the composition below), else statistics, then normalize.
    fused = ops.forward_train(x, axis, gamma, beta, eps, eps_placement, ddof, out)
    if fused is not None:
        count, mean, m2, inv_std, y = fused
        moments = Moments(count, mean, m2)
        return y, Cache(x, moments, inv_std, gamma, axis, eps, eps_placement, ddof)
    moments = Moments(*ops.batch_moments(x, axis))
    return _normalize_by(
        ops, x, moments, gamma, beta, axis, eps, eps_placement, ddof, out
    )


def forward_from_moments(
    x: Any,
    moments: Moments,
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
    """Normalize ``x`` with batch ``moments`` gathered elsewhere (e.g. every rank's).

    The tail of :func:`forward_train`, for callers that merged the statistics of a
    larger batch than ``x`` (synchronized batch norm); ``forward_train(x, …)``
    equals ``forward_from_moments(x, Moments.from_array(x, axis), …)``. ``x`` may be
    empty. Arguments as in :func:`forward_train`; ``moments.count`` must be >= 2.
    """
    x, axis, gamma, beta, eps, eps_placement = check_normalization(
        x, axis, gamma, beta, eps, eps_placement
    )
    num_channels = x.shape[axis]
    if not isinstance(moments, Moments) or moments.num_channels != num_channels:
        raise TypeError(
            f"moments must be a Moments of {num_channels} channels (x.shape[axis]); "
            f"got {moments!r}. Build it with Moments.from_array and merge."
        )
    ddof = check_ddof(ddof)
    out = check_out(out, x, ("x", x), ("gamma", gamma), ("beta", beta))
    if moments.count == 0 and x.size == 0:
        return empty_pass(x, gamma, axis, eps, eps_placement, ddof, out)
    if moments.count < 2:
        raise ValueError(
            f"moments must hold at least 2 values per channel; got count = "
            f"{moments.count}. The variance of fewer values is undefined."
        )
    ops = kernels.resolve(backend)
    return _normalize_by(
        ops, x, moments, gamma, beta, axis, eps, eps_placement, ddof, out
    )


def empty_pass(
    x: np.ndarray,
    gamma: np.ndarray | None,
    axis: int,
    eps: float,
    eps_placement: str,
    ddof: int,
    out: np.ndarray | None,
) -> tuple[np.ndarray, Cache]:
    """The training pass of an empty batch: empty ``y``, a cache of count 0.

    Detection heads with no proposals and data-parallel ranks without samples
    send such batches; PyTorch, Keras and TensorFlow return an empty output too.
    The batch has no statistics: ``inv_std`` is NaN and ``cache.var`` raises.
    """
    num_channels = x.shape[axis]
    y = np.empty(x.shape, x.dtype) if out is None else out
    inv_std = np.full(num_channels, np.nan)
    moments = Moments.empty(num_channels)
    return y, Cache(x, moments, inv_std, gamma, axis, eps, eps_placement, ddof)


def _normalize_by(
    ops: Any,
    x: np.ndarray,
    moments: Moments,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    axis: int,
    eps: float,
    eps_placement: str,
    ddof: int,
    out: np.ndarray | None,
) -> tuple[np.ndarray, Cache]:
    """``y = (x − mean) · (γ · inv_std) + β`` for checked arguments, and its Cache."""
    inv_std = inv_std_of(moments.var(ddof), eps, eps_placement)
    scale = channel_gain(inv_std, gamma)
    if x.size:
        y = ops.normalize(x, axis, moments.mean, scale, beta, x.dtype, out=out)
    else:
        y = np.empty(x.shape, x.dtype) if out is None else out
    return y, Cache(x, moments, inv_std, gamma, axis, eps, eps_placement, ddof)


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
    :mod:`batchnorm.kernels.reference`. Darknet's own ``backward_batchnorm_layer`` is
    not the gradient of its forward (it differentiates the ε-inside formula with
    the biased ``1/m`` while its forward uses ε outside and ``m − 1``); this is.
    """
    if not isinstance(cache, Cache):
        raise TypeError(
            f"cache must be the Cache returned by forward_train; got "
            f"{type(cache).__name__}."
        )
    x, axis = cache.x, cache.axis
    dy = check_dy(dy, x)
    out = check_out(out, x, ("x", x), ("dy", dy), ("gamma", cache.gamma))
    if x.size == 0:  # an empty batch (see forward_train)
        num_channels = x.shape[axis]
        dx = np.empty(x.shape, x.dtype) if out is None else out
        return dx, np.zeros(num_channels), np.zeros(num_channels)
    k = gradient_k(cache.moments, cache.eps, cache.eps_placement, cache.ddof)
    ops = kernels.resolve(backend)
    return ops.backward_train(
        dy, x, axis, cache.mean, cache.inv_std, cache.gamma, k, cache.count, out=out
    )


def gradient_k(
    moments: Moments, eps: float, eps_placement: str, ddof: int
) -> np.ndarray:
    """Per-channel ``k`` of the training gradient (:mod:`batchnorm.kernels.reference`).

    ``−1/(m − ddof)`` for ε inside the root; ``−(1 + ε/√v)/(m − ddof)`` for ε
    outside, and 0 where ``v = 0`` (every ``x̂`` is then 0).
    """
    count = moments.count
    if eps_placement == "inside":
        return np.full(moments.num_channels, -1.0 / (count - ddof))
    std = np.sqrt(moments.var(ddof))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(std > 0, -(1.0 + eps / std) / (count - ddof), 0.0)


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
    ...              np.array([4.0]), eps=1e-30, backend="numpy")
    array([[-0.5],
           [ 0.5]])
    """
    x, axis, gamma, beta, eps, eps_placement = check_normalization(
        x, axis, gamma, beta, eps, eps_placement
    )
    running_mean, running_var = check_running(running_mean, running_var, x.shape[axis])
    out = check_out(
        out,
        x,
        ("x", x),
        ("gamma", gamma),
        ("beta", beta),
        ("running_mean", running_mean),
        ("running_var", running_var),
    )
    inv_std = inv_std_of(running_var, eps, eps_placement)
    scale = channel_gain(inv_std, gamma)
    mean = running_mean.astype(np.float64)
    if x.size == 0:
        return np.empty(x.shape, dtype=x.dtype) if out is None else out
    ops = kernels.resolve(backend)
    return ops.normalize(x, axis, mean, scale, beta, x.dtype, out=out)


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
    x, axis, gamma, _, eps, eps_placement = check_normalization(
        x, axis, gamma, None, eps, eps_placement
    )
    dy = check_dy(dy, x)
    running_mean, running_var = check_running(running_mean, running_var, x.shape[axis])
    out = check_out(
        out,
        x,
        ("x", x),
        ("dy", dy),
        ("gamma", gamma),
        ("running_mean", running_mean),
        ("running_var", running_var),
    )
    inv_std = inv_std_of(running_var, eps, eps_placement)
    ops = kernels.resolve(backend)
    return ops.backward_eval(
        dy, x, axis, running_mean.astype(np.float64), inv_std, gamma, out=out
    )
