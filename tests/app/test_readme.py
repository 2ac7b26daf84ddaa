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
