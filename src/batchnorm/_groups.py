"""The BatchNorm layer's training pass for ghost batches and batch renormalization.

Both split or correct the batch-statistics path; the layer delegates to
:func:`train_pass` and :func:`backward_pass` when ``virtual_batch_size`` or
``renorm`` is set, and keeps its plain path untouched otherwise. The math is
:func:`batchnorm.functional.forward_train` / :func:`~batchnorm.functional.backward`
per group, or :func:`batchnorm.renorm.forward_renorm` /
:func:`~batchnorm.renorm.backward_renorm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from batchnorm import functional as F
from batchnorm._layer_state import updated_running_stats
from batchnorm._validation import as_float_array
from batchnorm.moments import Moments
from batchnorm.renorm import RenormCache, backward_renorm, forward_renorm

if TYPE_CHECKING:
    from batchnorm.layer import BatchNorm


def check_virtual_batch_size(value: Any) -> int | None:
    """``None`` or an int >= 2."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"virtual_batch_size must be an int >= 2 or None; got "
            f"{type(value).__name__}."
        )
    if value < 2:
        raise ValueError(
            f"virtual_batch_size must be >= 2 samples (a group of one sample has no "
            f"batch variance for dense inputs); got {value}. Use None to normalize "
            "the whole batch at once."
        )
    return int(value)


def group_slices(
    num_samples: int, virtual_batch_size: int | None, values_per_sample: int
) -> list[slice]:
    """Consecutive sample ranges along axis 0 normalized together.

    Groups of ``virtual_batch_size`` samples; a remainder forms its own, smaller
    group when it holds at least 2 values per channel (``r · ∏ spatial >= 2``) and
    joins the previous group otherwise. A batch no larger than the virtual batch
    size is one group (plain batch norm).

    >>> group_slices(10, 4, 1)
    [slice(0, 4, None), slice(4, 8, None), slice(8, 10, None)]
    >>> group_slices(9, 4, 1)               # a remainder of one joins the last group
    [slice(0, 4, None), slice(4, 9, None)]
    """
    k = virtual_batch_size
    if k is None or num_samples <= k:
        return [slice(0, num_samples)]
    slices = [slice(s, min(s + k, num_samples)) for s in range(0, num_samples, k)]
    last = slices[-1]
    if (last.stop - last.start) * values_per_sample < 2:
        slices[-2:] = [slice(slices[-2].start, num_samples)]
    return slices


@dataclass
class _Running:
    """Running statistics being updated group by group, committed at the end."""

    mean: np.ndarray
    var: np.ndarray
    batches: int
    values: int

    def absorb(self, layer: BatchNorm, moments: Moments) -> None:
        # Same rule as _layer_state.absorb: raises (nothing committed) or skips.
        update = updated_running_stats(layer, self.mean, self.var, self.values, moments)
        if update is not None:
            self.mean, self.var = update
            self.batches += 1
            self.values += moments.count


@dataclass(frozen=True)
class GroupPass:
    """What :func:`backward_pass` needs: each group's slice and cache."""

    x: np.ndarray
    slices: list[slice]
    caches: list[F.Cache | RenormCache]


def train_pass(
    layer: BatchNorm, x: np.ndarray, out: np.ndarray | None
) -> tuple[np.ndarray, GroupPass]:
    """Normalize each group with its statistics (renormalized if ``layer.renorm``).

    With ``layer.update_running_stats`` the running statistics take one update per
    group, in order, as if the groups had arrived as separate batches; with
    ``renorm`` each group's r and d use the running statistics as updated by the
    groups before it. Nothing is written to the layer when a group fails.
    """
    n = x.shape[0]
    per_sample = x.size // (n * layer.num_features) if n else 0
    slices = group_slices(n, layer.virtual_batch_size, per_sample)
    y = np.empty(x.shape, x.dtype) if out is None else out
    running = _Running(
        layer.running_mean,
        layer.running_var,
        layer.num_batches_tracked,
        layer.num_values_seen,
    )
    caches: list[F.Cache | RenormCache] = []
    options: dict[str, Any] = {
        "axis": layer.axis,
        "eps": layer.eps,
        "eps_placement": layer.eps_placement,
        "ddof": layer.ddof,
        "backend": layer.backend,
    }
    for part in slices:
        cache: F.Cache | RenormCache
        if layer.renorm:
            _, cache = forward_renorm(
                x[part],
                layer.gamma,
                layer.beta,
                running.mean,
                running.var,
                rmax=layer.rmax,
                dmax=layer.dmax,
                out=y[part],
                **options,
            )
        else:
            _, cache = F.forward_train(
                x[part], layer.gamma, layer.beta, out=y[part], **options
            )
        if layer.update_running_stats:
            running.absorb(layer, cache.moments)
        caches.append(cache)
    if layer.update_running_stats:
        layer.running_mean, layer.running_var = running.mean, running.var
        layer.num_batches_tracked = running.batches
        layer.num_values_seen = running.values
    return y, GroupPass(x, slices, caches)


def backward_pass(
    layer: BatchNorm, groups: GroupPass, dy: Any, out: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact gradient of :func:`train_pass`: each group is an independent batch norm
    (renorm's r and d held constant); the parameter gradients add up."""
    x = groups.x
    dy = as_float_array(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(
            f"dy must have the shape of the forward input {x.shape}; got {dy.shape}. "
            "Pass the gradient of the loss with respect to y."
        )
    dx = np.empty(x.shape, x.dtype) if out is None else out
    dgamma = np.zeros(layer.num_features)
    dbeta = np.zeros(layer.num_features)
    for part, cache in zip(groups.slices, groups.caches, strict=True):
        if isinstance(cache, RenormCache):
            _, dg, db = backward_renorm(
                dy[part], cache, backend=layer.backend, out=dx[part]
            )
        else:
            _, dg, db = F.backward(dy[part], cache, backend=layer.backend, out=dx[part])
        dgamma += dg
        dbeta += db
    return dx, dgamma, dbeta
