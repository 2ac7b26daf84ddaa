"""Batch renormalization (Ioffe, 2017) as stateless functions: forward, backward.

Training normalizes with the batch statistics and then corrects towards the running
ones, with the correction held constant in the backward pass::

    x̂ = (x − μ_B) / σ_B,
    r = clip(σ_B / σ_run, 1/rmax, rmax),   d = clip((μ_B − μ_run) / σ_run, −dmax, dmax),
    y = γ · (x̂ · r + d) + β.

σ follows the layer's ε convention: ``σ_B = √(var_B + ε)`` (or ``√var_B + ε`` for
darknet's ``eps_placement="outside"``, ``var_B`` over ``m − ddof``) and
``σ_run = 1 / inv_std_of(running_var, ε)``, exactly the σ that eval mode divides
by. So when neither clip is active, ``x̂ · r + d = (x − μ_run) / σ_run`` and the
training output is the eval output. ``rmax = 1, dmax = 0`` is plain batch norm.

Backward: r and d are constants (stop-gradient, as in the paper), so
``dx`` is the ordinary batch-norm gradient with γ replaced by ``γ · r`` (see
:mod:`batchnorm.kernels.reference` for its derivation), ``dγ = r · Σ dy · x̂ + d · Σ dy``
and ``dβ = Σ dy``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from batchnorm import functional as F
from batchnorm import kernels
from batchnorm._validation import (
    check_ddof,
    check_normalization,
    check_out,
    check_running,
    training_count_error,
)
from batchnorm.moments import Moments

__all__ = [
    "RenormCache",
    "backward_renorm",
    "check_renorm_limits",
    "forward_renorm",
    "renorm_factors",
    "renorm_schedule",
]


@dataclass(frozen=True)
class RenormCache:
    """What :func:`backward_renorm` needs from :func:`forward_renorm`.

    Attributes
    ----------
    cache : Cache
        The batch's statistics; its ``gamma`` is ``γ · r`` (float64), so
        :func:`batchnorm.functional.backward` on it gives the stop-gradient ``dx``.
    r, d : ndarray, shape (C,), float64
        The corrections of this pass.
    """

    cache: F.Cache
    r: np.ndarray
    d: np.ndarray

    @property
    def moments(self) -> Moments:
        """Exact ``(count, mean, M2)`` of the batch."""
        return self.cache.moments


def check_renorm_limits(rmax: Any, dmax: Any) -> tuple[float, float]:
    """Validate ``rmax >= 1`` and ``dmax >= 0`` (``inf`` means no clipping)."""
    for name, value in (("rmax", rmax), ("dmax", dmax)):
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
            raise TypeError(f"{name} must be a float; got {type(value).__name__}.")
    rmax, dmax = float(rmax), float(dmax)
    if not rmax >= 1.0:
        raise ValueError(
            f"rmax must be >= 1 (r is clipped to [1/rmax, rmax]); got {rmax}. "
            "rmax=1 with dmax=0 is plain batch norm; renorm_schedule ramps them."
        )
    if not dmax >= 0.0:
        raise ValueError(
            f"dmax must be >= 0 (d is clipped to [-dmax, dmax]); got {dmax}. "
            "dmax=0 disables the mean correction."
        )
    return rmax, dmax


def renorm_schedule(
    step: int,
    warmup: int,
    ramp: int,
    *,
    rmax_final: float = 3.0,
    dmax_final: float = 5.0,
) -> tuple[float, float]:
    """``(rmax, dmax)`` at ``step``: plain BN for ``warmup`` steps, then linear ramps.

    The paper's schedule shape: ``rmax = 1, dmax = 0`` (plain batch norm) while the
    running statistics settle, then both grow linearly over ``ramp`` steps to
    ``rmax_final`` and ``dmax_final`` (the paper: 3 and 5) and stay there.

    Examples
    --------
    >>> [renorm_schedule(s, warmup=100, ramp=200) for s in (0, 100, 200, 300, 900)]
    [(1.0, 0.0), (1.0, 0.0), (2.0, 2.5), (3.0, 5.0), (3.0, 5.0)]
    """
    check_renorm_limits(rmax_final, dmax_final)
    if warmup < 0 or ramp < 0:
        raise ValueError(
            f"warmup and ramp must be >= 0 steps; got warmup={warmup}, ramp={ramp}."
        )
    if ramp == 0:
        t = 1.0 if step >= warmup else 0.0
    else:
        t = min(max((step - warmup) / ramp, 0.0), 1.0)
    return 1.0 + t * (float(rmax_final) - 1.0), t * float(dmax_final)


def renorm_factors(
    moments: Moments,
    inv_std: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    *,
    rmax: float,
    dmax: float,
    eps: float,
    eps_placement: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Clipped ``r = σ_B/σ_run`` and ``d = (μ_B − μ_run)/σ_run``, float64, shape (C,).

    ``inv_std`` is the batch's ``1/σ_B``. Where ``σ_run = 0`` (possible only with
    ``eps = 0``) the ratios are infinite and clip to their limits; 0/0 gives
    ``r = 1`` and ``d = 0``.
    """
    inv_std_run = F.inv_std_of(running_var, eps, eps_placement)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = inv_std_run / inv_std
        d = (moments.mean - running_mean.astype(np.float64)) * inv_std_run
    r = np.where(np.isnan(r), 1.0, r)
    d = np.where(np.isnan(d), 0.0, d)
    return np.clip(r, 1.0 / rmax, rmax), np.clip(d, -dmax, dmax)


def forward_renorm(
    x: Any,
    gamma: Any,
    beta: Any,
    running_mean: Any,
    running_var: Any,
    *,
    rmax: float = 3.0,
    dmax: float = 5.0,
    axis: int = 1,
    eps: float = 1e-6,
    eps_placement: str = "inside",
    ddof: int = 0,
    backend: str | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, RenormCache]:
    """Batch renormalization in training: ``y = γ · (x̂ · r + d) + β``.

    Parameters
    ----------
    x : ndarray, shape (N, C, *) with C at ``axis``
    gamma, beta : ndarray, shape (C,), or None
    running_mean, running_var : ndarray, shape (C,)
        Read only; update them afterwards with
        :func:`batchnorm.functional.update_running_stats` on ``cache.moments``.
    rmax : float >= 1, default 3
    dmax : float >= 0, default 5
    axis, eps, eps_placement, ddof, backend, out
        As in :func:`batchnorm.functional.forward_train`.

    Returns
    -------
    y : ndarray, shape and dtype of ``x``
        ``(x − μ_B) · (γ · r / σ_B) + (γ · d + β)``, the mean subtracted first.
    cache : RenormCache

    Raises
    ------
    TypeError, ValueError
        As :func:`batchnorm.functional.forward_train`, and for ``rmax < 1`` or
        ``dmax < 0``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1.0], [3.0]])                 # μ_B = 2, σ_B = 1 (ε negligible)
    >>> y, cache = forward_renorm(x, None, None, np.array([0.0]), np.array([4.0]),
    ...                           eps=1e-30, backend="numpy")
    >>> cache.r, cache.d                              # σ_run = 2: r = 1/2, d = 1
    (array([0.5]), array([1.]))
    >>> y                                             # (x − μ_run)/σ_run
    array([[0.5],
           [1.5]])
    """
    x, axis, gamma, beta, eps, eps_placement = check_normalization(
        x, axis, gamma, beta, eps, eps_placement
    )
    num_channels = x.shape[axis]
    running_mean, running_var = check_running(running_mean, running_var, num_channels)
    rmax, dmax = check_renorm_limits(rmax, dmax)
    ddof = check_ddof(ddof)
    out = check_out(
        out,
        x,
        ("x", x),
        ("gamma", gamma),
        ("beta", beta),
        ("running_mean", running_mean),
        ("running_var", running_var),
    )
    count = x.size // num_channels if num_channels else 0
    if x.size == 0:  # as forward_train: empty y, no statistics, r = 1 and d = 0
        y, cache = F.empty_pass(x, gamma, axis, eps, eps_placement, ddof, out)
        return y, RenormCache(cache, np.ones(num_channels), np.zeros(num_channels))
    if count < 2:
        raise training_count_error(x, axis, count)
    ops = kernels.resolve(backend)
    moments = Moments(*ops.batch_moments(x, axis))
    inv_std = F.inv_std_of(moments.var(ddof), eps, eps_placement)
    r, d = renorm_factors(
        moments,
        inv_std,
        running_mean,
        running_var,
        rmax=rmax,
        dmax=dmax,
        eps=eps,
        eps_placement=eps_placement,
    )
    gain = r if gamma is None else r * gamma.astype(np.float64)
    scale = inv_std * gain
    shift = d if gamma is None else d * gamma.astype(np.float64)
    if beta is not None:
        shift = shift + beta.astype(np.float64)
    y = ops.normalize(x, axis, moments.mean, scale, shift, x.dtype, out=out)
    cache = F.Cache(x, moments, inv_std, gain, axis, eps, eps_placement, ddof)
    return y, RenormCache(cache, r, d)


def backward_renorm(
    dy: Any,
    cache: RenormCache,
    *,
    backend: str | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradient of :func:`forward_renorm` with r and d held constant.

    Returns
    -------
    dx : ndarray, shape and dtype of ``x``
        ``γ r · inv_std · (dy − Σdy/m + k · x̂ · Σ(dy·x̂))``.
    dgamma, dbeta : ndarray, shape (C,), float64
        ``r · Σ dy · x̂ + d · Σ dy`` and ``Σ dy``.
    """
    if not isinstance(cache, RenormCache):
        raise TypeError(
            f"cache must be the RenormCache returned by forward_renorm; got "
            f"{type(cache).__name__}."
        )
    dx, dgamma_hat, dbeta = F.backward(dy, cache.cache, backend=backend, out=out)
    return dx, cache.r * dgamma_hat + cache.d * dbeta, dbeta
