"""darknet cfg sections as layers: shapes and ``.weights`` arrays, as pjreddie's
``parser.c`` and each ``make_*_layer`` compute them (see :mod:`batchnorm.io.darknet`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from batchnorm.io._darknet_cfg import decode
from batchnorm.io._structure import FormatError
from batchnorm.layer import BatchNorm

__all__ = [
    "DIALECTS",
    "INT_MAX",
    "Layer",
    "Section",
    "Shape",
    "Unit",
    "decode",
    "layers",
    "sections",
]

#: darknets whose ``.weights`` and normalization differ: pjreddie's original and
#: AlexeyAB's fork (standalone ``[batchnorm]`` stores biases first there).
DIALECTS = ("pjreddie", "alexeyab")

# section name as written -> canonical type (pjreddie's string_to_layer_type)
_TYPES = {
    "shortcut": "shortcut",
    "crop": "crop",
    "cost": "cost",
    "detection": "detection",
    "region": "region",
    "yolo": "yolo",
    "iseg": "iseg",
    "local": "local",
    "conv": "convolutional",
    "convolutional": "convolutional",
    "deconv": "deconvolutional",
    "deconvolutional": "deconvolutional",
    "activation": "activation",
    "logistic": "logistic",
    "l2norm": "l2norm",
    "net": "net",
    "network": "net",
    "crnn": "crnn",
    "gru": "gru",
    "lstm": "lstm",
    "rnn": "rnn",
    "conn": "connected",
    "connected": "connected",
    "max": "maxpool",
    "maxpool": "maxpool",
    "reorg": "reorg",
    "avg": "avgpool",
    "avgpool": "avgpool",
    "dropout": "dropout",
    "lrn": "normalization",
    "normalization": "normalization",
    "batchnorm": "batchnorm",
    "soft": "softmax",
    "softmax": "softmax",
    "route": "route",
    "upsample": "upsample",
}

#: Largest sizes we accept: darknet keeps them in C ints.
INT_MAX = 2**31 - 1


class Shape(NamedTuple):
    """What darknet passes from one layer to the next: ``out_h, out_w, out_c``
    and ``outputs`` (values per sample; not always ``h·w·c``: 0 dimensions mean
    "not an image", as after a connected or cost layer)."""

    h: int
    w: int
    c: int
    size: int


@dataclass(frozen=True)
class Unit:
    """One convolutional, connected, local or batchnorm computation inside a layer.

    A ``[convolutional]`` layer is one unit with an empty ``prefix``; an
    ``[lstm]`` is eight connected units ``wi.`` … ``ug.``. ``arrays`` names the
    unit's arrays (with the prefix) in file order; ``channels`` is the number
    of outputs it normalizes when ``batch_normalize``.
    """

    prefix: str
    kind: str  # "convolutional", "deconvolutional", "connected", "local", "batchnorm"
    channels: int
    inputs: int
    batch_normalize: bool
    arrays: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def names(self) -> dict[str, str]:
        """Role (``"scales"``…) → array name."""
        return {name[len(self.prefix) :]: name for name, _ in self.arrays}


@dataclass(eq=False)
class Layer:
    """One section of the cfg after ``[net]``: darknet's layer ``index``."""

    index: int
    type: str
    section: str
    line: int
    options: list[tuple[str, str, int]]
    input: Shape
    output: Shape
    units: tuple[Unit, ...] = ()
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    dialect: str = "pjreddie"
    sources: tuple[int, ...] = ()

    def option(self, key: str) -> str | None:
        """The first value of ``key`` in the section (darknet's ``option_find``)."""
        for k, v, _ in self.options:
            if k == key:
                return v
        return None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every array's name and shape, in file order."""
        return {name: shape for unit in self.units for name, shape in unit.arrays}

    @property
    def batch_normalize(self) -> bool:
        return any(u.batch_normalize for u in self.units)

    def batch_norms(self) -> dict[str, BatchNorm]:
        """Each unit's normalization as our :class:`batchnorm.BatchNorm`.

        The keys are the unit prefixes (``""`` for a convolutional layer). The
        layers use the ``"darknet"`` preset (ε = 1e-6 added to √var, or the
        ``alexeyab`` dialect's 1e-5 under the root) in eval mode, with γ the
        layer's ``scales``, β its ``biases`` (0 for a pjreddie ``[batchnorm]``,
        which stores none), and darknet's rolling statistics.
        """
        out = {}
        for unit in self.units:
            if not unit.batch_normalize or not self.arrays:
                continue
            names = unit.names
            norm = BatchNorm.from_preset(
                "darknet", unit.channels, **_dialect_eps(self.dialect)
            )
            norm.gamma = np.array(self.arrays[names["scales"]], np.float32)
            beta = self.arrays.get(names.get("biases", ""))
            norm.beta = (
                np.zeros(unit.channels, np.float32)
                if beta is None
                else np.array(beta, np.float32)
            )
            norm.running_mean = np.array(self.arrays[names["rolling_mean"]], np.float32)
            norm.running_var = np.array(
                self.arrays[names["rolling_variance"]], np.float32
            )
            norm.eval()
            out[unit.prefix] = norm
        return out

    def __repr__(self) -> str:
        o = self.output
        return (
            f"Layer({self.index}, [{self.type}], line {self.line}, "
            f"out {o.h}x{o.w}x{o.c} ({o.size}))"
        )


def _dialect_eps(dialect: str) -> dict[str, Any]:
    if dialect == "alexeyab":
        return {"eps": 1e-5, "eps_placement": "inside"}
    return {}


# -- the cfg ------------------------------------------------------------------


@dataclass
class Section:
    name: str  # as written, without brackets
    line: int
    options: list[tuple[str, str, int]] = field(default_factory=list)


def sections(text: str, source: str) -> list[Section]:
    found: list[Section] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = "".join(raw.split())
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]") or line[1:-1] not in _TYPES:
                raise FormatError(
                    f"{source}, line {number}: section {raw.strip()!r} is not a "
                    "layer type darknet knows (pjreddie's parser.c); known: "
                    f"{', '.join(f'[{t}]' for t in _TYPES)}."
                )
            found.append(Section(line[1:-1], number))
            continue
        if "=" not in line or line.endswith("="):
            raise FormatError(
                f"{source}, line {number}: cannot parse {raw.strip()!r}; darknet "
                "options are key=value."
            )
        if not found:
            raise FormatError(
                f"{source}, line {number}: option {raw.strip()!r} before any section."
            )
        key, value = line.split("=", 1)
        found[-1].options.append((key, value, number))
    if not found or _TYPES[found[0].name] != "net":
        raise FormatError(f"{source}: the first section must be [net] or [network].")
    return found


_INT = re.compile(r"[+-]?\d+")
_REAL = re.compile(
    r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|nan)", re.I
)


class _Options:
    """A section's options read as darknet reads them, with our checks."""

    def __init__(self, section: Section, source: str, kind: str) -> None:
        self.section, self.source, self.kind = section, source, kind

    def raw(self, key: str) -> tuple[str, int] | None:
        for k, v, line in self.section.options:
            if k == key:
                return v, line
        return None

    def where(self, key: str | None = None) -> str:
        found = self.raw(key) if key else None
        line = found[1] if found else self.section.line
        return f"{self.source}, line {line}: [{self.section.name}]"

    def integer(self, key: str, default: int, minimum: int = -INT_MAX) -> int:
        found = self.raw(key)
        if found is None:
            return default
        match = _INT.match(found[0])  # atoi: leading digits, else 0
        value = int(match.group()) if match else 0
        if not -INT_MAX - 1 <= value <= INT_MAX:
            raise FormatError(f"{self.where(key)} {key}={found[0]} is not a C int.")
        if value < minimum:
            raise FormatError(
                f"{self.where(key)} {key}= must be >= {minimum}; got {found[0]!r}."
            )
        return value

    def real(self, key: str, default: float) -> float:
        found = self.raw(key)
        if found is None:
            return default
        match = _REAL.match(found[0])  # atof
        return float(match.group()) if match else 0.0


def _cdiv(a: int, b: int) -> int:
    """C's integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _conv_unit(
    prefix: str,
    kind: str,
    n: int,
    c: int,
    size: int,
    groups: int,
    bn: bool,
    *,
    flipped: bool = False,
    load_scales: bool = True,
) -> Unit:
    per = _cdiv(c, groups) * size * size
    weights: tuple[int, ...] = (n, _cdiv(c, groups), size, size)
    if flipped:  # stored as the transpose of a (c·size², n) matrix
        weights = (per, n)
    elif kind == "deconvolutional":  # the gemm reads a (c, n·size²) matrix
        weights = (c, n, size, size)
    arrays: list[tuple[str, tuple[int, ...]]] = [(f"{prefix}biases", (n,))]
    if bn and load_scales:
        arrays += [(f"{prefix}{k}", (n,)) for k in _BN]
    arrays.append((f"{prefix}weights", weights))
    return Unit(prefix, kind, n, per, bn and load_scales, tuple(arrays))


def _connected_unit(
    prefix: str, inputs: int, outputs: int, bn: bool, transpose: bool, load_scales: bool
) -> Unit:
    arrays = [
        (f"{prefix}biases", (outputs,)),
        (f"{prefix}weights", (inputs, outputs) if transpose else (outputs, inputs)),
    ]
    if bn and load_scales:
        arrays += [(f"{prefix}{k}", (outputs,)) for k in _BN]
    return Unit(prefix, "connected", outputs, inputs, bn and load_scales, tuple(arrays))


_BN = ("scales", "rolling_mean", "rolling_variance")


def layers(
    parsed: list[Section], source: str, transpose: bool, dialect: str
) -> tuple[Shape, list[Layer]]:
    net = _Options(parsed[0], source, "net")
    h, w = net.integer("height", 0, 0), net.integer("width", 0, 0)
    c = net.integer("channels", 0, 0)
    inputs = net.integer("inputs", h * w * c, 0)
    if not inputs and not (h and w and c):
        raise FormatError(
            f"{source}, line {parsed[0].line}: [net] gives no input size; set "
            "width, height and channels, or inputs."
        )
    first = Shape(h, w, c, inputs)
    shape, out = first, list[Layer]()
    for index, section in enumerate(parsed[1:]):
        kind = _TYPES[section.name]
        opts = _Options(section, source, kind)
        layer = _layer(index, kind, opts, shape, out, transpose, dialect)
        for dim in layer.output:
            if not 0 <= dim <= INT_MAX:
                raise FormatError(
                    f"{opts.where()} output {tuple(layer.output)} does not fit "
                    "darknet's C ints; the sizes in the cfg are too large."
                )
        for name, s in layer.shapes.items():
            if min(s, default=1) < 0 or math.prod(s) > INT_MAX:
                raise FormatError(
                    f"{opts.where()} array {name} of shape {s} is out of range."
                )
        out.append(layer)
        shape = layer.output
    return first, out


def _need_image(opts: _Options, shape: Shape) -> None:
    if not (shape.h and shape.w and shape.c):
        raise FormatError(
            f"{opts.where()}: the layer before must output an image; it outputs "
            f"{shape.h}x{shape.w}x{shape.c} ({shape.size} values)."
        )


def _positive(opts: _Options, key: str, value: int) -> int:
    if value < 1:
        raise FormatError(f"{opts.where(key)} {key}= must be >= 1; got {value}.")
    return value


def _index(opts: _Options, key: str, text: str, here: int) -> int:
    match = _INT.match(text)
    index = int(match.group()) if match else 0
    target = here + index if index < 0 else index
    if not 0 <= target < here:
        raise FormatError(
            f"{opts.where(key)} {key}= refers to layer {target} (from {text!r}); "
            f"layer {here} can only use layers 0..{here - 1}."
        )
    return target


def _layer(
    index: int,
    kind: str,
    opts: _Options,
    shape: Shape,
    before: list[Layer],
    transpose: bool,
    dialect: str,
) -> Layer:
    h, w, c, inputs = shape
    units: list[Unit] = []
    sources: tuple[int, ...] = ()
    bn = opts.integer("batch_normalize", 0) != 0
    # dontloadscales is set on the layer itself; a recurrent layer's sub-layers
    # are made afresh (all zero) and load their scales regardless.
    load_scales = not opts.integer("dontloadscales", 0)
    if kind in ("convolutional", "deconvolutional"):
        _need_image(opts, shape)
        n = _positive(opts, "filters", opts.integer("filters", 1))
        size = _positive(opts, "size", opts.integer("size", 1))
        stride = _positive(opts, "stride", opts.integer("stride", 1))
        padding = opts.integer("padding", 0)
        if opts.integer("pad", 0):
            padding = size // 2
        groups = 1
        if kind == "convolutional":
            groups = _positive(opts, "groups", opts.integer("groups", 1))
            oh = _cdiv(h + 2 * padding - size, stride) + 1
            ow = _cdiv(w + 2 * padding - size, stride) + 1
        else:  # pjreddie's deconvolution has no groups
            oh = (h - 1) * stride + size - 2 * padding
            ow = (w - 1) * stride + size - 2 * padding
        if oh < 1 or ow < 1:
            raise FormatError(
                f"{opts.where()}: size={size} stride={stride} padding={padding} on a "
                f"{h}x{w} input gives a {oh}x{ow} output."
            )
        numload = opts.integer("numload", 0, 0)
        flipped = bool(opts.integer("flipped", 0)) and kind == "convolutional"
        if flipped and groups != 1:
            raise FormatError(
                f"{opts.where('flipped')} flipped=1 with groups={groups}: darknet "
                "transposes a c·size²×n matrix that the grouped weights do not fill."
            )
        units.append(
            _conv_unit(
                "",
                kind,
                numload or n,
                c,
                size,
                groups,
                bn,
                flipped=flipped,
                load_scales=load_scales,
            )
        )
        out = Shape(oh, ow, n, oh * ow * n)
    elif kind == "local":
        _need_image(opts, shape)
        n = _positive(opts, "filters", opts.integer("filters", 1))
        size = _positive(opts, "size", opts.integer("size", 1))
        stride = _positive(opts, "stride", opts.integer("stride", 1))
        pad = opts.integer("pad", 0)
        oh = _cdiv(h - (1 if pad else size), stride) + 1
        ow = _cdiv(w - (1 if pad else size), stride) + 1
        if oh < 1 or ow < 1:
            raise FormatError(
                f"{opts.where()}: size={size} on {h}x{w} gives no output."
            )
        out = Shape(oh, ow, n, oh * ow * n)
        arrays: tuple[tuple[str, tuple[int, ...]], ...] = (
            ("biases", (out.size,)),
            ("weights", (oh * ow, n, c * size * size)),
        )
        units.append(Unit("", "local", n, c * size * size, False, arrays))
    elif kind == "connected":
        outputs = _positive(opts, "output", opts.integer("output", 1))
        units.append(_connected_unit("", inputs, outputs, bn, transpose, load_scales))
        out = Shape(1, 1, outputs, outputs)
    elif kind == "rnn":
        outputs = _positive(opts, "output", opts.integer("output", 1))
        for prefix, n_in in (
            ("input_layer.", inputs),
            ("self_layer.", outputs),
            ("output_layer.", outputs),
        ):
            units.append(_connected_unit(prefix, n_in, outputs, bn, transpose, True))
        out = Shape(0, 0, 0, outputs)
    elif kind in ("gru", "lstm"):
        outputs = _positive(opts, "output", opts.integer("output", 1))
        order = (
            ("wz", "wr", "wh", "uz", "ur", "uh")
            if kind == "gru"
            else ("wi", "wf", "wo", "wg", "ui", "uf", "uo", "ug")
        )
        for name in order:  # w*: state -> state, u*: input -> state
            n_in = outputs if name[0] == "w" else inputs
            units.append(
                _connected_unit(f"{name}.", n_in, outputs, bn, transpose, True)
            )
        out = Shape(0, 0, 0, outputs)
    elif kind == "crnn":
        _need_image(opts, shape)
        hidden = _positive(opts, "hidden_filters", opts.integer("hidden_filters", 1))
        output = _positive(opts, "output_filters", opts.integer("output_filters", 1))
        for prefix, n_in, n_out in (
            ("input_layer.", c, hidden),
            ("self_layer.", hidden, hidden),
            ("output_layer.", hidden, output),
        ):
            units.append(
                _conv_unit(
                    prefix,
                    "convolutional",
                    n_out,
                    n_in,
                    3,
                    1,
                    bn,
                    load_scales=True,
                )
            )
        # parse_crnn passes (w, h) to make_crnn_layer(batch, h, w, ...): the
        # 3x3 same-size convolutions keep the size, the labels swap.
        out = Shape(w, h, output, h * w * output)
    elif kind == "batchnorm":
        stats: tuple[tuple[str, tuple[int, ...]], ...] = tuple((k, (c,)) for k in _BN)
        if dialect == "alexeyab":
            stats = (("biases", (c,)), *stats)
        units.append(Unit("", "batchnorm", c, c, True, stats))
        out = Shape(h, w, c, h * w * c)
    elif kind == "maxpool":
        _need_image(opts, shape)
        stride = _positive(opts, "stride", opts.integer("stride", 1))
        size = _positive(opts, "size", opts.integer("size", stride))
        padding = opts.integer("padding", size - 1)
        oh = _cdiv(h + padding - size, stride) + 1
        ow = _cdiv(w + padding - size, stride) + 1
        if oh < 1 or ow < 1:
            raise FormatError(
                f"{opts.where()}: size={size} stride={stride} padding={padding} on a "
                f"{h}x{w} input gives a {oh}x{ow} output."
            )
        out = Shape(oh, ow, c, oh * ow * c)
    elif kind == "avgpool":
        _need_image(opts, shape)
        out = Shape(1, 1, c, c)
    elif kind == "reorg":
        stride = _positive(opts, "stride", opts.integer("stride", 1))
        if opts.integer("reverse", 0):
            out = Shape(h * stride, w * stride, _cdiv(c, stride * stride), 0)
        else:
            out = Shape(_cdiv(h, stride), _cdiv(w, stride), c * stride * stride, 0)
        out = out._replace(size=out.h * out.w * out.c)
        extra = opts.integer("extra", 0)
        if extra:
            out = Shape(0, 0, 0, h * w * c + extra)
    elif kind == "upsample":
        stride = opts.integer("stride", 2)
        if stride == 0:
            raise FormatError(f"{opts.where('stride')} stride=0 divides by zero.")
        if stride > 0:
            out = Shape(h * stride, w * stride, c, 0)
        else:
            out = Shape(_cdiv(h, -stride), _cdiv(w, -stride), c, 0)
        out = out._replace(size=out.h * out.w * out.c)
    elif kind == "route":
        found = opts.raw("layers")
        if found is None:
            raise FormatError(f"{opts.where()}: a route needs layers=.")
        sources = tuple(
            _index(opts, "layers", part, index) for part in found[0].split(",")
        )
        first = before[sources[0]].output
        oh, ow, oc = first.h, first.w, first.c
        for j in sources[1:]:
            nxt = before[j].output
            if nxt.h == first.h and nxt.w == first.w:
                oc += nxt.c
            else:
                oh = ow = oc = 0
        out = Shape(oh, ow, oc, sum(before[j].output.size for j in sources))
    elif kind == "shortcut":
        found = opts.raw("from")
        if found is None:
            raise FormatError(f"{opts.where()}: a shortcut needs from=.")
        sources = (_index(opts, "from", found[0], index),)
        out = Shape(h, w, c, h * w * c)
    elif kind == "crop":
        _need_image(opts, shape)
        ch = _positive(opts, "crop_height", opts.integer("crop_height", 1))
        cw = _positive(opts, "crop_width", opts.integer("crop_width", 1))
        out = Shape(ch, cw, c, ch * cw * c)
    elif kind in ("region", "yolo", "iseg"):
        classes = opts.integer("classes", 20, 0)
        if kind == "region":
            coords = opts.integer("coords", 4, 0)
            num = opts.integer("num", 1, 0)
            oc = num * (classes + coords + 1)
        elif kind == "yolo":
            mask = opts.raw("mask")
            num = mask[0].count(",") + 1 if mask else opts.integer("num", 1, 0)
            oc = num * (classes + 4 + 1)
        else:
            oc = classes + opts.integer("ids", 32, 0)
        out = Shape(h, w, oc, h * w * oc)
        if out.size != inputs:
            raise FormatError(
                f"{opts.where()}: the layer expects {h}x{w}x{oc} = {out.size} inputs "
                f"and gets {inputs}; the previous layer's filters= do not fit "
                "classes= (and mask=, num=, coords=)."
            )
    elif kind == "detection":
        coords = opts.integer("coords", 1, 0)
        classes = opts.integer("classes", 1, 0)
        num = opts.integer("num", 1, 0)
        side = opts.integer("side", 7, 0)
        want = side * side * ((1 + coords) * num + classes)
        if want != inputs:
            raise FormatError(
                f"{opts.where()}: side² · ((1 + coords) · num + classes) = {want} "
                f"but the layer gets {inputs} inputs."
            )
        out = Shape(0, 0, 0, inputs)
    elif kind == "softmax":
        groups = _positive(opts, "groups", opts.integer("groups", 1))
        if inputs % groups:
            raise FormatError(
                f"{opts.where('groups')} groups={groups} does not divide the "
                f"{inputs} inputs."
            )
        out = Shape(0, 0, 0, inputs)
    elif kind == "cost":
        out = Shape(0, 0, 0, inputs)
    elif kind in ("dropout", "activation", "logistic", "l2norm", "normalization"):
        out = Shape(h, w, c, inputs)
    else:  # a second [net]
        raise FormatError(
            f"{opts.where()}: [{opts.section.name}] may only be the first section."
        )
    if opts.integer("dontload", 0):
        units = []
    return Layer(
        index,
        kind,
        opts.section.name,
        opts.section.line,
        list(opts.section.options),
        shape,
        out,
        tuple(units),
        dialect=dialect,
        sources=sources,
    )
