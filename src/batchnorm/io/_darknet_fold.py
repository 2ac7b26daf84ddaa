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

from dataclasses import dataclass
from typing import Any

import numpy as np

from batchnorm.io._darknet_layers import DIALECTS, Layer, Unit
from batchnorm.io._darknet_net import Network, parse

__all__ = ["Folding", "fold", "fold_error_bound", "folding", "normalization_scale"]

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


def _channel_axis(unit: Unit, ndim: int, transpose: bool) -> int:
    """The axis of a unit's weights that indexes its output channels.

    Connected weights are (outputs, inputs), or (inputs, outputs) when the
    header transposes (the shape alone cannot tell a square unit's, such as an
    rnn's ``self_layer.`` or a gru's ``w*.``); deconvolution weights are
    (c, n, size, size); a flipped convolution's (c·size², n).
    """
    if unit.kind == "connected":
        return 1 if transpose else 0
    if unit.kind == "deconvolutional" or ndim == 2:
        return 1
    return 0


class _Folded:
    """A unit's weights and biases in float64 while normalizations fold into it."""

    def __init__(self, layer: Layer, unit: Unit, transpose: bool) -> None:
        names = unit.names
        self.unit = unit
        self.weights = np.asarray(layer.arrays[names["weights"]], np.float64)
        self.axis = _channel_axis(unit, self.weights.ndim, transpose)
        self.biases = np.asarray(layer.arrays[names["biases"]], np.float64)

    def absorb(
        self, scales: Any, mean: Any, variance: Any, shift: Any, dialect: str
    ) -> np.ndarray:
        """Fold ``a (· − mean) + shift`` applied to this unit's output; return
        the channels where ``a`` or the new bias is not finite (nothing is
        folded then)."""
        a = normalization_scale(scales, variance, dialect)
        biases = a * (self.biases - np.asarray(mean, np.float64))
        biases += np.asarray(shift, np.float64)
        bad = np.flatnonzero(~np.isfinite(a) | ~np.isfinite(biases))
        if bad.size:
            return bad
        shape = [1] * self.weights.ndim
        shape[self.axis] = -1
        self.weights = self.weights * a.reshape(shape)
        self.biases = biases
        return bad


def _activation(layer: Layer) -> str:
    return layer.option("activation") or "logistic"


def _readers(network: Network) -> dict[int, int]:
    """Layer index → the first route or shortcut that reads its output."""
    found: dict[int, int] = {}
    for layer in network.layers:
        for j in layer.sources:
            found.setdefault(j, layer.index)
    return found


def _keep_reason(network: Network, layer: Layer, readers: dict[int, int]) -> str | None:
    """Why the standalone ``[batchnorm]`` ``layer`` cannot be folded into the
    layer before it (None: it can)."""
    if not layer.units:
        return "it loads no statistics (dontload=1)"
    if layer.index == 0:
        return "it is the first layer: no unit before it to fold into"
    previous = network.layers[layer.index - 1]
    name = f"layer {previous.index} [{previous.section}]"
    if previous.type not in _FOLDABLE:
        return (
            f"it follows {name}, not a convolutional, deconvolutional or "
            "connected layer"
        )
    if len(previous.units) != 1:
        return f"{name} loads no weights (dontload=1)"
    if _activation(previous) != "linear":
        return f"{name} has activation={_activation(previous)}, not linear"
    if previous.index in readers:
        reader = network.layers[readers[previous.index]]
        return (
            f"layer {reader.index} [{reader.section}] also reads the output of "
            f"{name} before the normalization"
        )
    if previous.option("numload") not in (None, "0"):
        return f"{name} loads only numload={previous.option('numload')} filters"
    if previous.units[0].channels != layer.units[0].channels:
        return (
            f"it normalizes {layer.units[0].channels} channels and {name} outputs "
            f"{previous.units[0].channels}"
        )
    return None


_NOT_FINITE = (
    "its normalization is not finite: a negative or non-finite rolling_variance, "
    "or a non-finite scale, rolling_mean or bias"
)


def _not_finite(layer: Layer, prefix: str, channels: Any, what: str) -> ValueError:
    return ValueError(
        f"cannot fold layer {layer.index} [{layer.section}] (line {layer.line})"
        f"{' unit ' + prefix if prefix else ''}: {what} (channels "
        f"{np.asarray(channels)[:8].tolist()}). Check it with `batchnorm inspect`."
    )


@dataclass(frozen=True)
class Folding:
    """A folded network and what :func:`folding` did to get it.

    Layer indices are the original network's.
    """

    #: The folded copy (what :func:`fold` returns).
    network: Network
    #: ``(layer index, unit prefix)`` of each unit whose own batch
    #: normalization was folded.
    units: tuple[tuple[int, str], ...]
    #: ``(index of a standalone [batchnorm], index of the layer it was folded
    #: into)``; the ``[batchnorm]`` sections are gone from the folded network.
    merged: tuple[tuple[int, int], ...]
    #: ``(index of a standalone [batchnorm], why it stays)``.
    kept: tuple[tuple[int, str], ...]
    #: The largest ``|fl(w') − w'| / |w'|`` over the folded weights: the relative
    #: rounding to float32 of ``w' = a · W`` computed in float64 (at most 2⁻²⁴
    #: unless a weight became subnormal, 1 where one flushed to zero); 0 when
    #: no weight was folded.
    rounding: float


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
    renumbered. ``network`` is not changed. :func:`folding` also tells what was
    folded and what was kept, and why.

    The folded network computes what darknet computes with the original one at
    test time, up to float32 rounding: :func:`fold_error_bound`.

    Raises
    ------
    ValueError
        The network has no arrays (read it with its ``.weights``); a
        normalization's ``a`` or folded bias is not finite (a negative or NaN
        variance, a non-finite scale, mean or bias), naming the layer that
        holds it; or a folded weight or bias is not finite in float32.
    """
    return _fold(network, dialect, measure=False).network


def folding(network: Network, *, dialect: str | None = None) -> Folding:
    """:func:`fold`, with an account of what it folded and kept (:class:`Folding`),
    and of how the folded weights rounded (a few more passes over them)."""
    return _fold(network, dialect, measure=True)


def _fold(network: Network, dialect: str | None, *, measure: bool) -> Folding:
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
    transpose = network.header.transpose if network.header else False
    readers = _readers(network)
    # every standalone [batchnorm]: None when it folds into the layer before it
    reasons = {
        layer.index: _keep_reason(network, layer, readers)
        for layer in network.layers
        if layer.type == "batchnorm"
    }
    final: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    own: list[tuple[int, str]] = []
    bn_off: list[Layer] = []
    removed: list[int] = []
    rounding = 0.0
    for layer in network.layers:
        if layer.type == "batchnorm":
            continue
        states: dict[str, _Folded] = {}
        numload = layer.option("numload") not in (None, "0")
        for unit in layer.units:
            if not unit.batch_normalize:
                continue
            if numload:
                raise ValueError(
                    f"cannot fold layer {layer.index} [{layer.section}] (line "
                    f"{layer.line}): numload={layer.option('numload')} loads only "
                    "some of its filters, and the others keep darknet's initial "
                    "values, which folding would change. Remove numload first."
                )
            names = unit.names
            state = _Folded(layer, unit, transpose)
            state.biases = np.zeros_like(state.biases)  # the biases are β
            bad = state.absorb(
                layer.arrays[names["scales"]],
                layer.arrays[names["rolling_mean"]],
                layer.arrays[names["rolling_variance"]],
                layer.arrays[names["biases"]],
                dialect,
            )
            if bad.size:
                raise _not_finite(layer, unit.prefix, bad, _NOT_FINITE)
            states[unit.prefix] = state
            own.append((layer.index, unit.prefix))
        if states:
            bn_off.append(layer)
        after = layer.index + 1
        if reasons.get(after, "") is None:  # a standalone [batchnorm] folds in
            norm = network.layers[after]
            if "" not in states:
                states[""] = _Folded(layer, layer.units[0], transpose)
            names = norm.units[0].names
            bad = states[""].absorb(
                norm.arrays[names["scales"]],
                norm.arrays[names["rolling_mean"]],
                norm.arrays[names["rolling_variance"]],
                norm.arrays.get(names.get("biases", ""), 0.0),
                dialect,
            )
            if bad.size:
                raise _not_finite(norm, "", bad, _NOT_FINITE)
            removed.append(after)
        # round each unit once, now: one layer in float64 at a time
        for prefix, state in states.items():
            arrays = {}
            for role, exact in (("weights", state.weights), ("biases", state.biases)):
                with np.errstate(over="ignore"):
                    value = np.array(exact, dtype="<f4")
                if not np.isfinite(value).all():
                    axis = state.axis if role == "weights" else 0
                    channels = np.unique(np.nonzero(~np.isfinite(value))[axis])
                    raise _not_finite(
                        layer,
                        prefix,
                        channels,
                        f"the folded {role} are not finite in float32 (an "
                        "overflow, or a non-finite weight)",
                    )
                if measure and role == "weights":
                    rounding = max(rounding, _relative_rounding(value, exact))
                arrays[role] = value
            final[layer.index, prefix] = arrays
    kept = tuple((i, r) for i, r in reasons.items() if r is not None)
    text = _edited_cfg(network, bn_off, removed)
    result = parse(text, network.source, network.header, network.dialect)
    gone = set(removed)
    old_of_new = [i for i in range(len(network.layers)) if i not in gone]
    for new_layer, old_index in zip(result.layers, old_of_new, strict=True):
        old = network.layers[old_index]
        for unit in new_layer.units:
            done = final.get((old_index, unit.prefix), {})
            for role, name in unit.names.items():
                if role in done:
                    new_layer.arrays[name] = done[role]
                else:
                    new_layer.arrays[name] = np.array(old.arrays[name], dtype="<f4")
    merged = tuple((index, index - 1) for index in removed)
    return Folding(result, tuple(own), merged, kept, rounding)


def _relative_rounding(rounded: np.ndarray, exact: np.ndarray) -> float:
    """The largest ``|rounded − exact| / |exact|`` over the nonzero ``exact``
    (a zero rounds exactly)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = rounded / exact  # 0/0 = NaN where exact is 0, skipped below
    ratio -= 1
    np.abs(ratio, out=ratio)
    return float(np.nanmax(ratio)) if np.isfinite(ratio).any() else 0.0


def _edited_cfg(network: Network, bn_off: list[Layer], removed: list[int]) -> str:
    """The cfg text with ``batch_normalize=0`` set, folded ``[batchnorm]``
    sections removed, and route/shortcut indices renumbered."""
    lines = network.cfg_text.splitlines(keepends=True)
    # darknet.save's first line ties a cfg to the .weights written with it;
    # the folded pair is another one
    if lines and lines[0].startswith("# batchnorm: written with "):
        lines[0] = "# batchnorm: folded (batch_normalize=0; see darknet.fold)\n"

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
            # A route reads every comma-separated index; a shortcut only the
            # first (atoi), so anything after it stays as written.
            old_parts = value.split(",")
            parts = list(old_parts)
            for i, target in enumerate(layer.sources):
                if old_parts[i].strip().startswith("-"):  # relative
                    parts[i] = str(new_index[target] - new_index[layer.index])
                else:
                    parts[i] = str(new_index[target])
            if parts != old_parts:
                put(number, key, ",".join(parts))
            break
    starts = [layer.line for layer in network.layers] + [len(lines) + 1]
    for index in sorted(removed, reverse=True):
        begin, end = starts[index] - 1, starts[index + 1] - 1
        # comments and blank lines belong to the section they precede
        while end - 1 > begin and _blank(lines[end - 1]):
            end -= 1
        while begin > starts[index - 1] and _blank(lines[begin - 1]):
            begin -= 1
        del lines[begin:end]
    return "".join(lines)


def _blank(line: str) -> bool:
    """A cfg line darknet skips: empty, or a ``#`` or ``;`` comment."""
    return "".join(line.split())[:1] in ("", "#", ";")


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
      ``γ_n Σ|W_j x_j|``, which the normalization multiplies by ``|a|``; then
      ``normalize_cpu`` subtracts the mean in float (``x[i] - mean[f]``, both
      floats), divides in double and rounds to float, and the scale and the
      bias are applied in float: four roundings, ``γ_4`` of the output's size;
    - the folded unit: ``W'`` and ``b'`` rounded once each and an ``n + 1``-term
      float32 sum: ``γ_{n+2}`` of ``|a| Σ|W_j x_j| + |b'|``.

    With ``|b'| ≤ |β| + |a| |μ|``: ``|Δy| ≤ (γ_n + γ_{n+2} + γ_4) · (|a| (Σ|W_j
    x_j| + |μ|) + |β|)``, ``a = scales / d``, to first order in ``u``.
    """
    u = 2.0**-24

    def gamma(k: int) -> float:
        return k * u / (1 - k * u)

    a = np.abs(normalization_scale(scales, rolling_variance, dialect))
    mean = np.abs(np.asarray(rolling_mean, np.float64))
    beta = np.abs(np.asarray(biases, np.float64))
    total = a * (np.asarray(magnitude, np.float64) + mean) + beta
    return (gamma(fan_in) + gamma(fan_in + 2) + gamma(4)) * total
