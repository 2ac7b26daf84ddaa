"""Runs the MPI suite (tests/mpi_suite) under ``mpiexec -n 2`` and ``-n 3``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mpi4py")
SUITE = Path(__file__).parent / "mpi_suite"


def mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip("mpiexec not found (pip install 'batchnorm[distributed]')")
    return found


def run_mpi(
    ranks: int, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    command = [
        mpiexec(),
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        str(ranks),
        sys.executable,
        *args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batchnorm_suite(ranks):
    result = run_mpi(
        ranks,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--color=no",
        str(SUITE / "check_sync.py"),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.count(" passed") == ranks, result.stdout[-2000:]
    assert " failed" not in result.stdout
