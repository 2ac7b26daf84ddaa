"""The data-parallel trainer's arguments, checked before any communication."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from batchnorm.distributed import data_parallel as dp
from batchnorm.nn import SGD, Split, mlp


class NoComm:
    """A communicator that fails the test if anything is sent."""

    def Get_rank(self):  # noqa: N802 - mpi4py's name
        return 0

    def Get_size(self):  # noqa: N802
        return 1

    def __getattr__(self, name):
        raise AssertionError(f"communicated ({name}) before checking timeout")


@pytest.mark.parametrize(
    ("timeout", "error", "message"),
    [
        (0, ValueError, "> 0; got 0"),
        (-1.0, ValueError, "> 0; got -1.0"),
        (float("nan"), ValueError, "> 0; got nan"),
        (True, TypeError, "got bool True"),
        ("60", TypeError, "got str '60'"),
    ],
)
def test_timeout_must_be_positive_seconds(timeout, error, message):
    rng = np.random.default_rng(0)
    model = mlp(batch_norm=True, rng=rng, in_features=4, hidden=(3,), backend="numpy")
    data = Split(rng.normal(size=(8, 4)), np.arange(8) % 2, np.zeros((0, 4)), [])
    with pytest.raises(error, match=r"timeout must be a number of seconds"):
        dp.fit_data_parallel(
            model,
            SGD(model, lr=0.1),
            data,
            steps=1,
            batch_size=4,
            rng=rng,
            comm=NoComm(),
            timeout=timeout,
        )
    for check in (dp.parameters_agree, dp.running_statistics_agree):
        with pytest.raises(error, match=re.escape(message)):
            check(model, NoComm(), timeout=timeout)


def test_train_batch_larger_than_the_training_set_is_one_line(tmp_path):
    """Before: a traceback on every rank from inside the training loop."""
    pytest.importorskip("mpi4py")
    pytest.importorskip("sklearn")
    code = (
        "import sys\n"
        "from batchnorm.app.main import main\n"
        "sys.exit(main(['train', '--batch-size', '100000', '--steps', '1']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert re.fullmatch(
        r"batchnorm train: error: --batch-size must be at most the \d+ training "
        r"images; got 100000\.\n",
        result.stderr,
    )
