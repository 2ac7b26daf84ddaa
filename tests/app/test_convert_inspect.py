"""``batchnorm convert`` and ``batchnorm inspect``."""

from __future__ import annotations

import numpy as np
import pytest

from batchnorm import io as bio
from batchnorm.app.main import main
from batchnorm.io import darknet

CFG = """\
[net]
height=4
width=4
channels=1

[convolutional]
batch_normalize=1
filters=2
size=3
pad=1
activation=leaky

[avgpool]

[connected]
output=3
activation=linear
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "m.cfg").write_text(CFG)
    net = darknet.load(tmp_path / "m.cfg")
    rng = np.random.default_rng(0)
    net.layers[0].weight = rng.normal(size=(2, 1, 3, 3)).astype(np.float32)
    net.layers[1].running_var = np.array([0.5, 2.0], np.float32)
    net.layers[1].running_mean = np.array([0.1, -0.2], np.float32)
    net.layers[1].beta = np.array([0.3, 0.4], np.float32)
    darknet.save(
        net,
        tmp_path / "m.weights",
        header={"major": 0, "minor": 2, "revision": 0, "seen": 64000},
    )
    return tmp_path


def test_darknet_to_native_and_back_is_byte_identical(files):
    cfg = str(files / "m.cfg")
    assert (
        main(["convert", str(files / "m.weights"), str(files / "m.npz"), "--cfg", cfg])
        == 0
    )
    assert main(["convert", str(files / "m.npz"), str(files / "back.weights")]) == 0
    assert (files / "back.weights").read_bytes() == (files / "m.weights").read_bytes()
    assert bio.load(files / "m.npz").metadata["darknet"]["header"]["seen"] == 64000


def test_convert_to_torch_and_onnx_and_back(files):
    pytest.importorskip("torch")
    cfg = str(files / "m.cfg")
    assert (
        main(["convert", str(files / "m.weights"), str(files / "m.pt"), "--cfg", cfg])
        == 0
    )
    assert main(["convert", str(files / "m.pt"), str(files / "m2.npz")]) == 0
    x = np.random.default_rng(1).normal(size=(2, 1, 4, 4)).astype(np.float32)
    original = darknet.load(files / "m.cfg", files / "m.weights").eval()
    np.testing.assert_allclose(
        bio.load(files / "m2.npz").eval()(x), original(x), atol=1e-5
    )
    pytest.importorskip("onnxruntime")
    assert main(["convert", str(files / "m2.npz"), str(files / "m.onnx")]) == 0
    assert (files / "m.onnx").stat().st_size > 0


def test_convert_errors_exit_2(files, capsys):
    assert main(["convert", str(files / "m.weights"), str(files / "x.npz")]) == 2
    assert "needs --cfg FILE" in capsys.readouterr().err
    assert main(["convert", str(files / "m.cfg"), str(files / "x.npz")]) == 2
    assert "unknown extension '.cfg'" in capsys.readouterr().err
    (files / "bad.npz").write_bytes(b"garbage")
    assert main(["convert", str(files / "bad.npz"), str(files / "x.weights")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_inspect_healthy_and_broken(files, capsys):
    cfg = str(files / "m.cfg")
    assert main(["inspect", str(files / "m.weights"), "--cfg", cfg]) == 0
    out = capsys.readouterr().out
    assert "[1] BatchNorm C=2" in out and "eps=1e-06 (outside the root)" in out
    assert "momentum=0.99 (on the old value; torch's 0.01)" in out and "healthy" in out
    net = darknet.load(files / "m.cfg", files / "m.weights")
    net.layers[1].running_var = np.array([np.nan, -1.0], np.float32)
    net.layers[1].gamma = np.array([0.0, 1.0], np.float32)
    bio.save(net, files / "broken.npz")
    assert main(["inspect", str(files / "broken.npz")]) == 1
    out = capsys.readouterr().out
    assert "non-finite running statistics at channels [0]" in out
    assert "running_var <= 0 at 1 channels [1]" in out and "gamma ~ 0 at 1" in out
    fresh = darknet.load(files / "m.cfg")
    bio.save(fresh, files / "fresh.npz")
    assert main(["inspect", str(files / "fresh.npz")]) == 1
    assert "statistics never updated" in capsys.readouterr().out


def test_native_cnn_to_darknet_with_written_cfg(tmp_path):
    from batchnorm import nn

    net = nn.cnn(batch_norm=True, rng=np.random.default_rng(0))
    bio.save(net, tmp_path / "model.npz")
    weights, cfg = tmp_path / "model.weights", tmp_path / "model.cfg"
    with pytest.warns(UserWarning, match="inside the root"):
        code = main(
            [
                "convert",
                str(tmp_path / "model.npz"),
                str(weights),
                "--write-cfg",
                str(cfg),
                "--input-shape",
                "1,8,8",
            ]
        )
    assert code == 0
    assert "height=8" in cfg.read_text()
    back = tmp_path / "back.npz"
    assert main(["convert", str(weights), str(back), "--cfg", str(cfg)]) == 0
    again = tmp_path / "again.weights"
    assert main(["convert", str(back), str(again)]) == 0
    assert again.read_bytes() == weights.read_bytes()
