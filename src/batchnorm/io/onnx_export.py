"""ONNX export of a harness network (inference graph), with the ``onnx`` package.

Operators: Conv, Gemm, BatchNormalization, Relu, LeakyRelu, Sigmoid, MaxPool,
GlobalAveragePool (+ Flatten: the harness's GlobalAvgPool returns (N, C)), Flatten,
Softmax. Conventions: ONNX BatchNormalization's ``momentum`` weighs the OLD running
value, as ours does, and is exported unchanged; ONNX computes
``(x − mean) / √(var + epsilon) · scale + B`` with the stored ``input_var`` used
as is (ONNX itself updates a *biased* running variance in training mode, but the
exported graph is an inference graph), so we export our running variance as
stored and record its kind in the model's ``metadata_props``. A layer with ε
outside the root (darknet) is exported as ``epsilon = ε²`` and
``var + 2ε√var``, which gives the same ``√var + ε``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from batchnorm.io._atomic import atomic_write
from batchnorm.io._shapes import check_input_shape
from batchnorm.io._structure import layers_of
from batchnorm.layer import BatchNorm
from batchnorm.nn.conv import Conv2d, GlobalAvgPool, MaxPool2d
from batchnorm.nn.layers import Flatten, LeakyReLU, Linear, ReLU, Sigmoid, Softmax

__all__ = ["OPSET", "export", "to_model"]

#: Opset and IR version chosen so that onnxruntime ≥ 1.17 loads the model.
OPSET = 17
IR_VERSION = 8


def to_model(network: Any, input_shape: tuple[int, ...] | None = None) -> Any:
    """An ``onnx.ModelProto`` computing ``network.eval()``'s output.

    ``input_shape`` is one sample's shape, (C, H, W) or (features,); the batch
    axis is dynamic (``"N"``). Defaults to ``network.metadata["input_shape"]``.
    It is traced through the network first (:func:`batchnorm.io.check_input_shape`):
    a shape the network cannot take raises ``ValueError`` naming the first layer
    that disagrees, instead of a model that onnxruntime refuses.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shape = input_shape or tuple(
        (getattr(network, "metadata", {}) or {}).get("input_shape") or ()
    )
    if not shape:
        raise ValueError(
            "to_model needs input_shape=(C, H, W) or (features,): the network "
            "records none."
        )
    check_input_shape(network, shape)
    shape = tuple(int(n) for n in shape)
    nodes: list[Any] = []
    inits: list[Any] = []
    current = "input"

    def add(op: str, inputs: list[str], **attrs: Any) -> None:
        nonlocal current
        out = f"{len(nodes)}_{op}"
        nodes.append(helper.make_node(op, [current, *inputs], [out], **attrs))
        current = out

    def const(name: str, value: np.ndarray) -> str:
        inits.append(
            numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name)
        )
        return name

    layers = layers_of(network)
    rank = len(shape) + 1
    for i, layer in enumerate(layers):
        if isinstance(layer, Conv2d):
            extra = [const(f"{i}.weight", layer.weight)]
            if layer.bias is not None:
                extra.append(const(f"{i}.bias", layer.bias))
            k, p = layer.kernel_size, layer.padding
            add(
                "Conv",
                extra,
                kernel_shape=[k, k],
                strides=[layer.stride] * 2,
                pads=[p, p, p, p],
            )
        elif isinstance(layer, Linear):
            extra = [const(f"{i}.weight", layer.weight)]
            if layer.bias is not None:
                extra.append(const(f"{i}.bias", layer.bias))
            add("Gemm", extra, transB=1)
            rank = 2
        elif isinstance(layer, BatchNorm):
            if layer.axis != 1 and not (layer.axis == -1 and len(shape) == 1):
                raise ValueError(f"layer {i} ({layer!r}): ONNX normalizes axis 1 only.")
            c = layer.num_features
            var = layer.running_var.astype(np.float64)
            eps = layer.eps
            if layer.eps_placement == "outside":
                var, eps = var + 2 * eps * np.sqrt(var), eps * eps
            gamma = layer.gamma if layer.gamma is not None else np.ones(c)
            beta = layer.beta if layer.beta is not None else np.zeros(c)
            extra = [
                const(f"{i}.gamma", gamma),
                const(f"{i}.beta", beta),
                const(f"{i}.running_mean", layer.running_mean),
                const(f"{i}.running_var", var),
            ]
            momentum = 0.9 if layer.momentum is None else layer.momentum
            add("BatchNormalization", extra, epsilon=eps, momentum=momentum)
        elif isinstance(layer, ReLU):
            add("Relu", [])
        elif isinstance(layer, LeakyReLU):
            add("LeakyRelu", [], alpha=layer.slope)
        elif isinstance(layer, Sigmoid):
            add("Sigmoid", [])
        elif isinstance(layer, MaxPool2d):
            k = layer.kernel_size
            add("MaxPool", [], kernel_shape=[k, k], strides=[layer.stride] * 2)
        elif isinstance(layer, GlobalAvgPool):
            add("GlobalAveragePool", [])
            add("Flatten", [], axis=1)
            rank = 2
        elif isinstance(layer, Flatten):
            add("Flatten", [], axis=1)
            rank = 2
        elif isinstance(layer, Softmax):
            add("Softmax", [], axis=1)
        else:
            raise TypeError(f"layer {i} ({layer!r}) has no ONNX export.")
    graph = helper.make_graph(
        nodes,
        "batchnorm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape])],
        [
            helper.make_tensor_value_info(
                current, TensorProto.FLOAT, ["N", *(f"d{j}" for j in range(rank - 1))]
            )
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="batchnorm",
    )
    model.ir_version = IR_VERSION
    kinds = {
        str(i): layer.running_var_kind
        for i, layer in enumerate(layers)
        if isinstance(layer, BatchNorm)
    }
    helper.set_model_props(model, {"batchnorm.running_var_kind": json.dumps(kinds)})
    onnx.checker.check_model(model)
    return model


def export(
    network: Any,
    path: str | os.PathLike[str],
    input_shape: tuple[int, ...] | None = None,
) -> None:
    """Write :func:`to_model`'s model to ``path`` atomically (nothing on error)."""
    data = to_model(network, input_shape).SerializeToString()
    atomic_write(path, lambda file: file.write(data))
