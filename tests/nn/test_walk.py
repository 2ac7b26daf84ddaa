"""The one network walker: nested containers are visited everywhere."""

from __future__ import annotations

import numpy as np

import batchnorm as bn
from batchnorm import nn
from batchnorm.inference import recalibrate


def nested_net() -> nn.Sequential:
    inner = nn.Sequential([bn.BatchNorm(3, backend="numpy"), nn.ReLU()])
    return nn.Sequential([nn.Linear(4, 3, rng=0), nn.Sequential([inner])])


def data(n: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def test_walk_visits_nested_layers_in_forward_order():
    net = nested_net()
    names = [type(layer).__name__ for layer in nn.walk(net)]
    assert names == [
        "Sequential",
        "Linear",
        "Sequential",
        "Sequential",
        "BatchNorm",
        "ReLU",
    ]
    assert nn.batch_norms(net) == [net[1][0][0]]


def test_accuracy_leaves_a_nested_batch_norm_untouched():
    """Regression: accuracy() set the modes of top-level BatchNorms only, so one
    inside a nested Sequential stayed in training mode and took the test batch
    into its running statistics (num_batches_tracked went from 0 to 1)."""
    net = nested_net()
    norm = net[1][0][0]
    before = norm.state_dict()
    nn.accuracy(net, data(), np.zeros(8, dtype=int))
    assert norm.num_batches_tracked == 0
    assert norm.num_values_seen == 0
    np.testing.assert_array_equal(norm.running_mean, before["running_mean"])
    np.testing.assert_array_equal(norm.running_var, before["running_var"])
    assert norm.use_batch_stats and norm.update_running_stats  # mode restored


def test_statistics_mode_reaches_nested_batch_norms():
    net = nested_net()
    norm = net[1][0][0]
    with nn.statistics_mode(net, use_batch_stats=False, update_running_stats=False):
        assert not norm.use_batch_stats and not norm.update_running_stats
    assert norm.use_batch_stats and norm.update_running_stats


def test_replace_batch_norms_reaches_nested_layers():
    net = nested_net()
    norm = net[1][0][0]
    replaced = nn.replace_batch_norms(net, lambda layer: nn.ReLU())
    assert replaced is net
    assert nn.batch_norms(net) == []
    assert isinstance(net[1][0][0], nn.ReLU) and norm is not net[1][0][0]


def test_recalibrate_reaches_nested_batch_norms():
    net = nested_net()
    batches = [data(8, seed) for seed in range(3)]
    (moments,) = recalibrate(net, batches)
    assert moments.count == 24
    assert net[1][0][0].num_values_seen == 24
