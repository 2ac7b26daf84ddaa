"""Numba's on-disk cache of the compiled loops: where it goes, that an edit of any
kernel module compiles anew, and that no writable location means compiling in
process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("numba")

import batchnorm as bn  # noqa: E402
from helpers.processes import run_python  # noqa: E402


def test_kernels_cache_to_numba_cache_dir(tmp_path):
    code = (
        "import numpy as np, batchnorm as bn;"
        "bn.functional.forward_train(np.ones((4, 2, 3), np.float32), None, None,"
        " backend='numba')"
    )
    run_python(code, NUMBA_CACHE_DIR=str(tmp_path))
    assert any(p.suffix == ".nbi" for p in tmp_path.rglob("*"))


def test_an_edit_of_a_helper_module_alone_reaches_the_cached_row_dispatch(tmp_path):
    """Numba's cache checks only the cached function's own file, and the row
    dispatch (``_loops.rows``) carries the channels-last bodies of
    ``_loops_channels_last.py`` compiled in: the digest of the package's sources in
    every cached name makes an edit of that module alone compile it anew, instead
    of loading it."""
    package = tmp_path / "site" / "batchnorm"
    shutil.copytree(
        Path(bn.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__")
    )
    code = (
        "import numpy as np; from batchnorm.kernels.numba import _loops;"
        "x = np.ones((1, 2, 3)); out = np.empty_like(x); v = np.ones(3);"
        "_loops.launch.serial(_loops.DX + _loops.CHANNELS_LAST, x, x, out,"
        " v, v, v, v, 1);"
        "print(out[0, 0, 0])"
    )
    env = {"PYTHONPATH": str(package.parent), "NUMBA_CACHE_DIR": str(tmp_path / "c")}
    before = run_python(code, **env)  # ((1 − 1)·1 + 1 − 1)·1
    helpers = package / "kernels" / "numba" / "_loops_channels_last.py"
    line = "dst[c] = (dx - dbeta_mean[c]) * gain[c]"
    assert helpers.read_text().count(line) == 1
    helpers.write_text(helpers.read_text().replace(line, line + " + 7.0"))
    assert (before, run_python(code, **env)) == ("0.0", "7.0")


def test_kernels_work_with_no_writable_cache_location(tmp_path):
    """Read-only site-packages and no writable home: compile in-process instead.

    Tests run as root here, which ignores permissions, so every location Numba
    tries is made unusable by a plain file where it needs a directory: the
    package's ``kernels/__pycache__``, ``~/.cache`` and ``$NUMBA_CACHE_DIR``.
    """
    package = tmp_path / "site" / "batchnorm"
    shutil.copytree(
        Path(bn.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__")
    )
    (package / "kernels" / "numba" / "__pycache__").write_text("not a directory")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".cache").write_text("not a directory")
    code = (
        "import numpy as np, batchnorm as bn;"
        "from batchnorm.kernels.numba import _loops;"
        "x = np.random.default_rng(0).normal(size=(4, 2, 300)).astype(np.float32);"
        "F = bn.functional;"
        "y, c = F.forward_train(x, None, None, backend='numba');"
        "ref, c_ref = F.forward_train(x, None, None, backend='numpy');"
        "dx = F.backward(x, c, backend='numba')[0];"
        "dx_ref = F.backward(x, c_ref, backend='numpy')[0];"
        f"print(bn.__file__.startswith({str(package)!r}),"
        " np.allclose(y, ref, rtol=0, atol=1e-6),"
        " np.allclose(dx, dx_ref, rtol=0, atol=1e-6),"
        " type(_loops.train_ncs._cache).__name__,"
        " type(_loops._launch.serial._cache).__name__,"
        " type(_loops.rows._cache).__name__)"
    )
    out = run_python(
        code,
        PYTHONPATH=str(package.parent),
        HOME=str(home),
        NUMBA_CACHE_DIR=str(home / ".cache" / "numba"),
    )
    assert out == "True True True NullCache NullCache NullCache"


# A small training step: compiles (or loads) the fused pass and its helpers only.
_STEP = (
    "import warnings, numpy as np, batchnorm as bn;"
    "from batchnorm.kernels.numba import CacheWarning;"
    "x = np.arange(24, dtype=np.float32).reshape(4, 2, 3) % 5;"
    "ref = bn.functional.forward_train(x, None, None, backend='numpy')[0];"
    "warnings.simplefilter('always');"  # each warning, not Python's once per place
    "\nwith warnings.catch_warnings(record=True) as caught:"
    "\n    warnings.simplefilter('always')"
    "\n    same = [np.allclose(bn.functional.forward_train(x, None, None,"
    " backend='numba')[0], ref, rtol=0, atol=1e-6) for _ in range(2)]"
    "\nours = [w for w in caught if issubclass(w.category, CacheWarning)]"
    "\nprint(all(same), len(ours), len(caught) - len(ours));"
    "print(ours[0].message if ours else '')"
)


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory):
    """A cache directory that holds the compiled small training step."""
    directory = tmp_path_factory.mktemp("filled") / "cache"
    assert run_python(_STEP, NUMBA_CACHE_DIR=str(directory)).startswith("True 0 0")
    return directory


def test_a_corrupt_cache_is_warned_about_once_and_never_breaks_a_call(
    filled_cache, tmp_path
):
    """Garbage in an index (ValueError from pickle), an empty index (EOFError) and
    a garbage data file (UnpicklingError) made every call raise."""
    directory = tmp_path / "cache"
    shutil.copytree(filled_cache, directory)
    index = sorted(directory.rglob("*.nbi"))
    data = sorted(directory.rglob("*.nbc"))
    assert len(index) >= 3 and data
    index[0].write_bytes(b"garbage\n")
    index[1].write_bytes(b"")
    data[-1].write_bytes(b"\x80\x04not a pickle")
    first, message = run_python(_STEP, NUMBA_CACHE_DIR=str(directory)).split("\n")
    assert first == "True 1 0"
    assert "could not be read" in message and "NUMBA_CACHE_DIR" in message
    # The broken entries were replaced: the next process loads them quietly.
    second = run_python(_STEP, NUMBA_CACHE_DIR=str(directory)).split("\n")[0]
    assert second == "True 0 0"


def test_a_full_disk_is_warned_about_once_and_never_breaks_a_call(tmp_path):
    """ENOSPC where Numba writes its cache files (they are written to a temporary
    name and renamed: a full disk fails in that write) made every call raise."""
    patch = (
        "import errno, os, numba.core.caching as caching\n"
        "def full(self, path):\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)\n"
        "caching.IndexDataCacheFile._open_for_write = full\n"
    )
    out = run_python(patch + _STEP, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    first, message = out.split("\n")
    assert first == "True 1 0"
    assert "could not be written" in message and "No space left" in message


def _plus_one(value):
    return value + 1.0


def test_the_cache_warning_is_a_catchable_warning(tmp_path, monkeypatch):
    """In process: a CacheWarning (so ``-W error`` and pytest's filters see it),
    and the call still returns."""
    import numba

    from batchnorm.kernels.numba import CacheWarning, _jit

    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_jit, "_cache_warned", [])
    compiled = _jit._jit(_plus_one, parallel=False, fastmath=False)
    index = Path(compiled._cache._cache_file._index_path)
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_bytes(b"garbage\n")
    with pytest.warns(CacheWarning, match=r"could not be read \(ValueError"):
        assert compiled(1.0) == 2.0
