"""batchnorm.inference: folding BatchNorm into Linear/Conv2d, exact recalibration."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import nn
from batchnorm.inference import fold, fold_error_bound, recalibrate

PRESETS = [None, "darknet", "torch"]


def norm(channels, preset, rng, *, running_var_scale, mean_scale=1.0, **options):
    """A BatchNorm with random γ, β and running statistics."""
    if preset is None:
        layer = bn.BatchNorm(channels, **options)
    else:
        layer = bn.BatchNorm.from_preset(preset, channels, **options)
    layer.gamma = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    layer.beta = rng.normal(size=channels).astype(np.float32)
    layer.running_mean = (mean_scale * rng.normal(size=channels)).astype(np.float32)
    spread = rng.uniform(0.5, 2.0, channels)
    layer.running_var = (running_var_scale * spread).astype(np.float32)
    return layer.eval()


def linear_net(preset, var_scale, rng, *, bias=False, mean_scale=1.0):
    return nn.Sequential(
        [
            nn.Linear(20, 16, bias=bias, rng=rng),
            norm(16, preset, rng, running_var_scale=var_scale, mean_scale=mean_scale),
            nn.ReLU(),
            nn.Linear(16, 8, bias=bias, rng=rng),
            norm(8, preset, rng, running_var_scale=var_scale, mean_scale=mean_scale),
        ]
    )


def conv_net(preset, var_scale, rng, *, bias=False):
    return nn.Sequential(
        [
            nn.Conv2d(2, 4, 3, padding=1, bias=bias, rng=rng),
            norm(4, preset, rng, running_var_scale=var_scale),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias, rng=rng),
            norm(6, preset, rng, running_var_scale=var_scale),
            nn.ReLU(),
        ]
    )


def inputs_of_pairs(net, x):
    result, current = [], x
    layers = net.layers
    for i, layer in enumerate(layers):
        if i + 1 < len(layers) and isinstance(layers[i + 1], bn.BatchNorm):
            result.append((layer, layers[i + 1], current))
        current = layer(current)
    return result


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("var_scale", [1e4, 1e-7])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("bias", [False, True])
def test_fold_within_derived_bound(preset, var_scale, kind, bias):
    rng = np.random.default_rng(0)
    if kind == "linear":
        net, x = (
            linear_net(preset, var_scale, rng, bias=bias),
            rng.normal(size=(32, 20)),
        )
    else:
        net = conv_net(preset, var_scale, rng, bias=bias)
        x = rng.normal(size=(8, 2, 8, 8))
    if bias:
        for layer in net.layers:
            if getattr(layer, "bias", None) is not None:
                layer.bias[:] = rng.normal(size=layer.bias.shape)
    x = x.astype(np.float32)
    folded = fold(net)
    assert not any(isinstance(layer, bn.BatchNorm) for layer in folded.layers)
    assert len(folded.layers) == len(net.layers) - 2
    folded_pairs = [
        lay for lay in folded.layers if isinstance(lay, nn.Linear | nn.Conv2d)
    ]
    for (layer, batch_norm, inp), new in zip(
        inputs_of_pairs(net, x), folded_pairs, strict=True
    ):
        bound = fold_error_bound(layer, batch_norm, inp)
        error = np.abs(new(inp).astype(np.float64) - batch_norm(layer(inp)))
        assert np.all(error <= bound)
        # The bound is tight enough to mean something: it is small against the
        # outputs, and folding with the other ε convention would break it.
        assert bound.max() < 1e-4 * np.abs(batch_norm(layer(inp))).max()


@pytest.mark.parametrize("var_scale", [1e-7, 1e-5])
def test_wrong_eps_convention_breaks_the_bound(var_scale):
    # The bound discriminates: ε inside vs outside differs far beyond it when the
    # running variance is near ε.
    rng = np.random.default_rng(1)
    net = linear_net("darknet", var_scale, rng)
    x = rng.normal(size=(16, 20)).astype(np.float32)
    layer, batch_norm, inp = inputs_of_pairs(net, x)[0]
    wrong = copy.deepcopy(batch_norm)
    wrong.eps_placement = "inside"
    folded = fold(nn.Sequential([layer, wrong]))[0]
    error = np.abs(folded(inp) - batch_norm(layer(inp)))
    assert np.any(error > fold_error_bound(layer, batch_norm, inp))


def test_fold_whole_network_single_pair_is_within_bound():
    rng = np.random.default_rng(2)
    net = nn.Sequential(
        [
            nn.Conv2d(1, 3, 3, padding=1, rng=rng),
            norm(3, None, rng, running_var_scale=1e-3, mean_scale=50.0),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        ]
    )
    x = rng.normal(3.0, 1.0, size=(4, 1, 6, 6)).astype(np.float32)
    bound = fold_error_bound(net[0], net[1], x)
    propagated = nn.Sequential([nn.MaxPool2d(2), nn.Flatten()])(bound)
    error = np.abs(fold(net)(x).astype(np.float64) - net(x))
    assert np.all(error <= propagated)


def test_fold_leaves_network_unchanged_and_keeps_other_layers():
    rng = np.random.default_rng(3)
    net = nn.Sequential(
        [
            nn.Linear(4, 3, bias=False, rng=rng),
            norm(3, None, rng, running_var_scale=1.0),
            nn.ReLU(),
            norm(3, "torch", rng, running_var_scale=1.0),  # follows a ReLU: kept
            nn.Sequential(
                [nn.Linear(3, 2, rng=rng), norm(2, None, rng, running_var_scale=1.0)]
            ),
        ]
    )
    before = copy.deepcopy(net)
    folded = fold(net)
    names = [type(layer).__name__ for layer in folded.layers]
    assert names == ["Linear", "ReLU", "BatchNorm", "Sequential"]
    assert [type(lay).__name__ for lay in folded[3].layers] == ["Linear"]
    assert folded[2] is not net[3] and folded[0].bias.dtype == np.float32
    np.testing.assert_array_equal(net[0].weight, before[0].weight)
    assert net[0].bias is None and len(net.layers) == 5
    x = rng.normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(folded(x), net.eval()(x), rtol=1e-5, atol=1e-5)


def test_fold_is_computed_in_float64():
    # γ/σ = 1e4 and W near 1: the product rounded once, not twice.
    layer = nn.Linear(1, 1, bias=False, rng=0)
    layer.weight[:] = np.float32(1.0000001)
    batch_norm = bn.BatchNorm(1, eps=1e-30).eval()  # ε below the variance's ulp
    batch_norm.running_var[:] = np.float32(3e-9)
    folded = fold(nn.Sequential([layer, batch_norm]))[0]
    exact = 1.0000001192092896 / np.sqrt(np.float64(np.float32(3e-9)) + 1e-30)
    assert folded.weight[0, 0] == np.float32(exact)


@pytest.mark.parametrize(
    ("network", "error", "match"),
    [
        (bn.BatchNorm(3), TypeError, "network must be a batchnorm.nn.Sequential"),
        (
            nn.Sequential([nn.Linear(3, 4), bn.BatchNorm(5)]),
            ValueError,
            "normalizes 5 channels, the layer produces 4",
        ),
        (
            nn.Sequential([nn.Conv2d(1, 4, 3), bn.BatchNorm(4, axis=-1)]),
            ValueError,
            "channel axis -1 is not the layer's output channel axis 1",
        ),
    ],
)
def test_fold_errors(network, error, match):
    with pytest.raises(error, match=match):
        fold(network)


def test_fold_infinite_scale_error():
    # ε > 0 is required; outside the root, 1/(√0 + 1e-320) overflows to inf.
    batch_norm = bn.BatchNorm(2, eps=1e-320, eps_placement="outside")
    batch_norm.running_var[:] = 0.0
    with pytest.raises(ValueError, match="not finite in channels \\[0, 1\\]"):
        fold(nn.Sequential([nn.Linear(2, 2), batch_norm]))


# -- recalibrate ----------------------------------------------------------------------


def stream_net(rng, **options):
    return nn.Sequential(
        [
            bn.BatchNorm(3, dtype=np.float64, **options),
            nn.Linear(3, 4, rng=rng, dtype=np.float64),
            bn.BatchNorm(4, dtype=np.float64, running_var_kind="biased"),
            nn.ReLU(),
        ]
    )


def test_recalibrate_first_layer_is_exact_statistics_of_all_data():
    rng = np.random.default_rng(0)
    # Mean 1e4, spread 1: E[x²] − E[x]² would lose 8 of float64's 16 digits.
    x = rng.normal(1e4, 1.0, size=(200, 3))
    sizes = [7, 50, 2, 90, 51]
    batches = np.split(x, np.cumsum(sizes)[:-1])
    net = stream_net(rng)
    merged = recalibrate(net, batches)
    first = net[0]
    np.testing.assert_allclose(first.running_mean, x.mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(first.running_var, x.var(axis=0, ddof=1), rtol=1e-12)
    assert first.num_values_seen == 200 and first.num_batches_tracked == 5
    assert merged[0].count == 200
    # The second layer: statistics of the Linear outputs of batch-normalized data.
    hidden = np.concatenate([net[1](_bn(b)) for b in batches])
    # Each batch is centred, so the mean is 0 up to rounding.
    np.testing.assert_allclose(net[2].running_mean, hidden.mean(axis=0), atol=1e-10)
    np.testing.assert_allclose(
        net[2].running_var, hidden.var(axis=0), rtol=1e-10
    )  # biased: that layer's running_var_kind


def _bn(batch):
    return (batch - batch.mean(axis=0)) / np.sqrt(batch.var(axis=0) + 1e-6)


def test_recalibrate_restores_modes_and_accepts_pairs():
    rng = np.random.default_rng(1)
    net = stream_net(rng)
    net.eval()
    net[2].train()
    x = rng.normal(size=(40, 3))
    y = np.zeros(40, int)
    recalibrate(net, [(x[:20], y[:20]), (x[20:], y[20:])])
    assert (net[0].use_batch_stats, net[0].update_running_stats) == (False, False)
    assert (net[2].use_batch_stats, net[2].update_running_stats) == (True, True)
    np.testing.assert_allclose(net[0].running_mean, x.mean(axis=0), rtol=1e-13)


def test_recalibrate_a_single_layer_and_ghost_layers():
    rng = np.random.default_rng(2)
    x = rng.normal(5.0, 2.0, size=(30, 3, 2, 2))
    layer = bn.BatchNorm(3, virtual_batch_size=4, dtype=np.float64)
    recalibrate(layer, iter([x[:13], x[13:]]))
    np.testing.assert_allclose(
        layer.running_var, x.var(axis=(0, 2, 3), ddof=1), rtol=1e-13
    )
    assert layer.num_values_seen == 120 and layer.num_batches_tracked == 2


def test_recalibrate_errors_change_nothing():
    rng = np.random.default_rng(3)
    net = stream_net(rng)
    with pytest.raises(TypeError, match="holds no BatchNorm"):
        recalibrate(nn.Sequential([nn.ReLU()]), [np.ones((2, 3))])
    with pytest.raises(ValueError, match="batches yielded no data"):
        recalibrate(net, [])
    bad = rng.normal(size=(8, 3))
    bad[3, 1] = np.nan
    with pytest.raises(bn.NonFiniteStatisticsError, match="saw NaN/inf"):
        recalibrate(net, [rng.normal(size=(8, 3)), bad])
    np.testing.assert_array_equal(net[0].running_var, np.ones(3))
    assert net[0].num_batches_tracked == 0
    assert net[0].use_batch_stats and net[0].update_running_stats
