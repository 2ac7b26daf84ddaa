"""darknet .cfg parsing and .weights files: byte layout, round trips, inference, errors.

The expected bytes are built here with ``struct.pack`` from the layout darknet's
``save_weights_upto`` writes (header int32 major, minor, revision, then seen;
convolutional: biases, scales, rolling_mean, rolling_variance, weights;
connected: biases, weights, scales, rolling_mean, rolling_variance; batchnorm:
scales, rolling_mean, rolling_variance), never with the writer under test.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from batchnorm import io as bio
from batchnorm.io import darknet

CFG = """\
[net]
# a comment
batch=8
height=4
width=4
channels=2

[convolutional]
batch_normalize=1
filters=3
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
filters=2
size=1
activation=linear

[batchnorm]

[connected]
output=3
batch_normalize=1
activation=relu

[connected]
output=2
activation=logistic

[softmax]
groups=1
"""


def floats(values) -> bytes:
    values = np.asarray(values, np.float32).ravel()
    return struct.pack(f"<{values.size}f", *values.tolist())


@pytest.fixture
def net(tmp_path):
    (tmp_path / "t.cfg").write_text(CFG)
    network = darknet.load(tmp_path / "t.cfg")
    rng = np.random.default_rng(0)
    for layer in network.layers:
        for name in ("weight", "bias", "gamma", "beta", "running_mean"):
            value = getattr(layer, name, None)
            if value is not None:
                setattr(layer, name, rng.normal(size=value.shape).astype(np.float32))
        if hasattr(layer, "running_var"):
            layer.running_var = rng.uniform(0.5, 2, layer.running_var.shape).astype(
                np.float32
            )
    network.layers[5].beta = np.zeros(2, np.float32)  # standalone: darknet has no β
    return network


def test_cfg_builds_the_expected_layers(net):
    assert [type(layer).__name__ for layer in net.layers] == [
        "Conv2d",
        "BatchNorm",
        "LeakyReLU",
        "MaxPool2d",
        "Conv2d",
        "BatchNorm",
        "Flatten",
        "Linear",
        "BatchNorm",
        "ReLU",
        "Linear",
        "Sigmoid",
        "Softmax",
    ]
    conv, norm = net.layers[0], net.layers[1]
    assert (conv.padding, conv.bias, norm.eps_placement, norm.ddof) == (
        1,
        None,
        "outside",
        1,
    )
    assert net.layers[7].in_features == 2 * 2 * 2
    assert net.metadata["input_shape"] == [2, 4, 4]


def expected_bytes(net, header=(0, 2, 0), seen=1234, seen_format="<Q") -> bytes:
    conv1, bn1, _, _, conv2, bn_alone, _, fc1, bn3, _, fc2 = net.layers[:11]
    out = struct.pack("<iii", *header) + struct.pack(seen_format, seen)
    out += floats(bn1.beta) + floats(bn1.gamma) + floats(bn1.running_mean)
    out += floats(bn1.running_var) + floats(conv1.weight)
    out += floats(conv2.bias) + floats(conv2.weight)
    out += floats(bn_alone.gamma) + floats(bn_alone.running_mean)
    out += floats(bn_alone.running_var)
    out += floats(bn3.beta) + floats(fc1.weight) + floats(bn3.gamma)
    out += floats(bn3.running_mean) + floats(bn3.running_var)
    out += floats(fc2.bias) + floats(fc2.weight)
    return out


def test_weights_bytes_follow_darknet_layout(net, tmp_path):
    darknet.save(
        net,
        tmp_path / "t.weights",
        header={"major": 0, "minor": 2, "revision": 0, "seen": 1234},
    )
    assert (tmp_path / "t.weights").read_bytes() == expected_bytes(net)


def test_old_header_has_32_bit_seen(net, tmp_path):
    header = {"major": 0, "minor": 1, "revision": 5, "seen": 77}
    darknet.save(net, tmp_path / "t.weights", header=header)
    data = (tmp_path / "t.weights").read_bytes()
    assert data == expected_bytes(net, (0, 1, 5), 77, "<I")
    back = darknet.load(tmp_path / "t.cfg", tmp_path / "t.weights")
    assert back.metadata["darknet"]["header"] == header


def test_transposed_connected_weights_when_version_over_1000(net, tmp_path):
    data = expected_bytes(net, (1001, 0, 0), 9, "<I")
    fc1, fc2 = net.layers[7], net.layers[10]
    # darknet reads these files' connected weights as (inputs, outputs)
    data = data.replace(floats(fc1.weight), floats(fc1.weight.T))
    data = data.replace(floats(fc2.weight), floats(fc2.weight.T))
    (tmp_path / "t.weights").write_bytes(data)
    back = darknet.load(tmp_path / "t.cfg", tmp_path / "t.weights")
    np.testing.assert_array_equal(back.layers[7].weight, fc1.weight)
    np.testing.assert_array_equal(back.layers[10].weight, fc2.weight)
    darknet.save(back, tmp_path / "again.weights")
    assert (tmp_path / "again.weights").read_bytes() == data


def test_read_back_identical_and_rewrite_byte_identical(net, tmp_path):
    (tmp_path / "t.weights").write_bytes(expected_bytes(net))
    back = darknet.load(tmp_path / "t.cfg", tmp_path / "t.weights")
    for ours, theirs in zip(back.layers, net.layers, strict=True):
        for name in ("weight", "bias", "gamma", "beta", "running_mean", "running_var"):
            if getattr(theirs, name, None) is not None:
                np.testing.assert_array_equal(
                    getattr(ours, name), getattr(theirs, name)
                )
    darknet.save(back, tmp_path / "copy.weights")
    assert (tmp_path / "copy.weights").read_bytes() == expected_bytes(net)


def test_inference_is_darknet_formula(net):
    net.eval()
    x = np.random.default_rng(1).normal(size=(2, 2, 4, 4)).astype(np.float32)
    conv, norm = net.layers[0], net.layers[1]
    z = conv(x).astype(np.float64)
    mean, var = norm.running_mean[:, None, None], norm.running_var[:, None, None]
    expected = (z - mean) / (np.sqrt(var) + 1e-6) * norm.gamma[:, None, None]
    expected += norm.beta[:, None, None]
    np.testing.assert_allclose(norm(conv(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("delta", [-4, -1, 4, 100])
def test_size_mismatch_names_both_sizes(net, tmp_path, delta):
    data = expected_bytes(net)
    data = data[:delta] if delta < 0 else data + b"\0" * delta
    (tmp_path / "t.weights").write_bytes(data)
    with pytest.raises(
        bio.FormatError,
        match=rf"t.weights has {len(data)} bytes, .*t.cfg implies "
        rf"{len(data) - delta}",
    ):
        darknet.load(tmp_path / "t.cfg", tmp_path / "t.weights")


def test_short_header_and_nonfinite_statistics(net, tmp_path):
    (tmp_path / "t.weights").write_bytes(b"\0" * 10)
    with pytest.raises(bio.FormatError, match="shorter than a darknet header"):
        darknet.load(tmp_path / "t.cfg", tmp_path / "t.weights")
    net.layers[1].running_var[0] = np.nan
    (tmp_path / "t.weights").write_bytes(expected_bytes(net))
    with pytest.raises(
        bio.FormatError, match=r"running_var of BatchNorm.*channels \[0\]"
    ):
        darknet.load(tmp_path / "t.cfg", tmp_path / "t.weights")
    back = darknet.load(
        tmp_path / "t.cfg", tmp_path / "t.weights", allow_nonfinite=True
    )
    assert np.isnan(back.layers[1].running_var[0])


def test_standalone_batchnorm_beta_warns(net, tmp_path):
    net.layers[5].beta[:] = 1.0
    with pytest.warns(UserWarning, match=r"\[batchnorm\] stores no β"):
        darknet.save(net, tmp_path / "t.weights")


def test_conventions_warning_and_unrepresentable_bias(tmp_path):
    import batchnorm as bn
    from batchnorm import nn

    with pytest.warns(UserWarning, match="darknet will use its statistics"):
        darknet.save(
            nn.Sequential([nn.Linear(2, 2, bias=False), bn.BatchNorm(2)]),
            tmp_path / "a.weights",
        )
    # a BatchNorm after a layer with a bias is a standalone [batchnorm]
    norm = bn.BatchNorm.from_preset("darknet", 2)
    darknet.save(nn.Sequential([nn.Linear(2, 2), norm]), tmp_path / "b.weights")
    assert (tmp_path / "b.weights").stat().st_size == 20 + 4 * (2 + 4 + 3 * 2)


def test_cfg_written_back_parses_to_the_same_network(net, tmp_path):
    darknet.save(net, tmp_path / "w.weights", tmp_path / "w.cfg")
    back = darknet.load(tmp_path / "w.cfg", tmp_path / "w.weights")
    assert [repr(a) for a in back.layers] == [repr(b) for b in net.layers]
    assert "batch=8" in (tmp_path / "w.cfg").read_text()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "[net]\ninputs=2\n[yolo]\n",
            r"line 3: unknown or unsupported section '\[yolo\]'",
        ),
        (
            "[net]\ninputs=2\n[connected]\nfoo=1\n",
            r"line 4: unknown or unsupported option 'foo' in \[connected\]",
        ),
        (
            "[net]\ninputs=2\n[connected]\nactivation=mish\n",
            "line 4: activation 'mish' is not supported",
        ),
        (
            "[net]\ninputs=2\n[connected]\noutput=two\n",
            "line 4: .*output= must be an integer",
        ),
        ("inputs=2\n[net]\n", "line 1: option 'inputs=2' before any section"),
        ("[net]\ninputs=2\n[connected]\njunk\n", "line 4: cannot parse 'junk'"),
        ("[connected]\n", r"first section must be \[net\]"),
        ("[net]\ninputs=2\n[net]\n", r"line 3: a second \[net\]"),
        ("[net]\n", "needs width, height, channels or inputs"),
        ("[net]\ninputs=2\n[convolutional]\n", "line 3.*needs an image input"),
        (
            "[net]\nwidth=5\nheight=5\nchannels=1\n[maxpool]\nsize=2\nstride=2\n",
            "line 5.*pads the 5x5 input",
        ),
        (
            "[net]\ninputs=4\n[softmax]\ntemperature=2\n",
            "only groups=1 and temperature=1",
        ),
    ],
)
def test_cfg_errors_name_the_problem_and_line(tmp_path, text, match):
    (tmp_path / "bad.cfg").write_text(text)
    with pytest.raises(bio.FormatError, match=match):
        darknet.load(tmp_path / "bad.cfg")
