"""SGD, and the seed's and darknet's update rules written out literally against it."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import nn

BATCH = 8


def _model(seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        [
            nn.Linear(6, 5, bias=False, rng=rng, dtype=np.float64),
            bn.BatchNorm(5, dtype=np.float64, backend="numpy"),
            nn.ReLU(),
            nn.Linear(5, 3, rng=rng, dtype=np.float64),
        ]
    )


def _batches(steps):
    rng = np.random.default_rng(42)
    return [
        (rng.normal(1.0, 2.0, (BATCH, 6)), rng.integers(0, 3, BATCH))
        for _ in range(steps)
    ]


def _summed_gradients(model, x, labels):
    """Forward and backward with darknet's summed loss; returns δ at the BN output,
    the BN input, and ``{name: ∂L_sum/∂param}``."""
    loss = nn.SoftmaxCrossEntropy("sum")
    loss(model(x), labels)
    grad = loss.backward()
    for layer in reversed(model.layers[2:]):
        grad = layer.backward(grad)
    delta = -grad  # δ = −∂L/∂y of the BN layer, as the seed writes it
    grad = model.layers[1].backward(grad)
    model.layers[0].backward(grad)
    return (
        delta,
        x @ model.layers[0].weight.T,
        {name: g.copy() for name, _, g in model.parameters()},
    )


def _mean_loss_step(model, optimizer, x, labels):
    loss = nn.SoftmaxCrossEntropy()
    loss(model(x), labels)
    model.backward(loss.backward())
    optimizer.step()


def test_seed_update_rule_is_sgd():
    """γ ← γ + rate·Σ(x̂·δ), β ← β + rate·Σδ (and w ← w + rate·Σ δ-terms for the
    other layers) equals SGD with lr = rate·batch on the mean loss."""
    rate = 0.01
    literal, through_sgd = _model(), _model()
    optimizer = nn.seed_sgd(through_sgd, rate, BATCH)
    for x, labels in _batches(5):
        delta, bn_input, grads = _summed_gradients(literal, x, labels)
        mean, var = bn_input.mean(axis=0), bn_input.var(axis=0)
        x_hat = (bn_input - mean) / np.sqrt(var + 0.000001)
        layer = literal.layers[1]
        layer.gamma += rate * (x_hat * delta).sum(axis=0)
        layer.beta += rate * delta.sum(axis=0)
        for name, value, _ in literal.parameters():
            if name not in ("1.gamma", "1.beta"):
                value -= rate * grads[name]
        _mean_loss_step(through_sgd, optimizer, x, labels)
    for (name, a, _), (_, b, _) in zip(
        literal.parameters(), through_sgd.parameters(), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13, err_msg=name)
    assert not np.allclose(literal.layers[1].gamma, 1.0)  # γ did move


def test_darknet_update_is_sgd_with_momentum_and_decay():
    """darknet: updates += δ-sums; updates −= decay·batch·w (weights only);
    w += lr/batch · updates; updates *= momentum."""
    lr, momentum, decay = 0.1, 0.9, 0.05
    literal, through_sgd = _model(), _model()
    optimizer = nn.darknet_sgd(through_sgd, lr, momentum, decay)
    updates: dict[str, np.ndarray] = {}
    for x, labels in _batches(6):
        _, _, grads = _summed_gradients(literal, x, labels)
        for name, value, _ in literal.parameters():
            update = updates.setdefault(name, np.zeros_like(value))
            update -= grads[name]
            if name.endswith("weight"):
                update -= decay * BATCH * value
            value += lr / BATCH * update
            update *= momentum
        _mean_loss_step(through_sgd, optimizer, x, labels)
    for (name, a, _), (_, b, _) in zip(
        literal.parameters(), through_sgd.parameters(), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12, err_msg=name)


def test_weight_decay_skips_gamma_beta_and_biases():
    model = _model()
    x, labels = _batches(1)[0]
    loss = nn.SoftmaxCrossEntropy()
    loss(model(x), labels)
    model.backward(loss.backward())
    for _, _, grad in model.parameters():
        grad[...] = 0.0  # only the decay moves anything
    before = {name: value.copy() for name, value, _ in model.parameters()}
    nn.SGD(model, lr=0.1, weight_decay=0.5).step()
    for name, value, _ in model.parameters():
        if name.endswith("weight"):
            np.testing.assert_allclose(value, 0.95 * before[name])
        else:
            np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert [nn.takes_weight_decay(n) for n in ("0.weight", "1.gamma", "3.bias")] == [
        True,
        False,
        False,
    ]


def test_momentum_accumulates():
    layer = nn.Linear(1, 1, bias=False, rng=0, dtype=np.float64)
    layer.weight[:] = 0.0
    layer.grad_weight = np.ones((1, 1))
    optimizer = nn.SGD(layer, lr=1.0, momentum=0.5)
    for _ in range(3):
        optimizer.step()
    assert layer.weight[0, 0] == pytest.approx(-(1 + 1.5 + 1.75))


def test_sgd_errors():
    with pytest.raises(ValueError, match="lr must be > 0"):
        nn.SGD(nn.Linear(1, 1), lr=0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        nn.SGD(nn.Linear(1, 1), lr=0.1, momentum=1.0)
    with pytest.raises(RuntimeError, match="no gradient"):
        nn.SGD(nn.Linear(1, 1), lr=0.1).step()
