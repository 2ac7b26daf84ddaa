"""``batchnorm convert IN OUT``: move a model between formats chosen by extension.

``.npz`` native · ``.weights`` darknet (needs ``--cfg``) · ``.pt``/``.pth`` PyTorch
state dict (read with ``torch.load(weights_only=True)``; one not written by
batchnorm needs ``--cfg`` or ``--like`` for its structure) · ``.onnx`` (export
only).

Everything is checked before anything is written (formats, ``--input-shape``
against the network), and the outputs (``OUT`` and ``--write-cfg``) are renamed
into place only once all of them are complete: a failed convert leaves every
file as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator
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
    from batchnorm.io import pytorch

    state = pytorch.read_state_dict(path)
    structure = _structure(args)
    if structure is None and not pytorch.records_structure(state):
        raise ValueError(
            f"{path} does not record its network structure (it was not written by "
            "batchnorm): pass --cfg FILE or --like FILE.npz to give it."
        )
    return pytorch.load_state_dict(
        structure, state, allow_nonfinite=allow_nonfinite, source=str(path)
    )


def _input_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ValueError(
            "--input-shape must be sizes separated by commas, one sample's C,H,W "
            f"or FEATURES (e.g. 1,8,8 or 64); got {text!r}."
        )
    return sizes


def _check_shape(obj: Any, suffix: str, args: argparse.Namespace) -> Any:
    """The input shape the output needs, checked against the network (or None)."""
    from batchnorm.io import check_input_shape

    shape = _input_shape(args.input_shape)
    if args.write_cfg is not None and suffix != ".weights":
        raise ValueError(
            f"--write-cfg goes with a .weights output; {args.output} is {suffix}."
        )
    if suffix != ".onnx" and args.write_cfg is None:
        return shape
    if shape is not None:
        check_input_shape(obj, shape, name="--input-shape")
        return shape
    recorded = (getattr(obj, "metadata", None) or {}).get("input_shape")
    if not recorded:
        needed = ".onnx output" if suffix == ".onnx" else "--write-cfg"
        raise ValueError(
            f"--input-shape is required for {needed}: {args.input} records no "
            "input shape. Give one sample's shape, e.g. --input-shape 1,8,8 or 64."
        )
    check_input_shape(obj, recorded, name=f"the input shape recorded in {args.input}")
    return None


def write_any(obj: Any, path: Path, args: argparse.Namespace) -> None:
    """Write ``obj`` to ``path`` (and ``--write-cfg``); checks first, then writes."""
    from batchnorm.io import darknet, native

    suffix = _suffix(path, _WRITE, "output")
    shape = _check_shape(obj, suffix, args)
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


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Show warnings as ``batchnorm COMMAND: warning: ...``, without source lines."""
    original = warnings.formatwarning

    def one_line(message: Any, *_: Any, **__: Any) -> str:
        return f"batchnorm {command}: warning: {message}\n"

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = original


def describe_error(exc: BaseException) -> str:
    """One line for a failed command: a missing file by its name and the fix."""
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        return (
            f"{exc.filename}: no such file. Check the path (relative to {Path.cwd()})."
        )
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}."
    return str(exc)


def missing_extra(command: str, *paths: Path | None) -> str | None:
    """The one-line error when the formats of ``paths`` need a missing extra."""
    from batchnorm.app.main import missing_modules

    suffixes = {path.suffix.lower() for path in paths if path is not None}
    if ".onnx" in suffixes:
        missing = missing_modules(
            command, {"onnx": "onnx"}, "pip install 'batchnorm[interop]'"
        )
        if missing:
            return missing
    if suffixes & {".pt", ".pth"}:
        return missing_modules(
            command, {"torch": "torch"}, "pip install 'torch==2.13.0'"
        )
    return None


def run(args: argparse.Namespace) -> int:
    from batchnorm.io import FormatError

    missing = missing_extra("convert", args.input, args.output)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    with one_line_warnings("convert"):
        try:
            obj = read_any(args.input, args)
            write_any(obj, args.output, args)
        except (FormatError, ValueError, TypeError, OSError, ImportError) as exc:
            print(f"batchnorm convert: error: {describe_error(exc)}", file=sys.stderr)
            return 2
    also = f" and {args.write_cfg}" if args.write_cfg is not None else ""
    print(f"wrote {args.output}{also}")
    return 0
