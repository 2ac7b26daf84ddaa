"""One sample's shape traced through a network: what each layer takes and gives.

Writers that record an input shape (ONNX graphs, darknet ``.cfg`` files) call
:func:`check_input_shape` before writing anything, so a shape the network cannot
take is refused with the first layer that disagrees, instead of a file that
onnxruntime or darknet refuses later.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from batchnorm.io._structure import layers_of
from batchnorm.layer import BatchNorm
from batchnorm.nn.conv import Conv2d, GlobalAvgPool, MaxPool2d
from batchnorm.nn.layers import Flatten, Linear, Softmax

__all__ = ["check_input_shape"]


def check_input_shape(
    obj: Any, shape: Any, *, name: str = "input_shape"
) -> tuple[int, ...]:
    """Trace one sample's ``shape`` through ``obj``'s layers; its output shape.

    Parameters
    ----------
    obj : batchnorm.BatchNorm or batchnorm.nn.Sequential
    shape : tuple of int
        (C, H, W) or (features,), without the batch axis.
    name : str, default "input_shape"
        What the caller calls the shape in messages (``"--input-shape"`` on the
        command line, which also shows it as typed: ``3,8,8``).

    Raises
    ------
    TypeError
        ``shape`` is not a sequence of ints.
    ValueError
        A rank other than 1 or 3, a size < 1, or a layer that cannot take what
        reaches it: the message names the first such layer.

    Examples
    --------
    >>> from batchnorm import nn
    >>> net = nn.Sequential([nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 2)])
    >>> check_input_shape(net, (1, 8, 8))
    (2,)
    >>> check_input_shape(net, (3, 8, 8))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: input_shape (3, 8, 8) does not fit ... it gets (3, 8, 8).
    """
    if (
        isinstance(shape, str | bytes)
        or not isinstance(shape, Sequence)
        or not all(isinstance(n, int | np.integer) for n in shape)
        or any(isinstance(n, bool) for n in shape)
    ):
        raise TypeError(
            f"{name} must be a tuple of ints, (C, H, W) or (features,); got {shape!r}."
        )
    sizes = tuple(int(n) for n in shape)
    shown = ",".join(map(str, sizes)) if name.startswith("--") else str(sizes)
    if len(sizes) not in (1, 3):
        raise ValueError(
            f"{name} {shown} must be (C, H, W) or (features,): one sample's shape, "
            f"without the batch axis; got {len(sizes)} sizes."
        )
    if min(sizes) < 1:
        raise ValueError(f"{name} {shown} must have sizes >= 1.")
    current = sizes
    for index, layer in enumerate(layers_of(obj)):
        problem, current = _traced(layer, current)
        if problem:
            raise ValueError(
                f"{name} {shown} does not fit the network: layer {index} "
                f"({layer!r}) {problem}."
            )
    return current


def _traced(layer: Any, s: tuple[int, ...]) -> tuple[str | None, tuple[int, ...]]:
    """(what is wrong or None, the output shape) of one layer for input ``s``."""
    if isinstance(layer, Conv2d | MaxPool2d):
        channels = getattr(layer, "in_channels", None)  # a pool takes any C
        wanted = f"({channels}, H, W)" if channels else "images (C, H, W)"
        if len(s) != 3 or (channels is not None and s[0] != channels):
            return f"takes {wanted}; it gets {s}", s
        k, stride, pad = layer.kernel_size, layer.stride, getattr(layer, "padding", 0)
        h, w = s[1] + 2 * pad, s[2] + 2 * pad
        if min(h, w) < k:
            padded = f" (padding {pad})" if pad else ""
            return f"has kernel {k}, larger than its {s[1]}x{s[2]} input{padded}", s
        c = getattr(layer, "out_channels", s[0])
        return None, (c, (h - k) // stride + 1, (w - k) // stride + 1)
    if isinstance(layer, GlobalAvgPool):
        if len(s) != 3:
            return f"takes images (C, H, W); it gets {s}", s
        return None, (s[0],)
    if isinstance(layer, Flatten):
        return None, (math.prod(s),)
    if isinstance(layer, Linear | Softmax) and len(s) != 1:
        return f"takes (features,); it gets {s} (put a Flatten() before it)", s
    if isinstance(layer, Linear):
        if s[0] != layer.in_features:
            return f"takes {layer.in_features} features; it gets {s[0]}", s
        return None, (layer.out_features,)
    if isinstance(layer, BatchNorm):
        rank, axis = len(s) + 1, layer.axis
        if not -rank < axis < rank or axis % rank == 0:
            batch = ", ".join(["N", *map(str, s)])
            return f"normalizes axis {axis}, which a batch ({batch}) lacks", s
        wanted, got = layer.num_features, s[axis % rank - 1]
        if got != wanted:
            return f"takes {wanted} channels on axis {axis}; it gets {got}", s
    return None, s
