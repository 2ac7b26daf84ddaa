"""Fold a darknet network's batch normalization into its weights, for deployment.

darknet at test time computes, per output channel of a convolutional,
deconvolutional or connected unit with ``batch_normalize=1``::

    y = scales · (W x − rolling_mean) / d + biases

with ``d = √rolling_variance + 1e-6`` in pjreddie's ``normalize_cpu``
(``src/blas.c``: ``(x[i] - mean[f]) / (sqrt(variance[f]) + .000001f)``; the
constant is the float nearest 1e-6, added in double) and ``d = √(rolling_variance
+ 1e-5)`` in AlexeyAB's fork (``src/blas.c``: ``sqrt(variance[f] + .00001f)``,
the sum in float). With ``a = scales / d`` the folded unit has ``W' = a · W`` and
``b' = biases − a · rolling_mean``, computed in float64 and rounded once to
float32; its ``batch_normalize`` becomes 0. A standalone ``[batchnorm]`` right
after a unit whose activation is ``linear`` (and whose output no route or
shortcut reads) is folded into that unit too and its section removed; routes
and shortcuts are renumbered.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batchnorm.io._darknet_layers import DIALECTS, Layer, Unit
from batchnorm.io._darknet_net import Network, parse

__all__ = ["fold", "fold_error_bound", "normalization_scale"]

_FOLDABLE = ("convolutional", "deconvolutional", "connected")


def normalization_scale(
    scales: np.ndarray, variance: np.ndarray, dialect: str = "pjreddie"
) -> np.ndarray:
    """``a = scales / d`` per channel in float64, ``d`` as ``dialect``'s darknet
    computes it (see the module docstring)."""
    if dialect not in DIALECTS:
        raise ValueError(
            f"dialect must be one of {', '.join(map(repr, DIALECTS))}; got {dialect!r}."
        )
    var32 = np.asarray(variance, np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if dialect == "alexeyab":
            denominator = np.sqrt((var32 + np.float32(1e-5)).astype(np.float64))
        else:
            denominator = np.sqrt(var32.astype(np.float64)) + float(np.float32(1e-6))
        return np.asarray(scales, np.float64) / denominator


def _channel_axis(unit: Unit, shape: tuple[int, ...]) -> int:
    """The axis of a unit's weights that indexes its output channels."""
    if unit.kind == "deconvolutional":
        return 1
    if len(shape) == 2 and unit.kind == "connected":
        # (outputs, inputs), or (inputs, outputs) when the header transposes
        return 0 if shape == (unit.channels, unit.inputs) else 1
    if len(shape) == 2:  # flipped convolution: (c·size², n)
        return 1
    return 0


class _Folded:
    """A unit's weights and biases in float64 while normalizations fold into it."""

    def __init__(self, layer: Layer, unit: Unit) -> None:
        names = unit.names
        self.unit = unit
        self.weights = np.asarray(layer.arrays[names["weights"]], np.float64)
        self.axis = _channel_axis(unit, self.weights.shape)
        self.biases = np.asarray(layer.arrays[names["biases"]], np.float64)

    def absorb(
        self, scales: Any, mean: Any, variance: Any, shift: Any, dialect: str
    ) -> None:
        """Fold ``a (· − mean) + shift`` applied to this unit's output."""
        a = normalization_scale(scales, variance, dialect)
        shape = [1] * self.weights.ndim
        shape[self.axis] = -1
        self.weights = self.weights * a.reshape(shape)
        self.biases = a * (self.biases - np.asarray(mean, np.float64))
        self.biases += np.asarray(shift, np.float64)


def _activation(layer: Layer) -> str:
    return layer.option("activation") or "logistic"


def _referenced(network: Network) -> set[int]:
    return {j for layer in network.layers for j in layer.sources}


def fold(network: Network, *, dialect: str | None = None) -> Network:
    """A copy of ``network`` with its batch normalization folded into the weights.

    Every convolutional, deconvolutional and connected unit with
    ``batch_normalize=1`` (the recurrent layers' sub-layers included) gets
    ``W' = a · W`` and ``b' = biases − a · rolling_mean`` with ``a = scales / d``
    and ``d`` as darknet's ``normalize_cpu`` computes it (``dialect``: the
    network's, ``"pjreddie"`` unless read otherwise; ``"alexeyab"`` for that
    fork's ``√(var + 1e-5)``), in float64 and rounded once to float32. A
    standalone ``[batchnorm]`` directly after such a unit with a ``linear``
    activation is folded into it as well, unless a route or shortcut reads that
    unit's output; its section is removed and later routes and shortcuts are
    renumbered. ``network`` is not changed.

    The folded network computes what darknet computes with the original one at
    test time, up to float32 rounding: :func:`fold_error_bound`.

    Raises
    ------
    ValueError
        The network has no arrays (read it with its ``.weights``), or a
        normalization's ``a`` is not finite (negative or NaN variance).
    """
    dialect = dialect or network.dialect
    if dialect not in DIALECTS:
        raise ValueError(
            f"dialect must be one of {', '.join(map(repr, DIALECTS))}; got {dialect!r}."
        )
    if any(layer.units and not layer.arrays for layer in network.layers):
        raise ValueError(
            "the network has no arrays: read it with darknet.read(cfg, weights) "
            "before folding."
        )
    folded: dict[tuple[int, str], _Folded] = {}
    bn_off: list[Layer] = []
    for layer in network.layers:
        if layer.type == "batchnorm":
            continue
        if any(u.batch_normalize for u in layer.units):
            bn_off.append(layer)
        for unit in layer.units:
            if not unit.batch_normalize:
                continue
            names = unit.names
            state = _Folded(layer, unit)
            state.biases = np.zeros_like(state.biases)  # the biases are β
            state.absorb(
                layer.arrays[names["scales"]],
                layer.arrays[names["rolling_mean"]],
                layer.arrays[names["rolling_variance"]],
                layer.arrays[names["biases"]],
                dialect,
            )
            folded[layer.index, unit.prefix] = state
    referenced = _referenced(network)
    removed: list[int] = []
    for layer in network.layers:
        if layer.type != "batchnorm" or not layer.units or layer.index == 0:
            continue
        previous = network.layers[layer.index - 1]
        if (
            previous.type not in _FOLDABLE
            or len(previous.units) != 1
            or previous.index in referenced
            or _activation(previous) != "linear"
            or previous.option("numload") not in (None, "0")
            or previous.units[0].channels != layer.units[0].channels
        ):
            continue
        key = (previous.index, "")
        if key not in folded:
            folded[key] = _Folded(previous, previous.units[0])
        names = layer.units[0].names
        shift = layer.arrays.get(names.get("biases", ""), 0.0)
        folded[key].absorb(
            layer.arrays[names["scales"]],
            layer.arrays[names["rolling_mean"]],
            layer.arrays[names["rolling_variance"]],
            shift,
            dialect,
        )
        removed.append(layer.index)
    for (index, prefix), state in folded.items():
        bad = ~np.isfinite(state.biases)
        if bad.any() or not np.isfinite(state.weights).all():
            layer = network.layers[index]
            channels = np.flatnonzero(bad)[:8].tolist()
            raise ValueError(
                f"cannot fold layer {index} [{layer.section}] (line {layer.line})"
                f"{' unit ' + prefix if prefix else ''}: the folded weights are not "
                f"finite (channels {channels or 'in the weights'}): a negative or "
                "non-finite rolling_variance or scale. Check it with `batchnorm "
                "inspect`."
            )
    text = _edited_cfg(network, bn_off, removed)
    result = parse(text, network.source, network.header, network.dialect)
    old_of_new = [i for i in range(len(network.layers)) if i not in set(removed)]
    for new_layer, old_index in zip(result.layers, old_of_new, strict=True):
        old = network.layers[old_index]
        for unit in new_layer.units:
            done = folded.get((old_index, unit.prefix))
            for role, name in unit.names.items():
                if done is not None and role == "weights":
                    value = done.weights
                elif done is not None and role == "biases":
                    value = done.biases
                else:
                    value = old.arrays[name]
                new_layer.arrays[name] = np.array(value, dtype="<f4")
    return result


def _edited_cfg(network: Network, bn_off: list[Layer], removed: list[int]) -> str:
    """The cfg text with ``batch_normalize=0`` set, folded ``[batchnorm]``
    sections removed, and route/shortcut indices renumbered."""
    lines = network.cfg_text.splitlines(keepends=True)

    def put(number: int, key: str, value: str) -> None:
        end = lines[number - 1][len(lines[number - 1].rstrip("\r\n")) :]
        lines[number - 1] = f"{key}={value}{end or chr(10)}"

    for layer in bn_off:
        for key, _, number in layer.options:
            if key == "batch_normalize":
                put(number, key, "0")
                break
    gone = set(removed)
    new_index: dict[int, int] = {}
    for old in range(len(network.layers)):
        if old in gone:
            new_index[old] = new_index[old - 1]  # the unit it was folded into
        else:
            new_index[old] = old - sum(1 for r in removed if r < old)
    for layer in network.layers:
        if layer.index in gone or not layer.sources:
            continue
        key = "layers" if layer.type == "route" else "from"
        for k, value, number in layer.options:
            if k != key:
                continue
            parts = []
            for part, target in zip(value.split(","), layer.sources, strict=True):
                relative = part.strip().startswith("-")
                if relative:
                    parts.append(str(new_index[target] - new_index[layer.index]))
                else:
                    parts.append(str(new_index[target]))
            if parts != value.split(","):
                put(number, key, ",".join(parts))
            break
    starts = [layer.line for layer in network.layers] + [len(lines) + 1]
    for index in sorted(removed, reverse=True):
        begin, end = starts[index] - 1, starts[index + 1] - 1
        del lines[begin:end]
    return "".join(lines)


def fold_error_bound(
    magnitude: np.ndarray,
    scales: np.ndarray,
    rolling_mean: np.ndarray,
    rolling_variance: np.ndarray,
    biases: np.ndarray,
    *,
    fan_in: int,
    dialect: str = "pjreddie",
) -> np.ndarray:
    """Bound on ``|folded − unfolded|`` for the outputs of one folded darknet unit.

    ``magnitude`` is ``Σ_j |W_j x_j|`` per output (the unit applied with ``|W|``
    to ``|x|``, in float64), channels on the last axis so that it broadcasts
    against the per-channel arrays. With ``n`` = ``fan_in`` (``c/groups · size²``
    for a convolution, ``inputs`` for a connected layer), unit roundoff
    ``u = 2⁻²⁴`` and ``γ_k = k u / (1 − k u)``:

    - darknet's unfolded unit: its float32 dot product errs by at most
      ``γ_n Σ|W_j x_j|``, which the normalization multiplies by ``|a|``; the
      normalization runs in double and rounds to float, then the scale and the
      bias are applied in float: three roundings, ``γ_3`` of the output's size;
    - the folded unit: ``W'`` and ``b'`` rounded once each and an ``n + 1``-term
      float32 sum: ``γ_{n+2}`` of ``|a| Σ|W_j x_j| + |b'|``.

    With ``|b'| ≤ |β| + |a| |μ|``: ``|Δy| ≤ (γ_n + γ_{n+2} + γ_3) · (|a| (Σ|W_j
    x_j| + |μ|) + |β|)``, ``a = scales / d``, to first order in ``u``.
    """
    u = 2.0**-24

    def gamma(k: int) -> float:
        return k * u / (1 - k * u)

    a = np.abs(normalization_scale(scales, rolling_variance, dialect))
    mean = np.abs(np.asarray(rolling_mean, np.float64))
    beta = np.abs(np.asarray(biases, np.float64))
    total = a * (np.asarray(magnitude, np.float64) + mean) + beta
    return (gamma(fan_in) + gamma(fan_in + 2) + gamma(3)) * total
