"""A command whose optional dependencies are missing names the extra to install.

Each case runs the command in a fresh interpreter in which one module cannot be
imported (``sys.modules[name] = None``), the state ``pip install -e .`` without
the extra leaves; nothing is uninstalled.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from batchnorm.app import demo

_RUN = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
from batchnorm.app.main import main
sys.exit(main(sys.argv[2:]))
"""

# (blocked modules, command line, what the message must name)
CASES = {
    "demo-tqdm": ("tqdm", ["demo", "--quick"], ["tqdm", "[demo]", "--no-progress"]),
    "demo-matplotlib": (
        "matplotlib",
        ["demo", "--quick", "--no-progress"],
        ["matplotlib", "[demo]"],
    ),
    "demo-sklearn": (
        "sklearn",
        ["demo", "--quick", "--no-progress"],
        ["scikit-learn", "[demo]"],
    ),
    "bench-numba": ("numba", ["bench"], ["numba", "[fast]"]),
    "bench-torch": ("torch", ["bench"], ["torch", "pip install"]),
    "train-mpi4py": ("mpi4py", ["train"], ["mpi4py", "[demo,distributed]"]),
    "convert-onnx": (
        "onnx",
        ["convert", "m.npz", "m.onnx", "--input-shape", "4"],
        ["onnx", "[interop]"],
    ),
    "convert-torch": ("torch", ["convert", "m.npz", "m.pt"], ["torch", "pip install"]),
    "inspect-torch": ("torch", ["inspect", "m.pth", "--like", "m.npz"], ["torch"]),
}


@pytest.mark.parametrize("case", CASES)
def test_missing_extra_is_named_before_any_work(case, tmp_path):
    blocked, argv, named = CASES[case]
    result = subprocess.run(
        [sys.executable, "-c", _RUN, blocked, *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""  # no work started: nothing printed
    message = result.stderr.strip()
    assert "\n" not in message, message  # one line, no traceback
    assert message.startswith(f"batchnorm {argv[0]} needs "), message
    assert "pip install" in message
    for word in named:
        assert word in message
    assert list(tmp_path.iterdir()) == []  # no empty demo-output/


def test_demo_without_progress_bar_needs_no_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    config = demo._config(_demo_args())
    task = next(t for t in demo._tasks(config) if t["kind"] == "sweep")
    done = demo._execute([{**task, "steps": 2}], {**config, "jobs": 1}, progress=False)
    assert len(done) == 1 and len(done[0][1]["loss"]) == 2


def _demo_args():
    from batchnorm.app.main import build_parser

    return build_parser(["demo"]).parse_args(["demo", "--quick", "--no-progress"])
