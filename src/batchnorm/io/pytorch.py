"""PyTorch interop: state dicts and ``torch.nn`` modules, both directions.

Key names are PyTorch's: for layer ``i`` of a network, ``"i.weight"``, ``"i.bias"``
and for a BatchNorm also ``"i.running_mean"``, ``"i.running_var"``,
``"i.num_batches_tracked"`` (γ is ``weight``, β is ``bias``). A lone BatchNorm has
no prefix. Conventions converted:

- momentum: PyTorch's ``momentum`` weighs the NEW batch, ours the OLD running
  value: ``ours = 1 − theirs`` (their 0.1 is our 0.9). PyTorch's
  ``momentum=None`` (equal weight per batch) maps to our ``None`` (weight per
  value: the same for equal batch sizes).
- ε: both inside the root. A layer with ε added *outside* the root (darknet) is
  exported exactly for inference as ``eps' = ε²``, ``running_var' = var + 2ε√var``
  (so ``√(var' + eps') = √var + ε``), and converted back on import.
- running variance: PyTorch stores it unbiased; a ``"biased"`` layer's values are
  copied as they are (inference uses them as stored); the kind is recorded.

The conventions of every BatchNorm are recorded in the state dict's
``_metadata`` (where PyTorch keeps each module's ``version``) under
``"batchnorm"``, and survive ``torch.save`` / ``torch.load(weights_only=True)``.
torch is imported only when a function here is called.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from batchnorm.io._atomic import atomic_write
from batchnorm.io._structure import (
    FormatError,
    Network,
    describe,
    fill,
    layer_prefix,
    layers_of,
)
from batchnorm.layer import BatchNorm
from batchnorm.nn.conv import Conv2d, GlobalAvgPool, MaxPool2d
from batchnorm.nn.layers import Flatten, LeakyReLU, Linear, ReLU, Sigmoid, Softmax

__all__ = [
    "from_module",
    "load_state_dict",
    "structure_of",
    "to_module",
    "to_state_dict",
]

_TORCH_BN = {"weight": "gamma", "bias": "beta"}


def _torch() -> Any:
    import torch

    return torch


def _exported_stats(layer: BatchNorm) -> tuple[np.ndarray, float]:
    """Running variance and ε as PyTorch must see them (ε inside the root)."""
    var = layer.running_var.astype(np.float64)
    if layer.eps_placement == "outside":
        return var + 2 * layer.eps * np.sqrt(var), layer.eps**2
    return var, layer.eps


def to_state_dict(obj: Any) -> OrderedDict[str, Any]:
    """A PyTorch ``state_dict`` (CPU tensors) of a BatchNorm or harness network.

    Examples
    --------
    >>> import batchnorm as bn
    >>> sd = to_state_dict(bn.BatchNorm(2))        # doctest: +SKIP
    >>> sorted(sd)                                 # doctest: +SKIP
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """
    torch = _torch()
    state: OrderedDict[str, Any] = OrderedDict()
    metadata: dict[str, Any] = {"": {"batchnorm": json.dumps(structure_of(obj))}}
    for index, layer in enumerate(layers_of(obj)):
        p = layer_prefix(obj, index)
        if isinstance(layer, BatchNorm):
            var, eps = _exported_stats(layer)
            if layer.gamma is not None and layer.beta is not None:
                state[p + "weight"] = torch.from_numpy(layer.gamma.copy())
                state[p + "bias"] = torch.from_numpy(layer.beta.copy())
            state[p + "running_mean"] = torch.from_numpy(layer.running_mean.copy())
            state[p + "running_var"] = torch.from_numpy(var.astype(layer.dtype))
            state[p + "num_batches_tracked"] = torch.tensor(
                layer.num_batches_tracked, dtype=torch.int64
            )
            conventions = {
                "momentum_ours": layer.momentum,
                "momentum_torch": None
                if layer.momentum is None
                else 1 - layer.momentum,
                "eps": layer.eps,
                "eps_placement": layer.eps_placement,
                "torch_eps": eps,
                "running_var_kind": layer.running_var_kind,
                "num_values_seen": int(layer.num_values_seen),
            }
            metadata[p.rstrip(".")] = {
                "version": 2,
                "batchnorm": json.dumps(conventions),
            }
        elif isinstance(layer, Conv2d | Linear):
            state[p + "weight"] = torch.from_numpy(layer.weight.copy())
            if layer.bias is not None:
                state[p + "bias"] = torch.from_numpy(layer.bias.copy())
    state._metadata = metadata  # type: ignore[attr-defined]
    return state


def save(obj: Any, path: Any) -> None:
    """Write :func:`to_state_dict` of ``obj`` to ``path`` (``torch.save``, atomic)."""
    torch = _torch()
    state = to_state_dict(obj)
    atomic_write(path, lambda file: torch.save(state, file))


def structure_of(obj: Any) -> dict[str, Any]:
    """The layer specs (as in the native format) recorded in a state dict."""
    return {
        "kind": "layer" if isinstance(obj, BatchNorm) else "network",
        "layers": [describe(layer) for layer in layers_of(obj)],
        "metadata": dict(getattr(obj, "metadata", {}) or {}),
    }


def _recorded(state: Any, key: str) -> Any:
    entry = (getattr(state, "_metadata", None) or {}).get(key, {})
    raw = entry.get("batchnorm") if isinstance(entry, Mapping) else None
    try:
        return json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        return None


def load_state_dict(
    obj: Any, state: Mapping[str, Any] | None = None, *, allow_nonfinite: bool = False
) -> Any:
    """Copy a PyTorch ``state_dict`` into ``obj``; all or nothing; returns ``obj``.

    ``obj`` may be ``None`` when ``state`` was written by :func:`to_state_dict`:
    the network recorded in it is rebuilt. Keys, shapes and finiteness are checked
    (:class:`batchnorm.io.FormatError`).
    """
    if state is None or not isinstance(state, Mapping):
        raise TypeError(
            f"state must be a mapping (a state_dict); got {type(state).__name__}."
        )
    if obj is None:
        recorded = _recorded(state, "")
        if not isinstance(recorded, dict):
            raise FormatError(
                "this state_dict does not record its network structure (it was not "
                "written by batchnorm); pass the network to load it into."
            )
        from batchnorm.io._structure import build

        layers = [build(spec) for spec in recorded.get("layers", [])]
        if recorded.get("kind") == "layer":
            obj = layers[0]
        else:
            obj = Network(layers, recorded.get("metadata") or {})
    arrays: dict[str, np.ndarray] = {}
    counters: dict[str, dict[str, int]] = {}
    layers = layers_of(obj)
    bn_prefixes = {
        layer_prefix(obj, i): layer
        for i, layer in enumerate(layers)
        if isinstance(layer, BatchNorm)
    }
    for key, value in state.items():
        p, _, name = key.rpartition(".")
        p = p + "." if p else ""
        array = (
            value.detach().cpu().numpy()
            if hasattr(value, "detach")
            else np.asarray(value)
        )
        if p in bn_prefixes and name == "num_batches_tracked":
            counters.setdefault(p, {})["num_batches_tracked"] = int(array)
            continue
        if p in bn_prefixes:
            name = _TORCH_BN.get(name, name)
        arrays[p + name] = array
    for p, layer in bn_prefixes.items():
        conv = _recorded(state, p.rstrip(".")) or {}
        counters.setdefault(p, {}).setdefault("num_batches_tracked", 0)
        counters[p]["num_values_seen"] = int(conv.get("num_values_seen", 0) or 0)
        var = arrays.get(p + "running_var")
        if (
            var is not None
            and conv.get("eps_placement") == "outside"
            and (layer.eps_placement == "outside")
        ):
            eps = float(conv["eps"])
            root = -eps + np.sqrt(eps * eps + np.maximum(var.astype(np.float64), 0))
            arrays[p + "running_var"] = (root * root).astype(var.dtype)
    fill(
        obj,
        arrays,
        counters,
        source="state_dict",
        allow_nonfinite=allow_nonfinite,
        strict_dtype=False,
    )
    return obj


def from_module(module: Any) -> Any:
    """A BatchNorm or harness network equal to a ``torch.nn`` module in eval mode.

    Supports ``BatchNorm1d/2d``, ``Conv2d`` (square kernel, groups 1, dilation 1,
    zero padding), ``Linear``, ``ReLU``, ``LeakyReLU``, ``Sigmoid``, ``MaxPool2d``
    (no padding), ``AdaptiveAvgPool2d(1)`` (as GlobalAvgPool: its output is then
    already flat), ``Flatten``, ``Softmax(dim=1)`` inside an ``nn.Sequential``.
    """
    torch = _torch()
    nn = torch.nn
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _bn_from(module)
    if not isinstance(module, nn.Sequential):
        raise TypeError(
            f"expected a torch.nn.Sequential or BatchNorm; got {type(module).__name__}."
        )
    layers = [_layer_from(child, nn) for child in module]
    network = Network(layers)
    load_state_dict(network, module.state_dict())
    for layer, child in zip(network.layers, module, strict=True):
        if isinstance(layer, BatchNorm):
            layer.num_batches_tracked = int(child.num_batches_tracked)
    return network


def _bn_from(m: Any) -> BatchNorm:
    if not m.track_running_stats or m.running_mean is None:
        raise ValueError(f"{m} has no running statistics (track_running_stats=False).")
    momentum = None if m.momentum is None else 1.0 - m.momentum
    layer = BatchNorm.from_preset(
        "torch", m.num_features, eps=m.eps, momentum=momentum, affine=m.affine
    )
    state = {k: v.detach().cpu().numpy() for k, v in m.state_dict().items()}
    load_state_dict(layer, state)
    return layer


def _layer_from(child: Any, nn: Any) -> Any:
    if isinstance(child, nn.modules.batchnorm._BatchNorm):
        return _bn_from(child)
    if isinstance(child, nn.Conv2d):
        k, s, p = child.kernel_size, child.stride, child.padding
        if (
            k[0] != k[1]
            or s[0] != s[1]
            or isinstance(p, str)
            or p[0] != p[1]
            or child.groups != 1
            or child.dilation != (1, 1)
            or child.padding_mode != "zeros"
        ):
            raise ValueError(
                f"unsupported {child}: the harness Conv2d is square, "
                "ungrouped, undilated, zero-padded."
            )
        return Conv2d(
            child.in_channels,
            child.out_channels,
            k[0],
            stride=s[0],
            padding=p[0],
            bias=child.bias is not None,
            init=0.0,
        )
    if isinstance(child, nn.Linear):
        return Linear(
            child.in_features, child.out_features, bias=child.bias is not None, init=0.0
        )
    if isinstance(child, nn.MaxPool2d):
        k, s = child.kernel_size, child.stride
        if (
            not (isinstance(k, int) and isinstance(s, int))
            or child.padding not in (0, (0, 0))
            or child.dilation not in (1, (1, 1))
            or child.ceil_mode
        ):
            raise ValueError(f"unsupported {child}: square, unpadded pooling only.")
        return MaxPool2d(k, s)
    if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size in (1, (1, 1)):
        return GlobalAvgPool()
    if isinstance(child, nn.Softmax) and child.dim in (1, -1):
        return Softmax()
    if isinstance(child, nn.LeakyReLU):
        return LeakyReLU(child.negative_slope)
    simple = {nn.ReLU: ReLU, nn.Sigmoid: Sigmoid, nn.Flatten: Flatten}
    for cls, ours in simple.items():
        if type(child) is cls:
            return ours()
    raise ValueError(f"no harness layer for torch module {child}.")


def to_module(obj: Any, *, num_spatial_dims: int = 2) -> Any:
    """A ``torch.nn`` module (eval mode, float32) equal to ``obj`` for inference.

    A lone BatchNorm becomes ``BatchNorm2d`` (``num_spatial_dims=2``) or
    ``BatchNorm1d`` (0 or 1). In a network, the rank is followed through the layers.
    """
    torch = _torch()
    nn = torch.nn
    if isinstance(obj, BatchNorm):
        module = _bn_to(obj, nn, image=num_spatial_dims == 2)
        module.load_state_dict(_strip(to_state_dict(obj)))
        return module.eval()
    modules, image = [], None
    for layer in layers_of(obj):
        if isinstance(layer, BatchNorm):
            modules.append(_bn_to(layer, nn, image=bool(image)))
        elif isinstance(layer, Conv2d):
            modules.append(
                nn.Conv2d(
                    layer.in_channels,
                    layer.out_channels,
                    layer.kernel_size,
                    stride=layer.stride,
                    padding=layer.padding,
                    bias=layer.bias is not None,
                )
            )
            image = True
        elif isinstance(layer, Linear):
            modules.append(
                nn.Linear(
                    layer.in_features, layer.out_features, bias=layer.bias is not None
                )
            )
            image = False
        elif isinstance(layer, GlobalAvgPool):
            modules.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
            image = False
        elif isinstance(layer, MaxPool2d):
            modules.append(nn.MaxPool2d(layer.kernel_size, layer.stride))
            image = True
        else:
            table = {ReLU: nn.ReLU, Sigmoid: nn.Sigmoid, Flatten: nn.Flatten}
            if isinstance(layer, LeakyReLU):
                modules.append(nn.LeakyReLU(layer.slope))
            elif isinstance(layer, Softmax):
                modules.append(nn.Softmax(dim=1))
            elif type(layer) in table:
                modules.append(table[type(layer)]())
            else:
                raise TypeError(f"no torch module for {layer!r}.")
            image = False if isinstance(layer, Flatten) else image
    module = nn.Sequential(*modules)
    module.load_state_dict(_strip(to_state_dict(obj)))
    return module.eval()


def _strip(state: OrderedDict[str, Any]) -> OrderedDict[str, Any]:
    return OrderedDict(
        (k, v.float() if v.is_floating_point() else v) for k, v in state.items()
    )


def _bn_to(layer: BatchNorm, nn: Any, *, image: bool) -> Any:
    if layer.axis not in (1, -1) or (image and layer.axis != 1):
        raise ValueError(f"{layer!r}: torch normalizes axis 1 only.")
    cls = nn.BatchNorm2d if image else nn.BatchNorm1d
    momentum = None if layer.momentum is None else 1.0 - layer.momentum
    return cls(
        layer.num_features,
        eps=_exported_stats(layer)[1],
        momentum=momentum,
        affine=layer.affine,
    )
