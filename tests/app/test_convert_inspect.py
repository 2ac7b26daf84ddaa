"""``batchnorm convert`` and ``batchnorm inspect``."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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
    out = capsys.readouterr().out  # a darknet pair: the darknet reader's table
    assert "1 batch-normalized units (2 channels)" in out and "healthy" in out
    net = darknet.load(files / "m.cfg", files / "m.weights")
    bio.save(net, files / "m.npz")
    assert main(["inspect", str(files / "m.npz")]) == 0
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


# -- hardening: shapes, partial outputs, damaged files, messages ---------------


@pytest.fixture
def cnn_file(tmp_path):
    from batchnorm import nn

    bio.save(nn.cnn(batch_norm=True, rng=np.random.default_rng(0)), tmp_path / "m.npz")
    return tmp_path / "m.npz"


@pytest.fixture
def mlp_file(tmp_path):
    """A darknet-preset MLP (saving it to darknet warns about nothing)."""
    import batchnorm as bn
    from batchnorm import nn

    layers = [
        nn.Linear(64, 4, bias=False, rng=0),
        bn.BatchNorm.from_preset("darknet", 4),
        nn.ReLU(),
    ]
    bio.save(nn.Sequential(layers), tmp_path / "mlp.npz")
    return tmp_path / "mlp.npz"


def convert(*args) -> int:
    return main(["convert", *map(str, args)])


@pytest.mark.parametrize(
    ("shape", "layer"),
    [
        ("3,8,8", r"layer 0 \(Conv2d"),
        ("1,16,16", r"layer 9 \(Linear"),
        ("64", r"layer 0 \(Conv2d"),
    ],
)
def test_convert_to_onnx_refuses_a_shape_the_network_cannot_take(
    cnn_file, capsys, shape, layer
):
    pytest.importorskip("onnx")
    out = cnn_file.parent / "m.onnx"
    out.write_bytes(b"old")
    assert convert(cnn_file, out, "--input-shape", shape) == 2
    captured = capsys.readouterr()
    assert f"--input-shape {shape} does not fit the network: " in captured.err
    assert re.search(layer, captured.err) and "wrote" not in captured.out
    assert out.read_bytes() == b"old"


def test_convert_to_onnx_with_a_rank_the_graph_cannot_take(cnn_file, capsys):
    pytest.importorskip("onnx")
    assert convert(cnn_file, cnn_file.parent / "m.onnx", "--input-shape", "8,8") == 2
    err = capsys.readouterr().err
    assert "--input-shape 8,8 must be (C, H, W) or (features,)" in err
    assert not (cnn_file.parent / "m.onnx").exists()


def test_convert_to_darknet_refuses_a_wrong_shape_for_the_cfg(cnn_file, capsys):
    weights, cfg = cnn_file.parent / "m.weights", cnn_file.parent / "m.cfg"
    code = convert(cnn_file, weights, "--write-cfg", cfg, "--input-shape", "3,8,8")
    assert code == 2
    assert "--input-shape 3,8,8 does not fit" in capsys.readouterr().err
    assert not weights.exists() and not cfg.exists()


@pytest.mark.parametrize("text", ["a,b", "1,,8", "1.5", "", "-1,8,8"])
def test_convert_input_shape_that_is_not_a_shape(mlp_file, capsys, text):
    out = mlp_file.parent / "m.onnx"
    assert convert(mlp_file, out, f"--input-shape={text}") == 2
    err = capsys.readouterr().err
    assert "--input-shape must be sizes separated by commas" in err
    assert repr(text) in err


def test_failed_convert_leaves_every_output_untouched(mlp_file, capsys):
    keep = mlp_file.parent / "keep.weights"
    keep.write_bytes(b"old")
    code = convert(
        mlp_file, keep, "--write-cfg", "/nonexistent/x.cfg", "--input-shape", "64"
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "folder /nonexistent does not exist" in err and ".tmp" not in err
    assert keep.read_bytes() == b"old"
    assert sorted(p.name for p in mlp_file.parent.iterdir()) == [
        "keep.weights",
        "mlp.npz",
    ]


def test_missing_output_folder_is_named(mlp_file, capsys):
    out = mlp_file.parent / "nonexistent_dir" / "out.npz"
    assert convert(mlp_file, out) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}: the folder {out.parent} does not exist" in err
    assert ".tmp" not in err and "Errno" not in err


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_missing_input_file_is_named_with_the_fix(tmp_path, capsys, command):
    missing = tmp_path / "missing.npz"
    argv = [command, str(missing)] + (
        [str(tmp_path / "out.npz")] * (command == "convert")
    )
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"batchnorm {command}: error: {missing}: no such file. Check the path "
        f"(relative to {os.getcwd()})."
    )


def test_messages_name_the_flags(mlp_file, capsys):
    pytest.importorskip("onnx")
    assert convert(mlp_file, mlp_file.parent / "m.onnx") == 2
    assert "--input-shape is required for .onnx output" in capsys.readouterr().err
    weights, cfg = mlp_file.parent / "m.weights", mlp_file.parent / "m.cfg"
    assert convert(mlp_file, weights, "--write-cfg", cfg) == 2
    assert "--input-shape is required for --write-cfg" in capsys.readouterr().err
    assert not weights.exists()
    assert convert(mlp_file, mlp_file.parent / "m.npz", "--write-cfg", cfg) == 2
    assert "--write-cfg goes with a .weights output" in capsys.readouterr().err


def test_pt_without_structure_names_the_flags(mlp_file, capsys):
    torch = pytest.importorskip("torch")
    path = mlp_file.parent / "plain.pt"
    torch.save({"0.weight": torch.ones(4, 64)}, path)
    assert convert(path, mlp_file.parent / "x.npz") == 2
    err = capsys.readouterr().err
    assert "does not record its network structure" in err
    assert "--cfg FILE or --like FILE.npz" in err


@pytest.mark.parametrize("command", ["convert", "inspect"])
@pytest.mark.parametrize(
    ("name", "data"),
    [("m.pt", b""), ("m.pt", b"PK\x03\x04 truncated"), ("m.npz", b"\x00" * 10)],
)
def test_damaged_inputs_exit_2_with_a_format_error(
    tmp_path, capsys, command, name, data
):
    pytest.importorskip("torch")
    (tmp_path / name).write_bytes(data)
    argv = [command, str(tmp_path / name)]
    if command == "convert":
        argv.append(str(tmp_path / "out.npz"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / name}: " in err and "weights_only=False" not in err


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_binary_cfg_exits_2(files, capsys, command):
    (files / "bin.cfg").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    argv = [command, str(files / "m.weights")]
    if command == "convert":
        argv.append(str(files / "out.npz"))
    assert main([*argv, "--cfg", str(files / "bin.cfg")]) == 2
    assert "bin.cfg: not a text darknet .cfg" in capsys.readouterr().err


def test_inspect_says_which_file_of_a_pair_is_newer(files, capsys):
    import os

    other = CFG.replace("filters=2", "filters=3")
    (files / "m.cfg").write_text(other)
    stamp = os.stat(files / "m.weights").st_mtime - 30
    os.utime(files / "m.weights", (stamp, stamp))
    assert (
        main(["inspect", str(files / "m.weights"), "--cfg", str(files / "m.cfg")]) == 2
    )
    err = capsys.readouterr().err
    assert "are not a pair" in err and f"{files / 'm.cfg'} is newer" in err


def test_cli_warnings_are_one_clean_line(tmp_path):
    from batchnorm import nn

    bio.save(nn.mlp(batch_norm=True, rng=np.random.default_rng(0)), tmp_path / "m.npz")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchnorm.app.main",
            "convert",
            str(tmp_path / "m.npz"),
            str(tmp_path / "m.weights"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr  # one per BatchNorm
    for index, line in zip((1, 4), lines, strict=True):
        assert line.startswith(f"batchnorm convert: warning: layer {index}: BatchNorm")
    assert ".py" not in result.stderr and "warnings.warn" not in result.stderr
