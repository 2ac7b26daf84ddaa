"""The README's Python examples run as written (in a temporary directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[2] / "README.md"


def python_blocks(heading: str) -> str:
    """Every ```python block between ``heading`` and the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    section = text[start : end if end != -1 else len(text)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, f"no python example under {heading!r}"
    return "\n".join(blocks)


def test_core_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(python_blocks("## Example"), "README:Example", "exec"), {})


def test_interop_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    code = python_blocks("## Weights files and other frameworks")
    with pytest.warns(UserWarning, match="darknet will use its statistics"):
        exec(compile(code, "README:interop", "exec"), {})
    assert (tmp_path / "model.onnx").exists() and (tmp_path / "model.pt").exists()


def test_darknet_examples_run(tmp_path, monkeypatch, capsys):
    """The darknet section's Python and ``batchnorm`` lines, on a cfg with
    yolov3-tiny's layer sequence (the README downloads pjreddie's file)."""
    from batchnorm.app.main import main
    from helpers.darknet_nets import yolov3_tiny

    monkeypatch.chdir(tmp_path)
    (tmp_path / "yolov3-tiny.cfg").write_text(yolov3_tiny())
    heading = "## Real darknet networks"
    exec(compile(python_blocks(heading), "README:darknet", "exec"), {})
    assert (tmp_path / "yolov3-tiny.weights").stat().st_size == 35_434_956
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading) : text.index("\n## ", text.index(heading) + 1)]
    commands = [
        line.split("#")[0].split()
        for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
        for line in block.splitlines()
        if line.startswith("batchnorm ")
    ]
    assert [c[1] for c in commands] == ["inspect", "fold"]
    assert main(commands[0][1:]) == 1  # "exit 1: a problem"
    assert "layer 13 [convolutional]" in capsys.readouterr().out
    assert main(commands[1][1:]) == 0
    assert "folded the batch normalization of 11 unit(s)" in capsys.readouterr().out
    assert (tmp_path / "bn.png").exists() and (tmp_path / "folded.weights").exists()


# torch.compile imports inductor, whose import of torch.utils.mkldnn warns; not ours
@pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)
def test_torch_examples_run(tmp_path, monkeypatch):
    """The "From PyTorch" section: its inline example in-process, and its
    training script under the torchrun command its first line gives."""
    pytest.importorskip("torch")
    import os
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    text = README.read_text(encoding="utf-8")
    start = text.index("## From PyTorch")
    section = text[start : text.index("\n## ", start + 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    scripts = [b for b in blocks if b.startswith("# train_sync.py")]
    inline = [b for b in blocks if b not in scripts]
    assert len(scripts) == 1 and inline
    exec(compile("\n".join(inline), "README:torch", "exec"), {})
    script = scripts[0]
    (tmp_path / "train_sync.py").write_text(script)
    command = script.splitlines()[0].split("run with: ")[1].split()
    assert command[0] == "torchrun"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *command[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        # a rank that dies in native code leaves its Python stack in stderr
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # the two ranks share stdout: their lines may interleave, not their fields
    found = dict(re.findall(r"rank (\d): (\[[^\]]*\])", done.stdout))
    assert sorted(found) == ["0", "1"], done.stdout[-2000:]
    assert found["0"] == found["1"]  # the same running mean on both ranks
