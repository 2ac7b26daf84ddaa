"""``input_shape`` is traced through the network before anything is written.

A shape the network cannot take would give an ONNX model that onnxruntime refuses
(or fails on at run time), or a darknet ``.cfg`` whose ``.weights`` do not belong
to it; the writers refuse it, name the first layer that disagrees, and leave the
existing files alone.
"""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import io as bio
from batchnorm import nn
from batchnorm.io import darknet


def cnn() -> nn.Sequential:
    """1×8×8 images: conv, BN, ReLU, pool, conv, BN, ReLU, pool, Flatten, Linear(64)."""
    return nn.cnn(batch_norm=True, rng=np.random.default_rng(0))


def darknet_cnn() -> nn.Sequential:
    rng = np.random.default_rng(0)
    return nn.Sequential(
        [
            nn.Conv2d(1, 2, 3, padding=1, bias=False, rng=rng),
            bn.BatchNorm.from_preset("darknet", 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 3, rng=rng),
        ]
    )


BAD_SHAPES = [
    (
        (3, 8, 8),
        r"layer 0 \(Conv2d\(1, 8, 3.*\) takes \(1, H, W\); it gets \(3, 8, 8\)",
    ),
    ((1, 16, 16), r"layer 9 \(Linear\(64, 10.*\) takes 64 features; it gets 256"),
    ((8, 8), r"input_shape \(8, 8\) must be \(C, H, W\) or \(features,\)"),
    ((64,), r"layer 0 \(Conv2d\(1, 8, 3.*\) takes \(1, H, W\); it gets \(64,\)"),
    ((1, 2, 2), r"layer 7 \(MaxPool2d\(2.*\) has kernel 2, larger than its 1x1 input"),
    ((0, 8, 8), r"input_shape \(0, 8, 8\) must have sizes >= 1"),
]


@pytest.mark.parametrize(("shape", "match"), BAD_SHAPES)
def test_check_input_shape_names_the_first_layer_that_disagrees(shape, match):
    with pytest.raises(ValueError, match=match):
        bio.check_input_shape(cnn(), shape)


def test_check_input_shape_traces_every_layer_kind():
    net = darknet_cnn()
    assert bio.check_input_shape(net, (1, 8, 8)) == (3,)
    assert bio.check_input_shape(net, [1, 9, 9]) == (3,)  # pooling floors
    mlp = nn.mlp(batch_norm=True, rng=np.random.default_rng(0))
    assert bio.check_input_shape(mlp, (64,)) == (10,)
    with pytest.raises(ValueError, match=r"layer 0 \(Linear\(64, 100.*\) takes 64 f"):
        bio.check_input_shape(mlp, (63,))
    pooled = nn.Sequential(
        [nn.Conv2d(3, 4, 3, stride=2), nn.GlobalAvgPool(), bn.BatchNorm(4)]
    )
    assert bio.check_input_shape(pooled, (3, 7, 5)) == (4,)
    with pytest.raises(
        ValueError, match=r"layer 0 .*has kernel 3, larger than its 2x9"
    ):
        bio.check_input_shape(pooled, (3, 2, 9))
    assert bio.check_input_shape(bn.BatchNorm(3), (3, 4, 4)) == (3, 4, 4)
    with pytest.raises(
        ValueError, match="layer 0 .*takes 3 channels on axis 1; it gets 4"
    ):
        bio.check_input_shape(bn.BatchNorm(3), (4, 4, 4))
    last = nn.Sequential([bn.BatchNorm(4, axis=-1)])
    assert bio.check_input_shape(last, (2, 2, 4)) == (2, 2, 4)
    with pytest.raises(ValueError, match="--input-shape 2,4,2 does not fit"):
        bio.check_input_shape(last, (2, 4, 2), name="--input-shape")
    softmax = nn.Sequential([nn.Conv2d(1, 2, 1), bio.Softmax()])
    with pytest.raises(
        ValueError, match=r"layer 1 \(Softmax\(\)\) takes \(features,\); it"
    ):
        bio.check_input_shape(softmax, (1, 2, 2))


def test_check_input_shape_rejects_non_integers():
    with pytest.raises(TypeError, match=r"input_shape must be a tuple of ints"):
        bio.check_input_shape(cnn(), (1.0, 8, 8))
    with pytest.raises(TypeError, match=r"input_shape must be a tuple of ints"):
        bio.check_input_shape(cnn(), "1,8,8")


@pytest.mark.parametrize(("shape", "match"), BAD_SHAPES[:5])
def test_onnx_export_refuses_a_wrong_shape_and_keeps_the_old_file(
    tmp_path, shape, match
):
    pytest.importorskip("onnx")
    from batchnorm.io import onnx_export

    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match=match):
        onnx_export.export(cnn(), path, shape)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_onnx_export_checks_the_recorded_shape_too(tmp_path):
    pytest.importorskip("onnx")
    from batchnorm.io import onnx_export

    net = bio.Network(cnn().layers, {"input_shape": [3, 8, 8]})
    with pytest.raises(ValueError, match=r"input_shape \(3, 8, 8\).*layer 0"):
        onnx_export.export(net, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((3, 8, 8), r"layer 0 \(Conv2d\(1, 2, 3.*\) takes \(1, H, W\)"),
        ((1, 16, 16), r"layer 5 \(Linear\(32, 3.*\) takes 32 features; it gets 128"),
        ((8, 8), r"\(C, H, W\) or \(features,\)"),
        ((64,), r"layer 0 \(Conv2d\(1, 2, 3.*\) takes \(1, H, W\); it gets \(64,\)"),
    ],
)
def test_darknet_save_refuses_a_wrong_shape_and_writes_nothing(tmp_path, shape, match):
    weights, cfg = tmp_path / "m.weights", tmp_path / "m.cfg"
    weights.write_bytes(b"old weights")
    with pytest.raises(ValueError, match=match):
        darknet.save(darknet_cnn(), weights, cfg, input_shape=shape)
    assert weights.read_bytes() == b"old weights" and not cfg.exists()


def test_darknet_save_with_the_right_shape_round_trips(tmp_path):
    net = darknet_cnn()
    darknet.save(net, tmp_path / "m.weights", tmp_path / "m.cfg", input_shape=(1, 8, 8))
    back = darknet.load(tmp_path / "m.cfg", tmp_path / "m.weights")
    assert [repr(layer) for layer in back.layers] == [repr(x) for x in net.layers]
