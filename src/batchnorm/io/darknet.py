"""darknet interop: ``.cfg`` networks and byte-compatible ``.weights`` files.

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

import os
import struct
import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np

from batchnorm.io import _darknet_cfg as cfg
from batchnorm.io._atomic import atomic_write
from batchnorm.io._structure import FormatError, Network, layers_of
from batchnorm.layer import BatchNorm
from batchnorm.nn.conv import Conv2d
from batchnorm.nn.layers import Linear
from batchnorm.presets import PRESETS

__all__ = ["DEFAULT_HEADER", "load", "save", "weights_layout"]

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


def read_weights(
    network: Any, path: str | os.PathLike[str], *, allow_nonfinite: bool = False
) -> dict[str, int]:
    """Fill ``network`` from a ``.weights`` file; return its header. All or nothing."""
    data = Path(path).read_bytes()
    if len(data) < 16:
        raise FormatError(
            f"{path}: {len(data)} bytes is shorter than a darknet header."
        )
    major, minor, revision = struct.unpack_from("<iii", data, 0)
    wide = _seen_is_64bit(major, minor)
    if len(data) < _header_size(major, minor):
        raise FormatError(f"{path}: truncated header ({len(data)} bytes).")
    (seen,) = struct.unpack_from("<Q" if wide else "<I", data, 12)
    layout = weights_layout(network)
    expected = _header_size(major, minor) + 4 * sum(
        int(np.prod(s)) for _, _, s in layout
    )
    if len(data) != expected:
        raise FormatError(
            f"{path}: the file has {len(data)} bytes but the cfg implies {expected} "
            f"({'shorter' if len(data) < expected else 'longer'}); the .weights file "
            "does not belong to this .cfg."
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
    return {"major": major, "minor": minor, "revision": revision, "seen": int(seen)}


def load(
    cfg_path: str | os.PathLike[str],
    weights_path: str | os.PathLike[str] | None = None,
    *,
    allow_nonfinite: bool = False,
) -> Network:
    """A harness network from a darknet ``.cfg`` and (optionally) its ``.weights``.

    BatchNorm layers use the ``"darknet"`` preset, so ``network.eval()`` computes
    what darknet computes at test time: ``(x − mean) / (√var + 1e-6) · γ + β``.

    Raises
    ------
    batchnorm.io.FormatError
        Unknown sections or options (with their line), a weights file whose size
        differs from what the cfg implies (both sizes), non-finite statistics.

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
    sections = cfg.read(cfg_path)
    layers, input_shape = cfg.build_layers(sections, str(cfg_path))
    net_options = [[k, v] for k, v in sections[0].options.items()]
    network = Network(layers, {"input_shape": list(input_shape)})
    header = dict(DEFAULT_HEADER)
    if weights_path is not None:
        header = read_weights(network, weights_path, allow_nonfinite=allow_nonfinite)
    network.metadata["darknet"] = {"header": header, "net": net_options}
    return network


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
    (features,) unless the network records it.

    Warns (``UserWarning``) when a standalone BatchNorm has β ≠ 0 (darknet stores
    none) or a BatchNorm's conventions differ from darknet's (its statistics will
    be used with ε = 1e-6 added to √var).
    """
    layers = layers_of(network)
    meta = dict(getattr(network, "metadata", {}) or {})
    darknet_meta = meta.get("darknet", {})
    head = dict(header or darknet_meta.get("header") or DEFAULT_HEADER)
    major, minor, revision, seen = (
        int(head[k]) for k in ("major", "minor", "revision", "seen")
    )
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
    text = None
    if cfg_path is not None:
        shape = input_shape or tuple(meta.get("input_shape") or ())
        if not shape:
            raise ValueError(
                "save(cfg_path=...) needs input_shape=(C, H, W) or (features,)."
            )
        text = cfg.write_text(layers, tuple(shape), darknet_meta.get("net"))

    def write(file: IO[bytes]) -> None:
        for chunk in chunks:
            file.write(chunk)

    atomic_write(weights_path, write)
    if cfg_path is not None and text is not None:
        encoded = text.encode("utf-8")
        atomic_write(cfg_path, lambda file: file.write(encoded))


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
