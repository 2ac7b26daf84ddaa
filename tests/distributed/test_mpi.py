"""Runs the MPI suite (``mpi_suite/`` here) under ``mpiexec -n 2`` and ``-n 3``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
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
@pytest.mark.parametrize("suite", ["check_sync.py", "check_data_parallel.py"])
def test_mpi_suite(suite, ranks):
    result = run_mpi(
        ranks,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--color=no",
        str(SUITE / suite),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.count(" passed") == ranks, result.stdout[-2000:]
    assert " failed" not in result.stdout


def test_stalled_rank_raises_within_the_deadline():
    start = time.monotonic()
    result = run_mpi(2, str(SUITE / "stalled_rank.py"), "stall", timeout=120)
    elapsed = time.monotonic() - start
    assert "SyncError after 2." in result.stdout, result.stdout + result.stderr
    assert "rank 0 waited 2 s for the other 1 rank(s), which never joined" in (
        result.stdout
    )
    assert result.returncode != 0
    assert elapsed < 50  # the stalled rank sleeps 60 s: the abort ended it


def test_dead_rank_ends_the_job():
    start = time.monotonic()
    result = run_mpi(2, str(SUITE / "stalled_rank.py"), "die", timeout=120)
    assert result.returncode != 0
    assert "no error" not in result.stdout
    assert time.monotonic() - start < 50


def test_train_command_under_mpiexec():
    pytest.importorskip("sklearn")
    result = run_mpi(
        2,
        "-m",
        "batchnorm.app.main",
        "train",
        "--json",
        "--model",
        "mlp",
        "--steps",
        "20",
        "--batch-size",
        "31",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ranks"] == 2 and report["shard_sizes"] == [16, 15]
    assert report["parameters_identical_on_all_ranks"] is True
    assert report["running_statistics_identical_on_all_ranks"] is True
    # 2 BN layers × (forward + backward) × (2C + 1) float64, C = 100
    assert report["bn_bytes_per_step"] >= 2 * 2 * 201 * 8
    assert report["test_accuracy"] > 0.5


def test_train_without_sync_shows_the_statistics_drift_and_exits_0():
    pytest.importorskip("sklearn")
    result = run_mpi(
        3,
        "-m",
        "batchnorm.app.main",
        "train",
        "--json",
        "--model",
        "cnn",
        "--no-sync",
        "--steps",
        "10",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sync_batchnorm"] is False
    # Gradients are still summed over ranks, so the weights stay identical; each
    # rank's BatchNorm sees only its shard, so the running statistics drift.
    assert report["parameters_identical_on_all_ranks"] is True
    assert report["running_statistics_identical_on_all_ranks"] is False


@pytest.mark.parametrize("mode", ["raise", "stall"])
def test_a_failing_optimizer_step_ends_every_rank(mode):
    start = time.monotonic()
    result = run_mpi(2, str(SUITE / "failing_step.py"), mode, timeout=120)
    elapsed = time.monotonic() - start
    out = result.stdout
    assert result.returncode != 0
    assert "no error" not in out, out + result.stderr
    if mode == "raise":  # rank 1 tells rank 0 in the step's collective
        assert "rank 1: raised injected: the update overflowed" in out, out
        assert "rank 0: SyncError after " in out, out + result.stderr
        assert "rank(s) [1] failed in optimizer.step() at step 3" in out
    else:  # rank 1 never joins: rank 0's deadline
        assert "rank 0: SyncError after 2." in out, out + result.stderr
        assert "rank 0 waited 2 s for the other 1 rank(s)" in out
    assert elapsed < 30  # every rank has a 40 s watchdog: no deadline fired
