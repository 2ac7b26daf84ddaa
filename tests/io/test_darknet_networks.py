"""Any darknet network: shapes, ``.weights`` layout, byte identity and errors.

Every expected number here is worked out by hand from pjreddie/darknet's C
source (``parser.c``: ``parse_*``, ``load_weights_upto``,
``load_convolutional_weights``, ``load_connected_weights``,
``load_batchnorm_weights``; each ``make_*_layer``), never by asking the reader
under test. The formulas used (C ints, ``/`` truncates toward zero):

- convolutional: ``padding = pad ? size/2 : padding``;
  ``out = (h + 2·padding − size)/stride + 1``; file: biases n, [scales,
  rolling_mean, rolling_variance] n each, weights ``n·c/groups·size²``
  (stored ``(c·size², n)`` when ``flipped``); ``numload`` replaces n;
- deconvolutional: ``out = (h − 1)·stride + size − 2·padding``;
- local: ``out = (h − (pad ? 1 : size))/stride + 1``; biases
  ``out_h·out_w·n``, weights ``(out_h·out_w, n, c·size²)``;
- connected: biases, weights ``(outputs, inputs)`` (``(inputs, outputs)`` when
  the header's major or minor > 1000), then [scales, rolling_mean,
  rolling_variance];
- maxpool: ``size`` defaults to ``stride``, ``padding`` to ``size − 1``;
  ``out = (h + padding − size)/stride + 1``;
- route: ``outputs`` is the sum; channels add while ``h, w`` equal the first
  layer's, any other size zeroes ``h, w, c`` (later equal ones add again);
- rnn/gru/lstm: connected sub-layers (``u*``: inputs → outputs, ``w*`` and
  ``self_layer``/``output_layer``: outputs → outputs); crnn: three 3×3 pad-1
  convolutions, with ``make_crnn_layer(batch, w, h, …)`` called on a
  ``(batch, h, w, …)`` signature, so ``out_h = w`` and ``out_w = h``.
"""

from __future__ import annotations

import math
import os
import re
import struct

import numpy as np
import pytest

from batchnorm.io import FormatError, darknet

BN = ("scales", "rolling_mean", "rolling_variance")


# -- expected array layouts, in darknet's load order ----------------------------


def conv(n, weights, bn=False, prefix=""):
    """load_convolutional_weights: biases, [scales, mean, variance], weights."""
    out = {f"{prefix}biases": (n,)}
    if bn:
        out.update({f"{prefix}{k}": (n,) for k in BN})
    out[f"{prefix}weights"] = weights
    return out


def conn(inputs, outputs, bn=False, prefix="", transpose=False):
    """load_connected_weights: biases, weights, [scales, mean, variance]."""
    out = {
        f"{prefix}biases": (outputs,),
        f"{prefix}weights": (inputs, outputs) if transpose else (outputs, inputs),
    }
    if bn:
        out.update({f"{prefix}{k}": (outputs,) for k in BN})
    return out


def bnorm(c):
    """load_batchnorm_weights: scales, rolling_mean, rolling_variance (C each)."""
    return {k: (c,) for k in BN}


def count(shape) -> int:
    # an int stands for "this many floats" where only the count is asserted
    return shape if isinstance(shape, int) else math.prod(shape)


def floats_in(expected) -> int:
    return sum(count(s) for *_, arrays in expected for s in arrays.values())


def line_of(text: str, line: str, nth: int = 1) -> int:
    """The 1-based number of the ``nth`` line of ``text`` that reads ``line``."""
    hits = [i for i, raw in enumerate(text.splitlines(), 1) if raw.strip() == line]
    return hits[nth - 1]


def header_bytes(major, minor, revision, seen) -> bytes:
    # load_weights_upto: seen is a size_t when major*10+minor >= 2 and both
    # are < 1000, else an int.
    wide = major * 10 + minor >= 2 and major < 1000 and minor < 1000
    return struct.pack("<iii", major, minor, revision) + struct.pack(
        "<Q" if wide else "<I", seen
    )


# -- the networks ----------------------------------------------------------------

ALL_CFG = """\
# every section pjreddie's parser.c knows (größe: a non-ASCII comment)
[net]
batch=1
height=9
width=12
channels=3

[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=leaky

[conv]
filters=6
size=3
stride=2
groups=2
activation=linear

[batchnorm]

[deconvolutional]
filters=2
size=2
stride=2

[maxpool]
size=2
stride=2

[local]
filters=3
size=3
stride=1
pad=1

[max]
size=3
stride=1

[reorg]
stride=2

[reorg]
stride=2
reverse=1

[route]
layers=6

[route]
layers = -1, 5

[shortcut]
from=-10

[upsample]
stride=2

[upsample]
stride=-2

[dropout]
probability=.5

[activation]
activation=leaky

[logistic]

[l2norm]

[lrn]
size=3

[normalization]
size=5

[crop]
crop_height=3
crop_width=4

[crnn]
batch_normalize=1
hidden_filters=2
output_filters=5

[avgpool]

[connected]
output=7
batch_normalize=1

[batchnorm]

[conn]
output=8

[rnn]
output=3

[gru]
output=4

[lstm]
output=2
batch_normalize=1

[softmax]
groups=2

[soft]

[cost]
"""

ALL_INPUT = (9, 12, 3, 9 * 12 * 3)


def all_expected(transpose=False):
    t = transpose
    return [
        # 0: pad=1 -> padding 3/2 = 1; (9+2-3)/1+1 = 9, (12+2-3)/1+1 = 12
        ("convolutional", "convolutional", (9, 12, 4, 9 * 12 * 4),
         conv(4, (4, 3, 3, 3), bn=True)),
        # 1: padding 0, groups 2: (9-3)/2+1 = 4, (12-3)/2+1 = 9/2+1 = 5;
        #    weights n x c/groups x size x size = 6 x 4/2 x 3 x 3
        ("convolutional", "conv", (4, 5, 6, 120), conv(6, (6, 2, 3, 3))),
        ("batchnorm", "batchnorm", (4, 5, 6, 120), bnorm(6)),
        # 3: (4-1)*2+2-0 = 8, (5-1)*2+2 = 10; c*n*size^2 = 6*2*4 weights
        ("deconvolutional", "deconvolutional", (8, 10, 2, 160),
         {"biases": (2,), "weights": 6 * 2 * 2 * 2}),
        # 4: padding = size-1 = 1: (8+1-2)/2+1 = 7/2+1 = 4, (10+1-2)/2+1 = 5
        ("maxpool", "maxpool", (4, 5, 2, 40), {}),
        # 5: pad -> (4-1)/1+1 = 4, (5-1)/1+1 = 5; biases out_h*out_w*n = 60;
        #    weights (locations, n, c*size^2) = (20, 3, 2*9)
        ("local", "local", (4, 5, 3, 60),
         {"biases": (60,), "weights": (20, 3, 18)}),
        # 6: padding 2: (4+2-3)/1+1 = 4, (5+2-3)/1+1 = 5
        ("maxpool", "max", (4, 5, 3, 60), {}),
        # 7: 4/2 = 2, 5/2 = 2, 3*2*2 = 12
        ("reorg", "reorg", (2, 2, 12, 48), {}),
        # 8: reverse: 2*2, 2*2, 12/(2*2)
        ("reorg", "reorg", (4, 4, 3, 48), {}),
        # 9: layer 6
        ("route", "route", (4, 5, 3, 60), {}),
        # 10: layers 9 (4x5x3) and 5 (4x5x3): channels add
        ("route", "route", (4, 5, 6, 120), {}),
        # 11: from layer 11-10 = 1; output = its input
        ("shortcut", "shortcut", (4, 5, 6, 120), {}),
        ("upsample", "upsample", (8, 10, 6, 480), {}),
        # 13: stride -2: 8/2, 10/2
        ("upsample", "upsample", (4, 5, 6, 120), {}),
        ("dropout", "dropout", (4, 5, 6, 120), {}),
        ("activation", "activation", (4, 5, 6, 120), {}),
        ("logistic", "logistic", (4, 5, 6, 120), {}),
        ("l2norm", "l2norm", (4, 5, 6, 120), {}),
        ("normalization", "lrn", (4, 5, 6, 120), {}),
        ("normalization", "normalization", (4, 5, 6, 120), {}),
        ("crop", "crop", (3, 4, 6, 72), {}),
        # 21: input 3x4x6; out_h = w = 4, out_w = h = 3, out_c = 5
        ("crnn", "crnn", (4, 3, 5, 60),
         {**conv(2, (2, 6, 3, 3), bn=True, prefix="input_layer."),
          **conv(2, (2, 2, 3, 3), bn=True, prefix="self_layer."),
          **conv(5, (5, 2, 3, 3), bn=True, prefix="output_layer.")}),
        ("avgpool", "avgpool", (1, 1, 5, 5), {}),
        ("connected", "connected", (1, 1, 7, 7), conn(5, 7, bn=True, transpose=t)),
        ("batchnorm", "batchnorm", (1, 1, 7, 7), bnorm(7)),
        ("connected", "conn", (1, 1, 8, 8), conn(7, 8, transpose=t)),
        # 26: rnn: no image; input 8 -> 3, then 3 -> 3 twice
        ("rnn", "rnn", (0, 0, 0, 3),
         {**conn(8, 3, prefix="input_layer.", transpose=t),
          **conn(3, 3, prefix="self_layer.", transpose=t),
          **conn(3, 3, prefix="output_layer.", transpose=t)}),
        # 27: gru: w* 4 -> 4, u* 3 -> 4
        ("gru", "gru", (0, 0, 0, 4),
         {k: v for p in ("wz.", "wr.", "wh.") for k, v in
          conn(4, 4, prefix=p, transpose=t).items()}
         | {k: v for p in ("uz.", "ur.", "uh.") for k, v in
            conn(3, 4, prefix=p, transpose=t).items()}),
        # 28: lstm: w* 2 -> 2, u* 4 -> 2, each with batch normalization
        ("lstm", "lstm", (0, 0, 0, 2),
         {k: v for p in ("wi.", "wf.", "wo.", "wg.") for k, v in
          conn(2, 2, bn=True, prefix=p, transpose=t).items()}
         | {k: v for p in ("ui.", "uf.", "uo.", "ug.") for k, v in
            conn(4, 2, bn=True, prefix=p, transpose=t).items()}),
        ("softmax", "softmax", (0, 0, 0, 2), {}),
        ("softmax", "soft", (0, 0, 0, 2), {}),
        ("cost", "cost", (0, 0, 0, 2), {}),
    ]  # fmt: skip


HEADS_CFG = """\
[net]
height=3
width=4
channels=2

[convolutional]
filters=16
size=1

[region]
classes=3
coords=4
num=2

[convolutional]
filters=14
size=1

[yolo]
mask = 0, 2
num=5
classes=2

[convolutional]
filters=21
size=1

[yolo]
num=3
classes=2

[convolutional]
filters=7
size=1

[iseg]
classes=3
ids=4

[connected]
output=52

[detection]
side=2
coords=4
num=2
classes=3
"""

HEADS_INPUT = (3, 4, 2, 24)


def heads_expected(transpose=False):
    return [
        ("convolutional", "convolutional", (3, 4, 16, 192), conv(16, (16, 2, 1, 1))),
        # num*(classes+coords+1) = 2*(3+4+1) = 16
        ("region", "region", (3, 4, 16, 192), {}),
        ("convolutional", "convolutional", (3, 4, 14, 168), conv(14, (14, 16, 1, 1))),
        # mask has 2 entries (num=5 is the anchor total): 2*(2+4+1) = 14
        ("yolo", "yolo", (3, 4, 14, 168), {}),
        ("convolutional", "convolutional", (3, 4, 21, 252), conv(21, (21, 14, 1, 1))),
        # no mask: n = num = 3: 3*(2+5) = 21
        ("yolo", "yolo", (3, 4, 21, 252), {}),
        ("convolutional", "convolutional", (3, 4, 7, 84), conv(7, (7, 21, 1, 1))),
        # classes + ids = 3 + 4
        ("iseg", "iseg", (3, 4, 7, 84), {}),
        ("connected", "connected", (1, 1, 52, 52), conn(84, 52, transpose=transpose)),
        # side^2 * ((1+coords)*num + classes) = 4 * (5*2 + 3) = 52 = inputs
        ("detection", "detection", (0, 0, 0, 52), {}),
    ]


OPTIONS_CFG = """\
[net]
height=6
width=7
channels=4

[convolutional]
filters=3
size=3
stride=1
padding=2

[convolutional]
filters=2
size=5
stride=2
pad=1
padding=7

[convolutional]
filters=6
size=1
flipped=1
batch_normalize=1

[convolutional]
filters=4
size=1
numload=2
batch_normalize=1

[convolutional]
filters=3
size=1
batch_normalize=1
dontloadscales=1

[convolutional]
filters=2
size=3
batch_normalize=1
dontload=1

[deconv]
filters=1
size=3
stride=1
pad=1

[local]
filters=2
size=2
stride=1

[deconvolutional]
filters=3
size=3
stride=2
padding=1
batch_normalize=1
"""

OPTIONS_INPUT = (6, 7, 4, 168)


def options_expected(transpose=False):
    return [
        # explicit padding=2: (6+4-3)/1+1 = 8, (7+4-3)/1+1 = 9
        ("convolutional", "convolutional", (8, 9, 3, 216), conv(3, (3, 4, 3, 3))),
        # pad=1 wins over padding=7: padding = 5/2 = 2;
        # (8+4-5)/2+1 = 7/2+1 = 4, (9+4-5)/2+1 = 5
        ("convolutional", "convolutional", (4, 5, 2, 40), conv(2, (2, 3, 5, 5))),
        # flipped: stored as the (c*size^2, n) = (2, 6) matrix darknet transposes
        ("convolutional", "convolutional", (4, 5, 6, 120), conv(6, (2, 6), bn=True)),
        # numload=2: l.n = 2 for biases, statistics and weights; output keeps 4
        ("convolutional", "convolutional", (4, 5, 4, 80),
         conv(2, (2, 6, 1, 1), bn=True)),
        # dontloadscales: no scales/mean/variance in the file
        ("convolutional", "convolutional", (4, 5, 3, 60), conv(3, (3, 4, 1, 1))),
        # dontload: nothing read; (4-3)/1+1 = 2, (5-3)/1+1 = 3
        ("convolutional", "convolutional", (2, 3, 2, 12), {}),
        # pad -> padding 1: (2-1)*1+3-2 = 2, (3-1)*1+3-2 = 3; c*n*size^2 = 2*1*9
        ("deconvolutional", "deconv", (2, 3, 1, 6),
         {"biases": (1,), "weights": 2 * 1 * 9}),
        # no pad: (2-2)/1+1 = 1, (3-2)/1+1 = 2; weights (1*2, 2, 1*2*2)
        ("local", "local", (1, 2, 2, 4), {"biases": (4,), "weights": (2, 2, 4)}),
        # padding=1: (1-1)*2+3-2 = 1, (2-1)*2+3-2 = 3; c*n*size^2 = 2*3*9
        ("deconvolutional", "deconvolutional", (1, 3, 3, 9),
         {"biases": (3,), **{k: (3,) for k in BN}, "weights": 2 * 3 * 9}),
    ]  # fmt: skip


ROUTES_CFG = """\
[net]
height=4
width=4
channels=1

[convolutional]
filters=2
size=1

[convolutional]
filters=3
size=2
stride=2

[route]
layers=0

[convolutional]
filters=5
size=1

[route]
layers=0,1,3

[route]
layers=-5,-2

[route]
layers=1,0

[route]
layers=5

[shortcut]
from=0
"""

ROUTES_INPUT = (4, 4, 1, 16)


def routes_expected(transpose=False):
    return [
        ("convolutional", "convolutional", (4, 4, 2, 32), conv(2, (2, 1, 1, 1))),
        # (4-2)/2+1 = 2
        ("convolutional", "convolutional", (2, 2, 3, 12), conv(3, (3, 2, 2, 2))),
        ("route", "route", (4, 4, 2, 32), {}),
        ("convolutional", "convolutional", (4, 4, 5, 80), conv(5, (5, 2, 1, 1))),
        # 4x4x2, then 2x2 (zeroes h, w, c), then 4x4x5 == first's size: c = 0+5;
        # outputs 32+12+80
        ("route", "route", (0, 0, 5, 124), {}),
        # layers 0 and 3: 4x4x(2+5), 32+80
        ("route", "route", (4, 4, 7, 112), {}),
        # 2x2x3 then a 4x4: all zero, outputs 12+32
        ("route", "route", (0, 0, 0, 44), {}),
        ("route", "route", (4, 4, 7, 112), {}),
        # from=0 (absolute): the output is the input, whatever layer 0 is
        ("shortcut", "shortcut", (4, 4, 7, 112), {}),
    ]


INPUTS_CFG = """\
[network]
inputs=6

[conn]
output=2

[dropout]

[soft]
"""

INPUTS_INPUT = (0, 0, 0, 6)


def inputs_expected(transpose=False):
    return [
        ("connected", "conn", (1, 1, 2, 2), conn(6, 2, transpose=transpose)),
        ("dropout", "dropout", (1, 1, 2, 2), {}),
        ("softmax", "soft", (0, 0, 0, 2), {}),
    ]


NETWORKS = {
    "all": (ALL_CFG, ALL_INPUT, all_expected),
    "heads": (HEADS_CFG, HEADS_INPUT, heads_expected),
    "options": (OPTIONS_CFG, OPTIONS_INPUT, options_expected),
    "routes": (ROUTES_CFG, ROUTES_INPUT, routes_expected),
    "inputs": (INPUTS_CFG, INPUTS_INPUT, inputs_expected),
}

# floats in each .weights file, summed by hand from the tables above
FLOATS = {
    # 124 + 114 + 18 + 50 + 1140 (local) + 270 (crnn: 116 + 44 + 110) + 63 + 21
    # + 64 + 51 (rnn) + 108 (gru: 3*20 + 3*16) + 112 (lstm: 4*12 + 4*16)
    "all": 2135,
    # 48 + 238 + 315 + 154 + 4420
    "heads": 5175,
    # 111 + 152 + 36 + 20 + 15 + 0 + 19 + 20 (local: 4 + 2*2*1*4) + 66
    "options": 439,
    "routes": 46,
    "inputs": 14,
}


def write_cfg(tmp_path, text, name="net.cfg"):
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


# -- 1. shapes ------------------------------------------------------------------


def test_float_totals_match_the_tables():
    for name, (_, _, expected) in NETWORKS.items():
        assert floats_in(expected()) == FLOATS[name], name


LAYER_CASES = [
    (name, i) for name, (_, _, exp) in NETWORKS.items() for i in range(len(exp()))
]


@pytest.mark.parametrize(("name", "index"), LAYER_CASES)
def test_layer_shapes_follow_darknet(tmp_path, name, index):
    text, first, expected = NETWORKS[name]
    network = darknet.read_cfg(write_cfg(tmp_path, text))
    assert len(network) == len(expected())
    assert tuple(network.input) == first
    kind, section, output, arrays = expected()[index]
    layer = network[index]
    assert (layer.index, layer.type, layer.section) == (index, kind, section)
    assert tuple(layer.output) == output
    assert isinstance(layer.output, darknet.Shape)
    # same arrays, in darknet's load order
    assert list(layer.shapes) == list(arrays)
    for array, shape in arrays.items():
        if isinstance(shape, int):
            assert math.prod(layer.shapes[array]) == shape
        else:
            assert layer.shapes[array] == shape
    assert layer.arrays == {}
    # the next layer sees this one's output
    if index + 1 < len(network):
        assert network[index + 1].input == layer.output


@pytest.mark.parametrize("name", list(NETWORKS))
def test_weights_size_is_header_plus_floats(tmp_path, name):
    network = darknet.read_cfg(write_cfg(tmp_path, NETWORKS[name][0]))
    assert network.weights_size() == 20 + 4 * FLOATS[name]
    assert network.weights_size(darknet.Header(0, 1, 0, 0)) == 16 + 4 * FLOATS[name]
    assert network.weights_size(darknet.Header(1001, 0, 0, 0)) == 16 + 4 * FLOATS[name]


SINGLE = [
    # (input h, w, c), section, expected output
    # maxpool: size 2 stride 2, padding 1: (7+1-2)/2+1 = 4, (5+1-2)/2+1 = 3
    ((7, 5, 2), "[maxpool]\nsize=2\nstride=2", (4, 3, 2, 24)),
    # yolov3-tiny's stride-1 pool: (13+1-2)/1+1 = 13
    ((13, 13, 4), "[maxpool]\nsize=2\nstride=1", (13, 13, 4, 676)),
    # explicit padding 0: (7-3)/2+1 = 3, (6-3)/2+1 = 1+1 = 2
    ((7, 6, 1), "[maxpool]\nsize=3\nstride=2\npadding=0", (3, 2, 1, 6)),
    # size defaults to stride 3, padding to 2: (8+2-3)/3+1 = 3, (7+2-3)/3+1 = 3
    ((8, 7, 1), "[max]\nstride=3", (3, 3, 1, 9)),
    # C truncation: (2+0-3)/2 = 0 (not -1) -> 1; (5-3)/2+1 = 2
    ((2, 5, 3), "[maxpool]\nsize=3\nstride=2\npadding=0", (1, 2, 3, 6)),
    ((1, 1, 2), "[maxpool]\nsize=2\nstride=2", (1, 1, 2, 2)),
    # defaults: stride 1, size 1, padding 0
    ((3, 4, 2), "[maxpool]", (3, 4, 2, 24)),
    # convolution, C truncation: (2-3)/2+1 = 0+1 = 1, (5-3)/2+1 = 2
    ((2, 5, 1), "[conv]\nfilters=1\nsize=3\nstride=2", (1, 2, 1, 2)),
    ((3, 5, 4), "[avg]", (1, 1, 4, 4)),
    ((6, 4, 3), "[reorg]\nstride=2", (3, 2, 12, 72)),
    ((6, 4, 8), "[reorg]\nstride=2\nreverse=1", (12, 8, 2, 192)),
    # extra: no image, outputs = inputs + extra = 72 + 5
    ((6, 4, 3), "[reorg]\nstride=2\nextra=5", (0, 0, 0, 77)),
    ((6, 4, 3), "[reorg]", (6, 4, 3, 72)),
    # upsample: stride defaults to 2
    ((3, 5, 2), "[upsample]", (6, 10, 2, 120)),
    ((3, 5, 2), "[upsample]\nstride=3", (9, 15, 2, 270)),
    ((7, 5, 2), "[upsample]\nstride=-2", (3, 2, 2, 12)),
    ((7, 5, 2), "[upsample]\nstride=-3", (2, 1, 2, 4)),
    # yolo: one mask entry: 1*(1+4+1) = 6 channels
    ((2, 3, 6), "[yolo]\nmask=4\nnum=9\nclasses=1", (2, 3, 6, 36)),
    ((2, 3, 24), "[yolo]\nmask=0,1,2,3\nnum=9\nclasses=1", (2, 3, 24, 144)),
    ((2, 3, 10), "[yolo]\nnum=2\nclasses=0", (2, 3, 10, 60)),
    # yolo default: num 1, classes 20 -> 25
    ((1, 2, 25), "[yolo]", (1, 2, 25, 50)),
    # region defaults: num 1, classes 20, coords 4 -> 25
    ((1, 2, 25), "[region]", (1, 2, 25, 50)),
    # iseg defaults: classes 20 + ids 32
    ((2, 1, 52), "[iseg]", (2, 1, 52, 104)),
    ((2, 3, 4), "[crop]\ncrop_height=1\ncrop_width=2", (1, 2, 4, 8)),
    ((2, 3, 4), "[softmax]\ngroups=3", (0, 0, 0, 24)),
    ((2, 3, 4), "[cost]", (0, 0, 0, 24)),
    # crnn defaults hidden=1 output=1; h, w swap: out 3x2
    ((2, 3, 4), "[crnn]", (3, 2, 1, 6)),
]


@pytest.mark.parametrize(("hwc", "section", "output"), SINGLE)
def test_single_layer_output(tmp_path, hwc, section, output):
    h, w, c = hwc
    text = f"[net]\nheight={h}\nwidth={w}\nchannels={c}\n\n{section}\n"
    network = darknet.read_cfg(write_cfg(tmp_path, text))
    assert tuple(network[0].output) == output


def test_flat_inputs_detection_and_connected_as_image(tmp_path):
    # detection defaults: side 7, coords 1, num 1, classes 1: 49*(2*1+1) = 147
    network = darknet.read_cfg(write_cfg(tmp_path, "[net]\ninputs=147\n[detection]\n"))
    assert tuple(network.input) == (0, 0, 0, 147)
    assert tuple(network[0].output) == (0, 0, 0, 147)
    # inputs= overrides h*w*c for what the first layer sees
    text = "[net]\nheight=2\nwidth=2\nchannels=1\ninputs=10\n[connected]\noutput=3\n"
    network = darknet.read_cfg(write_cfg(tmp_path, text))
    assert tuple(network.input) == (2, 2, 1, 10)
    assert network[0].shapes == {"biases": (3,), "weights": (3, 10)}
    # a connected layer outputs 1x1xN, an image to the layers after it
    text = "[net]\ninputs=4\n[connected]\noutput=6\n[conv]\nfilters=2\n[max]\n"
    network = darknet.read_cfg(write_cfg(tmp_path, text))
    assert tuple(network[1].output) == (1, 1, 2, 2)
    assert network[1].shapes == {"biases": (2,), "weights": (2, 6, 1, 1)}
    assert tuple(network[2].output) == (1, 1, 2, 2)


def tiny_yolo_cfg(size=416):
    """pjreddie's cfg/yolov3-tiny.cfg: the same section sequence and options."""
    conv_bn = (
        "[convolutional]\nbatch_normalize=1\nfilters={}\nsize={}\nstride=1\npad=1\n"
        "activation=leaky\n\n"
    ).format
    head = (
        "[convolutional]\nsize=1\nstride=1\npad=1\nfilters=255\nactivation=linear\n\n"
    )
    pool = "[maxpool]\nsize=2\nstride={}\n\n".format
    yolo = (
        "[yolo]\nmask = {}\nanchors = 10,14,  23,27,  37,58,  81,82,  135,169,  "
        "344,319\nclasses=80\nnum=6\njitter=.3\nignore_thresh = .7\n"
        "truth_thresh = 1\nrandom=1\n\n"
    ).format
    parts = [
        f"[net]\nbatch=1\nsubdivisions=1\nwidth={size}\nheight={size}\nchannels=3\n"
        "momentum=0.9\ndecay=0.0005\nsaturation = 1.5\nhue=.1\n\n"
    ]
    for filters in (16, 32, 64, 128, 256):
        parts += [conv_bn(filters, 3), pool(2)]
    parts += [
        conv_bn(512, 3),
        pool(1),
        conv_bn(1024, 3),
        "###########\n\n",
        conv_bn(256, 1),
        conv_bn(512, 3),
        head,
        yolo("3,4,5"),
        "[route]\nlayers = -4\n\n",
        conv_bn(128, 1),
        "[upsample]\nstride=2\n\n",
        "[route]\nlayers = -1, 8\n\n",
        conv_bn(256, 3),
        head,
        yolo("0,1,2"),
    ]
    return "".join(parts)


def test_yolov3_tiny_shapes_and_file_size(tmp_path):
    network = darknet.read_cfg(write_cfg(tmp_path, tiny_yolo_cfg()))
    # maxpool 2/2 with padding 1: (416+1-2)/2+1 = 208, then 104, 52, 26, 13;
    # the 2/1 pool keeps 13
    outputs = [
        (416, 416, 16), (208, 208, 16), (208, 208, 32), (104, 104, 32),
        (104, 104, 64), (52, 52, 64), (52, 52, 128), (26, 26, 128),
        (26, 26, 256), (13, 13, 256), (13, 13, 512), (13, 13, 512),
        (13, 13, 1024), (13, 13, 256), (13, 13, 512), (13, 13, 255),
        (13, 13, 255),
        (13, 13, 256),  # route -4: layer 13
        (13, 13, 128), (26, 26, 128),
        (26, 26, 384),  # route -1, 8: 26x26x128 + 26x26x256
        (26, 26, 256), (26, 26, 255), (26, 26, 255),
    ]  # fmt: skip
    assert [tuple(layer.output[:3]) for layer in network] == outputs
    assert network[20].output.size == 26 * 26 * 384
    assert network[20].sources == (19, 8)
    assert network[17].sources == (13,)
    assert network[21].shapes["weights"] == (256, 384, 3, 3)
    assert network[22].shapes == {"biases": (255,), "weights": (255, 256, 1, 1)}
    # pjreddie's yolov3-tiny.weights is 35,434,956 bytes: 20-byte header and
    # 8,858,734 floats
    assert network.weights_size() == 35_434_956
    assert network.weights_size(darknet.Header(0, 1, 0, 0)) == 35_434_952


# -- 2. byte identity -----------------------------------------------------------

HEADERS = [
    pytest.param((0, 2, 0, 2**40 + 7), id="v0.2.0-seen64"),
    pytest.param((0, 1, 0, 123_456), id="v0.1.0-seen32"),
    pytest.param((1001, 0, 0, 99), id="major1001-transposed"),
    pytest.param((0, 1001, 3, 5), id="minor1001-transposed"),
]


def transposed(header) -> bool:
    return header[0] > 1000 or header[1] > 1000


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_read_write_is_byte_identical(tmp_path, name, header, mmap):
    text, _, expected_of = NETWORKS[name]
    expected = expected_of(transpose=transposed(header))
    cfg = write_cfg(tmp_path, text)
    payload = np.random.default_rng(len(text)).bytes(4 * FLOATS[name])
    data = header_bytes(*header) + payload
    (tmp_path / "in.weights").write_bytes(data)

    network = darknet.read(cfg, tmp_path / "in.weights", mmap=mmap)
    assert network.header == darknet.Header(*header)
    assert network.header.pack() == header_bytes(*header)
    assert network.weights_size() == len(data)
    # every array is the file's bytes at the offset darknet's load order gives
    offset = 0
    for layer, (*_, arrays) in zip(network, expected, strict=True):
        assert list(layer.arrays) == list(arrays)
        for array, shape in arrays.items():
            got = layer.arrays[array]
            assert got.dtype == np.dtype("<f4")
            if not isinstance(shape, int):
                assert got.shape == shape
            size = 4 * count(shape)
            assert got.tobytes() == payload[offset : offset + size], (layer, array)
            offset += size
    assert offset == len(payload)

    darknet.write(network, tmp_path / "out.weights")
    assert (tmp_path / "out.weights").read_bytes() == data
    darknet.write(network, tmp_path / "both.weights", cfg_path=tmp_path / "both.cfg")
    assert (tmp_path / "both.weights").read_bytes() == data
    assert (tmp_path / "both.cfg").read_bytes() == text.encode()


def test_cfg_text_written_unchanged_with_comments_and_spacing(tmp_path):
    # darknet strips spaces and tabs from every line and skips #, ; comments
    text = "; leading comment\n\n" + ALL_CFG.replace(
        "stride=-2", "\tstride = -2  "
    ).replace("[soft]", "  [soft]\n# a comment \u00e9\u00e8\n")
    raw = (text + "\n\n# end \u00e9").encode()
    (tmp_path / "odd.cfg").write_bytes(raw)
    network = darknet.synthetic(tmp_path / "odd.cfg", seed=1)
    darknet.write(network, tmp_path / "w.weights", cfg_path=tmp_path / "w.cfg")
    assert (tmp_path / "w.cfg").read_bytes() == raw
    back = darknet.read(tmp_path / "w.cfg", tmp_path / "w.weights")
    assert [tuple(layer.output) for layer in back] == [e[2] for e in all_expected()]


def test_mmap_arrays_are_copy_on_write(tmp_path):
    cfg = write_cfg(tmp_path, ROUTES_CFG)
    data = header_bytes(0, 2, 0, 0) + np.arange(46, dtype="<f4").tobytes()
    (tmp_path / "w.weights").write_bytes(data)
    network = darknet.read(cfg, tmp_path / "w.weights", mmap=True)
    # layer 0: biases floats 0..1, weights 2..3; layer 1: biases 4..6
    np.testing.assert_array_equal(network[0].arrays["biases"], [0, 1])
    np.testing.assert_array_equal(network[1].arrays["biases"], [4, 5, 6])
    network[0].arrays["biases"][:] = -1
    assert (tmp_path / "w.weights").read_bytes() == data
    darknet.write(network, tmp_path / "changed.weights")
    changed = (tmp_path / "changed.weights").read_bytes()
    assert changed[20:28] == struct.pack("<2f", -1, -1)
    assert changed[28:] == data[28:]


# -- 3. truncation and extension --------------------------------------------------

SMALL_CFG = """\
[net]
height=4
width=4
channels=2

[convolutional]
batch_normalize=1
filters=3
size=3
pad=1

[maxpool]
size=2
stride=2

[batchnorm]

[connected]
output=4
batch_normalize=1

[dropout]

[conn]
output=2

[softmax]
"""

# (layer, section, array, floats) in file order; the pool gives
# (4+1-2)/2+1 = 2: 2x2x3 = 12 inputs to the connected layer
SMALL_ARRAYS = [
    (0, "convolutional", "biases", 3),
    (0, "convolutional", "scales", 3),
    (0, "convolutional", "rolling_mean", 3),
    (0, "convolutional", "rolling_variance", 3),
    (0, "convolutional", "weights", 3 * 2 * 3 * 3),
    (2, "batchnorm", "scales", 3),
    (2, "batchnorm", "rolling_mean", 3),
    (2, "batchnorm", "rolling_variance", 3),
    (3, "connected", "biases", 4),
    (3, "connected", "weights", 4 * 12),
    (3, "connected", "scales", 4),
    (3, "connected", "rolling_mean", 4),
    (3, "connected", "rolling_variance", 4),
    (5, "conn", "biases", 2),
    (5, "conn", "weights", 2 * 4),
]
SMALL_FLOATS = 149
SMALL_LINES = {
    0: line_of(SMALL_CFG, "[convolutional]"),
    2: line_of(SMALL_CFG, "[batchnorm]"),
    3: line_of(SMALL_CFG, "[connected]"),
    5: line_of(SMALL_CFG, "[conn]"),
}


def shortfall(size: int, head: int, total: int) -> str:
    """What the error for a ``size``-byte file must say (a regex)."""
    if size < 12:
        return r"shorter than a darknet \.weights header"
    if size < head:
        return rf"needs {head} bytes; the file has {size}\."
    offset = head
    for index, section, array, floats in SMALL_ARRAYS:
        end = offset + 4 * floats
        if end > size:
            return (
                rf"layer {index} \[{section}\] \(line {SMALL_LINES[index]}\) runs "
                rf"out in its {array} .*; {total - size} bytes are missing"
            )
        offset = end
    raise AssertionError("not short")


@pytest.mark.parametrize("header", HEADERS[:3])
def test_every_truncation_names_the_layer_that_runs_out(tmp_path, header):
    assert sum(f for *_, f in SMALL_ARRAYS) == SMALL_FLOATS
    cfg = write_cfg(tmp_path, SMALL_CFG)
    head = header_bytes(*header)
    data = head + np.random.default_rng(0).bytes(4 * SMALL_FLOATS)
    path = tmp_path / "w.weights"
    path.write_bytes(data)
    assert darknet.read(cfg, path).weights_size() == len(data)
    for size in range(len(data)):
        path.write_bytes(data[:size])
        with pytest.raises(FormatError) as caught:
            darknet.read(cfg, path, mmap=size % 2 == 1)
        assert re.search(shortfall(size, len(head), len(data)), str(caught.value)), (
            size,
            str(caught.value),
        )


@pytest.mark.parametrize("extra", range(1, 9))
def test_every_extension_names_the_bytes_left_over(tmp_path, extra):
    cfg = write_cfg(tmp_path, SMALL_CFG)
    data = header_bytes(0, 2, 0, 1) + bytes(4 * SMALL_FLOATS)
    (tmp_path / "w.weights").write_bytes(data + b"\x7f" * extra)
    with pytest.raises(
        FormatError,
        match=rf"{extra} bytes are left over after layer 5 \[conn\] "
        rf"\(line {SMALL_LINES[5]}\)",
    ):
        darknet.read(cfg, tmp_path / "w.weights")


def test_extension_of_a_network_without_weights(tmp_path):
    cfg = write_cfg(tmp_path, "[net]\nheight=2\nwidth=2\nchannels=1\n[maxpool]\n")
    (tmp_path / "w.weights").write_bytes(header_bytes(0, 2, 0, 0))
    assert darknet.read(cfg, tmp_path / "w.weights")[0].arrays == {}
    (tmp_path / "w.weights").write_bytes(header_bytes(0, 2, 0, 0) + b"abc")
    with pytest.raises(FormatError, match="3 bytes are left over after the header"):
        darknet.read(cfg, tmp_path / "w.weights")


# -- 4. cfg errors name the line --------------------------------------------------

IMAGE = "[net]\nheight=4\nwidth=4\nchannels=3\n"
FLAT = "[net]\ninputs=4\n"

CFG_ERRORS = [
    # (cfg, the line the message must name, what else it must say)
    (FLAT + "[connected]\noutput=2\n[route]\nlayers=2\n", "layers=2", "layer 2"),
    (FLAT + "[connected]\noutput=2\n[route]\nlayers=1\n", "layers=1", "layer 1"),
    (FLAT + "[connected]\noutput=2\n[route]\nlayers=-2\n", "layers=-2", "layer -1"),
    (FLAT + "[conn]\n[conn]\n[route]\nlayers=-1,5\n", "layers=-1,5", "layer 5"),
    (FLAT + "[connected]\n[route]\n", "[route]", "needs layers="),
    (FLAT + "[connected]\n[shortcut]\nfrom=1\n", "from=1", "layer 1"),
    (FLAT + "[connected]\n[shortcut]\n", "[shortcut]", "needs from="),
    (
        IMAGE + "[convolutional]\nfilters=20\nsize=1\n[yolo]\nmask=0,1\nclasses=2\n",
        "[yolo]",
        "4x4x14",
    ),
    (
        IMAGE + "[convolutional]\nfilters=20\nsize=1\n[region]\nnum=2\nclasses=3\n",
        "[region]",
        "4x4x16",
    ),
    (FLAT + "[detection]\nside=1\nclasses=1\n", "[detection]", "= 3"),
    # layers that need an image after ones that output none (0x0x0): a
    # [connected] outputs 1x1xN, which darknet accepts as an image
    (FLAT + "[convolutional]\nfilters=2\n", "[convolutional]", "image"),
    (FLAT + "[connected]\n[softmax]\n[conv]\n", "[conv]", "image"),
    (FLAT + "[connected]\n[cost]\n[maxpool]\n", "[maxpool]", "image"),
    (FLAT + "[cost]\n[local]\n", "[local]", "image"),
    (FLAT + "[softmax]\n[crop]\n", "[crop]", "image"),
    (FLAT + "[rnn]\n[deconv]\n", "[deconv]", "image"),
    (FLAT + "[gru]\n[avgpool]\n", "[avgpool]", "image"),
    (IMAGE + "[reorg]\nextra=1\n[crnn]\n", "[crnn]", "image"),
    (FLAT + "[connected]\n[foo]\nbar=1\n", "[foo]", "not a layer type"),
    (FLAT + "[connected]\n[yolo\n", "[yolo", "not a layer type"),
    (FLAT + "[connected]\njunk line\n", "junk line", "cannot parse"),
    (FLAT + "[connected]\noutput=\n", "output=", "cannot parse"),
    ("height=3\n[net]\ninputs=4\n", "height=3", "before any section"),
    (IMAGE + "[upsample]\nstride=0\n", "stride=0", "divides by zero"),
    (FLAT + "[softmax]\ngroups=3\n", "groups=3", "does not divide"),
    (IMAGE + "[convolutional]\nfilters=0\n", "filters=0", ">= 1"),
    (IMAGE + "[maxpool]\nstride=0\n", "stride=0", ">= 1"),
    (IMAGE + "[convolutional]\nsize=7\n", "[convolutional]", "-2x-2"),
    (FLAT + "[connected]\n[network]\ninputs=2\n", "[network]", "first section"),
]


@pytest.mark.parametrize(("text", "line", "says"), CFG_ERRORS)
def test_cfg_errors_name_the_line(tmp_path, text, line, says):
    cfg = write_cfg(tmp_path, text, "bad.cfg")
    number = line_of(text, line)
    with pytest.raises(FormatError) as caught:
        darknet.read_cfg(cfg)
    message = str(caught.value)
    assert f"bad.cfg, line {number}:" in message
    assert says in message
    # read fails the same way, before looking at any array
    (tmp_path / "w.weights").write_bytes(header_bytes(0, 2, 0, 0))
    with pytest.raises(FormatError, match=f"line {number}:"):
        darknet.read(cfg, tmp_path / "w.weights")


def test_cfg_errors_without_a_line(tmp_path):
    with pytest.raises(FormatError, match=r"first section must be \[net\]"):
        darknet.read_cfg(write_cfg(tmp_path, "[connected]\noutput=2\n"))
    with pytest.raises(FormatError, match=r"line 1: \[net\] gives no input size"):
        darknet.read_cfg(write_cfg(tmp_path, "[net]\nheight=3\nwidth=3\n"))


# -- 5. batch normalizations --------------------------------------------------------


def offsets(expected):
    """(layer index, array) -> float slice in the payload, from a hand table."""
    out, at = {}, 0
    for index, (*_, arrays) in enumerate(expected):
        for array, shape in arrays.items():
            out[index, array] = slice(at, at + count(shape))
            at += count(shape)
    return out


def test_batch_norms_are_the_files_arrays(tmp_path):
    cfg = write_cfg(tmp_path, ALL_CFG)
    values = np.random.default_rng(5).uniform(0.5, 2.0, FLOATS["all"]).astype("<f4")
    (tmp_path / "w.weights").write_bytes(header_bytes(0, 2, 0, 0) + values.tobytes())
    network = darknet.read(cfg, tmp_path / "w.weights")
    where = offsets(all_expected())
    gates = ("wi.", "wf.", "wo.", "wg.", "ui.", "uf.", "uo.", "ug.")
    units = {
        0: ("",),
        2: ("",),
        21: ("input_layer.", "self_layer.", "output_layer."),
        23: ("",),
        24: ("",),
        28: gates,
    }
    channels = {(21, "input_layer."): 2, (21, "self_layer."): 2}
    channels |= {(21, "output_layer."): 5, (0, ""): 4, (2, ""): 6}
    channels |= {(23, ""): 7, (24, ""): 7} | {(28, g): 2 for g in gates}
    for layer in network:
        assert tuple(layer.batch_norms()) == units.get(layer.index, ())
    assert [(layer.index, prefix) for layer, prefix, _ in network.batch_norms()] == [
        (index, prefix) for index, prefixes in units.items() for prefix in prefixes
    ]
    for layer, prefix, norm in network.batch_norms():
        i = layer.index
        assert norm.num_features == channels[i, prefix]
        assert (norm.eps, norm.eps_placement) == (1e-6, "outside")
        assert not norm.use_batch_stats and not norm.update_running_stats
        np.testing.assert_array_equal(norm.gamma, values[where[i, prefix + "scales"]])
        np.testing.assert_array_equal(
            norm.running_mean, values[where[i, prefix + "rolling_mean"]]
        )
        np.testing.assert_array_equal(
            norm.running_var, values[where[i, prefix + "rolling_variance"]]
        )
        if layer.type == "batchnorm":  # pjreddie stores no β for it
            np.testing.assert_array_equal(norm.beta, np.zeros(channels[i, prefix]))
        else:
            np.testing.assert_array_equal(
                norm.beta, values[where[i, prefix + "biases"]]
            )
    # without weights there is nothing to normalize with
    assert darknet.read_cfg(cfg)[0].batch_norms() == {}


ALEXEY_CFG = """\
[net]
height=2
width=3
channels=2

[convolutional]
batch_normalize=1
filters=3
size=1

[batchnorm]
"""


def test_alexeyab_dialect_stores_batchnorm_biases(tmp_path):
    cfg = write_cfg(tmp_path, ALEXEY_CFG)
    # conv: biases 3, scales/mean/var 3 each, weights 3*2 = 18 floats;
    # the standalone [batchnorm]: 3 arrays of 3 (pjreddie), 4 (AlexeyAB)
    assert darknet.read_cfg(cfg)[1].shapes == bnorm(3)
    alexey = darknet.read_cfg(cfg, dialect="alexeyab")
    assert alexey[1].shapes == {"biases": (3,), **bnorm(3)}
    assert alexey.weights_size() == 20 + 4 * (18 + 12)

    values = np.linspace(0.5, 3.0, 30, dtype="<f4")
    data = header_bytes(0, 2, 0, 0) + values.tobytes()
    (tmp_path / "a.weights").write_bytes(data)
    network = darknet.read(cfg, tmp_path / "a.weights", dialect="alexeyab")
    norm = network[1].batch_norms()[""]
    np.testing.assert_array_equal(norm.beta, values[18:21])
    np.testing.assert_array_equal(norm.gamma, values[21:24])
    np.testing.assert_array_equal(norm.running_mean, values[24:27])
    np.testing.assert_array_equal(norm.running_var, values[27:30])
    assert (norm.eps, norm.eps_placement) == (1e-5, "inside")
    conv_norm = network[0].batch_norms()[""]
    assert (conv_norm.eps, conv_norm.eps_placement) == (1e-5, "inside")
    np.testing.assert_array_equal(conv_norm.beta, values[0:3])
    np.testing.assert_array_equal(conv_norm.gamma, values[3:6])
    darknet.write(network, tmp_path / "again.weights")
    assert (tmp_path / "again.weights").read_bytes() == data

    # the AlexeyAB file is 12 bytes too long for pjreddie's darknet ...
    with pytest.raises(FormatError, match=r"12 bytes are left over after layer 1"):
        darknet.read(cfg, tmp_path / "a.weights")
    # ... and pjreddie's 128-byte file 12 bytes short for AlexeyAB's: the
    # [batchnorm]'s biases take bytes 92..104, so rolling_variance (128..140)
    # runs out
    (tmp_path / "p.weights").write_bytes(data[:-12])
    line = line_of(ALEXEY_CFG, "[batchnorm]")
    with pytest.raises(
        FormatError,
        match=rf"layer 1 \[batchnorm\] \(line {line}\) runs out in its "
        r"rolling_variance .*12 bytes are missing",
    ):
        darknet.read(cfg, tmp_path / "p.weights", dialect="alexeyab")
    with pytest.raises(ValueError, match="dialect"):
        darknet.read_cfg(cfg, dialect="opencv")


# -- 6. write refuses wrong arrays ----------------------------------------------


def test_write_refuses_a_wrong_shape_and_writes_nothing(tmp_path):
    cfg = write_cfg(tmp_path, SMALL_CFG)
    data = header_bytes(0, 2, 0, 3) + np.random.default_rng(2).bytes(4 * 149)
    (tmp_path / "w.weights").write_bytes(data)
    (tmp_path / "other.cfg").write_text("# old cfg\n")
    network = darknet.read(cfg, tmp_path / "w.weights")
    before = sorted(os.listdir(tmp_path))
    weights = network[3].arrays["weights"]
    for wrong in (weights.T, weights.reshape(-1), weights[:, :-1]):
        network[3].arrays["weights"] = wrong
        with pytest.raises(
            ValueError,
            match=rf"layer 3 \[connected\] array 'weights' has shape "
            rf"{re.escape(str(wrong.shape))}; its cfg needs \(4, 12\)",
        ):
            darknet.write(
                network, tmp_path / "w.weights", cfg_path=tmp_path / "other.cfg"
            )
        with pytest.raises(ValueError):
            darknet.write(network, tmp_path / "w.weights")
        assert (tmp_path / "w.weights").read_bytes() == data
        assert (tmp_path / "other.cfg").read_text() == "# old cfg\n"
        assert sorted(os.listdir(tmp_path)) == before
    network[3].arrays["weights"] = weights
    del network[0].arrays["scales"]
    with pytest.raises(ValueError, match=r"layer 0 \[convolutional\] has no array"):
        darknet.write(network, tmp_path / "new.weights")
    assert not (tmp_path / "new.weights").exists()
    with pytest.raises(ValueError, match="has no array"):
        darknet.write(darknet.read_cfg(cfg), tmp_path / "new.weights")
    assert sorted(os.listdir(tmp_path)) == before


# -- 7. synthetic ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(NETWORKS))
def test_synthetic_is_deterministic_and_exact(tmp_path, name):
    cfg = write_cfg(tmp_path, NETWORKS[name][0])
    darknet.write(darknet.synthetic(cfg, seed=7), tmp_path / "a.weights")
    darknet.write(darknet.synthetic(cfg, seed=7), tmp_path / "b.weights")
    darknet.write(darknet.synthetic(cfg, seed=8), tmp_path / "c.weights")
    a = (tmp_path / "a.weights").read_bytes()
    assert len(a) == 20 + 4 * FLOATS[name]
    assert a[:20] == header_bytes(0, 2, 0, 0)
    assert a == (tmp_path / "b.weights").read_bytes()
    assert a != (tmp_path / "c.weights").read_bytes()
    network = darknet.read(cfg, tmp_path / "a.weights")
    for layer in network:
        for array, value in layer.arrays.items():
            assert np.isfinite(value).all()
            if array.endswith("rolling_variance"):
                assert (value > 0).all()


def test_synthetic_with_old_and_transposing_headers(tmp_path):
    cfg = write_cfg(tmp_path, ALL_CFG)
    old = darknet.synthetic(cfg, seed=1, header=darknet.Header(0, 1, 0, 9))
    darknet.write(old, tmp_path / "old.weights")
    data = (tmp_path / "old.weights").read_bytes()
    assert len(data) == 16 + 4 * FLOATS["all"]
    assert data[:16] == header_bytes(0, 1, 0, 9)
    flipped = darknet.synthetic(cfg, seed=1, header=darknet.Header(1001, 0, 0, 0))
    # connected weights stored (inputs, outputs)
    assert flipped[23].arrays["weights"].shape == (5, 7)
    assert flipped[26].arrays["input_layer.weights"].shape == (8, 3)
    assert flipped[27].arrays["uz.weights"].shape == (3, 4)
    assert flipped[28].arrays["ui.weights"].shape == (4, 2)
    assert flipped[1].arrays["weights"].shape == (6, 2, 3, 3)
    for layer, (*_, arrays) in zip(flipped, all_expected(True), strict=True):
        assert list(layer.arrays) == list(arrays)


def test_deconvolution_weights_are_c_by_n_as_its_gemm_reads_them(tmp_path):
    # forward_deconvolutional_layer: gemm_cpu(1, 0, m, n, k, 1, a, m, ...) with
    # m = size²·n, k = c: the weights are a c × (n·size²) matrix.
    cfg = write_cfg(
        tmp_path,
        IMAGE + "[deconvolutional]\nfilters=5\nsize=2\nstride=2\nactivation=linear\n",
    )
    layer = darknet.read_cfg(cfg)[0]
    assert layer.shapes == {"biases": (5,), "weights": (3, 5, 2, 2)}
    assert layer.output == (8, 8, 5, 8 * 8 * 5)  # (4 − 1)·2 + 2 − 0


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_dontloadscales_does_not_reach_recurrent_sub_layers(tmp_path, kind):
    # parse_network_cfg sets dontloadscales on the layer only; its sub-layers
    # come from make_connected_layer ({0}) and load_connected_weights tests the
    # sub-layer's own flag, so each still reads its three normalization arrays.
    section = f"[{kind}]\noutput=3\nbatch_normalize=1\ndontloadscales=1\n"
    cfg = write_cfg(tmp_path, FLAT + section)
    units = {"rnn": 3, "gru": 6, "lstm": 8}[kind]
    layer = darknet.read_cfg(cfg)[0]
    assert len(layer.units) == units
    assert all(unit.batch_normalize for unit in layer.units)
    # per unit: biases 3, weights 3·in (in = 4 inputs or 3 outputs), 3 BN arrays
    in_sizes = {
        "rnn": [4, 3, 3],
        "gru": [3, 3, 3, 4, 4, 4],
        "lstm": [3, 3, 3, 3, 4, 4, 4, 4],
    }[kind]
    assert sum(count(s) for s in layer.shapes.values()) == sum(
        3 + 3 * n + 9 for n in in_sizes
    )
