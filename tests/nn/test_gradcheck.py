"""Float64 central-difference gradient checks of every harness layer and of a whole
network (conv → BN → ReLU → maxpool → linear → loss), with random upstream gradients."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import nn

RTOL, ATOL = 1e-6, 1e-8


def _random(shape, seed):
    return np.random.default_rng(seed).normal(size=shape)


def _check_layer(layer, x, seed=0):
    """Compare backward with numerical gradients of L = Σ R ⊙ layer(x), R random."""
    upstream = _random(layer.forward(x).shape, seed + 1)

    def loss():
        return float((layer.forward(x) * upstream).sum())

    loss()
    dx = layer.backward(upstream)
    analytic = {name: grad.copy() for name, _, grad in layer.parameters()}
    np.testing.assert_allclose(dx, nn.numerical_gradient(loss, x), rtol=RTOL, atol=ATOL)
    for name, value, _ in list(layer.parameters()):
        numeric = nn.numerical_gradient(loss, value)
        np.testing.assert_allclose(
            analytic[name], numeric, rtol=RTOL, atol=ATOL, err_msg=name
        )
    return dx


@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias):
    layer = nn.Linear(5, 3, bias=bias, rng=0, dtype=np.float64)
    if layer.bias is not None:
        layer.bias += _random(3, 9)
    _check_layer(layer, _random((4, 5), 1))


@pytest.mark.parametrize(
    ("stride", "padding", "size"), [(1, 0, 5), (1, 1, 5), (2, 1, 6), (2, 0, 7)]
)
def test_conv2d(stride, padding, size):
    layer = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, rng=0, dtype=np.float64)
    layer.bias += _random(3, 9)
    _check_layer(layer, _random((2, 2, size, size), 1))


def test_conv2d_matches_a_direct_loop():
    layer = nn.Conv2d(2, 3, 3, stride=2, padding=1, rng=0, dtype=np.float64)
    x = _random((2, 2, 5, 5), 1)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.zeros((2, 3, 3, 3))
    for i in range(3):
        for j in range(3):
            patch = xp[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]
            expected[:, :, i, j] = np.einsum("ncab,fcab->nf", patch, layer.weight)
    np.testing.assert_allclose(layer(x), expected + layer.bias[:, None, None])


@pytest.mark.parametrize(("kernel", "stride"), [(2, None), (3, 1), (2, 1)])
def test_maxpool(kernel, stride):
    _check_layer(nn.MaxPool2d(kernel, stride), _random((2, 3, 6, 6), 1))


def test_maxpool_sends_the_gradient_to_the_first_maximum_only():
    pool = nn.MaxPool2d(2)
    x = np.ones((1, 1, 2, 2))
    pool(x)
    np.testing.assert_array_equal(
        pool.backward(np.array([[[[5.0]]]])), [[[[5.0, 0.0], [0.0, 0.0]]]]
    )


@pytest.mark.parametrize(
    "layer",
    [
        nn.ReLU(),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.GlobalAvgPool(),
        nn.LeakyReLU(0.1),
    ],
    ids=repr,
)
def test_parameter_free_layers(layer):
    _check_layer(layer, _random((3, 2, 4, 4), 1))


def test_softmax_gradient():
    _check_layer(nn.Softmax(), _random((4, 5), 2))


def test_sigmoid_does_not_overflow():
    y = nn.Sigmoid()(np.array([-1000.0, 0.0, 1000.0], dtype=np.float32))
    np.testing.assert_array_equal(y, [0.0, 0.5, 1.0])


def test_softmax_cross_entropy_gradient():
    logits, labels = _random((5, 4), 1), np.array([0, 3, 1, 1, 2])
    for reduction in ("mean", "sum"):
        loss = nn.SoftmaxCrossEntropy(reduction)
        loss(logits, labels)
        analytic = loss.backward()
        numeric = nn.numerical_gradient(lambda: loss(logits, labels), logits)  # noqa: B023
        np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=ATOL)


def _small_cnn():
    rng = np.random.default_rng(0)
    batch_norm = bn.BatchNorm(3, dtype=np.float64, backend="numpy")
    batch_norm.gamma[:] = rng.uniform(0.5, 1.5, 3)
    batch_norm.beta[:] = rng.normal(size=3)
    return nn.Sequential(
        [
            nn.Conv2d(2, 3, 3, padding=1, bias=False, rng=rng, dtype=np.float64),
            batch_norm,
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(3 * 3 * 3, 4, rng=rng, dtype=np.float64),
        ]
    )


def test_whole_network_gradient():
    """conv → BN (train mode) → ReLU → maxpool → linear → softmax cross-entropy."""
    model, loss = _small_cnn(), nn.SoftmaxCrossEntropy()
    x = _random((5, 2, 6, 6), 1) * 2.0 + 0.5
    labels = np.array([0, 3, 1, 2, 1])

    def value():
        return loss(model(x), labels)

    value()
    dx = model.backward(loss.backward())
    analytic = {name: grad.copy() for name, _, grad in model.parameters()}
    assert sorted(analytic) == ["0.weight", "1.beta", "1.gamma", "5.bias", "5.weight"]
    np.testing.assert_allclose(
        dx, nn.numerical_gradient(value, x), rtol=RTOL, atol=ATOL
    )
    for name, param, _ in list(model.parameters()):
        numeric = nn.numerical_gradient(value, param)
        assert np.abs(numeric).max() > 1e-4, name  # the check is not vacuous
        np.testing.assert_allclose(
            analytic[name], numeric, rtol=RTOL, atol=ATOL, err_msg=name
        )


def test_whole_network_gradient_in_eval_mode():
    model, loss = _small_cnn(), nn.SoftmaxCrossEntropy()
    x = _random((4, 2, 6, 6), 1)
    labels = np.array([0, 3, 1, 2])
    model(x)  # move the running statistics away from (0, 1)
    model.eval()

    def value():
        return loss(model(x), labels)

    value()
    dx = model.backward(loss.backward())
    np.testing.assert_allclose(
        dx, nn.numerical_gradient(value, x), rtol=RTOL, atol=ATOL
    )


def test_backward_before_forward_raises():
    for layer in (nn.Linear(2, 2), nn.Conv2d(1, 1, 1), nn.ReLU(), nn.MaxPool2d(2)):
        with pytest.raises(RuntimeError, match="before forward"):
            layer.backward(np.ones((1, 1)))


def test_shape_errors_explain_the_fix():
    with pytest.raises(ValueError, match="Flatten"):
        nn.Linear(4, 2)(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match=r"reshape\(-1, 1, 8, 8\)"):
        nn.Conv2d(1, 2, 3)(np.ones((2, 64)))
    with pytest.raises(ValueError, match="init must be"):
        nn.Linear(2, 2, init="glorot")


def test_numerical_gradient_needs_float64():
    with pytest.raises(TypeError, match="float64"):
        nn.numerical_gradient(lambda: 0.0, np.ones(2, np.float32))
