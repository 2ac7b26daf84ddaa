"""What every writer in ``batchnorm.io`` does to the file system.

Permissions as ``open()`` would give them, symlinks written through, temporary
files of killed writers removed by the next save, a missing folder named as the
user typed it, and several outputs renamed only when all of them are complete.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import io as bio
from batchnorm import nn
from batchnorm.io import _atomic, darknet


def small_net() -> bio.Network:
    rng = np.random.default_rng(0)
    layers = [
        nn.Linear(6, 4, bias=False, rng=rng),
        bn.BatchNorm.from_preset("darknet", 4),  # no conventions warning
        nn.ReLU(),
        nn.Linear(4, 3, rng=rng),
    ]
    return bio.Network(layers, {"input_shape": [6]})


def save_native(path):
    bio.save(small_net(), path)


def save_darknet_weights(path):
    darknet.save(small_net(), path)


def save_darknet_cfg(path):
    darknet.save(small_net(), path.with_suffix(".weights"), path)


def save_torch(path):
    pytest.importorskip("torch")
    from batchnorm.io import pytorch

    pytorch.save(small_net(), path)


def save_onnx(path):
    pytest.importorskip("onnx")
    from batchnorm.io import onnx_export

    onnx_export.export(small_net(), path)


WRITERS = {
    "model.npz": save_native,
    "model.weights": save_darknet_weights,
    "model.cfg": save_darknet_cfg,
    "model.pt": save_torch,
    "model.onnx": save_onnx,
}


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("name", WRITERS)
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=oct)
def test_new_files_get_the_mode_open_would_give(tmp_path, umask, name, mask):
    umask(mask)
    WRITERS[name](tmp_path / name)
    assert mode(tmp_path / name) == 0o666 & ~mask


@pytest.mark.parametrize("name", WRITERS)
@pytest.mark.parametrize("old_mode", [0o644, 0o640, 0o604], ids=oct)
def test_overwritten_file_keeps_its_mode(tmp_path, umask, name, old_mode):
    umask(0o077)
    path = tmp_path / name
    path.write_bytes(b"old")
    path.chmod(old_mode)
    WRITERS[name](path)
    assert path.read_bytes() != b"old" and mode(path) == old_mode


@pytest.mark.parametrize("name", WRITERS)
def test_saving_to_a_symlink_writes_its_target(tmp_path, name):
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / name
    target.write_bytes(b"old")
    link = tmp_path / name
    link.symlink_to(os.path.join("store", name))
    WRITERS[name](link)
    assert link.is_symlink() and os.readlink(link) == os.path.join("store", name)
    assert target.read_bytes() != b"old"
    # the temporary file was made beside the target (one file system), and is gone
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [name]


def test_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link.npz"
    link.symlink_to("real.npz")
    save_native(link)
    assert link.is_symlink() and (tmp_path / "real.npz").is_file()


def test_missing_folder_is_named_as_typed(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError) as info:
        save_native(missing / "out.npz")
    message = str(info.value)
    assert f"{missing / 'out.npz'}" in message and f"folder {missing}" in message
    assert ".tmp" not in message and "Errno" not in message


def test_several_outputs_rename_only_when_all_are_written(tmp_path):
    first = tmp_path / "a.bin"
    first.write_bytes(b"old")

    def explode(file):
        file.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _atomic.atomic_write_all(
            [(first, lambda f: f.write(b"new")), (tmp_path / "b", explode)]
        )
    assert first.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    with pytest.raises(FileNotFoundError, match="no_dir"):
        _atomic.atomic_write_all(
            [
                (first, lambda f: f.write(b"new")),
                (tmp_path / "no_dir" / "b", lambda f: f.write(b"x")),
            ]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    assert first.read_bytes() == b"old"


def test_the_same_file_twice_is_refused(tmp_path):
    (tmp_path / "x").write_bytes(b"old")
    (tmp_path / "alias").symlink_to("x")
    with pytest.raises(ValueError, match="same file"):
        _atomic.atomic_write_all(
            [(tmp_path / "x", lambda f: None), (tmp_path / "alias", lambda f: None)]
        )


# A writer that creates its temporary file, says so, and hangs: killing it then
# leaves exactly what a writer killed mid-save leaves.
HANGING_WRITER = textwrap.dedent(
    """
    import sys, time
    from batchnorm.io._atomic import atomic_write

    def write(file):
        file.write(b"partial")
        file.flush()
        print("writing", flush=True)
        time.sleep(60)

    atomic_write(sys.argv[1], write)
    """
)


def hanging_writer(path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING_WRITER, str(path)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"writing\n"
    return proc


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()  # reaped: the pid is gone, not a zombie
    assert proc.stdout is not None
    proc.stdout.close()


def temporaries(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_next_save_removes_temporaries_of_killed_writers_only(tmp_path):
    path = tmp_path / "bn.npz"
    save_native(path)
    kill(hanging_writer(path))
    [dead] = temporaries(tmp_path)
    live = hanging_writer(path)  # its own save removed the dead writer's file
    try:
        [kept] = temporaries(tmp_path)
        assert kept != dead and f".{live.pid}." in kept
        bio.save(bn.BatchNorm(2), path)  # a concurrent live writer keeps its file
        assert temporaries(tmp_path) == [kept]
    finally:
        kill(live)
    bio.save(bn.BatchNorm(2), path)
    assert temporaries(tmp_path) == []
    assert bio.load(path).num_features == 2


def test_cleanup_leaves_other_files_alone(tmp_path):
    path = tmp_path / "bn.npz"
    others = [
        ".bn.npz.tmp",
        ".bn.npz.abc123.tmp",  # made by someone else's tool
        ".other.npz.localhost.999999999.deadbeef.tmp",  # another target
        "bn.npz.999999999.tmp",
    ]
    for name in others:
        (tmp_path / name).write_bytes(b"keep")
    bio.save(bn.BatchNorm(2), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*others, "bn.npz"])


def test_atomic_write_keeps_the_old_file_when_write_fails(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def explode(file):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _atomic.atomic_write(path, explode)
    assert path.read_bytes() == b"old" and temporaries(tmp_path) == []
