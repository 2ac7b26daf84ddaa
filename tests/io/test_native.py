"""Native format: round trips, every load error, fuzzed files, a killed save."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm import io as bio
from batchnorm import nn


def trained_layer(**kw: object) -> bn.BatchNorm:
    layer = bn.BatchNorm(3, **kw)
    rng = np.random.default_rng(0)
    for _ in range(3):
        layer(rng.normal(2.0, 3.0, (8, 3, 2, 2)).astype(np.float32))
    return layer


def trained_cnn() -> nn.Sequential:
    net = nn.cnn(batch_norm=True, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).normal(size=(16, 1, 8, 8)).astype(np.float32)
    net(x)
    return net


def write_npz(path, header: dict, arrays: dict) -> None:
    raw = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(path, __header__=raw, **arrays)


def header_and_arrays(path) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(arrays.pop("__header__").tobytes())
    return header, arrays


def test_layer_round_trip_keeps_state_and_conventions(tmp_path):
    layer = trained_layer(momentum=0.9, eps=1e-3, running_var_kind="biased")
    layer.gamma[:] = [1.5, 0.5, 2.0]
    bio.save(layer, tmp_path / "bn.npz")
    back = bio.load(tmp_path / "bn.npz")
    assert back.config() == layer.config()
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[key], value)
    header, _ = header_and_arrays(tmp_path / "bn.npz")
    conv = header["conventions"][""]
    assert header["version"] == bio.FORMAT_VERSION
    assert conv["momentum"] == 0.9 and conv["running_var_kind"] == "biased"
    assert conv["eps"] == 1e-3 and conv["eps_placement"] == "inside"
    assert conv["num_batches_tracked"] == 3 and conv["num_values_seen"] == 3 * 32
    assert "old" in conv["momentum_direction"]


def test_network_round_trip_rebuilds_structure_and_outputs(tmp_path):
    net = trained_cnn().eval()
    x = np.random.default_rng(2).normal(size=(4, 1, 8, 8)).astype(np.float32)
    bio.save(net, tmp_path / "net.npz")
    back = bio.load(tmp_path / "net.npz").eval()
    assert [repr(a) for a in back.layers] == [repr(b) for b in net.layers]
    np.testing.assert_array_equal(back(x), net(x))


def test_non_affine_and_metadata_round_trip(tmp_path):
    net = bio.Network(
        [nn.Linear(2, 2), bn.BatchNorm(2, affine=False), bio.Softmax()],
        {"input_shape": [2]},
    )
    bio.save(net, tmp_path / "n.npz")
    back = bio.load(tmp_path / "n.npz")
    assert back.metadata == {"input_shape": [2]} and back.layers[1].gamma is None


def test_save_rejects_unknown_layer(tmp_path):
    with pytest.raises(TypeError, match="cannot store a layer of type object"):
        bio.save(nn.Sequential([object()]), tmp_path / "x.npz")
    with pytest.raises(TypeError, match="expected a batchnorm.BatchNorm"):
        bio.save([1, 2], tmp_path / "x.npz")
    assert not list(tmp_path.iterdir())  # nothing, not even a temporary file


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "bn.npz"
    bio.save(trained_layer(), path)
    return path


def rewrite(path, mutate) -> None:
    header, arrays = header_and_arrays(path)
    mutate(header, arrays)
    write_npz(path, header, arrays)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda h, a: h.update(version=99), "format version 99 is not supported"),
        (lambda h, a: h.update(version="1"), "format version '1' is not supported"),
        (lambda h, a: h.update(format="other"), "does not say format 'batchnorm'"),
        (lambda h, a: h.pop("layers"), "header field 'layers' is missing"),
        (lambda h, a: h.update(kind="zoo"), "unknown kind 'zoo'"),
        (lambda h, a: a.pop("running_var"), r"missing \['running_var'\]"),
        (lambda h, a: a.update(extra=np.zeros(3, np.float32)), r"unknown \['extra'\]"),
        (lambda h, a: a.update(gamma=np.ones(4, np.float32)), r"has shape \(4,\)"),
        (lambda h, a: a.update(beta=np.zeros(3, np.float64)), "has dtype float64"),
        (
            lambda h, a: a.update(running_mean=np.full(3, np.nan, np.float32)),
            "running_mean must be finite in every channel; 3 of 3 are not",
        ),
        (
            lambda h, a: a.update(running_var=np.array([1, -1, 1], np.float32)),
            r"running_var must be finite and >= 0 in every channel; 1 of 3 is not",
        ),
        (lambda h, a: h["layers"][0].update(type="Nope"), "exactly one BatchNorm"),
        (lambda h, a: h["layers"][0].update(eps=-1.0), "invalid BatchNorm layer spec"),
        (
            lambda h, a: h["conventions"][""].update(num_batches_tracked=-2),
            "num_batches_tracked must be an int >= 0",
        ),
        (
            lambda h, a: h.update(conventions={}),
            r"header conventions\[''\] must be an object with "
            r"\['num_batches_tracked', 'num_values_seen'\] .* got None",
        ),
        (
            lambda h, a: h["conventions"][""].pop("num_values_seen"),
            r"conventions\[''\] must be an object with",
        ),
        (lambda h, a: h.update(layers=[1]), "exactly one BatchNorm"),
        (lambda h, a: h["layers"][0].update(backend="cuda"), "invalid BatchNorm"),
        (
            lambda h, a: h["layers"][0].update(initial_running_var=-5.0),
            "invalid BatchNorm layer spec",
        ),
        (
            lambda h, a: a.update(gamma=np.array([1, np.nan, 1], np.float32)),
            "gamma must be finite in every channel; 1 of 3 is not",
        ),
    ],
)
def test_every_invalid_content_raises_format_error(saved, mutate, match):
    rewrite(saved, mutate)
    with pytest.raises(bio.FormatError, match=match):
        bio.load(saved)


def test_allow_nonfinite_loads_broken_statistics(saved):
    rewrite(
        saved, lambda h, a: a.update(running_var=np.array([np.inf, -1, 1], np.float32))
    )
    layer = bio.load(saved, allow_nonfinite=True)
    assert np.isinf(layer.running_var[0]) and layer.running_var[1] == -1


def test_missing_header_and_not_a_zip(tmp_path, saved):
    np.savez(tmp_path / "plain.npz", x=np.zeros(2))
    with pytest.raises(bio.FormatError, match="no __header__ entry"):
        bio.load(tmp_path / "plain.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(bio.FormatError, match="truncated or corrupt"):
        bio.load(tmp_path / "junk.npz")
    with zipfile.ZipFile(tmp_path / "odd.npz", "w") as archive:
        archive.writestr("readme.txt", "hi")
    with pytest.raises(bio.FormatError, match="unexpected entry 'readme.txt'"):
        bio.load(tmp_path / "odd.npz")
    with pytest.raises(FileNotFoundError):
        bio.load(tmp_path / "absent.npz")


def test_every_truncation_raises_format_error(saved, tmp_path):
    data = saved.read_bytes()
    for size in sorted({*range(0, len(data), max(1, len(data) // 97)), len(data) - 1}):
        (tmp_path / "cut.npz").write_bytes(data[:size])
        with pytest.raises(bio.FormatError, match="truncated or corrupt"):
            bio.load(tmp_path / "cut.npz")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.data())
def test_fuzzed_files_raise_only_format_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "bn.npz"
    bio.save(trained_layer(), path)
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))
    try:
        layer = bio.load(path)
    except bio.FormatError:
        return
    assert np.isfinite(layer.running_var).all()  # a change the CRC cannot see


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, batchnorm as bn
    from batchnorm import io
    layer = bn.BatchNorm(200_000)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        layer.running_mean[:] = i
        io.save(layer, sys.argv[1])
    """
)


def test_save_killed_mid_write_leaves_a_loadable_file(tmp_path):
    path = tmp_path / "bn.npz"
    old = bn.BatchNorm(200_000)
    old.running_mean[:] = -1.0
    bio.save(old, path)
    with subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(path)], stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    layer = bio.load(path)
    values = np.unique(layer.running_mean)
    assert values.size == 1 and (values[0] == -1.0 or values[0] >= 1.0)
    # the temporary files of interrupted saves are the only leftovers
    assert all(p.name.startswith(".bn.npz.") for p in tmp_path.iterdir() if p != path)


def test_atomic_write_failure_keeps_old_file(tmp_path):
    from batchnorm.io._atomic import atomic_write

    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def explode(file: io.BufferedWriter) -> None:
        file.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, explode)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [
        "f.bin"
    ]


def test_network_file_with_unknown_layer_type(tmp_path):
    path = tmp_path / "net.npz"
    bio.save(nn.Sequential([nn.ReLU()]), path)
    rewrite(path, lambda h, a: h["layers"][0].update(type="Nope"))
    with pytest.raises(bio.FormatError, match="unknown layer spec"):
        bio.load(path)
