"""Which backend runs: Numba is imported on first use only, the default falls
back to NumPy without it, and the choice is looked up once per process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

from batchnorm import kernels  # noqa: E402
from batchnorm.kernels import numba as _numba  # noqa: E402
from batchnorm.kernels import reference  # noqa: E402
from helpers.processes import run_python  # noqa: E402


def test_import_batchnorm_does_not_import_numba():
    code = "import sys, batchnorm; print('numba' in sys.modules)"
    assert run_python(code) == "False"


def test_default_backend_falls_back_to_numpy_without_numba():
    """Where numba does not import, calls without ``backend=`` run on the NumPy
    reference, and ``backend="numba"`` says how to install it."""
    code = (
        "import sys; sys.modules['numba'] = None\n"  # import numba raises
        "import numpy as np, batchnorm as bn\n"
        "from batchnorm import kernels\n"
        "x = np.arange(12.0).reshape(4, 3)\n"
        "y, cache = bn.functional.forward_train(x, None, None)\n"
        "print(kernels.default(), kernels.available(), cache.mean.tolist())\n"
        "try:\n"
        "    bn.functional.forward_train(x, None, None, backend='numba')\n"
        "except ImportError as exc:\n"
        "    print('ImportError', 'batchnorm[fast]' in str(exc))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "BATCHNORM_BACKEND"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "numpy ('numpy',) [4.5, 5.5, 6.5]",
        "ImportError True",
    ]


def test_default_backend_is_looked_up_once(monkeypatch):
    """The default backend and its module are found once per process: later
    calls do not go through the import machinery again (a microsecond or two of
    every functional call), and ``$BATCHNORM_BACKEND`` still wins on every call."""
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    assert kernels.default() == "numba"
    assert kernels.resolve(None) is _numba
    assert kernels.resolve("numpy") is reference

    def no_imports(*args):
        raise AssertionError("imported again")

    monkeypatch.setattr(kernels, "available", no_imports)
    monkeypatch.setattr(kernels.importlib, "import_module", no_imports)
    assert kernels.default() == "numba"
    assert kernels.resolve(None) is _numba
    assert kernels.resolve("numpy") is reference
    monkeypatch.setenv("BATCHNORM_BACKEND", "numpy")
    assert kernels.resolve(None) is reference
