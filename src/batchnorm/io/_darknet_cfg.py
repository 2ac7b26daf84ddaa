"""darknet ``.cfg`` files: parse the subset the harness runs, build it, write it back.

Sections: ``[net]``/``[network]``, ``[convolutional]``/``[conv]``,
``[connected]``/``[conn]``, ``[batchnorm]``, ``[maxpool]``/``[max]``,
``[avgpool]``/``[avg]``, ``[softmax]``/``[soft]``. Lines are stripped of all
whitespace as darknet does; ``#`` and ``;`` start comment lines. Anything else (an
unknown section, an option the section does not take, an activation the harness
lacks, a maxpool that pads) raises :class:`batchnorm.io.FormatError` naming it and
its line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from batchnorm.io._structure import FormatError
from batchnorm.layer import BatchNorm
from batchnorm.nn.conv import Conv2d, GlobalAvgPool, MaxPool2d
from batchnorm.nn.layers import Flatten, LeakyReLU, Linear, ReLU, Sigmoid, Softmax
from batchnorm.presets import PRESETS

_SECTIONS = {
    "net": "net",
    "network": "net",
    "convolutional": "convolutional",
    "conv": "convolutional",
    "connected": "connected",
    "conn": "connected",
    "batchnorm": "batchnorm",
    "maxpool": "maxpool",
    "max": "maxpool",
    "avgpool": "avgpool",
    "avg": "avgpool",
    "softmax": "softmax",
    "soft": "softmax",
}

# [net] options are training settings; we keep them verbatim for writing back.
_NET_OPTIONS = frozenset(
    "batch subdivisions width height channels inputs momentum decay learning_rate "
    "max_batches policy steps scales step gamma power burn_in angle saturation "
    "exposure hue aspect max_crop min_crop time_steps adam B1 B2 eps flip jitter "
    "mosaic letter_box".split()
)
_OPTIONS = {
    "convolutional": {
        "filters",
        "size",
        "stride",
        "pad",
        "padding",
        "activation",
        "batch_normalize",
    },
    "connected": {"output", "activation", "batch_normalize"},
    "batchnorm": set(),
    "maxpool": {"size", "stride", "padding"},
    "avgpool": set(),
    "softmax": {"groups", "temperature"},
}
ACTIVATIONS = {"linear": None, "relu": ReLU, "logistic": Sigmoid, "leaky": LeakyReLU}


#: darknet reads every integer option into a C int.
INT_MAX = 2**31 - 1


@dataclass
class Section:
    """One ``[section]`` of a cfg: its canonical type, options and line number."""

    kind: str
    line: int
    source: str = "<cfg>"
    options: dict[str, str] = field(default_factory=dict)
    option_lines: dict[str, int] = field(default_factory=dict)

    def _where(self, name: str) -> str:
        return f"{self.source}, line {self.option_lines[name]}: [{self.kind}] option"

    def integer(
        self, name: str, default: int, minimum: int = 0, maximum: int = INT_MAX
    ) -> int:
        """Option ``name`` as an int in [minimum, maximum] (``default`` if absent)."""
        if name not in self.options:
            return default
        try:
            value = int(self.options[name])
        except ValueError:
            raise FormatError(
                f"{self._where(name)} {name}= must be an integer; got "
                f"{self.options[name]!r}."
            ) from None
        if value < minimum:
            raise FormatError(
                f"{self._where(name)} {name}= must be >= {minimum}; got {value}."
            )
        if value > maximum:
            limit = "0 or 1" if maximum == 1 else f"<= {maximum} (a C int)"
            raise FormatError(
                f"{self._where(name)} {name}= must be {limit}; got {value}."
            )
        return value

    def real(self, name: str, default: float) -> float:
        if name not in self.options:
            return default
        try:
            return float(self.options[name])
        except ValueError:
            raise FormatError(
                f"{self._where(name)} {name}= must be a number; got "
                f"{self.options[name]!r}."
            ) from None


def decode(data: bytes, source: str = "<cfg>") -> str:
    """The text of a cfg file, or FormatError for one that is not text."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(
            f"{source}: not a text darknet .cfg: byte {data[exc.start]:#04x} at "
            f"offset {exc.start} is not UTF-8."
        ) from None
    if "\0" in text:
        raise FormatError(
            f"{source}: not a text darknet .cfg: it holds a NUL byte at offset "
            f"{text.index(chr(0))}."
        )
    return text


def parse(text: str, source: str = "<cfg>") -> list[Section]:
    """Sections of a cfg text, options checked against the supported subset."""
    sections: list[Section] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = "".join(raw.split())
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            name = line[1:-1] if line.endswith("]") else None
            if name not in _SECTIONS:
                raise FormatError(
                    f"{source}, line {number}: unknown or unsupported section "
                    f"{raw.strip()!r}; supported: "
                    f"{', '.join(f'[{s}]' for s in _SECTIONS)}."
                )
            sections.append(Section(_SECTIONS[name], number, source))
            continue
        if "=" not in line:
            raise FormatError(f"{source}, line {number}: cannot parse {raw.strip()!r}.")
        if not sections:
            raise FormatError(
                f"{source}, line {number}: option {raw.strip()!r} before any section."
            )
        key, value = line.split("=", 1)
        section = sections[-1]
        allowed = _NET_OPTIONS if section.kind == "net" else _OPTIONS[section.kind]
        if key not in allowed:
            raise FormatError(
                f"{source}, line {number}: unknown or unsupported option {key!r} in "
                f"[{section.kind}] (section at line {section.line}); supported: "
                f"{', '.join(sorted(allowed)) or 'none'}."
            )
        section.options[key] = value
        section.option_lines[key] = number
    if not sections or sections[0].kind != "net":
        raise FormatError(f"{source}: the first section must be [net] or [network].")
    for section in sections[1:]:
        if section.kind == "net":
            raise FormatError(f"{source}, line {section.line}: a second [net] section.")
    return sections


def read(path: str | os.PathLike[str]) -> list[Section]:
    """Parse the cfg file at ``path``."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}.") from None
    return parse(decode(data, str(path)), str(path))


def _activation(section: Section) -> list[dict[str, Any]]:
    name = section.options.get("activation", "logistic")
    if name not in ACTIVATIONS:
        raise FormatError(
            f"{section.source}, line {section.option_lines['activation']}: activation "
            f"{name!r} is not supported; use one of {', '.join(ACTIVATIONS)}."
        )
    cls = ACTIVATIONS[name]
    return [] if cls is None else [{"type": cls.__name__}]


def _batchnorm(channels: int) -> dict[str, Any]:
    return {"type": "BatchNorm", "num_features": channels, **PRESETS["darknet"]}


def layer_specs(
    sections: list[Section], source: str = "<cfg>"
) -> tuple[list[tuple[dict[str, Any], int]], tuple[int, ...]]:
    """``(spec, line)`` of each harness layer, and the network's input shape.

    Nothing is allocated: a reader checks the sizes against its ``.weights``
    file first, then builds the layers with :func:`batchnorm.io._structure.build`.
    """
    net = sections[0]
    h, w, c = (
        net.integer("height", 0),
        net.integer("width", 0),
        net.integer("channels", 0),
    )
    shape: tuple[int, ...] = (
        (c, h, w) if h and w and c else (net.integer("inputs", h * w * c, 1),)
    )
    if shape == (0,):
        raise FormatError(f"{source}: [net] needs width, height, channels or inputs.")
    input_shape, specs = shape, list[tuple[dict[str, Any], int]]()
    for s in sections[1:]:
        where = f"{source}, line {s.line}: [{s.kind}]"
        new: list[dict[str, Any]] = []
        if s.kind == "convolutional":
            if len(shape) != 3:
                raise FormatError(f"{where} needs an image input; got shape {shape}.")
            size, stride = s.integer("size", 1, 1), s.integer("stride", 1, 1)
            padding = size // 2 if s.integer("pad", 0) else s.integer("padding", 0)
            filters = s.integer("filters", 1, 1)
            bn = bool(s.integer("batch_normalize", 0, maximum=1))
            out = [(n + 2 * padding - size) // stride + 1 for n in shape[1:]]
            if min(out) < 1:
                raise FormatError(f"{where}: kernel {size} larger than input {shape}.")
            new.append(
                {
                    "type": "Conv2d",
                    "in_channels": shape[0],
                    "out_channels": filters,
                    "kernel_size": size,
                    "stride": stride,
                    "padding": padding,
                    "bias": not bn,
                }
            )
            new += [_batchnorm(filters)] if bn else []
            new += _activation(s)
            shape = (filters, out[0], out[1])
        elif s.kind == "connected":
            if len(shape) == 3:
                new.append({"type": "Flatten"})
            inputs, output = int(_prod(shape)), s.integer("output", 1, 1)
            bn = bool(s.integer("batch_normalize", 0, maximum=1))
            new.append(
                {
                    "type": "Linear",
                    "in_features": inputs,
                    "out_features": output,
                    "bias": not bn,
                }
            )
            new += [_batchnorm(output)] if bn else []
            new += _activation(s)
            shape = (output,)
        elif s.kind == "batchnorm":
            new.append(_batchnorm(shape[0]))
        elif s.kind == "maxpool":
            if len(shape) != 3:
                raise FormatError(f"{where} needs an image input; got shape {shape}.")
            stride = s.integer("stride", 1, 1)
            size = s.integer("size", stride, 1)
            padding = s.integer("padding", size - 1)
            out = [(n + padding - size) // stride + 1 for n in shape[1:]]
            ours = [(n - size) // stride + 1 for n in shape[1:]]
            if padding // 2 != 0 or out != ours or min(shape[1:]) < size:
                raise FormatError(
                    f"{where} size={size} stride={stride} padding={padding} pads the "
                    f"{shape[1]}x{shape[2]} input, which the harness's MaxPool2d does "
                    "not; use size=stride on inputs divisible by it."
                )
            new.append({"type": "MaxPool2d", "kernel_size": size, "stride": stride})
            shape = (shape[0], out[0], out[1])
        elif s.kind == "avgpool":
            if len(shape) != 3:
                raise FormatError(f"{where} needs an image input; got shape {shape}.")
            new.append({"type": "GlobalAvgPool"})
            shape = (shape[0],)
        elif s.kind == "softmax":
            if s.integer("groups", 1, 1) != 1 or s.real("temperature", 1.0) != 1.0:
                raise FormatError(
                    f"{where}: only groups=1 and temperature=1 are supported."
                )
            if len(shape) == 3:
                new.append({"type": "Flatten"})
            new.append({"type": "Softmax"})
            shape = (int(_prod(shape)),)
        specs += [(spec, s.line) for spec in new]
    return specs, input_shape


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def _activation_name(layer: Any) -> str | None:
    for name, cls in ACTIVATIONS.items():
        if cls is not None and type(layer) is cls:
            if isinstance(layer, LeakyReLU) and layer.slope != 0.1:
                return None
            return name
    return None


def write_text(
    layers: list[Any], input_shape: tuple[int, ...], net_options: list[list[str]] | None
) -> str:
    """A cfg text for harness ``layers`` (the inverse of :func:`build_layers`)."""
    options = [list(kv) for kv in (net_options or [])]
    known = {k for k, _ in options}
    shape_keys = (
        [
            ("channels", input_shape[0]),
            ("height", input_shape[1]),
            ("width", input_shape[2]),
        ]
        if len(input_shape) == 3
        else [("inputs", input_shape[0])]
    )
    options += [[k, str(v)] for k, v in shape_keys if k not in known]
    out = ["[net]", *(f"{k}={v}" for k, v in options)]
    i = 0
    while i < len(layers):
        layer, follow = layers[i], layers[i + 1 : i + 3]
        if isinstance(layer, Conv2d | Linear):
            bn = (
                bool(follow) and isinstance(follow[0], BatchNorm) and layer.bias is None
            )
            act = follow[1 if bn else 0 : 2 if bn else 1]
            name = _activation_name(act[0]) if act else None
            out.append("")
            if isinstance(layer, Conv2d):
                out += [
                    "[convolutional]",
                    f"filters={layer.out_channels}",
                    f"size={layer.kernel_size}",
                    f"stride={layer.stride}",
                    f"padding={layer.padding}",
                ]
            else:
                out += ["[connected]", f"output={layer.out_features}"]
            if bn:
                out.append("batch_normalize=1")
            out.append(f"activation={name or 'linear'}")
            i += 1 + bn + (name is not None)
            continue
        if isinstance(layer, BatchNorm):
            out += ["", "[batchnorm]"]
        elif isinstance(layer, MaxPool2d):
            out += [
                "",
                "[maxpool]",
                f"size={layer.kernel_size}",
                f"stride={layer.stride}",
                "padding=0",
            ]
        elif isinstance(layer, GlobalAvgPool):
            out += ["", "[avgpool]"]
        elif isinstance(layer, Softmax):
            out += ["", "[softmax]", "groups=1"]
        elif not isinstance(layer, Flatten):
            raise TypeError(
                f"darknet has no section for layer {i} ({layer!r}) on its own; an "
                "activation must follow a Conv2d/Linear (and its BatchNorm)."
            )
        i += 1
    return "\n".join(out) + "\n"
