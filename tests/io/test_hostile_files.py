"""Every reader raises FormatError, naming the file, for damaged or crafted input.

No ``UnicodeDecodeError``, ``ZeroDivisionError``, ``RecursionError``,
``MemoryError``, pickle or zip errors leak out; sizes declared by a file are
checked against the file before anything is allocated; and nothing that loads
fails only later, when it is run.
"""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import io as bio
from batchnorm import nn
from batchnorm.io import darknet

# -- darknet .cfg --------------------------------------------------------------

CONV = "[net]\nwidth=8\nheight=8\nchannels=1\n[convolutional]\n"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (CONV + "stride=0\n", r"line 6: \[convolutional\] option stride= must be >= 1"),
        (
            CONV + "filters=0\n",
            r"line 6: \[convolutional\] option filters= must be >= 1",
        ),
        (CONV + "size=0\n", r"line 6: \[convolutional\] option size= must be >= 1"),
        (CONV + "size=-3\n", r"line 6: .*size= must be >= 1; got -3"),
        (CONV + "padding=-1\n", r"line 6: .*padding= must be >= 0"),
        (CONV + "size=3\nstride=99999999999999999999\n", r"line 7: .*stride= must be"),
        (
            "[net]\nwidth=8\nheight=8\nchannels=1\n[maxpool]\nsize=0\npadding=0\n",
            r"line 6: \[maxpool\] option size= must be >= 1",
        ),
        (
            "[net]\nwidth=8\nheight=8\nchannels=1\n[maxpool]\nstride=0\n",
            r"line 6: \[maxpool\] option stride= must be >= 1",
        ),
        ("[net]\ninputs=4\n[connected]\noutput=0\n", r"line 4: .*output= must be >= 1"),
        ("[net]\ninputs=-4\n[connected]\n", r"line 2: \[net\] option inputs= must be"),
        ("[net]\nwidth=8\nheight=-8\nchannels=1\n", r"line 3: .*height= must be >= 0"),
        ("[net]\ninputs=4\n[softmax]\ngroups=0\n", r"line 4: .*groups= must be >= 1"),
        (
            "[net]\ninputs=4\n[connected]\nbatch_normalize=2\n",
            r"line 4: .*batch_normalize= must be 0 or 1",
        ),
    ],
)
def test_cfg_sizes_out_of_range_name_the_option_and_line(tmp_path, text, match):
    (tmp_path / "bad.cfg").write_text(text)
    with pytest.raises(bio.FormatError, match=match) as info:
        darknet.load(tmp_path / "bad.cfg")
    assert str(tmp_path / "bad.cfg") in str(info.value)


@pytest.mark.parametrize(
    "data",
    [b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", b"[net]\ninputs=4\n\xff\n", b"\x00" * 64],
)
def test_binary_cfg_is_a_format_error(tmp_path, data):
    (tmp_path / "bad.cfg").write_bytes(data)
    with pytest.raises(bio.FormatError, match=r"bad.cfg.*not a text darknet \.cfg"):
        darknet.load(tmp_path / "bad.cfg")


def test_cfg_that_is_a_folder_is_a_format_error(tmp_path):
    (tmp_path / "dir.cfg").mkdir()
    with pytest.raises(bio.FormatError, match=r"dir.cfg: cannot read"):
        darknet.load(tmp_path / "dir.cfg")
    (tmp_path / "ok.cfg").write_text("[net]\ninputs=2\n[connected]\noutput=1\n")
    (tmp_path / "dir.weights").mkdir()
    with pytest.raises(bio.FormatError, match=r"dir.weights: cannot read"):
        darknet.load(tmp_path / "ok.cfg", tmp_path / "dir.weights")


def test_huge_cfg_sizes_are_checked_against_the_weights_before_allocating(tmp_path):
    (tmp_path / "big.cfg").write_text(
        "[net]\ninputs=1000000\n[connected]\noutput=1000000\n"
    )
    (tmp_path / "big.weights").write_bytes(struct.pack("<iiiQ", 0, 2, 0, 0) + bytes(8))
    tracemalloc.start()
    try:
        with pytest.raises(bio.FormatError, match=r"big.weights .*not a pair"):
            darknet.load(tmp_path / "big.cfg", tmp_path / "big.weights")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20  # the 4 TB of weights were never allocated


def test_cfg_too_big_for_memory_is_a_format_error(tmp_path):
    (tmp_path / "big.cfg").write_text(
        "[net]\ninputs=2000000000\n[connected]\noutput=2000000000\n"
    )
    with pytest.raises(
        bio.FormatError,
        match=r"big.cfg, line 3: the layer declares 4000000002000000000 parameters",
    ):
        darknet.load(tmp_path / "big.cfg")


# -- native .npz headers --------------------------------------------------------


def write_npz(path, header: dict | bytes, arrays: dict) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    np.savez(path, __header__=np.frombuffer(raw, np.uint8), **arrays)


@pytest.fixture
def pool_file(tmp_path):
    path = tmp_path / "net.npz"
    bio.save(nn.Sequential([nn.Conv2d(1, 2, 3), nn.MaxPool2d(2)]), path)
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(arrays.pop("__header__").tobytes())
    return path, header, arrays


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"kernel_size": 0, "stride": 2}, "kernel_size must be an int >= 1; got 0"),
        ({"kernel_size": 2, "stride": 0}, "stride must be an int >= 1; got 0"),
        ({"kernel_size": -1, "stride": 1}, "kernel_size must be an int >= 1; got -1"),
        ({"kernel_size": 1.5, "stride": 1}, "kernel_size must be an int >= 1; got 1.5"),
        ({"kernel_size": True, "stride": 1}, "kernel_size must be an int >= 1; got T"),
    ],
)
def test_crafted_maxpool_is_a_format_error(pool_file, spec, match):
    path, header, arrays = pool_file
    header["layers"][1] = {"type": "MaxPool2d", **spec}
    write_npz(path, header, arrays)
    with pytest.raises(bio.FormatError, match=match):
        bio.load(path)


def test_deeply_nested_header_is_a_format_error(pool_file):
    path, header, arrays = pool_file
    deep = b'{"format": "batchnorm", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    write_npz(path, deep, arrays)
    with pytest.raises(bio.FormatError, match="net.npz: the header is not valid JSON"):
        bio.load(path)


def small_layer_file(tmp_path):
    path = tmp_path / "bn.npz"
    bio.save(bn.BatchNorm(3), path)
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(arrays.pop("__header__").tobytes())
    return path, header, arrays


@pytest.mark.parametrize("channels", [10**12, 2**62, 10**30])
def test_huge_declared_channel_count_is_checked_against_the_arrays(tmp_path, channels):
    path, header, arrays = small_layer_file(tmp_path)
    header["layers"][0]["num_features"] = channels
    write_npz(path, header, arrays)
    with pytest.raises(
        bio.FormatError,
        match=r"bn.npz: array '\w+' has shape \(3,\); the BatchNorm at layer 0 "
        rf"needs \({channels},\)",
    ):
        bio.load(path)


def test_huge_declared_conv_is_checked_against_the_arrays(pool_file):
    path, header, arrays = pool_file
    header["layers"][0]["out_channels"] = 10**9
    header["layers"][0]["in_channels"] = 10**9
    write_npz(path, header, arrays)
    with pytest.raises(bio.FormatError, match=r"array '0.weight' has shape \(2, 1,"):
        bio.load(path)


def bomb(path, header: dict, arrays: dict, name: str, nbytes: int) -> None:
    """An .npz whose entry ``name`` inflates to ``nbytes`` of zeros (~1000:1)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for key, value in arrays.items():
            with archive.open(key + ".npy", "w") as entry:
                np.lib.format.write_array(entry, value)
        raw = np.frombuffer(json.dumps(header).encode(), np.uint8)
        with archive.open("__header__.npy", "w") as entry:
            np.lib.format.write_array(entry, raw)
        with archive.open(name + ".npy", "w", force_zip64=True) as entry:
            count = nbytes // 4
            np.lib.format.write_array_header_1_0(
                entry,
                {"descr": "<f4", "fortran_order": False, "shape": (count,)},
            )
            chunk = bytes(2**20)
            for _ in range(nbytes // len(chunk)):
                entry.write(chunk)


@pytest.mark.parametrize("name", ["running_mean", "extra"])
def test_compressed_bomb_is_rejected_before_it_is_inflated(tmp_path, name):
    path, header, arrays = small_layer_file(tmp_path)
    arrays.pop(name, None)
    bomb(path, header, arrays, name, 128 * 2**20)
    assert path.stat().st_size < 2 * 2**20
    tracemalloc.start()
    try:
        with pytest.raises(bio.FormatError, match=rf"bn.npz: .*'{name}"):
            bio.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_entry_whose_size_disagrees_with_its_npy_header(tmp_path):
    path, header, arrays = small_layer_file(tmp_path)
    lying = io.BytesIO()  # an npy header that claims 1000 values, then 3 values
    np.lib.format.write_array_header_1_0(
        lying, {"descr": "<f4", "fortran_order": False, "shape": (1000,)}
    )
    lying.write(np.zeros(3, "<f4").tobytes())
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            if key != "running_mean":
                with archive.open(key + ".npy", "w") as entry:
                    np.lib.format.write_array(entry, value)
        with archive.open("__header__.npy", "w") as entry:
            np.lib.format.write_array(
                entry, np.frombuffer(json.dumps(header).encode(), np.uint8)
            )
        archive.writestr("running_mean.npy", lying.getvalue())
    with pytest.raises(
        bio.FormatError,
        match=r"bn.npz: .*entry 'running_mean.npy' holds 12 bytes of data but "
        r"describes \(1000,\) float32 \(4000 bytes\)",
    ):
        bio.load(path)


# -- PyTorch .pt ----------------------------------------------------------------


@pytest.fixture
def pt_file(tmp_path):
    pytest.importorskip("torch")
    from batchnorm.io import pytorch

    path = tmp_path / "m.pt"
    pytorch.save(nn.Sequential([nn.Linear(3, 2, bias=False), bn.BatchNorm(2)]), path)
    return path


def load_pt(path):
    from batchnorm.io import pytorch

    return pytorch.load(path)


@pytest.mark.parametrize("cut", ["empty", "half", "garbage", "tail"])
def test_damaged_pt_is_a_format_error_that_never_suggests_unsafe_loading(pt_file, cut):
    data = pt_file.read_bytes()
    damaged = {
        "empty": b"",
        "half": data[: len(data) // 2],
        "garbage": b"hello world" * 10,
        "tail": data[:-30],
    }[cut]
    pt_file.write_bytes(damaged)
    with pytest.raises(bio.FormatError, match=r"m.pt: ") as info:
        load_pt(pt_file)
    assert "weights_only=False" not in str(info.value)


def test_every_truncation_of_a_pt_is_a_format_error(pt_file):
    data = pt_file.read_bytes()
    for size in range(0, len(data), max(1, len(data) // 60)):
        pt_file.write_bytes(data[:size])
        with pytest.raises(bio.FormatError, match="m.pt"):
            load_pt(pt_file)


def test_flipped_bytes_in_a_pt_load_or_raise_format_error(pt_file):
    data = pt_file.read_bytes()
    rng = np.random.default_rng(0)
    for _ in range(60):
        raw = bytearray(data)
        for i in rng.integers(0, len(raw), 3):
            raw[i] = int(rng.integers(0, 256))
        pt_file.write_bytes(bytes(raw))
        try:
            load_pt(pt_file)
        except bio.FormatError as exc:
            assert "m.pt" in str(exc) and "weights_only=False" not in str(exc)


def test_pt_with_objects_or_odd_contents_is_a_format_error(tmp_path):
    torch = pytest.importorskip("torch")
    cases = {
        "list": [torch.ones(2)],
        "int_keys": {1: torch.ones(2)},
        "bf16": {"0.weight": torch.ones(2, 3, dtype=torch.bfloat16)},
        "counter": {
            "weight": torch.ones(2),
            "bias": torch.zeros(2),
            "running_mean": torch.zeros(2),
            "running_var": torch.ones(2),
            "num_batches_tracked": torch.ones(3),
        },
    }
    for name, content in cases.items():
        torch.save(content, tmp_path / f"{name}.pt")
    from batchnorm.io import pytorch

    with pytest.raises(bio.FormatError, match=r"list.pt: .*a dict of tensors"):
        pytorch.load(tmp_path / "list.pt")
    linear = nn.Sequential([nn.Linear(3, 2, bias=False)])
    with pytest.raises(bio.FormatError, match=r"int_keys.pt: key 1 is not a string"):
        pytorch.load(tmp_path / "int_keys.pt", linear)
    with pytest.raises(bio.FormatError, match=r"bf16.pt: .*'0.weight'.*bfloat16"):
        pytorch.load(tmp_path / "bf16.pt", linear)
    with pytest.raises(bio.FormatError, match=r"counter.pt: num_batches_tracked"):
        pytorch.load(tmp_path / "counter.pt", bn.BatchNorm(2))
    with pytest.raises(bio.FormatError, match=r"counter.pt: .*does not record"):
        pytorch.load(tmp_path / "counter.pt")


def test_pt_with_a_crafted_structure_record_is_a_format_error(pt_file):
    torch = pytest.importorskip("torch")
    from batchnorm.io import pytorch

    state = torch.load(pt_file, weights_only=True)
    for record, match in [
        ({"kind": "layer", "layers": []}, "exactly one BatchNorm"),
        ({"kind": "network", "layers": "abc"}, "layers"),
        ({"kind": "network", "layers": [{"type": "MaxPool2d", "kernel_size": 0}]}, ""),
    ]:
        state._metadata[""]["batchnorm"] = json.dumps(record)
        torch.save(state, pt_file)
        with pytest.raises(bio.FormatError, match=rf"m.pt: .*{match}"):
            pytorch.load(pt_file)
