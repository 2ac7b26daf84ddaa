"""Network structure shared by every format: layer specs, parameter arrays, checks.

A *spec* is a JSON-able dict naming a layer's type and constructor arguments; an
*array name* is ``"<index>.<name>"`` in a network (``"0.weight"``, ``"1.gamma"``)
and ``"<name>"`` for a lone :class:`batchnorm.BatchNorm`. Every reader builds new
layers from specs, checks every array against them, and only then fills them, so a
failed load never leaves a half-loaded model behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from batchnorm._validation import bad_channels, bad_statistic_message
from batchnorm.layer import BatchNorm
from batchnorm.nn.conv import Conv2d, GlobalAvgPool, MaxPool2d
from batchnorm.nn.layers import (
    Flatten,
    LeakyReLU,
    Linear,
    ReLU,
    Sequential,
    Sigmoid,
    Softmax,
)
from batchnorm.nn.walk import children

__all__ = [
    "FormatError",
    "Network",
    "arrays_of",
    "build",
    "check_declared",
    "declared_arrays",
    "describe",
    "fill",
]

BN_ARRAYS = ("gamma", "beta", "running_mean", "running_var")
BN_COUNTERS = ("num_batches_tracked", "num_values_seen")


class FormatError(ValueError):
    """A file (or state dict) that cannot be read as the format it claims to be.

    Raised for truncated and corrupt files, unknown versions, missing or unknown
    keys, wrong shapes or dtypes, non-finite statistics and size mismatches. The
    message names the file, the offending key or layer, and what was expected.
    """


class Network(Sequential):
    """A :class:`batchnorm.nn.Sequential` that remembers where it came from.

    ``metadata`` holds JSON-able facts the formats need to write the network back
    unchanged: ``input_shape`` (C, H, W) or (features,), and for darknet files
    ``darknet`` (the header's ``major``, ``minor``, ``revision``, ``seen`` and the
    ``[net]`` options).
    """

    def __init__(
        self, layers: Iterable[Any], metadata: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(layers)
        self.metadata: dict[str, Any] = dict(metadata or {})


def describe(layer: Any) -> dict[str, Any]:
    """The spec of one layer; ``TypeError`` for layers no format knows."""
    if isinstance(layer, BatchNorm):
        return {"type": "BatchNorm", **layer.config()}
    if isinstance(layer, Conv2d):
        return {
            "type": "Conv2d",
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "kernel_size": int(layer.kernel_size),
            "stride": int(layer.stride),
            "padding": int(layer.padding),
            "bias": layer.bias is not None,
            "dtype": layer.weight.dtype.name,
        }
    if isinstance(layer, Linear):
        return {
            "type": "Linear",
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.bias is not None,
            "dtype": layer.weight.dtype.name,
        }
    if isinstance(layer, MaxPool2d):
        return {
            "type": "MaxPool2d",
            "kernel_size": layer.kernel_size,
            "stride": layer.stride,
        }
    if isinstance(layer, LeakyReLU):
        return {"type": "LeakyReLU", "slope": layer.slope}
    for cls in (ReLU, Sigmoid, Flatten, GlobalAvgPool, Softmax):
        if type(layer) is cls:
            return {"type": cls.__name__}
    raise TypeError(
        f"cannot store a layer of type {type(layer).__name__}: the formats know "
        "BatchNorm, Conv2d, Linear, ReLU, LeakyReLU, Sigmoid, MaxPool2d, "
        "GlobalAvgPool, Flatten and Softmax."
    )


_SIMPLE = {
    "ReLU": ReLU,
    "Sigmoid": Sigmoid,
    "Flatten": Flatten,
    "GlobalAvgPool": GlobalAvgPool,
    "Softmax": Softmax,
}


def build(spec: Mapping[str, Any]) -> Any:
    """A new layer from its spec (parameters zero; :func:`fill` sets them).

    Only the sizes of :func:`declared_arrays` are allocated: a reader checks
    them against its file first.
    """
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise FormatError(
            f"a layer spec must be an object with a 'type'; got {spec!r}."
        )
    kind, args = spec["type"], {k: v for k, v in spec.items() if k != "type"}
    try:
        declared_arrays(spec)
        if kind == "BatchNorm":
            return BatchNorm(**args)
        if kind == "Conv2d":
            bias = args.pop("bias")
            layer = Conv2d(
                args.pop("in_channels"),
                args.pop("out_channels"),
                args.pop("kernel_size"),
                bias=bias,
                init=0.0,
                **args,
            )
            return layer
        if kind == "Linear":
            return Linear(
                args.pop("in_features"), args.pop("out_features"), init=0.0, **args
            )
        if kind == "MaxPool2d":
            for key in ("kernel_size", "stride"):
                _size(args, key)
            return MaxPool2d(**args)
        if kind == "LeakyReLU":
            return LeakyReLU(**args)
        if kind in _SIMPLE and not args:
            return _SIMPLE[kind]()
    except (TypeError, ValueError, KeyError, MemoryError) as exc:
        raise FormatError(f"invalid {kind} layer spec {dict(spec)!r}: {exc}") from exc
    raise FormatError(f"unknown layer spec {dict(spec)!r}.")


def _size(args: Mapping[str, Any], key: str, minimum: int = 1) -> int:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an int >= {minimum}; got {value!r}.")
    return value


def declared_arrays(spec: Any) -> dict[str, tuple[int, ...]]:
    """The shape of each array a spec's layer holds, computed without allocating.

    A reader compares these with the arrays its file really has before
    :func:`build` allocates anything, so a header that declares a huge layer
    costs nothing. ``ValueError`` for sizes that are not ints >= 1.
    """
    if not isinstance(spec, Mapping):
        return {}
    kind = spec.get("type")
    if kind == "BatchNorm":
        c = _size(spec, "num_features")
        names = BN_ARRAYS if spec.get("affine", True) else BN_ARRAYS[2:]
        return {name: (c,) for name in names}
    if kind == "Conv2d":
        out, inp = _size(spec, "out_channels"), _size(spec, "in_channels")
        k = _size(spec, "kernel_size")
        arrays: dict[str, tuple[int, ...]] = {"weight": (out, inp, k, k)}
    elif kind == "Linear":
        out, inp = _size(spec, "out_features"), _size(spec, "in_features")
        arrays = {"weight": (out, inp)}
    else:
        return {}
    if spec.get("bias"):
        arrays["bias"] = (out,)
    return arrays


def check_declared(
    specs: list[Any],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    single: bool,
    source: str,
) -> None:
    """The arrays the layer specs declare are exactly ``shapes`` (before building).

    ``shapes`` maps array names (``"0.weight"``, or ``"gamma"`` when ``single``)
    to the shapes a file holds; a spec whose sizes disagree with them raises
    :class:`FormatError` before :func:`build` allocates anything.
    """
    expected: set[str] = set()
    for index, spec in enumerate(specs):
        try:
            declared = declared_arrays(spec)
        except ValueError as exc:
            raise FormatError(
                f"{source}: invalid layer spec {spec!r} at layer {index}: {exc}"
            ) from None
        for name, shape in declared.items():
            key = name if single else f"{index}.{name}"
            expected.add(key)
            if key in shapes and tuple(shapes[key]) != shape:
                raise FormatError(
                    f"{source}: array {key!r} has shape {tuple(shapes[key])}; the "
                    f"{spec['type']} at layer {index} needs {shape}."
                )
    missing, unknown = sorted(expected - set(shapes)), sorted(set(shapes) - expected)
    if missing or unknown:
        raise FormatError(
            f"{source}: arrays do not match the network: missing {missing}, unknown "
            f"{unknown}."
        )


def layers_of(obj: Any) -> list[Any]:
    """The layers of a network, or ``[obj]`` for a lone BatchNorm."""
    if isinstance(obj, BatchNorm | Sequential):
        return children(obj)
    raise TypeError(
        f"expected a batchnorm.BatchNorm or a batchnorm.nn.Sequential network; got "
        f"{type(obj).__name__}."
    )


def layer_prefix(obj: Any, index: int) -> str:
    """The array-name prefix of layer ``index`` of ``obj``: ``"3."``, none alone."""
    return "" if isinstance(obj, BatchNorm) else f"{index}."


def arrays_of(obj: Any) -> dict[str, np.ndarray]:
    """Every parameter and running statistic of ``obj`` by array name."""
    arrays: dict[str, np.ndarray] = {}
    for index, layer in enumerate(layers_of(obj)):
        prefix = layer_prefix(obj, index)
        for name, value in _layer_arrays(layer).items():
            arrays[prefix + name] = value
    return arrays


def _layer_arrays(layer: Any) -> dict[str, np.ndarray]:
    if isinstance(layer, BatchNorm):
        state = layer.state_dict()
        return {k: state[k] for k in BN_ARRAYS if k in state}
    if isinstance(layer, Conv2d | Linear):
        out = {"weight": layer.weight}
        if layer.bias is not None:
            out["bias"] = layer.bias
        return out
    return {}


def expected_arrays(layer: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array a freshly built layer expects."""
    return {k: (v.shape, v.dtype) for k, v in _layer_arrays(layer).items()}


def fill(
    obj: Any,
    arrays: Mapping[str, Any],
    counters: Mapping[str, Mapping[str, int]] | None = None,
    *,
    source: str,
    allow_nonfinite: bool = False,
    strict_dtype: bool = True,
) -> None:
    """Check ``arrays`` against ``obj``'s layers, then copy them in (all or nothing).

    ``counters`` maps a BatchNorm's array prefix to its ``num_batches_tracked`` and
    ``num_values_seen``. ``source`` names the file in messages.
    """
    plan: list[tuple[Any, str, np.ndarray]] = []
    expected_names: set[str] = set()
    for index, layer in enumerate(layers_of(obj)):
        prefix = layer_prefix(obj, index)
        for name, (shape, dtype) in expected_arrays(layer).items():
            key = prefix + name
            expected_names.add(key)
            if key not in arrays:
                continue
            value = np.asarray(arrays[key])
            if value.shape != shape:
                raise FormatError(
                    f"{source}: array {key!r} has shape {value.shape}; the layer "
                    f"{layer!r} needs {shape}."
                )
            if strict_dtype and value.dtype != dtype:
                raise FormatError(
                    f"{source}: array {key!r} has dtype {value.dtype}; expected "
                    f"{dtype}."
                )
            if not np.issubdtype(value.dtype, np.floating):
                raise FormatError(
                    f"{source}: array {key!r} has dtype {value.dtype}; expected floats."
                )
            bad = bad_channels(value, name)
            if bad.size and not allow_nonfinite:  # parameters and statistics alike
                raise FormatError(
                    bad_statistic_message(
                        f"{source}: {key}",
                        name,
                        value,
                        bad,
                        "Pass allow_nonfinite=True to load it anyway (for inspection).",
                    )
                )
            plan.append((layer, name, value.astype(dtype, copy=True)))
    missing = sorted(expected_names - set(arrays))
    unknown = sorted(set(arrays) - expected_names)
    if missing or unknown:
        raise FormatError(
            f"{source}: arrays do not match the network: missing {missing}, unknown "
            f"{unknown}."
        )
    counts = counters or {}
    for index, layer in enumerate(layers_of(obj)):
        if isinstance(layer, BatchNorm):
            c = counts.get(layer_prefix(obj, index), {})
            for key in BN_COUNTERS:
                count: Any = c.get(key, 0)
                if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                    raise FormatError(
                        f"{source}: {key} must be an int >= 0; got {count!r}."
                    )
    # Everything checked: now mutate.
    for layer, name, value in plan:
        setattr(layer, name, value)
    for index, layer in enumerate(layers_of(obj)):
        if isinstance(layer, BatchNorm):
            c = counts.get(layer_prefix(obj, index), {})
            layer.num_batches_tracked = int(c.get("num_batches_tracked", 0))
            layer.num_values_seen = int(c.get("num_values_seen", 0))
