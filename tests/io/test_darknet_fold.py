"""darknet.fold checked unit by unit against darknet's own test-time computation.

The references are written here from pjreddie's C code, not from the fold:

- a unit's linear part in float64 (convolution with stride, padding and groups
  through im2col in darknet's (c, ky, kx) order, flipped convolution,
  deconvolution through col2im, connected) and in float32 as darknet's
  ``gemm_nn``/``gemm_nt``/``gemm_tn`` compute it: one rounded product and one
  rounded addition per term, summed in order from 0;
- the normalization as ``normalize_cpu``, ``scale_bias`` and ``add_bias`` do
  it: ``x - mean`` in float, divided by ``sqrt(variance) + .000001f`` (or
  AlexeyAB's ``sqrt(variance + .00001f)``) in double and stored as float, then
  ``*= scales`` and ``+= biases`` in float.

Each folded unit is compared twice: its float32 arrays evaluated in float64
against the float64 unfolded unit (they may differ by the single rounding of
``W'`` and ``b'`` to float32), and darknet's float32 evaluation of both
against :func:`darknet.fold_error_bound`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from batchnorm.io import darknet
from batchnorm.io._darknet_fold import folding

F32, F64 = np.float32, np.float64
U = 2.0**-24  # float32's unit roundoff (round to nearest)
PLAIN = darknet.Header(0, 2, 0, 0)  # what darknet writes
TRANSPOSING = darknet.Header(1001, 0, 0, 0)  # major > 1000: connected stored (in, out)


# -- references ------------------------------------------------------------------


def denominator(variance, dialect):
    """darknet's d in float64: pjreddie adds 1e-6f to √var in double, AlexeyAB
    adds 1e-5f to var in float and takes √ in double."""
    var = np.asarray(variance, F32)
    if dialect == "alexeyab":
        return np.sqrt((var + F32(1e-5)).astype(F64))
    return np.sqrt(var.astype(F64)) + float(F32(1e-6))


def normalize32(out, mean, variance, scales, biases, dialect):
    """normalize_cpu, scale_bias, add_bias on float32 ``out`` (channels last)."""
    centred = out - np.asarray(mean, F32)  # float - float: a float subtraction
    q = (centred.astype(F64) / denominator(variance, dialect)).astype(F32)
    return q * np.asarray(scales, F32) + np.asarray(biases, F32)


def normalize64(out, mean, variance, scales, biases, dialect):
    d = denominator(variance, dialect)
    return (out - np.asarray(mean, F64)) / d * np.asarray(scales, F64) + biases


@dataclass(frozen=True)
class Geometry:
    """How one unit applies its weights (darknet's layout, as read)."""

    kind: str
    size: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    flipped: bool = False
    transpose: bool = False


def geometry(layer, unit, header):
    transpose = header.transpose if header else False
    if unit.kind == "connected":
        return Geometry("connected", transpose=transpose)
    if unit.prefix:  # crnn: make_convolutional_layer(..., 3, 1, 1, ...)
        return Geometry("convolutional", 3, 1, 1)

    def option(key, default):
        return int(layer.option(key) or default)

    size = option("size", 1)
    padding = size // 2 if option("pad", 0) else option("padding", 0)
    return Geometry(
        layer.type,
        size,
        option("stride", 1),
        padding,
        option("groups", 1),
        bool(option("flipped", 0)),
    )


def conv_weights(weights, geo):
    """(n, c/groups, size, size), the flipped layout transposed back."""
    if geo.flipped:
        per, n = weights.shape
        return weights.T.reshape(n, per // geo.size**2, geo.size, geo.size)
    return weights


def im2col(x, size, stride, padding):
    """(B, C·size², oh·ow) patches in darknet's (c, ky, kx) row order."""
    b, c, h, w = x.shape
    oh = (h + 2 * padding - size) // stride + 1
    ow = (w + 2 * padding - size) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    cols = np.empty((b, c, size, size, oh, ow), x.dtype)
    for ky in range(size):
        for kx in range(size):
            cols[:, :, ky, kx] = xp[
                :, :, ky : ky + stride * oh : stride, kx : kx + stride * ow : stride
            ]
    return cols.reshape(b, c * size * size, oh * ow), (oh, ow)


def sequential(a, b):
    """Σ_k a[..., k] · b[..., k] as darknet's gemm loops do in ``a``'s dtype:
    from 0, one rounded product and one rounded addition per term."""
    acc = np.zeros(np.broadcast_shapes(a.shape[:-1], b.shape[:-1]), a.dtype)
    for k in range(a.shape[-1]):
        acc = acc + a[..., k] * b[..., k]
    return acc


def linear(weights, x, geo, *, float32=False):
    """The unit's W x, channels last: (B, outputs) or (B, oh, ow, n)."""
    dtype = F32 if float32 else F64
    weights, x = np.asarray(weights, dtype), np.asarray(x, dtype)
    if geo.kind == "connected":
        w = weights.T if geo.transpose else weights  # (outputs, inputs)
        if not float32:
            return x @ w.T
        return sequential(x[:, None, :], w[None, :, :])
    if geo.kind == "convolutional":
        w = conv_weights(weights, geo)
        n, g = w.shape[0], geo.groups
        cols, (oh, ow) = im2col(x, geo.size, geo.stride, geo.padding)
        cols = cols.reshape(x.shape[0], g, -1, oh * ow)  # (B, g, K, P)
        a = w.reshape(g, n // g, -1)  # (g, n/g, K)
        if float32:
            out = sequential(
                a[None, :, :, None, :], cols.transpose(0, 1, 3, 2)[:, :, None]
            )
        else:
            out = np.einsum("gnk,bgkp->bgnp", a, cols)
        return out.reshape(x.shape[0], n, oh, ow).transpose(0, 2, 3, 1)
    # deconvolution: gemm_tn of the (c, n·size²) weights, then col2im
    c, n, s, _ = weights.shape
    b, _, h, w_ = x.shape
    st, pad = geo.stride, geo.padding
    if float32:
        col = sequential(
            weights.transpose(1, 2, 3, 0)[None, :, :, :, None, None, :],
            x.transpose(0, 2, 3, 1)[:, None, None, None],
        )
    else:
        col = np.einsum("cnyx,bchw->bnyxhw", weights, x)
    out = np.zeros((b, n, (h - 1) * st + s, (w_ - 1) * st + s), dtype)
    for ky in range(s):  # col2im_cpu adds in (channel, ky, kx) order
        for kx in range(s):
            out[:, :, ky : ky + st * h : st, kx : kx + st * w_ : st] += col[
                :, :, ky, kx
            ]
    oh, ow = out.shape[2] - 2 * pad, out.shape[3] - 2 * pad
    return out[:, :, pad : pad + oh, pad : pad + ow].transpose(0, 2, 3, 1)


def fan_in(unit, geo):
    """The most float32 roundings on one output's sum (see fold_error_bound)."""
    if geo.kind == "deconvolutional":
        c = unit.inputs // geo.size**2
        return c * math.ceil(geo.size / geo.stride) ** 2
    return unit.inputs


def unit_input(layer, unit, geo, rng, batch=3):
    if geo.kind == "connected":
        return rng.normal(size=(batch, unit.inputs))
    c = unit.inputs * geo.groups // geo.size**2
    h, w = layer.input.h, layer.input.w
    return rng.normal(size=(batch, c, h, w))


def bn_arrays(layer, prefix=""):
    a = layer.arrays
    biases = a.get(prefix + "biases")
    return (
        a[prefix + "rolling_mean"],
        a[prefix + "rolling_variance"],
        a[prefix + "scales"],
        np.zeros(a[prefix + "scales"].shape, F32) if biases is None else biases,
    )


# -- the checks --------------------------------------------------------------------

#: max(observed / bound) per case, float32 against fold_error_bound and float64
#: against the single rounding of W' and b' (for reading after a run).
RATIOS: dict[str, float] = {}
RATIOS64: dict[str, float] = {}


def check_unit(original, folded, old, new, unit, *, dialect, then=None, rng, case):
    """Folded unit ``unit`` of layer ``new`` (of ``folded``) against layer ``old``
    of ``original`` followed by the standalone [batchnorm] ``then``, if any."""
    geo = geometry(old, unit, original.header)
    p = unit.prefix
    w, b = old.arrays[p + "weights"], old.arrays[p + "biases"]
    fw, fb = new.arrays[p + "weights"], new.arrays[p + "biases"]
    assert fw.dtype == F32 and fb.dtype == F32
    assert not {p + k for k in ("scales", "rolling_mean", "rolling_variance")} & set(
        new.arrays
    ), "the folded unit keeps normalization arrays"
    x = unit_input(old, unit, geo, rng)
    # float64: the unfolded unit (and the [batchnorm] after it) vs the folded one
    ref = linear(w, x, geo)
    size = linear(np.abs(w), np.abs(x), geo)  # Σ|W x|, then Σ of |every term|
    gain = np.ones(ref.shape[-1])
    if unit.batch_normalize:
        mean, var, scales, beta = bn_arrays(old, p)
        ref = normalize64(ref, mean, var, scales, beta, dialect)
        a = np.asarray(scales, F64) / denominator(var, dialect)
        size = np.abs(a) * (size + np.abs(mean)) + np.abs(beta)
        gain = gain * a
    else:
        ref = ref + b
        size = size + np.abs(b)
    if then is not None:
        mean, var, scales, beta = bn_arrays(then)
        ref = normalize64(ref, mean, var, scales, beta, dialect)
        a = np.asarray(scales, F64) / denominator(var, dialect)
        size = np.abs(a) * (size + np.abs(mean)) + np.abs(beta)
        gain = gain * a
    got = linear(fw, x, geo) + fb.astype(F64)
    # W' and b' are each rounded once to float32 (|δ| ≤ 2⁻²⁴); the float64
    # arithmetic of both sides adds at most ~(n + 12)·2⁻⁵³ of the sum of the
    # magnitudes of every term (`size`), far below 2⁻²⁴ of it.
    n = fan_in(unit, geo)
    allowed = U * (np.abs(gain) * linear(np.abs(w), np.abs(x), geo) + np.abs(fb))
    allowed = allowed + (n + 12) * 2.0**-53 * size
    error = np.abs(got - ref)
    assert (error <= allowed).all(), (case, float((error / allowed).max()))
    RATIOS64[case] = max(RATIOS64.get(case, 0.0), float((error / allowed).max()))
    if then is not None or not unit.batch_normalize:
        return
    # float32, as darknet computes both: within fold_error_bound, and not loosely
    mean, var, scales, beta = bn_arrays(old, p)
    unfolded = normalize32(
        linear(w, x, geo, float32=True), mean, var, scales, beta, dialect
    )
    folded32 = linear(fw, x, geo, float32=True) + fb
    bound = darknet.fold_error_bound(
        linear(np.abs(w), np.abs(x), geo),
        scales,
        mean,
        var,
        beta,
        fan_in=n,
        dialect=dialect,
    )
    error32 = np.abs(folded32.astype(F64) - unfolded.astype(F64))
    assert (error32 <= bound).all(), (case, float((error32 / bound).max()))
    ratio = float((error32 / bound).max())
    RATIOS[case] = max(RATIOS.get(case, 0.0), ratio)
    assert ratio > 1e-3, f"{case}: the bound is {1 / ratio:.3g} times the error"


def write_cfg(tmp_path: Path, text: str, name: str = "net.cfg") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def snapshot(network):
    return network.cfg_text, {
        (layer.index, name): array.copy()
        for layer in network.layers
        for name, array in layer.arrays.items()
    }


def assert_unchanged(network, before):
    text, arrays = before
    assert network.cfg_text == text
    now = snapshot(network)[1]
    assert now.keys() == arrays.keys()
    for key, array in arrays.items():
        np.testing.assert_array_equal(now[key], array, err_msg=str(key))


def check_network(original, folded, *, dialect="pjreddie", removed=(), rng, case):
    """Every unit of ``folded`` against ``original``; ``removed``: the standalone
    [batchnorm] sections that were folded into the layer before them."""
    removed = set(removed)
    old_of_new = [i for i in range(len(original.layers)) if i not in removed]
    assert len(folded.layers) == len(old_of_new)
    for new, old_index in zip(folded.layers, old_of_new, strict=True):
        old = original.layers[old_index]
        assert (new.type, new.output) == (old.type, old.output)
        assert not new.batch_normalize or new.type == "batchnorm"
        then = original.layers[old_index + 1] if old_index + 1 in removed else None
        for unit in new.units:
            (old_unit,) = [u for u in old.units if u.prefix == unit.prefix]
            if old.type == "batchnorm" or (not old_unit.batch_normalize and not then):
                for name in old.shapes:  # untouched
                    np.testing.assert_array_equal(new.arrays[name], old.arrays[name])
                continue
            check_unit(
                original,
                folded,
                old,
                new,
                old_unit,
                dialect=dialect,
                then=then if not unit.prefix else None,
                rng=rng,
                case=case,
            )


# -- convolutional, deconvolutional, connected ----------------------------------------

CONV = """\
[net]
height=9
width=9
channels=4

# 0: groups 1, stride 2, pad=1
[convolutional]
batch_normalize=1
filters=6
size=3
stride=2
pad=1
activation=leaky

# 1: groups 2
[convolutional]
batch_normalize=1
filters=4
groups=2
size=3
pad=1
activation=linear

# 2: flipped=1, padding=1
[convolutional]
batch_normalize=1
flipped=1
filters=5
size=3
padding=1
activation=relu

# 3: deconvolution, stride 2
[deconvolutional]
batch_normalize=1
filters=3
size=3
stride=2
padding=1
activation=linear

# 4: 1x1 without batch_normalize: left as it is
[convolutional]
filters=2
size=1
activation=logistic
"""

CONNECTED = """\
[net]
inputs=7

[connected]
output=5
batch_normalize=1
activation=linear

# square: (5, 5) whether stored (outputs, inputs) or transposed
[connected]
output=5
batch_normalize=1
activation=logistic

[connected]
output=1
batch_normalize=1
activation=linear
"""


@pytest.mark.parametrize("seed", [0, 1])
def test_convolutions_fold_unit_by_unit(tmp_path, seed):
    net = darknet.synthetic(write_cfg(tmp_path, CONV), seed=seed)
    assert net[2].shapes["weights"] == (4 * 9, 5)  # flipped: (c·size², n)
    assert net[3].shapes["weights"] == (5, 3, 3, 3)  # deconvolution: (c, n, s, s)
    before = snapshot(net)
    folded = darknet.fold(net)
    assert_unchanged(net, before)
    assert [layer.output for layer in folded] == [layer.output for layer in net]
    check_network(net, folded, rng=np.random.default_rng(seed), case=f"conv{seed}")
    assert folded.cfg_text.count("batch_normalize=0") == 4
    assert "batch_normalize=1" not in folded.cfg_text


@pytest.mark.parametrize("header", [PLAIN, TRANSPOSING])
def test_connected_fold_with_either_weights_layout(tmp_path, header):
    net = darknet.synthetic(write_cfg(tmp_path, CONNECTED), header=header)
    assert net[0].shapes["weights"] == ((7, 5) if header.transpose else (5, 7))
    folded = darknet.fold(net)
    assert folded.header == header
    check_network(
        net, folded, rng=np.random.default_rng(2), case=f"connected {header.major}"
    )


def test_square_transposed_connected_folds_along_its_outputs(tmp_path):
    """A (5, 5) unit stored (inputs, outputs) must be scaled per column: a fold
    that told the layout from the shape scaled its rows (the inputs)."""
    net = darknet.synthetic(write_cfg(tmp_path, CONNECTED), header=TRANSPOSING)
    folded = darknet.fold(net)
    mean, var, scales, beta = bn_arrays(net[1])
    a = np.asarray(scales, F64) / denominator(var, "pjreddie")
    exact = net[1].arrays["weights"].astype(F64) * a[None, :]  # (inputs, outputs)
    got = folded[1].arrays["weights"].astype(F64)
    assert (np.abs(got - exact) <= U * np.abs(exact)).all()


# -- recurrent layers ---------------------------------------------------------------

RECURRENT = """\
[net]
inputs=6

[rnn]
output=4
batch_normalize=1
activation=leaky

[gru]
output=3
batch_normalize=1

[lstm]
output=3
batch_normalize=1

[connected]
output=2
activation=linear
"""

CRNN = """\
[net]
height=5
width=5
channels=2

[crnn]
hidden_filters=3
output_filters=4
batch_normalize=1
activation=leaky
"""


def check_recurrent_arrays(net, folded, header):
    """Every batch-normalized unit: its normalization arrays gone, weights
    a·W and biases β − a·μ, each the float32 nearest the float64 value."""
    count = 0
    for old, new in zip(net.layers, folded.layers, strict=True):
        for unit in old.units:
            if not unit.batch_normalize:
                continue
            count += 1
            p = unit.prefix
            assert set(new.arrays) & {p + "scales", p + "rolling_mean"} == set()
            mean, var, scales, beta = bn_arrays(old, p)
            a = np.asarray(scales, F64) / denominator(var, "pjreddie")
            w = old.arrays[p + "weights"].astype(F64)
            geo = geometry(old, unit, header)
            if geo.kind == "connected":
                a_w = a[None, :] if geo.transpose else a[:, None]
            else:
                a_w = a[:, None, None, None]
            for got, exact in (
                (new.arrays[p + "weights"], a_w * w),
                (new.arrays[p + "biases"], beta - a * mean.astype(F64)),
            ):
                assert got.dtype == F32 and got.shape == exact.shape
                assert (np.abs(got.astype(F64) - exact) <= U * np.abs(exact)).all(), p
    return count


@pytest.mark.parametrize("header", [PLAIN, TRANSPOSING])
def test_rnn_gru_lstm_fold_every_unit(tmp_path, header):
    net = darknet.synthetic(write_cfg(tmp_path, RECURRENT), header=header)
    folded = darknet.fold(net)
    assert check_recurrent_arrays(net, folded, header) == 3 + 6 + 8
    assert "batch_normalize=1" not in folded.cfg_text
    for layer in folded:
        assert not layer.batch_normalize
        assert set(layer.shapes) == set(layer.arrays)
    check_network(
        net, folded, rng=np.random.default_rng(3), case=f"recurrent {header.major}"
    )


def test_crnn_folds_its_three_convolutions(tmp_path):
    net = darknet.synthetic(write_cfg(tmp_path, CRNN))
    folded = darknet.fold(net)
    assert check_recurrent_arrays(net, folded, None) == 3
    check_network(net, folded, rng=np.random.default_rng(4), case="crnn")


# -- standalone [batchnorm], routes and shortcuts -----------------------------------

STANDALONE = """\
[net]
height=6
width=6
channels=3

# 0: linear, no batch_normalize
[convolutional]
filters=4
size=3
pad=1
activation=linear

# 1: folded into 0
[batchnorm]

# 2: linear with batch_normalize
[convolutional]
batch_normalize=1
filters=4
size=1
activation=linear

# 3: folded into 2, after 2's own
[batchnorm]

# 4: leaky
[convolutional]
batch_normalize=1
filters=4
size=3
pad=1
activation=leaky

# 5: kept: 4 is leaky
[batchnorm]

# 6: linear, read by the route at 10
[convolutional]
filters=4
size=1
activation=linear

# 7: kept: 10 reads 6
[batchnorm]

# 8: relative, to the folded 1
[shortcut]
from=-7
activation=linear

# 9: absolute, past both folded sections
[shortcut]
from=4
activation=linear

# 10: absolute and relative (to the folded 3)
[route]
layers=6,-7

# 11: relative, to the folded 1
[route]
layers=-10,-1
"""


def test_standalone_batchnorm_folds_and_routes_follow(tmp_path):
    cfg = write_cfg(tmp_path, STANDALONE)
    net = darknet.synthetic(cfg, seed=5)
    before = snapshot(net)
    done = folding(net)
    folded = done.network
    assert_unchanged(net, before)
    assert done.merged == ((1, 0), (3, 2))
    assert [index for index, _ in done.kept] == [5, 7]
    assert "activation=leaky" in done.kept[0][1]
    assert "layer 10 [route]" in done.kept[1][1]
    assert done.units == ((2, ""), (4, ""))
    check_network(net, folded, removed={1, 3}, rng=np.random.default_rng(5), case="bn")
    # each route and shortcut reads the same computation as before
    removed = {1, 3}
    old_of_new = [i for i in range(len(net.layers)) if i not in removed]
    same = {i: i - 1 if i in removed else i for i in range(len(net.layers))}
    for new, old_index in zip(folded.layers, old_of_new, strict=True):
        old = net[old_index]
        assert [old_of_new[j] for j in new.sources] == [same[j] for j in old.sources]
        for j, k in zip(new.sources, old.sources, strict=True):
            assert folded[j].output == net[k].output
    options = {(lay.index, k): v for lay in folded for k, v, _ in lay.options}
    assert options[6, "from"] == "-6"  # was -7: 1 → 0
    assert options[7, "from"] == "2"  # was 4
    assert options[8, "layers"] == "4,-7"  # was 6,-7: 3 → 2 (now 1)
    assert options[9, "layers"] == "-9,-1"  # was -10,-1: 1 → 0
    assert folded.cfg_text.count("[batchnorm]") == 2
    # a removed section goes with the comments before it, not those of the next
    assert "# 1: folded" not in folded.cfg_text and "# 3: folded" not in folded.cfg_text
    assert "=linear\n\n# 2: linear with batch_normalize\n[conv" in folded.cfg_text
    # the kept sections are untouched
    for old_index in (5, 7):
        new = folded[old_of_new.index(old_index)]
        for name in net[old_index].shapes:
            np.testing.assert_array_equal(new.arrays[name], net[old_index].arrays[name])


def test_folded_network_reads_back_from_the_written_pair(tmp_path):
    cfg = write_cfg(tmp_path, STANDALONE)
    darknet.write(darknet.synthetic(cfg, seed=6), tmp_path / "net.weights")
    net = darknet.read(cfg, tmp_path / "net.weights", mmap=True)
    before = snapshot(net)
    folded = darknet.fold(net)
    assert_unchanged(net, before)
    darknet.write(folded, tmp_path / "f.weights", tmp_path / "f.cfg")
    again = darknet.read(tmp_path / "f.cfg", tmp_path / "f.weights")
    assert (tmp_path / "f.cfg").read_text() == folded.cfg_text
    size = (tmp_path / "f.weights").stat().st_size
    arrays = sum(a.size for layer in folded for a in layer.arrays.values())
    assert size == folded.weights_size() == folded.header.size + 4 * arrays
    assert size < (tmp_path / "net.weights").stat().st_size
    assert len(again) == len(folded) == len(net) - 2
    for a, b in zip(again, folded, strict=True):
        assert a.arrays.keys() == b.arrays.keys() and a.output == b.output
        for name in a.arrays:
            np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
    # a folded network has nothing more to fold but the kept [batchnorm]s
    twice = folding(again)
    assert twice.units == () and twice.merged == ()
    assert [index for index, _ in twice.kept] == [3, 5]


def test_kept_batchnorm_reasons(tmp_path):
    cfg = write_cfg(
        tmp_path,
        "[net]\nheight=4\nwidth=4\nchannels=2\n"
        "[batchnorm]\n"  # 0: nothing before it
        "[maxpool]\nsize=2\nstride=2\n"
        "[batchnorm]\n"  # 2: after a maxpool
        "[convolutional]\nfilters=2\nsize=1\n"  # 3: logistic by default
        "[batchnorm]\n"  # 4
        "[convolutional]\nfilters=2\nsize=1\nactivation=linear\ndontload=1\n"
        "[batchnorm]\n"  # 6: the conv before it loads nothing
        "[batchnorm]\n",  # 7: after a batchnorm
    )
    done = folding(darknet.synthetic(cfg))
    reasons = dict(done.kept)
    assert done.merged == ()
    assert "first layer" in reasons[0]
    assert "follows layer 1 [maxpool]" in reasons[2]
    assert "activation=logistic" in reasons[4]
    assert "dontload=1" in reasons[6]
    assert "follows layer 6 [batchnorm]" in reasons[7]


def test_shortcut_from_with_extra_indices_is_renumbered(tmp_path):
    """pjreddie's parse_shortcut reads from= with atoi (the first index); AlexeyAB
    cfgs list more. Only the first is renumbered, the rest kept as written."""
    cfg = write_cfg(
        tmp_path,
        "[net]\nheight=4\nwidth=4\nchannels=2\n"
        "[convolutional]\nfilters=2\nsize=1\nactivation=linear\n"
        "[batchnorm]\n"
        "[convolutional]\nfilters=2\nsize=1\nactivation=leaky\n"
        "[convolutional]\nfilters=2\nsize=1\nactivation=leaky\n"
        "[shortcut]\nfrom=2,-1\nactivation=linear\n",
    )
    net = darknet.synthetic(cfg)
    assert net[4].sources == (2,)
    folded = darknet.fold(net)
    assert folded[3].option("from") == "1,-1"
    assert folded[3].sources == (1,)
    check_network(net, folded, removed={1}, rng=np.random.default_rng(7), case="sc")


# -- dialects -------------------------------------------------------------------------

SMALL_VARIANCE = """\
[net]
height=4
width=4
channels=2

[convolutional]
batch_normalize=1
filters=4
size=3
pad=1
activation=linear

[batchnorm]

[convolutional]
filters=3
size=1
activation=leaky
"""


def small_variance_network(path, dialect):
    net = darknet.synthetic(path, seed=8, dialect=dialect)
    for layer in net.layers[:2]:
        layer.arrays["rolling_variance"] = np.array([1e-5, 2e-5, 1e-6, 0.0], F32)
    if dialect == "alexeyab":  # the fork's [batchnorm] stores (and adds) biases
        assert net[1].arrays["biases"].shape == (4,)
    return net


@pytest.mark.parametrize("dialect", ["pjreddie", "alexeyab"])
def test_each_dialect_folds_with_its_own_denominator(tmp_path, dialect):
    path = write_cfg(tmp_path, SMALL_VARIANCE)
    net = small_variance_network(path, dialect)
    folded = darknet.fold(net)  # the network's dialect unless told
    np.testing.assert_array_equal(
        folded[0].arrays["weights"],
        darknet.fold(net, dialect=dialect)[0].arrays["weights"],
    )
    check_network(
        net,
        folded,
        dialect=dialect,
        removed={1},
        rng=np.random.default_rng(9),
        case=f"dialect {dialect}",
    )
    # the other dialect's formula is measurably wrong here (up to ~30 %)
    other = "alexeyab" if dialect == "pjreddie" else "pjreddie"
    wrong = darknet.fold(net, dialect=other)
    ratio = wrong[0].arrays["weights"] / folded[0].arrays["weights"]
    assert np.abs(ratio - 1).max() > 0.25


def test_fold_error_bound_alone_on_a_small_variance_unit(tmp_path):
    """The float32 check on a unit whose a is large (var 0..2e-5), each dialect."""
    cfg = write_cfg(tmp_path, SMALL_VARIANCE.replace("[batchnorm]\n", ""))
    for dialect in ("pjreddie", "alexeyab"):
        net = darknet.synthetic(cfg, seed=10, dialect=dialect)
        net[0].arrays["rolling_variance"] = np.array([1e-5, 2e-5, 1e-6, 0.0], F32)
        check_network(
            net,
            darknet.fold(net, dialect=dialect),
            dialect=dialect,
            rng=np.random.default_rng(10),
            case=f"small variance {dialect}",
        )


# -- the bound's derivation ------------------------------------------------------------


def worst_case(w, x, mean, var, scales, beta, sign):
    """darknet's unfolded unit (sign=+1) or the folded one (sign=-1) with every
    rounding at its worst in the standard model fl(x op y) = (x op y)(1 + δ),
    |δ| ≤ u: δ = sign·u on each product, sum, subtraction, division, scaling
    and bias addition darknet makes (all values positive here)."""
    r = 1 + sign * U
    d = denominator(var, "pjreddie")
    a = scales / d
    if sign < 0:  # folded: W' and b' rounded, then the n + 1-term sum
        w = w * a * r
        acc = 0.0
        for j, (wj, xj) in enumerate(zip(w, x, strict=True)):
            acc = wj * xj * r if j == 0 else (acc + wj * xj * r) * r
        return (acc + (beta - a * mean) * r) * r
    acc = 0.0
    for j, (wj, xj) in enumerate(zip(w, x, strict=True)):
        acc = wj * xj * r if j == 0 else (acc + wj * xj * r) * r
    centred = (acc - mean) * r  # float - float
    q = centred / d * r  # in double, stored as float
    return (q * scales * r + beta) * r  # scale_bias, add_bias


@pytest.mark.parametrize("n", [1, 2, 9])
def test_bound_covers_every_rounding_darknet_makes(n):
    """Every term positive, every rounding of the unfolded unit up and of the
    folded one down: the gap is ≈ (n + n + 2 + 4)·u of the output for n = 1.
    Counting three roundings in normalize/scale/bias (γ_3) instead of four, the
    float subtraction ``x - mean`` forgotten, the bound fell short of it."""
    w, x = np.full(n, 1.25), np.full(n, 1.5)
    mean, var, scales, beta = 1e-9, 0.81, 1.1, 1e-9  # μ, β tiny: all in the sums
    gap = worst_case(w, x, mean, var, scales, beta, 1) - worst_case(
        w, x, mean, var, scales, beta, -1
    )
    bound = darknet.fold_error_bound(
        np.array([np.sum(w * x)]),
        np.array([scales]),
        np.array([mean]),
        np.array([var], F32),
        np.array([beta]),
        fan_in=n,
    )[0]
    assert 0 < gap <= bound
    if n == 1:
        assert gap > 0.99 * bound  # the bound is tight here


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "bad"),
    [
        ("rolling_variance", -1.0),
        ("rolling_variance", np.nan),
        ("scales", np.inf),
        ("rolling_mean", np.nan),
    ],
)
def test_nonfinite_normalization_names_the_layer_that_holds_it(tmp_path, array, bad):
    """Of the conv's own normalization, and of the [batchnorm] folded into it
    (named as that [batchnorm], not as the conv it would be folded into)."""
    cfg = write_cfg(tmp_path, SMALL_VARIANCE)
    net = darknet.synthetic(cfg)
    before = snapshot(net)
    net[0].arrays[array][2] = bad
    line = net[0].line
    with pytest.raises(
        ValueError, match=rf"layer 0 \[convolutional\] \(line {line}\).*channels \[2\]"
    ):
        darknet.fold(net)
    net = darknet.synthetic(cfg)
    net[1].arrays[array][1] = bad
    with pytest.raises(
        ValueError,
        match=rf"layer 1 \[batchnorm\] \(line {net[1].line}\).*channels \[1\]",
    ):
        darknet.fold(net)
    assert snapshot(darknet.synthetic(cfg))[0] == before[0]


def test_infinite_variance_folds_to_the_bias_as_darknet_computes(tmp_path):
    """(x − μ)/∞ = 0 in darknet: the channel outputs its bias; a = 0 folds so."""
    net = darknet.synthetic(write_cfg(tmp_path, CONNECTED))
    net[0].arrays["rolling_variance"][1] = np.inf
    folded = darknet.fold(net)
    assert (folded[0].arrays["weights"][1] == 0).all()
    assert folded[0].arrays["biases"][1] == net[0].arrays["biases"][1]


def test_nonfinite_in_a_recurrent_unit_names_the_unit(tmp_path):
    net = darknet.synthetic(write_cfg(tmp_path, RECURRENT))
    net[1].arrays["ur.rolling_variance"][0] = -2.0
    with pytest.raises(ValueError, match=r"layer 1 \[gru\] .* unit ur\."):
        darknet.fold(net)


def test_folded_weights_that_overflow_float32_are_refused(tmp_path):
    net = darknet.synthetic(write_cfg(tmp_path, CONNECTED))
    net[0].arrays["weights"][3, 0] = 3e38
    net[0].arrays["scales"][3] = 1e3
    with pytest.raises(ValueError, match=r"layer 0 .*weights are not finite.*\[3\]"):
        darknet.fold(net)


def test_a_network_without_arrays_cannot_fold(tmp_path):
    with pytest.raises(ValueError, match="no arrays"):
        darknet.fold(darknet.read_cfg(write_cfg(tmp_path, CONV)))


def test_unknown_dialect(tmp_path):
    net = darknet.synthetic(write_cfg(tmp_path, CONNECTED))
    with pytest.raises(ValueError, match="dialect must be one of"):
        darknet.fold(net, dialect="darknet")


def test_rounding_reports_subnormal_folded_weights(tmp_path):
    net = darknet.synthetic(write_cfg(tmp_path, CONNECTED))
    assert 0 < folding(net).rounding <= U
    net[0].arrays["scales"][0] = 1e-40  # a·W subnormal in float32
    assert folding(net).rounding > U


def test_numload_layer_with_batch_normalization_is_refused(tmp_path):
    # numload=N loads N of the filters; the others keep darknet's initial values
    # (scales 1, rolling statistics 0), so setting batch_normalize=0 for the whole
    # layer would change what darknet computes for them.
    cfg = write_cfg(
        tmp_path,
        "[net]\nheight=4\nwidth=4\nchannels=2\n[convolutional]\nfilters=3\n"
        "size=1\nbatch_normalize=1\nnumload=2\nactivation=linear\n",
    )
    net = darknet.synthetic(cfg, seed=0)
    with pytest.raises(ValueError, match=r"layer 0 .*numload=2"):
        darknet.fold(net)


def test_fold_retires_the_tie_to_the_original_weights(tmp_path):
    # darknet.save's cfgs begin with a comment naming the .weights written with
    # them; the folded cfg belongs to other weights.
    text = (
        "# batchnorm: written with a.weights, sha256 0123456789abcdef\n[net]\n"
        "inputs=3\n[connected]\noutput=2\nbatch_normalize=1\nactivation=linear\n"
    )
    net = darknet.synthetic(write_cfg(tmp_path, text), seed=0)
    folded = darknet.fold(net)
    first = folded.cfg_text.splitlines()[0]
    assert first.startswith("#") and "a.weights" not in first
    assert len(folded.cfg_text.splitlines()) == len(text.splitlines())
