"""darknet interop: ``.cfg`` networks and byte-compatible ``.weights`` files.

Two ways in:

- **any darknet network** — :func:`read` (``cfg`` + ``.weights``),
  :func:`read_cfg` (structure only), :func:`write` (byte-identical),
  :func:`fold` (batch normalization into the weights, with darknet's own
  formula), :func:`synthetic` (random arrays for a cfg). Every section type
  pjreddie's ``parser.c`` parses, shapes as darknet computes them; the arrays
  stay darknet's (``biases``, ``scales``, ``rolling_mean``, ...), and each
  normalization is available as our :class:`batchnorm.BatchNorm`
  (:meth:`Layer.batch_norms`). See ``docs/INTEROP.md``, "Real darknet networks".
- **the harness** — :func:`load` / :func:`save`: the subset of darknet our
  :mod:`batchnorm.nn` layers run (convolutional, connected, batchnorm, maxpool
  without padding, avgpool, softmax), as a trainable network.

The harness layout below is the same file format.

Layout of a ``.weights`` file (little-endian, float32 everywhere after the header),
as darknet's ``load_weights_upto`` / ``save_weights_upto`` read and write it:

- header: int32 ``major``, int32 ``minor``, int32 ``revision``, then ``seen``
  (images trained on) as uint64 when ``major·10 + minor ≥ 2`` and both are below
  1000, else as uint32 (darknet writes 0, 2, 0);
- per ``[convolutional]``: biases (n), then with ``batch_normalize`` scales (n),
  rolling_mean (n), rolling_variance (n), then weights (n, c, size, size);
- per ``[connected]``: biases (out), weights (out, in) — stored (in, out) when
  ``major`` or ``minor`` > 1000 — then with ``batch_normalize`` scales,
  rolling_mean, rolling_variance (out each);
- per standalone ``[batchnorm]``: scales, rolling_mean, rolling_variance (C each).
  This darknet stores no β for it; saving warns when β ≠ 0. (AlexeyAB's fork also
  writes biases first; those files are reported as too long.)

Mapping to the harness: a convolutional or connected layer with
``batch_normalize=1`` becomes ``Conv2d``/``Linear`` without bias followed by
``BatchNorm.from_preset("darknet", n)``, and darknet's biases are that BatchNorm's
β (darknet adds them after scaling, exactly where β goes). Without
``batch_normalize`` the biases are the layer's own bias.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from batchnorm.io import _darknet_cfg as cfg
from batchnorm.io._atomic import atomic_write, atomic_write_all
from batchnorm.io._darknet_fold import (
    Folding,
    fold,
    fold_error_bound,
    folding,
    normalization_scale,
)
from batchnorm.io._darknet_layers import Layer, Shape, Unit
from batchnorm.io._darknet_net import (
    DIALECTS,
    Header,
    Network,
    read,
    read_cfg,
    read_files,
    synthetic,
    write,
)
from batchnorm.io._shapes import check_input_shape
from batchnorm.io._structure import FormatError, build, declared_arrays, layers_of
from batchnorm.io._structure import Network as HarnessNetwork
from batchnorm.layer import BatchNorm
from batchnorm.nn.conv import Conv2d
from batchnorm.nn.layers import Linear
from batchnorm.presets import PRESETS

__all__ = [
    "DEFAULT_HEADER",
    "DIALECTS",
    "Folding",
    "Header",
    "Layer",
    "Network",
    "Shape",
    "Unit",
    "fold",
    "fold_error_bound",
    "folding",
    "load",
    "normalization_scale",
    "read",
    "read_cfg",
    "save",
    "synthetic",
    "weights_layout",
    "write",
]

#: What darknet itself writes: version 0.2.0, seen 0.
DEFAULT_HEADER = {"major": 0, "minor": 2, "revision": 0, "seen": 0}


def _seen_is_64bit(major: int, minor: int) -> bool:
    return major * 10 + minor >= 2 and major < 1000 and minor < 1000


def _transposed(major: int, minor: int) -> bool:
    return major > 1000 or minor > 1000


def weights_layout(network: Any) -> list[tuple[Any, str, tuple[int, ...]]]:
    """``(layer, attribute, shape)`` in file order for a harness network.

    A BatchNorm right after a bias-free Conv2d/Linear is that layer's
    ``batch_normalize``; any other BatchNorm is a standalone ``[batchnorm]``.
    """
    layers = layers_of(network)
    layout: list[tuple[Any, str, tuple[int, ...]]] = []
    for i, layer in enumerate(layers):
        following = layers[i + 1] if i + 1 < len(layers) else None
        previous = layers[i - 1] if i > 0 else None
        if isinstance(layer, Conv2d | Linear):
            n = layer.out_channels if isinstance(layer, Conv2d) else layer.out_features
            # A BatchNorm after a bias-free layer is that layer's batch_normalize
            # (its β is darknet's biases); after a layer with a bias it is a
            # standalone [batchnorm].
            bn = (
                following
                if isinstance(following, BatchNorm) and layer.bias is None
                else None
            )
            bias_owner = bn if bn is not None else layer
            layout.append((bias_owner, "beta" if bn is not None else "bias", (n,)))
            stats = [(bn, k, (n,)) for k in ("gamma", "running_mean", "running_var")]
            weight = (layer, "weight", layer.weight.shape)
            if isinstance(layer, Conv2d):
                layout += [*stats, weight] if bn is not None else [weight]
            else:
                layout += [weight, *stats] if bn is not None else [weight]
        elif isinstance(layer, BatchNorm) and not (
            isinstance(previous, Conv2d | Linear) and previous.bias is None
        ):
            c = layer.num_features
            layout += [
                (layer, k, (c,)) for k in ("gamma", "running_mean", "running_var")
            ]
    return layout


def _header_size(major: int, minor: int) -> int:
    return 12 + (8 if _seen_is_64bit(major, minor) else 4)


def _read_header(data: bytes, path: Any) -> dict[str, int]:
    if len(data) < 16:
        raise FormatError(
            f"{path}: {len(data)} bytes is shorter than a darknet header."
        )
    major, minor, revision = struct.unpack_from("<iii", data, 0)
    if len(data) < _header_size(major, minor):
        raise FormatError(f"{path}: truncated header ({len(data)} bytes).")
    (seen,) = struct.unpack_from(
        "<Q" if _seen_is_64bit(major, minor) else "<I", data, 12
    )
    return {"major": major, "minor": minor, "revision": revision, "seen": int(seen)}


def read_weights(
    network: Any, path: str | os.PathLike[str], *, allow_nonfinite: bool = False
) -> dict[str, int]:
    """Fill ``network`` from a ``.weights`` file; return its header. All or nothing."""
    return _fill(network, _read_file(path), path, allow_nonfinite=allow_nonfinite)


def _fill(
    network: Any, data: bytes, path: Any, *, allow_nonfinite: bool
) -> dict[str, int]:
    header = _read_header(data, path)
    major, minor = header["major"], header["minor"]
    layout = weights_layout(network)
    expected = _header_size(major, minor) + 4 * sum(
        int(np.prod(s)) for _, _, s in layout
    )
    if len(data) != expected:
        raise FormatError(
            f"{path}: the file has {len(data)} bytes but the network implies "
            f"{expected} ({'shorter' if len(data) < expected else 'longer'}); the "
            ".weights file does not belong to this network."
        )
    values = np.frombuffer(data, dtype="<f4", offset=_header_size(major, minor))
    transpose = _transposed(major, minor)
    plan, offset = [], 0
    for owner, name, shape in layout:
        count = int(np.prod(shape))
        chunk = values[offset : offset + count].astype(np.float32)
        offset += count
        if transpose and isinstance(owner, Linear) and name == "weight":
            chunk = chunk.reshape(shape[1], shape[0]).T
        chunk = np.ascontiguousarray(chunk.reshape(shape))
        current = getattr(owner, name)
        if current is None:  # no bias / non-affine: only the neutral value fits
            if np.any(chunk != (1.0 if name == "gamma" else 0.0)):
                raise FormatError(
                    f"{path}: {owner!r} has no {name} but the file stores one; "
                    "rebuild the layer with it."
                )
            continue
        if name in ("running_mean", "running_var") and not allow_nonfinite:
            bad = ~np.isfinite(chunk)
            if name == "running_var":
                bad |= chunk < 0
            if bad.any():
                raise FormatError(
                    f"{path}: {name} of {owner!r} has non-finite or negative values "
                    f"at channels {np.flatnonzero(bad)[:8].tolist()}. Pass "
                    "allow_nonfinite=True to load it anyway."
                )
        plan.append((owner, name, chunk.astype(current.dtype)))
    for owner, name, value in plan:
        setattr(owner, name, value)
    return header


def _read_file(path: Any) -> bytes:
    return read_files([path])[0]


def _file_floats(specs: list[tuple[dict[str, Any], int]]) -> int:
    """float32 values a ``.weights`` file holds for these cfg layer specs."""
    total = 0
    for spec, _ in specs:
        for name, shape in declared_arrays(spec).items():
            # a BatchNorm's β is stored as its conv/connected layer's biases
            total += math.prod(shape) if name != "beta" else 0
        if spec["type"] in ("Conv2d", "Linear") and not spec["bias"]:
            total += spec[
                "out_channels" if spec["type"] == "Conv2d" else "out_features"
            ]
    return total


def _tie(weights_path: Any, weights: bytes) -> str:
    """The cfg comment that names the .weights written with it."""
    digest = hashlib.sha256(weights).hexdigest()[:16]
    return f"# batchnorm: written with {Path(weights_path).name}, sha256 {digest}"


_TIE = re.compile(r"^# batchnorm: written with .*, sha256 ([0-9a-f]{16})$", re.M)


def _not_a_pair(
    cfg_path: Any, weights_path: Any, text: str, data: bytes, expected: int
) -> FormatError:
    """What a .weights that does not fit its cfg says: sizes, tie, which is newer."""
    parts = [
        f"{weights_path} and {cfg_path} are not a pair: {weights_path} has "
        f"{len(data)} bytes, {cfg_path} implies {expected}"
    ]
    tie = _TIE.search(text)
    if tie and tie.group(1) != hashlib.sha256(data).hexdigest()[:16]:
        parts.append(f"{cfg_path} was written with another .weights")
    try:
        times = {
            cfg_path: os.stat(cfg_path).st_mtime,
            weights_path: os.stat(weights_path).st_mtime,
        }
    except OSError:
        times = {}
    if times:
        newer, older = sorted(times, key=times.__getitem__, reverse=True)
        gap = times[newer] - times[older]
        parts.append(
            f"{newer} is newer (modified {gap:.3g} s after {older})"
            if gap > 0
            else "both were modified at the same time"
        )
    return FormatError(
        "; ".join(parts) + ". A save interrupted between writing the two files, or "
        "files of two models: save both again, or use the .cfg written with this "
        ".weights."
    )


def load(
    cfg_path: str | os.PathLike[str],
    weights_path: str | os.PathLike[str] | None = None,
    *,
    allow_nonfinite: bool = False,
) -> HarnessNetwork:
    """A harness network from a darknet ``.cfg`` and (optionally) its ``.weights``.

    BatchNorm layers use the ``"darknet"`` preset, so ``network.eval()`` computes
    what darknet computes at test time: ``(x − mean) / (√var + 1e-6) · γ + β``.
    The two files are read as one pair (see :func:`save`), and every size the cfg
    declares is checked against the ``.weights`` before anything is allocated.

    Raises
    ------
    batchnorm.io.FormatError
        A cfg that is not text, unknown sections or options, sizes out of range
        (each with its line), a weights file whose size differs from what the cfg
        implies ("not a pair", with both sizes and which file is newer),
        non-finite statistics.

    Examples
    --------
    >>> import tempfile, pathlib, numpy as np
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "t.cfg").write_text("[net]\\ninputs=3\\n[connected]\\noutput=2\\n"
    ...                              "batch_normalize=1\\nactivation=relu\\n")
    >>> net = load(d / "t.cfg")
    >>> net.layers
    [Linear(3, 2, bias=False), BatchNorm(2, ...), ReLU()]
    >>> save(net, d / "t.weights")
    >>> (d / "t.weights").stat().st_size   # 20-byte header + 4 · (2 + 6 + 6)
    76
    """
    if weights_path is None:
        raw, data = _read_file(cfg_path), None
    else:
        raw, data = read_files([cfg_path, weights_path])
    text = cfg.decode(raw, str(cfg_path))
    sections = cfg.parse(text, str(cfg_path))
    specs, input_shape = cfg.layer_specs(sections, str(cfg_path))
    header = dict(DEFAULT_HEADER)
    if data is not None:
        header = _read_header(data, weights_path)
        size = _header_size(header["major"], header["minor"])
        expected = size + 4 * _file_floats(specs)
        if len(data) != expected:
            raise _not_a_pair(cfg_path, weights_path, text, data, expected)
    layers = []
    for spec, line in specs:
        try:
            layers.append(build(spec))
        except FormatError as exc:  # sizes are valid: only allocation can fail
            count = sum(math.prod(s) for s in declared_arrays(spec).values())
            raise FormatError(
                f"{cfg_path}, line {line}: the layer declares {count} parameters "
                f"({count * 4 / 2**30:.3g} GiB), which cannot be allocated: "
                f"{exc.__cause__ or exc}"
            ) from None
    network = HarnessNetwork(layers, {"input_shape": list(input_shape)})
    if data is not None:
        header = _fill(network, data, weights_path, allow_nonfinite=allow_nonfinite)
    net_options = [[k, v] for k, v in sections[0].options.items()]
    network.metadata["darknet"] = {"header": header, "net": net_options}
    return network


def _header_of(head: dict[str, Any]) -> tuple[int, int, int, int]:
    """``(major, minor, revision, seen)``, checked against the fields' sizes."""
    values = []
    for key in ("major", "minor", "revision", "seen"):
        value = head.get(key)
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"header[{key!r}] must be an int; got {value!r}.")
        values.append(int(value))
    major, minor, revision, seen = values
    bits = 64 if _seen_is_64bit(major, minor) else 32
    if not all(-(2**31) <= v < 2**31 for v in values[:3]) or not 0 <= seen < 2**bits:
        raise ValueError(
            f"header {head!r} does not fit darknet's fields: major, minor and "
            f"revision are int32, seen a uint{bits} for this version."
        )
    return major, minor, revision, seen


def save(
    network: Any,
    weights_path: str | os.PathLike[str],
    cfg_path: str | os.PathLike[str] | None = None,
    *,
    header: dict[str, int] | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> None:
    """Write ``network`` as a darknet ``.weights`` file (and ``.cfg``), atomically.

    ``header`` defaults to the one the network was read with, else darknet's
    ``0.2.0`` with ``seen`` 0. The cfg needs ``input_shape`` (C, H, W) or
    (features,) unless the network records it; the shape is traced through the
    network first (:func:`batchnorm.io.check_input_shape`), so a wrong one writes
    nothing.

    The two files are one pair: both are written completely before either is
    renamed into place, concurrent savers rename their pairs one at a time, and
    the cfg's first line (a comment, which darknet skips) names the ``.weights``
    written with it and its sha256. A ``.weights`` saved later without a cfg
    still loads with that cfg when the structure is the same.

    Warns (``UserWarning``) when a standalone BatchNorm has β ≠ 0 (darknet stores
    none) or a BatchNorm's conventions differ from darknet's (its statistics will
    be used with ε = 1e-6 added to √var).
    """
    layers = layers_of(network)
    meta = dict(getattr(network, "metadata", {}) or {})
    darknet_meta = meta.get("darknet", {})
    major, minor, revision, seen = _header_of(
        dict(header or darknet_meta.get("header") or DEFAULT_HEADER)
    )
    text = None
    if cfg_path is not None:
        shape = input_shape or tuple(meta.get("input_shape") or ())
        if not shape:
            raise ValueError(
                "save(cfg_path=...) needs input_shape=(C, H, W) or (features,)."
            )
        check_input_shape(network, shape)
        text = cfg.write_text(layers, tuple(shape), darknet_meta.get("net"))
    layout = weights_layout(network)
    _warn_conventions(layers)
    chunks = [
        struct.pack("<iii", major, minor, revision),
        struct.pack("<Q" if _seen_is_64bit(major, minor) else "<I", seen),
    ]
    for owner, name, shape in layout:
        value = getattr(owner, name)
        if value is None:  # non-affine BatchNorm: γ = 1, β = 0
            value = np.full(shape, 1.0 if name == "gamma" else 0.0)
        value = np.asarray(value, dtype="<f4")
        if _transposed(major, minor) and isinstance(owner, Linear) and name == "weight":
            value = value.T
        chunks.append(np.ascontiguousarray(value).tobytes())
    weights = b"".join(chunks)
    del chunks
    if text is None or cfg_path is None:
        atomic_write(weights_path, lambda file: file.write(weights))
        return
    encoded = f"{_tie(weights_path, weights)}\n{text}".encode()
    atomic_write_all(
        [
            (weights_path, lambda file: file.write(weights)),
            (cfg_path, lambda file: file.write(encoded)),
        ]
    )


def _warn_conventions(layers: list[Any]) -> None:
    preset = PRESETS["darknet"]
    for i, layer in enumerate(layers):
        if not isinstance(layer, BatchNorm):
            continue
        previous = layers[i - 1] if i > 0 else None
        if (
            not (isinstance(previous, Conv2d | Linear) and previous.bias is None)
            and layer.beta is not None
            and np.any(layer.beta != 0)
        ):
            warnings.warn(
                f"layer {i}: darknet's [batchnorm] stores no β; its nonzero β is "
                "dropped (fold it into the next layer's bias first).",
                UserWarning,
                stacklevel=3,
            )
        if layer.eps != preset["eps"] or layer.eps_placement != preset["eps_placement"]:
            warnings.warn(
                f"layer {i}: BatchNorm uses eps={layer.eps} ({layer.eps_placement} the "
                "root); darknet will use its statistics with 1e-6 added to √var.",
                UserWarning,
                stacklevel=3,
            )
