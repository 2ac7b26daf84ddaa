"""``batchnorm convert IN OUT``: move a model between formats chosen by extension.

``.npz`` native · ``.weights`` darknet (needs ``--cfg``) · ``.pt``/``.pth`` PyTorch
state dict (read with ``torch.load(weights_only=True)``; one not written by
batchnorm needs ``--cfg`` or ``--like`` for its structure) · ``.onnx`` (export
only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

_READ = (".npz", ".weights", ".pt", ".pth")
_WRITE = (".npz", ".weights", ".pt", ".pth", ".onnx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="model file: " + ", ".join(_READ))
    parser.add_argument("output", type=Path, help="model file: " + ", ".join(_WRITE))
    parser.add_argument("--cfg", type=Path, help="darknet .cfg (structure)")
    parser.add_argument("--like", type=Path, help=".npz whose network structure to use")
    parser.add_argument("--write-cfg", type=Path, help="also write a darknet .cfg")
    parser.add_argument(
        "--input-shape", help="one sample's shape for ONNX, e.g. 1,8,8 or 64"
    )


def _suffix(path: Path, allowed: tuple[str, ...], role: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise ValueError(
            f"{role} {path}: unknown extension {suffix!r}; use one of "
            f"{', '.join(allowed)}."
        )
    return suffix


def _structure(args: argparse.Namespace) -> Any:
    from batchnorm.io import darknet, native

    if getattr(args, "cfg", None) is not None:
        return darknet.load(args.cfg)
    if getattr(args, "like", None) is not None:
        return native.load(args.like, allow_nonfinite=True)
    return None


def read_any(
    path: Path, args: argparse.Namespace, *, allow_nonfinite: bool = False
) -> Any:
    """The model stored at ``path`` (format by extension)."""
    from batchnorm.io import darknet, native

    suffix = _suffix(path, _READ, "input")
    if suffix == ".npz":
        return native.load(path, allow_nonfinite=allow_nonfinite)
    if suffix == ".weights":
        if getattr(args, "cfg", None) is None:
            raise ValueError(f"{path}: a darknet .weights file needs --cfg FILE.")
        return darknet.load(args.cfg, path, allow_nonfinite=allow_nonfinite)
    import torch

    from batchnorm.io import pytorch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return pytorch.load_state_dict(
        _structure(args), state, allow_nonfinite=allow_nonfinite
    )


def write_any(obj: Any, path: Path, args: argparse.Namespace) -> None:
    from batchnorm.io import darknet, native

    suffix = _suffix(path, _WRITE, "output")
    shape = None
    if args.input_shape:
        shape = tuple(int(n) for n in args.input_shape.split(","))
    if suffix == ".npz":
        native.save(obj, path)
    elif suffix == ".weights":
        darknet.save(obj, path, args.write_cfg, input_shape=shape)
    elif suffix == ".onnx":
        from batchnorm.io import onnx_export

        onnx_export.export(obj, path, shape)
    else:
        from batchnorm.io import pytorch

        pytorch.save(obj, path)


def run(args: argparse.Namespace) -> int:
    from batchnorm.io import FormatError

    try:
        obj = read_any(args.input, args)
        write_any(obj, args.output, args)
    except (FormatError, ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"batchnorm convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0
