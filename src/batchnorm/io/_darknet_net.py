"""Any darknet network: every section pjreddie's ``parser.c`` parses, its shapes and
its ``.weights`` layout, read and written byte for byte.

The rules follow pjreddie/darknet (``parse_network_cfg``, ``load_weights_upto`` and
each ``make_*_layer``):

- a cfg line is stripped of its whitespace; ``#`` and ``;`` start a comment; an
  option's first occurrence in a section wins (``option_find``); integers and
  reals are read as C's ``atoi``/``atof`` read them;
- every layer sees the previous layer's ``(out_h, out_w, out_c, outputs)``
  (:class:`Shape`); layers that need an image check ``h``, ``w`` and ``c``;
- the weights come in layer order; only convolutional, deconvolutional,
  connected, batchnorm, local and the recurrent layers (rnn, gru, lstm, crnn,
  through their convolutional or connected sub-layers) hold any. A layer with
  ``dontload=1`` reads nothing, ``numload=N`` reads N filters, and
  ``dontloadscales=1`` skips the three batch-normalization arrays, as the loader
  does.

Where darknet would read past a buffer or divide by zero (a route to a later
layer, a zero stride), we raise :class:`FormatError` naming the line.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from batchnorm.io._atomic import atomic_write, atomic_write_all, read_together
from batchnorm.io._darknet_layers import (
    DIALECTS,
    Layer,
    Section,
    Shape,
    decode,
    layers,
    sections,
)
from batchnorm.io._structure import FormatError
from batchnorm.layer import BatchNorm

__all__ = [
    "DEFAULT_HEADER",
    "DIALECTS",
    "Header",
    "Network",
    "parse",
    "read",
    "read_cfg",
    "read_files",
    "synthetic",
    "write",
]


class Header(NamedTuple):
    """A ``.weights`` header: version ``major.minor.revision`` and ``seen``
    (images trained on), stored as uint64 from version 0.2 and as uint32 before
    (and when ``major`` or ``minor`` is 1000 or more)."""

    major: int
    minor: int
    revision: int
    seen: int

    @property
    def seen_bytes(self) -> int:
        return 8 if _seen_is_64bit(self.major, self.minor) else 4

    @property
    def size(self) -> int:
        """Bytes of the header in the file."""
        return 12 + self.seen_bytes

    @property
    def transpose(self) -> bool:
        """Whether connected weights are stored (inputs, outputs)."""
        return self.major > 1000 or self.minor > 1000

    def pack(self) -> bytes:
        fmt = "<iiiQ" if self.seen_bytes == 8 else "<iiiI"
        try:
            return struct.pack(fmt, *self)
        except struct.error:
            raise ValueError(
                f"header {tuple(self)} does not fit darknet's fields: major, minor "
                f"and revision are int32, seen a uint{8 * self.seen_bytes} for this "
                "version."
            ) from None


def _seen_is_64bit(major: int, minor: int) -> bool:
    return major * 10 + minor >= 2 and major < 1000 and minor < 1000


#: What darknet writes today: version 0.2.0, seen 0.
DEFAULT_HEADER = Header(0, 2, 0, 0)


@dataclass(eq=False)
class Network:
    """A darknet network: its cfg, its layers with shapes and arrays, its header.

    ``cfg_text`` is the cfg as read (written back unchanged); ``net`` holds the
    ``[net]`` section's options; ``header`` is None until weights are read.
    """

    cfg_text: str
    source: str
    net: list[tuple[str, str, int]]
    input: Shape
    layers: list[Layer]
    header: Header | None = None
    dialect: str = "pjreddie"

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Layer:
        return self.layers[index]

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def weights_size(self, header: Header | None = None) -> int:
        """Bytes of the ``.weights`` file this cfg implies, header included."""
        head = header or self.header or DEFAULT_HEADER
        return head.size + 4 * sum(
            math.prod(s) for layer in self.layers for s in layer.shapes.values()
        )

    def batch_norms(self) -> Iterator[tuple[Layer, str, BatchNorm]]:
        """``(layer, unit prefix, BatchNorm)`` for every normalization, in order."""
        for layer in self.layers:
            for prefix, norm in layer.batch_norms().items():
                yield layer, prefix, norm

    def __repr__(self) -> str:
        return (
            f"darknet.Network({self.source!r}, {len(self.layers)} layers, "
            f"{self.weights_size() - (self.header or DEFAULT_HEADER).size} bytes of "
            "weights)"
        )


# -- reading --------------------------------------------------------------------


def _check_dialect(dialect: str) -> str:
    if dialect not in DIALECTS:
        raise ValueError(
            f"dialect must be one of {', '.join(map(repr, DIALECTS))}; got {dialect!r}."
        )
    return dialect


def parse(text: str, source: str, header: Header | None, dialect: str) -> Network:
    """The network a cfg ``text`` describes (no arrays); ``header`` decides
    whether connected weights are stored transposed."""
    return _network(text, source, sections(text, source), header, dialect)


def _network(
    text: str,
    source: str,
    parsed: list[Section],
    header: Header | None,
    dialect: str,
) -> Network:
    transpose = header.transpose if header else False
    first, found = layers(parsed, source, transpose, dialect)
    return Network(text, source, list(parsed[0].options), first, found, header, dialect)


def read_cfg(cfg_path: str | os.PathLike[str], *, dialect: str = "pjreddie") -> Network:
    """A network's structure from its ``.cfg``: layers, shapes, array shapes.

    No arrays are read (:attr:`Layer.arrays` stays empty); :meth:`Network.weights_size`
    tells how large its ``.weights`` must be.
    """
    _check_dialect(dialect)
    data = read_files([cfg_path])[0]
    return parse(decode(data, str(cfg_path)), str(cfg_path), None, dialect)


def read_files(paths: list[Any]) -> list[bytes]:
    """The bytes of files written together (a cfg and its weights), or
    FormatError naming the file that cannot be read (FileNotFoundError as is)."""
    try:
        return read_together(paths)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FormatError(
            f"{exc.filename}: cannot read: {exc.strerror or exc}."
        ) from None


def _read_header(raw: bytes, path: Any, size: int) -> Header:
    if size < 12:
        raise FormatError(
            f"{path}: {size} bytes is shorter than a darknet .weights header."
        )
    major, minor, revision = struct.unpack_from("<iii", raw, 0)
    seen_bytes = 8 if _seen_is_64bit(major, minor) else 4
    if size < 12 + seen_bytes:
        raise FormatError(
            f"{path}: the header of version {major}.{minor}.{revision} needs "
            f"{12 + seen_bytes} bytes; the file has {size}."
        )
    (seen,) = struct.unpack_from("<Q" if seen_bytes == 8 else "<I", raw, 12)
    return Header(major, minor, revision, int(seen))


def _size_error(network: Network, path: Any, size: int) -> FormatError:
    """Which layer ran out (or how much is left over) in a file of ``size`` bytes."""
    header = network.header or DEFAULT_HEADER
    expected = network.weights_size()
    offset = header.size
    last = None
    for layer in network.layers:
        for name, shape in layer.shapes.items():
            end = offset + 4 * math.prod(shape)
            if end > size:
                missing = expected - size
                return FormatError(
                    f"{path}: too short for {network.source}: layer {layer.index} "
                    f"[{layer.section}] (line {layer.line}) runs out in its {name} "
                    f"{shape}, which needs bytes {offset}..{end} of a {size}-byte "
                    f"file; {missing} bytes are missing (the cfg implies {expected})."
                    " The .weights file is truncated or belongs to another network."
                )
            offset = end
            last = layer
    where = (
        f"layer {last.index} [{last.section}] (line {last.line})"
        if last
        else "the header (the cfg has no layer with weights)"
    )
    return FormatError(
        f"{path}: too long for {network.source}: {size - expected} bytes are left "
        f"over after {where}, the last with weights (the cfg implies {expected} "
        f"bytes, the file has {size}). The .weights file belongs to another network "
        "or another darknet dialect."
    )


def read(
    cfg_path: str | os.PathLike[str],
    weights_path: str | os.PathLike[str],
    *,
    dialect: str = "pjreddie",
    mmap: bool = False,
) -> Network:
    """A darknet network with its weights: any cfg pjreddie's darknet parses.

    The ``.weights`` file is read in one pass into one float32 buffer (or, with
    ``mmap=True``, mapped copy-on-write: changing an array never touches the
    file); every layer's arrays are views of it, named as darknet names them
    (``biases``, ``scales``, ``rolling_mean``, ``rolling_variance``,
    ``weights``; sub-layers prefixed, ``"wz.biases"``) and shaped as darknet
    uses them (convolutional weights ``(n, c/groups, size, size)``, connected
    ``(outputs, inputs)``, or as stored when ``flipped=1`` or the header
    transposes). :meth:`Layer.batch_norms` gives each normalization as our
    :class:`batchnorm.BatchNorm`.

    ``dialect="alexeyab"`` reads a standalone ``[batchnorm]`` with its biases
    first, as AlexeyAB's fork writes it, and uses that fork's ε in
    :meth:`Layer.batch_norms` and :func:`fold`; the cfg must still be one
    pjreddie's parser accepts.

    Raises
    ------
    batchnorm.io.FormatError
        A cfg darknet cannot parse (naming its line), shapes that do not fit,
        or a ``.weights`` file too short or too long for the cfg: the message
        names the layer that runs out and how many bytes are missing, or how
        many are left over.
    """
    _check_dialect(dialect)
    cfg_raw = read_files([cfg_path])[0]
    text = decode(cfg_raw, str(cfg_path))
    parsed = sections(text, str(cfg_path))
    try:
        file = open(weights_path, "rb")
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FormatError(
            f"{weights_path}: cannot read: {exc.strerror or exc}."
        ) from None
    with file:
        size = os.fstat(file.fileno()).st_size
        head = file.read(20)
        header = _read_header(head, weights_path, size)
        network = _network(text, str(cfg_path), parsed, header, dialect)
        expected = network.weights_size()
        if size != expected:
            raise _size_error(network, weights_path, size)
        count = (size - header.size) // 4
        values: np.ndarray
        if mmap and count:
            values = np.memmap(
                weights_path, dtype="<f4", mode="c", offset=header.size, shape=(count,)
            )
        else:
            values = np.empty(count, "<f4")
            file.seek(header.size)
            got = file.readinto(values.data.cast("B"))
            if got != 4 * count:
                raise FormatError(
                    f"{weights_path}: the file changed while it was read "
                    f"({got} of {4 * count} bytes)."
                )
    offset = 0
    for layer in network.layers:
        for name, shape in layer.shapes.items():
            n = math.prod(shape)
            layer.arrays[name] = values[offset : offset + n].reshape(shape)
            offset += n
    return network


# -- writing ------------------------------------------------------------------


def _checked_arrays(network: Network) -> list[np.ndarray]:
    out = []
    for layer in network.layers:
        for name, shape in layer.shapes.items():
            value = layer.arrays.get(name)
            if value is None:
                raise ValueError(
                    f"layer {layer.index} [{layer.section}] has no array {name!r}; "
                    "read the network with its .weights (darknet.read) before "
                    "writing it."
                )
            value = np.asarray(value)
            if value.shape != shape:
                raise ValueError(
                    f"layer {layer.index} [{layer.section}] array {name!r} has shape "
                    f"{value.shape}; its cfg needs {shape}."
                )
            out.append(value)
    return out


def write(
    network: Network,
    weights_path: str | os.PathLike[str],
    cfg_path: str | os.PathLike[str] | None = None,
) -> None:
    """Write ``network``'s ``.weights`` (and its cfg text), atomically.

    The header and every array are written in the order :func:`read` reads
    them, as little-endian float32: reading a file and writing it back gives the
    same bytes. With ``cfg_path`` both files are written completely before
    either replaces its target (a crash leaves both old or both new).

    Raises
    ------
    ValueError
        An array is missing or does not have the shape the cfg implies (nothing
        is written).
    """
    if not isinstance(network, Network):
        raise TypeError(
            f"network must be a batchnorm.io.darknet.Network (from darknet.read); "
            f"got {type(network).__name__}. For a harness network use darknet.save."
        )
    header = (network.header or DEFAULT_HEADER).pack()
    arrays = _checked_arrays(network)

    def weights(file: Any) -> None:
        file.write(header)
        for value in arrays:
            file.write(np.ascontiguousarray(value, dtype="<f4").data.cast("B"))

    if cfg_path is None:
        atomic_write(weights_path, weights)
        return
    encoded = network.cfg_text.encode()
    atomic_write_all(
        [(weights_path, weights), (cfg_path, lambda file: file.write(encoded))]
    )


def synthetic(
    cfg_path: str | os.PathLike[str],
    *,
    seed: int = 0,
    dialect: str = "pjreddie",
    header: Header = DEFAULT_HEADER,
) -> Network:
    """A network for ``cfg_path`` with random, plausible arrays: for trying tools
    on a real network's shape without its trained file.

    Weights are He-normal as darknet initializes them (``√(2 / fan-in)``), biases
    N(0, 0.1²), scales N(1, 0.1²), rolling means N(0, 0.5²) and rolling
    variances ``exp(N(0, 0.5²))`` (positive). Deterministic for a ``seed``.

    >>> import tempfile, pathlib
    >>> cfg = pathlib.Path(tempfile.mkdtemp()) / "t.cfg"
    >>> _ = cfg.write_text("[net]\\nheight=8\\nwidth=8\\nchannels=3\\n"
    ...                    "[convolutional]\\nfilters=4\\nsize=3\\n")
    >>> net = synthetic(cfg)
    >>> {name: a.shape for name, a in net[0].arrays.items()}["weights"]
    (4, 3, 3, 3)
    """
    network = read_cfg(cfg_path, dialect=dialect)
    network.header = header
    if header.transpose:  # connected weights are stored (inputs, outputs)
        network = parse(network.cfg_text, network.source, header, dialect)
    rng = np.random.default_rng(seed)
    for layer in network.layers:
        for unit in layer.units:
            for role, name in unit.names.items():
                shape = layer.shapes[name]
                if role == "weights":
                    scale = math.sqrt(2.0 / max(unit.inputs, 1))
                    value = rng.normal(0.0, scale, shape)
                elif role == "scales":
                    value = rng.normal(1.0, 0.1, shape)
                elif role == "rolling_mean":
                    value = rng.normal(0.0, 0.5, shape)
                elif role == "rolling_variance":
                    value = np.exp(rng.normal(0.0, 0.5, shape))
                else:
                    value = rng.normal(0.0, 0.1, shape)
                layer.arrays[name] = value.astype("<f4")
    return network
