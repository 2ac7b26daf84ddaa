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
torch is imported only when a function here is called. The state dict and file
functions live in :mod:`batchnorm.io._torch_state`; reading a file
(:func:`load`, :func:`read_state_dict`) uses ``torch.load(weights_only=True)``
and raises :class:`batchnorm.io.FormatError`, naming the file, for anything but
a dict of tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from batchnorm.io._structure import Network, layers_of
from batchnorm.io._torch_state import (
    exported_stats,
    load,
    load_state_dict,
    read_state_dict,
    recorded,
    records_structure,
    save,
    structure_of,
    to_state_dict,
    torch_module,
)
from batchnorm.layer import BatchNorm
from batchnorm.nn.conv import Conv2d, GlobalAvgPool, MaxPool2d
from batchnorm.nn.layers import Flatten, LeakyReLU, Linear, ReLU, Sigmoid, Softmax

__all__ = [
    "from_module",
    "load",
    "load_state_dict",
    "read_state_dict",
    "recorded",
    "records_structure",
    "save",
    "structure_of",
    "to_module",
    "to_state_dict",
]


def from_module(module: Any) -> Any:
    """A BatchNorm or harness network equal to a ``torch.nn`` module in eval mode.

    Supports ``BatchNorm1d/2d``, ``Conv2d`` (square kernel, groups 1, dilation 1,
    zero padding), ``Linear``, ``ReLU``, ``LeakyReLU``, ``Sigmoid``, ``MaxPool2d``
    (no padding), ``AdaptiveAvgPool2d(1)`` (as GlobalAvgPool: its output is then
    already flat), ``Flatten``, ``Softmax(dim=1)`` inside an ``nn.Sequential``.
    """
    torch = torch_module()
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
    torch = torch_module()
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
        eps=exported_stats(layer)[1],
        momentum=momentum,
        affine=layer.affine,
    )
