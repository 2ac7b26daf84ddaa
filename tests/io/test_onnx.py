"""ONNX export: onnxruntime reproduces our eval outputs."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import batchnorm as bn  # noqa: E402
from batchnorm import io as bio  # noqa: E402
from batchnorm import nn  # noqa: E402
from batchnorm.io import onnx_export  # noqa: E402

ATOL = 1e-5


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def trained(net, x):
    for _ in range(3):
        net(x)
    return net.eval()


def test_cnn_with_every_operator(tmp_path):
    rng = np.random.default_rng(0)
    net = nn.Sequential(
        [
            nn.Conv2d(1, 4, 3, padding=1, bias=False, rng=rng),
            bn.BatchNorm(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, stride=2, padding=1, rng=rng),
            bio.LeakyReLU(),
            nn.GlobalAvgPool(),
            nn.Linear(4, 3, rng=rng),
            bn.BatchNorm.from_preset("darknet", 3),
            nn.Sigmoid(),
            nn.Flatten(),
            bio.Softmax(),
        ]
    )
    x = rng.normal(3.0, 2.0, size=(8, 1, 8, 8)).astype(np.float32)
    trained(net, x)
    onnx_export.export(net, tmp_path / "m.onnx", (1, 8, 8))
    ops = {node.op_type for node in onnx.load(tmp_path / "m.onnx").graph.node}
    assert ops == {
        "Conv",
        "BatchNormalization",
        "Relu",
        "MaxPool",
        "LeakyRelu",
        "GlobalAveragePool",
        "Flatten",
        "Gemm",
        "Sigmoid",
        "Softmax",
    }
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x), net(x), atol=ATOL, rtol=0)


def test_mlp_and_recorded_conventions(tmp_path):
    net = nn.mlp(batch_norm=True, rng=np.random.default_rng(0), hidden=(16,))
    x = np.random.default_rng(1).normal(size=(32, 64)).astype(np.float32)
    trained(net, x)
    onnx_export.export(net, tmp_path / "m.onnx", (64,))
    model = onnx.load(tmp_path / "m.onnx")
    bn_node = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    momentum = next(a.f for a in bn_node.attribute if a.name == "momentum")
    assert momentum == pytest.approx(0.9)  # same direction as ours: no conversion
    assert (
        "unbiased"
        in {p.key: p.value for p in model.metadata_props}["batchnorm.running_var_kind"]
    )
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x), net(x), atol=ATOL, rtol=0)


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="needs input_shape"):
        onnx_export.to_model(nn.Sequential([nn.ReLU()]))
    with pytest.raises(TypeError, match="has no ONNX export"):
        onnx_export.to_model(nn.Sequential([object()]), (2,))
    with pytest.raises(ValueError, match="ONNX normalizes axis 1 only"):
        onnx_export.to_model(nn.Sequential([bn.BatchNorm(2, axis=-1)]), (3, 3, 2))
