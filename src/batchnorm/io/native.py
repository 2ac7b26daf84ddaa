"""The native format: a pickle-free ``.npz`` whose JSON header describes everything.

The archive holds one ``__header__`` entry (UTF-8 JSON as uint8) and one ``.npy``
entry per array, named as in :mod:`batchnorm.io._structure`. The header records

- ``format`` (``"batchnorm"``) and ``version`` (:data:`FORMAT_VERSION`);
- ``kind``: ``"layer"`` (a lone :class:`batchnorm.BatchNorm`) or ``"network"``;
- ``layers``: one spec per layer (type and constructor arguments), so that
  :func:`load` rebuilds the network;
- ``conventions`` per BatchNorm: momentum and its direction (weight on the OLD
  running value), running-variance kind, ε and its placement, the channel axis,
  ``num_batches_tracked`` and ``num_values_seen``;
- ``metadata``: what other formats need to write the network back unchanged
  (for darknet files: the header's version and ``seen``).

Saves are atomic (:func:`batchnorm.io._atomic.atomic_write`); loads read and check
every entry before building anything, and raise only
:class:`batchnorm.io.FormatError` for a bad file.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from typing import IO, Any

import numpy as np

from batchnorm.io._atomic import atomic_write
from batchnorm.io._structure import (
    BN_COUNTERS,
    FormatError,
    Network,
    arrays_of,
    build,
    check_declared,
    describe,
    fill,
    layers_of,
)
from batchnorm.layer import BatchNorm

__all__ = ["FORMAT_VERSION", "load", "read_header", "save"]

#: Version written by :func:`save`; :func:`load` reads versions up to this one.
FORMAT_VERSION = 1
_HEADER = "__header__"


def conventions(layer: BatchNorm) -> dict[str, Any]:
    """What a reader must know to use ``layer``'s statistics correctly."""
    return {
        "momentum": layer.momentum,
        "momentum_direction": "weight on the old running value: run <- momentum * "
        "run + (1 - momentum) * batch",
        "running_var_kind": layer.running_var_kind,
        "eps": layer.eps,
        "eps_placement": layer.eps_placement,
        "ddof": layer.ddof,
        "axis": layer.axis,
        "num_batches_tracked": int(layer.num_batches_tracked),
        "num_values_seen": int(layer.num_values_seen),
    }


def save(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write a BatchNorm layer or a harness network to ``path`` atomically.

    Parameters
    ----------
    obj : batchnorm.BatchNorm or batchnorm.nn.Sequential
    path : path-like
        Conventionally ``*.npz``. An existing file is replaced only once the new
        one is complete on disk.

    Raises
    ------
    TypeError
        For a layer type the format does not know.

    Examples
    --------
    >>> import tempfile, pathlib, numpy as np, batchnorm as bn
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "bn.npz"
    >>> layer = bn.BatchNorm(3)
    >>> _ = layer(np.arange(12.0, dtype=np.float32).reshape(4, 3))
    >>> save(layer, path)
    >>> load(path).running_mean
    array([0.045, 0.055, 0.065], dtype=float32)
    """
    layers = layers_of(obj)
    specs = [describe(layer) for layer in layers]
    prefixes = (
        [""] if isinstance(obj, BatchNorm) else [f"{i}." for i in range(len(layers))]
    )
    header = {
        "format": "batchnorm",
        "version": FORMAT_VERSION,
        "kind": "layer" if isinstance(obj, BatchNorm) else "network",
        "layers": specs,
        "conventions": {
            prefix: conventions(layer)
            for prefix, layer in zip(prefixes, layers, strict=True)
            if isinstance(layer, BatchNorm)
        },
        "metadata": dict(getattr(obj, "metadata", {}) or {}),
    }
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays_of(obj).items()}
    encoded = json.dumps(header, allow_nan=False).encode("utf-8")
    arrays[_HEADER] = np.frombuffer(encoded, dtype=np.uint8)

    def write(file: IO[bytes]) -> None:
        np.savez(file, allow_pickle=False, **arrays)

    atomic_write(path, write)


#: The JSON header is small (about 200 bytes a layer); a bigger entry is not one.
_MAX_HEADER_BYTES = 64 * 2**20


def _open_archive(path: str | os.PathLike[str]) -> zipfile.ZipFile:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}.") from None
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except Exception as exc:  # zipfile and zlib: all mean corrupt
        raise FormatError(
            f"{path}: truncated or corrupt file ({type(exc).__name__}: {exc})."
        ) from exc


def _entries(
    archive: zipfile.ZipFile, path: Any
) -> dict[str, tuple[zipfile.ZipInfo, tuple[int, ...]]]:
    """Each ``.npy`` entry's shape from its header, checked against its size.

    Nothing but the small ``.npy`` headers is inflated: the sizes an entry
    declares must agree before any data is read.
    """
    entries: dict[str, tuple[zipfile.ZipInfo, tuple[int, ...]]] = {}
    for info in archive.infolist():
        name = info.filename[:-4]
        if not info.filename.endswith(".npy") or name in entries:
            raise FormatError(
                f"{path}: not a batchnorm file: unexpected entry {info.filename!r}"
            )
        try:
            with archive.open(info) as stream:
                version = np.lib.format.read_magic(stream)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"unsupported .npy version {version}")
                read = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read(stream)
                offset = stream.tell()
        except Exception as exc:  # zipfile, zlib, numpy header parsing
            raise FormatError(
                f"{path}: truncated or corrupt file: entry {info.filename!r} "
                f"({type(exc).__name__}: {exc})."
            ) from exc
        size = math.prod(shape) * dtype.itemsize
        if dtype.hasobject or info.file_size != offset + size:
            raise FormatError(
                f"{path}: truncated or corrupt file: entry {info.filename!r} holds "
                f"{info.file_size - offset} bytes of data but describes {shape} "
                f"{dtype} ({size} bytes)."
            )
        entries[name] = (info, shape)
    return entries


def _read_array(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Any) -> Any:
    """One entry's array, read in chunks into its final buffer; CRC checked."""
    try:
        with archive.open(info) as stream:
            array = np.lib.format.read_array(stream, allow_pickle=False)
            if stream.read(1):  # reading to the end also checks the CRC
                raise ValueError("data after the array")
    except Exception as exc:
        raise FormatError(
            f"{path}: truncated or corrupt file: entry {info.filename!r} "
            f"({type(exc).__name__}: {exc})."
        ) from exc
    return array


def read_header(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The checked JSON header and the arrays of a native file.

    Every size the file declares (zip entries, ``.npy`` headers, layer specs) is
    checked against the others before an array is read, so a crafted file cannot
    make this allocate more than the arrays its header describes.
    """
    with _open_archive(path) as archive:
        entries = _entries(archive, path)
        found = entries.pop(_HEADER, None)
        if found is None or len(found[1]) != 1:
            raise FormatError(
                f"{path}: no {_HEADER} entry; not a batchnorm native file."
            )
        if found[0].file_size > _MAX_HEADER_BYTES:
            raise FormatError(
                f"{path}: the {_HEADER} entry has {found[0].file_size} bytes; a "
                f"header has at most {_MAX_HEADER_BYTES}. The file is corrupt."
            )
        raw = _read_array(archive, found[0], path)
        if raw.dtype != np.uint8:
            raise FormatError(
                f"{path}: no {_HEADER} entry; not a batchnorm native file."
            )
        header = _parse_header(raw, path)
        check_declared(
            header["layers"],
            {k: shape for k, (_, shape) in entries.items()},
            single=header["kind"] == "layer",
            source=str(path),
        )
        arrays = {k: _read_array(archive, e[0], path) for k, e in entries.items()}
    return header, arrays


def _parse_header(raw: np.ndarray, path: Any) -> dict[str, Any]:
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise FormatError(f"{path}: the header is not valid JSON: {reason}") from None
    if not isinstance(header, dict) or header.get("format") != "batchnorm":
        raise FormatError(f"{path}: the header does not say format 'batchnorm'.")
    version = header.get("version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise FormatError(
            f"{path}: format version {version!r} is not supported; this batchnorm "
            f"reads versions 1 to {FORMAT_VERSION}. Upgrade batchnorm to read it."
        )
    for key, kind in (
        ("kind", str),
        ("layers", list),
        ("conventions", dict),
        ("metadata", dict),
    ):
        if not isinstance(header.get(key), kind):
            raise FormatError(f"{path}: header field {key!r} is missing or invalid.")
    if header["kind"] not in ("layer", "network"):
        raise FormatError(f"{path}: unknown kind {header['kind']!r}.")
    specs = header["layers"]
    if header["kind"] == "layer" and (
        len(specs) != 1
        or not isinstance(specs[0], dict)
        or specs[0].get("type") != "BatchNorm"
    ):
        raise FormatError(f"{path}: a 'layer' file must hold exactly one BatchNorm.")
    return header


def load(path: str | os.PathLike[str], *, allow_nonfinite: bool = False) -> Any:
    """Read a layer or network written by :func:`save`; nothing half-loaded.

    Parameters
    ----------
    path : path-like
    allow_nonfinite : bool, default False
        Accept NaN/inf (or negative) running statistics instead of raising; for
        inspecting a broken model (``batchnorm inspect`` does this).

    Returns
    -------
    batchnorm.BatchNorm or batchnorm.io.Network
        Every BatchNorm comes back in train mode, as a new layer does (the mode
        is not stored); call ``.eval()`` for inference.

    Raises
    ------
    FileNotFoundError
    batchnorm.io.FormatError
        Truncated or corrupt file, unknown version, missing or unknown arrays,
        wrong shapes or dtypes, non-finite statistics (unless allowed).
    """
    header, arrays = read_header(path)
    layers = []
    for spec in header["layers"]:
        try:
            layers.append(build(spec))
        except FormatError as exc:
            raise FormatError(f"{path}: {exc}") from None
    obj: Any = (
        layers[0] if header["kind"] == "layer" else Network(layers, header["metadata"])
    )
    counters = _counters(obj, header["conventions"], path)
    fill(obj, arrays, counters, source=str(path), allow_nonfinite=allow_nonfinite)
    return obj


def _counters(obj: Any, conventions: Any, path: Any) -> dict[str, Any]:
    """Both counters of every BatchNorm, required: a silent 0 would reset them.

    ``num_values_seen`` is the weight of the running statistics under
    ``momentum=None``; losing it would let the next batch outweigh everything seen.
    """
    counters: dict[str, Any] = {}
    for index, layer in enumerate(layers_of(obj)):
        if not isinstance(layer, BatchNorm):
            continue
        prefix = "" if obj is layer else f"{index}."
        entry = conventions.get(prefix) if isinstance(conventions, dict) else None
        if not isinstance(entry, dict) or not all(k in entry for k in BN_COUNTERS):
            raise FormatError(
                f"{path}: header conventions[{prefix!r}] must be an object with "
                f"{list(BN_COUNTERS)} for the BatchNorm at layer {index}; got "
                f"{entry!r}. The file is damaged or was not written by batchnorm."
            )
        counters[prefix] = {k: entry[k] for k in BN_COUNTERS}
    return counters
