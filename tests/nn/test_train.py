"""Data splits, mini-batches, the training loop (loss falls, divergence recorded),
and the BN statistics modes used at test time."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import nn


@pytest.fixture(scope="module")
def digits():
    return nn.load_digits(seed=0)


def test_digits_split_is_fixed_and_stratified(digits):
    again = nn.load_digits(seed=0)
    np.testing.assert_array_equal(digits.y_test, again.y_test)
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert digits.x_train.shape[1] == 64 and digits.x_train.dtype == np.float32
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    counts = np.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert digits.reshape(1, 8, 8).x_test.shape == (len(digits.x_test), 1, 8, 8)
    other = nn.load_digits(seed=1)
    assert not np.array_equal(digits.y_train[:50], other.y_train[:50])


def test_minibatches_cover_each_epoch_once():
    x, y = np.arange(10), np.arange(10)
    batches = nn.minibatches(x, y, 3, np.random.default_rng(0))
    epoch = np.concatenate([next(batches)[0] for _ in range(3)])
    assert len(np.unique(epoch)) == 9  # drop_last: the tail of 1 is skipped
    with pytest.raises(ValueError, match="batch_size"):
        next(nn.minibatches(x, y, 11, np.random.default_rng(0)))


def test_split_errors():
    with pytest.raises(ValueError, match="same number of samples"):
        nn.train_test_split(np.ones((3, 2)), np.ones(4))
    with pytest.raises(ValueError, match="test_fraction"):
        nn.train_test_split(np.ones((3, 2)), np.ones(3), test_fraction=1.0)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_short_seeded_training_run_loss_falls(digits, batch_norm):
    def run():
        rng = np.random.default_rng(0)
        model = nn.mlp(batch_norm=batch_norm, rng=rng, hidden=(32,), backend="numpy")
        optimizer = nn.SGD(model, 0.1, momentum=0.9, weight_decay=5e-4)
        return nn.fit(
            model, optimizer, digits, steps=150, batch_size=32, rng=rng, eval_every=50
        )

    history = run()
    assert history.diverged_at is None and len(history.loss) == 150
    assert np.mean(history.loss[-20:]) < np.mean(history.loss[:10]) / 4
    assert history.eval_steps == [0, 50, 100, 150]
    assert history.test_accuracy[0] < 0.3 < 0.9 < history.test_accuracy[-1]
    assert history.steps_to(0.9) in (50, 100, 150)
    assert history.steps_to(1.01) is None
    assert history.roughness() > 0
    assert run().loss == history.loss  # seeded: bit-for-bit reproducible


def test_cnn_on_any_arrays_trains():
    """Not only the digits: two classes of synthetic 6×6 images (bright top or
    bottom half), through a CNN with BN and global average pooling."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    images = rng.normal(0, 0.3, (200, 1, 6, 6)).astype(np.float32)
    images[labels == 0, :, :3] += 1.0
    images[labels == 1, :, 3:] += 1.0
    data = nn.train_test_split(images, labels, seed=0)
    model = nn.Sequential(
        [
            nn.Conv2d(1, 4, 3, stride=1, padding=1, bias=False, rng=rng),
            bn.BatchNorm(4, backend="numpy", momentum=0.9),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1, rng=rng),
            nn.ReLU(),
            nn.GlobalAvgPool(),
            nn.Linear(4, 2, rng=rng),
        ]
    )
    history = nn.fit(
        model, nn.SGD(model, 0.1, momentum=0.9), data, steps=60, batch_size=16, rng=rng
    )
    assert np.mean(history.loss[-10:]) < np.mean(history.loss[:10]) / 2
    assert history.test_accuracy[-1] >= 0.9


@pytest.mark.parametrize("batch_norm", [False, True])
def test_divergence_is_recorded_not_raised(digits, batch_norm):
    """NaN in the data: BN layers raise NonFiniteStatisticsError, plain layers give
    a NaN loss; both end the run as diverged, without an exception or a warning."""
    x_train = digits.x_train.copy()
    x_train[::7, 3] = np.nan
    data = nn.Split(x_train, digits.y_train, digits.x_test, digits.y_test)
    rng = np.random.default_rng(0)
    model = nn.mlp(batch_norm=batch_norm, rng=rng, hidden=(16,), backend="numpy")
    history = nn.fit(
        model, nn.SGD(model, 0.1), data, steps=50, batch_size=32, rng=rng, eval_every=10
    )
    assert history.diverged_at == 1
    assert np.isnan(history.loss[-1]) and np.isnan(history.roughness())


def test_exploding_loss_is_divergence_with_max_loss(digits):
    rng = np.random.default_rng(0)
    model = nn.mlp(batch_norm=False, rng=rng, hidden=(16,))
    history = nn.fit(
        model,
        nn.SGD(model, 1e8),
        digits,
        steps=50,
        batch_size=32,
        rng=rng,
        max_loss=100.0,
    )
    assert history.diverged_at == 2


def test_max_loss_counts_as_divergence(digits):
    rng = np.random.default_rng(0)
    model = nn.mlp(batch_norm=False, rng=rng, hidden=(16,))
    history = nn.fit(
        model, nn.SGD(model, 0.1), digits, steps=5, batch_size=8, rng=rng, max_loss=0.1
    )
    assert history.diverged_at == 1 and history.test_accuracy == []


def test_statistics_mode_and_accuracy_leave_running_stats_alone(digits):
    rng = np.random.default_rng(0)
    model = nn.mlp(batch_norm=True, rng=rng, hidden=(16,), backend="numpy")
    nn.fit(model, nn.SGD(model, 0.1), digits, steps=20, batch_size=32, rng=rng)
    layer = model.layers[1]
    saved = layer.running_mean.copy(), layer.num_batches_tracked
    with_running = nn.accuracy(model, digits.x_test, digits.y_test)
    with_batch = nn.accuracy(
        model, digits.x_test, digits.y_test, use_batch_stats=True, batch_size=60
    )
    assert 0 < with_running <= 1 and 0 < with_batch <= 1
    np.testing.assert_array_equal(layer.running_mean, saved[0])
    assert layer.num_batches_tracked == saved[1]
    assert layer.use_batch_stats and layer.update_running_stats  # still training
    model.eval()
    with nn.statistics_mode(model, use_batch_stats=True, update_running_stats=False):
        assert layer.use_batch_stats and not layer.update_running_stats
    assert not layer.use_batch_stats


def test_bias_is_dropped_before_batch_norm():
    rng = np.random.default_rng(0)
    with_bn = [n for n, _, _ in nn.cnn(batch_norm=True, rng=rng).parameters()]
    without = [n for n, _, _ in nn.cnn(batch_norm=False, rng=rng).parameters()]
    assert "0.bias" not in with_bn and "1.gamma" in with_bn
    assert "0.bias" in without
    paper = nn.paper_mlp(batch_norm=True, rng=rng)
    assert sum(isinstance(layer, bn.BatchNorm) for layer in paper.layers) == 3
    assert sum(isinstance(layer, nn.Sigmoid) for layer in paper.layers) == 3
