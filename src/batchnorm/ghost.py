"""Ghost batches and batch renormalization: the layer's split or corrected pass.

Pure functions: they take the layer's options, parameters and running state and
return new values; the layer decides what to keep. The math is
:func:`batchnorm.functional.forward_train` / :func:`~batchnorm.functional.backward`
per group, or :func:`batchnorm.renorm.forward_renorm` /
:func:`~batchnorm.renorm.backward_renorm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from batchnorm import functional as F
from batchnorm._validation import check_dy
from batchnorm.moments import Cache
from batchnorm.options import LayerOptions
from batchnorm.renorm import RenormCache, backward_renorm, forward_renorm
from batchnorm.running_stats import RunningState


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


@dataclass(frozen=True)
class GroupPass:
    """What :func:`backward_pass` needs: each group's slice and cache."""

    x: np.ndarray
    slices: list[slice]
    caches: list[Cache | RenormCache]


def train_pass(
    options: LayerOptions,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    running: RunningState,
    x: np.ndarray,
    out: np.ndarray | None,
    *,
    rmax: float,
    dmax: float,
    update_running_stats: bool,
) -> tuple[np.ndarray, GroupPass, RunningState]:
    """Normalize each group with its statistics (renormalized if ``options.renorm``).

    With ``update_running_stats`` the running statistics take one update per
    group, in order, as if the groups had arrived as separate batches, and the
    returned state holds them; with ``renorm`` each group's r and d use the
    running statistics as updated by the groups before it. A group that fails
    raises before anything is returned, so the caller keeps its old state.
    """
    n = x.shape[0]
    per_sample = x.size // (n * options.num_features) if n else 0
    slices = group_slices(n, options.virtual_batch_size, per_sample)
    y = np.empty(x.shape, x.dtype) if out is None else out
    caches: list[Cache | RenormCache] = []
    common = options.train_arguments()
    for part in slices:
        cache: Cache | RenormCache
        if options.renorm:
            _, cache = forward_renorm(
                x[part],
                gamma,
                beta,
                running.mean,
                running.var,
                rmax=rmax,
                dmax=dmax,
                out=y[part],
                **common,
            )
        else:
            _, cache = F.forward_train(x[part], gamma, beta, out=y[part], **common)
        if update_running_stats:
            running = running.absorbed(
                cache.moments,
                momentum=options.momentum,
                running_var_kind=options.running_var_kind,
                on_nonfinite=options.on_nonfinite,
            )
        caches.append(cache)
    return y, GroupPass(x, slices, caches), running


def backward_pass(
    options: LayerOptions, groups: GroupPass, dy: Any, out: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact gradient of :func:`train_pass`: each group is an independent batch norm
    (renorm's r and d held constant); the parameter gradients add up."""
    x = groups.x
    dy = check_dy(dy, x)
    dx = np.empty(x.shape, x.dtype) if out is None else out
    dgamma = np.zeros(options.num_features)
    dbeta = np.zeros(options.num_features)
    for part, cache in zip(groups.slices, groups.caches, strict=True):
        if isinstance(cache, RenormCache):
            _, dg, db = backward_renorm(
                dy[part], cache, backend=options.backend, out=dx[part]
            )
        else:
            _, dg, db = F.backward(
                dy[part], cache, backend=options.backend, out=dx[part]
            )
        dgamma += dg
        dbeta += db
    return dx, dgamma, dbeta
