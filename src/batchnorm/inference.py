"""Inference tools: fold BatchNorm into the layer before it; exact population stats.

:func:`fold` turns ``Conv2d/Linear → BatchNorm`` pairs of a trained
:class:`batchnorm.nn.Sequential` into one layer for deployment. :func:`recalibrate`
replaces the running statistics (exponential moving averages, which lag behind
training) with the exact statistics of a data set, in O(C) memory per layer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np

from batchnorm import functional as F
from batchnorm.functional import NonFiniteStatisticsError
from batchnorm.layer import BatchNorm
from batchnorm.moments import Moments
from batchnorm.nn.conv import Conv2d
from batchnorm.nn.layers import Linear, Sequential
from batchnorm.nn.walk import batch_norms

__all__ = ["fold", "fold_error_bound", "recalibrate"]


def _fold_target(layer: Any, norm: BatchNorm) -> bool:
    """Whether ``norm`` can be folded into ``layer``; raises on a mismatch."""
    if not isinstance(layer, Linear | Conv2d):
        return False
    channels = layer.out_features if isinstance(layer, Linear) else layer.out_channels
    if norm.num_features != channels:
        raise ValueError(
            f"cannot fold {norm!r} into {layer!r}: it normalizes {norm.num_features} "
            f"channels, the layer produces {channels}."
        )
    rank = 2 if isinstance(layer, Linear) else 4
    if norm.axis % rank != 1:
        raise ValueError(
            f"cannot fold {norm!r} into {layer!r}: its channel axis {norm.axis} is not "
            f"the layer's output channel axis 1 (of {rank}-D outputs)."
        )
    return True


def _scale(norm: BatchNorm) -> np.ndarray:
    """``a = γ · inv_std(running_var)`` in float64, per channel."""
    with np.errstate(over="ignore", divide="ignore"):  # reported just below
        scale = F.inv_std_of(norm.running_var, norm.eps, norm.eps_placement)
        if norm.gamma is not None:
            scale = scale * norm.gamma.astype(np.float64)
    if not np.isfinite(scale).all():
        bad = np.flatnonzero(~np.isfinite(scale))[:8].tolist()
        raise ValueError(
            f"cannot fold {norm!r}: γ / σ is not finite in channels {bad} (running_var "
            "0 with a tiny eps?). Give the layer a larger eps or recalibrate it first."
        )
    return scale


def _folded(layer: Linear | Conv2d, norm: BatchNorm) -> Linear | Conv2d:
    """``layer`` with ``norm`` (eval mode) folded in, computed in float64."""
    scale = _scale(norm)
    weight = layer.weight.astype(np.float64)
    bias = np.zeros(weight.shape[0]) if layer.bias is None else layer.bias
    shift = np.zeros_like(scale) if norm.beta is None else norm.beta
    new_bias = (np.asarray(bias, np.float64) - norm.running_mean) * scale
    new_bias += np.asarray(shift, np.float64)
    new = copy.copy(layer)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    new.weight = (weight * scale.reshape(shape)).astype(layer.weight.dtype)
    new.bias = new_bias.astype(layer.weight.dtype)
    new.grad_weight = new.grad_bias = None
    for cached in ("_x", "_cache"):
        if hasattr(new, cached):
            setattr(new, cached, None)
    return new


def fold(network: Sequential) -> Sequential:
    """A copy of ``network`` with every BatchNorm that follows a Linear or Conv2d
    folded into that layer, for inference.

    A ``Linear/Conv2d`` (weight ``W``, bias ``b`` or none) followed by a BatchNorm in
    eval mode computes ``a (W x + b − μ) + β`` per output channel, with
    ``a = γ · inv_std(running_var)`` in the layer's ε convention (``1/√(σ² + ε)``, or
    ``1/(√σ² + ε)`` for darknet's ``eps_placement="outside"``). The folded layer has
    ``W' = a · W`` and ``b' = a (b − μ) + β``, computed in float64 and rounded once
    to the weight's dtype. Other layers, and BatchNorms that follow anything else,
    are deep copies; nested Sequentials are folded recursively. ``network`` is not
    changed.

    The result matches ``network.eval()``. For each folded pair, given the same
    input, the difference is at most :func:`fold_error_bound` elementwise (derived
    there): ``(2 γ_{n+2} + u) · (|a| (|W| |x| + |b| + |μ|) + |β|)`` with ``n`` the
    fan-in, ``u`` the unit roundoff (6e-8 in float32) and
    ``γ_k = k u / (1 − k u)``; whole networks are measured in ``docs/INFERENCE.md``.

    Raises
    ------
    TypeError
        ``network`` is not a :class:`batchnorm.nn.Sequential`.
    ValueError
        A BatchNorm after a Linear/Conv2d normalizes another number of channels or
        another axis than its output channels, or has an infinite ``γ/σ``.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> from batchnorm import nn
    >>> net = nn.Sequential([nn.Linear(3, 2, bias=False, rng=0), bn.BatchNorm(2),
    ...                      nn.ReLU()])
    >>> x = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
    >>> _ = net(x)                                   # one training step's statistics
    >>> folded = fold(net)
    >>> [type(layer).__name__ for layer in folded.layers]
    ['Linear', 'ReLU']
    >>> error = np.abs(folded[0](x) - net[1].eval()(net[0](x)))
    >>> bool(np.all(error <= fold_error_bound(net[0], net[1], x)))
    True
    """
    if not isinstance(network, Sequential):
        raise TypeError(
            f"network must be a batchnorm.nn.Sequential; got {type(network).__name__}. "
            "Wrap a single layer: nn.Sequential([layer, norm])."
        )
    layers: list[Any] = []
    for layer in network.layers:
        previous = layers[-1] if layers else None
        if (
            isinstance(layer, BatchNorm)
            and previous is not None
            and _fold_target(previous, layer)
        ):
            layers[-1] = _folded(previous, layer)
        elif isinstance(layer, Sequential):
            layers.append(fold(layer))
        else:
            layers.append(copy.deepcopy(layer))
    return Sequential(layers)


def fold_error_bound(
    layer: Linear | Conv2d, norm: BatchNorm, x: np.ndarray
) -> np.ndarray:
    """Elementwise bound on ``|folded(x) − norm.eval()(layer(x))|`` for one pair.

    ``folded`` is the layer :func:`fold` makes of ``layer`` and ``norm``; ``x`` is
    the pair's input. Derivation, for one output ``y = a (Σ_j W_j x_j + b − μ) + β``
    with fan-in ``n`` and unit roundoff ``u`` of the weight dtype
    (``γ_k = k u / (1 − k u)``, Higham's bound for a k-term dot product):

    - unfolded: the layer's dot product (n products and the bias) errs by at most
      ``γ_{n+1} (Σ|W_j x_j| + |b|)``; BatchNorm works in float64, multiplies that
      by ``|a|`` and rounds once: ``+ u |y|``;
    - folded: ``W'_j`` and ``b'`` carry one rounding each (``u``), the dot product
      ``γ_{n+1}``: together ``γ_{n+2} (|a| Σ|W_j x_j| + |b'|)``.

    With ``|b'| ≤ |a| (|b| + |μ|) + |β|`` and ``|y|`` bounded by the same sum,
    ``|Δy| ≤ (2 γ_{n+2} + u) · T`` with ``T = |a| (Σ_j |W_j x_j| + |b| + |μ|) + |β|``.
    The ``|μ|`` term is real: the folded bias ``b' ≈ −a μ`` cancels against
    ``a W x ≈ a μ`` in the layer's dtype (the cancellation that the unfolded
    BatchNorm avoids by subtracting the mean first), so channels whose running mean
    is large against their spread lose digits when folded. After the pair, ReLU
    and max-pooling do not increase the bound (they are 1-Lipschitz and exact);
    through later affine layers it is amplified by their ``|W|``.

    Returns
    -------
    ndarray, the shape of ``layer(x)``, float64
    """
    _fold_target(layer, norm)
    magnitude = _abs_copy(layer).forward(np.abs(np.asarray(x, np.float64)))
    u = float(np.finfo(layer.weight.dtype).eps) / 2
    k = layer.weight[0].size + 2
    factor = 2 * k * u / (1 - k * u) + u
    a = np.abs(_scale(norm))
    offset = np.abs(norm.running_mean.astype(np.float64))
    if layer.bias is not None:
        offset = offset + np.abs(layer.bias.astype(np.float64))
    beta = np.zeros_like(a) if norm.beta is None else np.abs(norm.beta, dtype=float)
    shape = (1, -1) + (1,) * (magnitude.ndim - 2)
    total = a.reshape(shape) * (magnitude + offset.reshape(shape)) + beta.reshape(shape)
    return factor * total


def _abs_copy(layer: Linear | Conv2d) -> Linear | Conv2d:
    """``layer`` with ``|W|`` in float64 and no bias: computes ``Σ |W_j| |x_j|``."""
    new = copy.copy(layer)
    new.weight = np.abs(layer.weight.astype(np.float64))
    new.bias = None
    return new


def _stream(layer: Any, x: np.ndarray, totals: dict[int, Moments]) -> np.ndarray:
    """Forward ``x`` through ``layer``, merging every BatchNorm's input moments."""
    if isinstance(layer, Sequential):
        for inner in layer.layers:
            x = _stream(inner, x, totals)
        return x
    if isinstance(layer, BatchNorm):
        moments = Moments.from_array(x, layer.axis)
        totals[id(layer)] = totals[id(layer)].merge(moments)
    return np.asarray(layer.forward(x))


def recalibrate(network: Any, batches: Iterable[Any]) -> list[Moments]:
    """Replace every BatchNorm's running statistics with exact population statistics.

    Streams ``batches`` through ``network`` with batch statistics (each BatchNorm
    with ``use_batch_stats=True, update_running_stats=False``, as in training,
    including ghost groups and renorm corrections), merges each BatchNorm's exact
    per-channel ``(count, mean, M2)`` of its input over all batches with Chan's
    update (:meth:`batchnorm.Moments.merge`: batches of any size, O(C) memory, no
    ``E[x²] − E[x]²``), then sets ``running_mean`` to the mean and ``running_var`` to
    ``M2/(count − 1)`` or, for layers with ``running_var_kind="biased"``,
    ``M2/count``; ``num_values_seen`` to ``count`` and ``num_batches_tracked`` to
    the number of batches. Modes are restored afterwards.

    The seed keeps exponential moving averages because storing every batch's
    statistics would cost too much memory; this is the exact alternative. Unlike
    PyTorch's ``torch.optim.swa_utils.update_bn`` (equal weight per batch, however
    large) and fvcore's PreciseBN (``E[x²] − E[x]²``), every value counts once and
    the variance does not cancel.

    Like ``update_bn``, one pass serves every layer: a BatchNorm deeper in the
    network sees inputs produced by earlier layers normalized with *batch*
    statistics, not with the recalibrated running statistics that eval mode will
    use. For the first BatchNorm the result is the exact statistics of its inputs.

    Parameters
    ----------
    network : Sequential or BatchNorm
        Nested Sequentials are searched too.
    batches : iterable of ndarray or of ``(x, y)`` tuples
        The data, e.g. the training set in mini-batches. Each batch needs at least
        2 values per channel at every BatchNorm.

    Returns
    -------
    list of Moments
        The merged statistics of each BatchNorm's input, in network order.

    Raises
    ------
    TypeError
        ``network`` holds no BatchNorm.
    ValueError
        ``batches`` is empty.
    NonFiniteStatisticsError
        Some statistics are NaN/inf; no layer was changed.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> x = np.random.default_rng(0).normal(4.0, 2.0, (100, 3))
    >>> layer = bn.BatchNorm(3, dtype=np.float64)
    >>> _ = recalibrate(layer, [x[:7], x[7:50], x[50:]])     # any batch sizes
    >>> bool(np.allclose(layer.running_var, x.var(axis=0, ddof=1), rtol=1e-12))
    True
    """
    layers = batch_norms(network)
    if not layers:
        raise TypeError(
            f"network holds no BatchNorm layer (got {type(network).__name__}); "
            "recalibrate walks a BatchNorm or nested batchnorm.nn.Sequential layers."
        )
    totals = {id(layer): Moments.empty(layer.num_features) for layer in layers}
    saved = [(layer.use_batch_stats, layer.update_running_stats) for layer in layers]
    num_batches = 0
    try:
        for layer in layers:
            layer.use_batch_stats, layer.update_running_stats = True, False
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple | list) else batch
            _stream(network, x, totals)
            num_batches += 1
    finally:
        for layer, (use, update) in zip(layers, saved, strict=True):
            layer.use_batch_stats, layer.update_running_stats = use, update
    if num_batches == 0:
        raise ValueError("batches yielded no data; pass at least one batch.")
    merged = [totals[id(layer)] for layer in layers]
    for layer, moments in zip(layers, merged, strict=True):
        if not (np.isfinite(moments.mean).all() and np.isfinite(moments.m2).all()):
            raise NonFiniteStatisticsError(
                f"{layer!r} saw NaN/inf inputs; no running statistics were changed."
            )
    results = []
    for layer, moments in zip(layers, merged, strict=True):
        ddof = 1 if layer.running_var_kind == "unbiased" else 0
        with np.errstate(over="ignore"):  # checked below
            mean = moments.mean.astype(layer.dtype)
            var = moments.var(ddof).astype(layer.dtype)
        if not (np.isfinite(mean).all() and np.isfinite(var).all()):
            raise NonFiniteStatisticsError(
                f"{layer!r}: the population statistics overflow {layer.dtype}; no "
                "running statistics were changed. Use dtype=np.float32 or wider."
            )
        results.append((mean, var))
    for layer, moments, (mean, var) in zip(layers, merged, results, strict=True):
        layer.running_mean, layer.running_var = mean, var
        layer.num_values_seen = moments.count
        layer.num_batches_tracked = num_batches
    return merged
