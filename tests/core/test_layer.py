"""The BatchNorm layer: modes, state, presets, and that it only delegates the math."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import kernels
from helpers import naive

F = bn.functional
BACKENDS = kernels.available()


def batch(seed, shape=(8, 3, 4, 4), mean=2.0, std=3.0, dtype=np.float32):
    return np.random.default_rng(seed).normal(mean, std, shape).astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step_equals_functional(backend):
    layer = bn.BatchNorm(3, backend=backend)
    rng = np.random.default_rng(0)
    layer.gamma[:] = rng.uniform(0.5, 2, 3)
    layer.beta[:] = rng.normal(size=3)
    x = batch(1)
    y = layer(x)
    y_ref, cache = F.forward_train(x, layer.gamma, layer.beta, backend=backend)
    np.testing.assert_array_equal(y, y_ref)
    dy = rng.normal(size=x.shape).astype(np.float32)
    dx = layer.backward(dy)
    dx_ref, dgamma, dbeta = F.backward(dy, cache, backend=backend)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(layer.grad_gamma, dgamma.astype(np.float32))
    np.testing.assert_array_equal(layer.grad_beta, dbeta.astype(np.float32))
    mean, var = F.update_running_stats(
        np.zeros(3, np.float32), np.ones(3, np.float32), cache
    )
    np.testing.assert_array_equal(layer.running_mean, mean)
    np.testing.assert_array_equal(layer.running_var, var)
    assert layer.num_batches_tracked == 1 and layer.num_values_seen == 8 * 16


def test_eval_uses_running_stats_and_updates_nothing():
    layer = bn.BatchNorm(3, momentum=0.5)
    for seed in range(3):
        layer(batch(seed))
    state = layer.state_dict()
    layer.eval()
    x = batch(10)
    y = layer(x)
    y_ref = naive.forward_eval(
        x, layer.gamma, layer.beta, layer.running_mean, layer.running_var
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    dy = batch(11)
    dx = layer.backward(dy)
    dx_ref, dgamma, _ = F.backward_eval(
        dy, x, layer.gamma, layer.running_mean, layer.running_var
    )
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(layer.grad_gamma, dgamma.astype(np.float32))


def test_eval_accepts_a_single_sample_and_an_empty_batch():
    layer = bn.BatchNorm(3).eval()
    assert layer(batch(0, shape=(1, 3))).shape == (1, 3)
    assert layer(np.zeros((0, 3), np.float32)).shape == (0, 3)


def test_mode_flags_are_independent():
    x = batch(0)
    # batch statistics without touching the running ones
    layer = bn.BatchNorm(3)
    layer.update_running_stats = False
    y = layer(x)
    np.testing.assert_array_equal(y, F.forward_train(x, layer.gamma, layer.beta)[0])
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_var, 1.0)
    # update running statistics, normalize with them
    layer = bn.BatchNorm(3, momentum=0.0)
    layer.use_batch_stats = False
    y = layer(x)
    assert layer.num_batches_tracked == 1
    expected = F.forward_eval(
        x, layer.gamma, layer.beta, layer.running_mean, layer.running_var
    )
    np.testing.assert_array_equal(y, expected)


def test_freeze_removes_parameters_and_train_restores_them():
    layer = bn.BatchNorm(2)
    assert [name for name, _, _ in layer.parameters()] == ["gamma", "beta"]
    layer.freeze()
    assert list(layer.parameters()) == []
    assert not layer.use_batch_stats and not layer.update_running_stats
    layer.train()
    assert len(list(layer.parameters())) == 2
    assert list(bn.BatchNorm(2, affine=False).parameters()) == []


def test_parameters_are_the_live_arrays():
    layer = bn.BatchNorm(2)
    x = batch(0, shape=(4, 2))
    layer(x)
    layer.backward(batch(1, shape=(4, 2)))
    for _name, value, grad in layer.parameters():
        value -= 0.1 * grad
    np.testing.assert_allclose(layer.gamma, 1 - 0.1 * layer.grad_gamma)


def test_not_affine():
    layer = bn.BatchNorm(3, affine=False)
    x = batch(0)
    np.testing.assert_array_equal(layer(x), F.forward_train(x, None, None)[0])
    layer.backward(batch(1))
    assert layer.gamma is None and layer.grad_gamma is None
    assert set(layer.state_dict()) == {
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "num_values_seen",
    }


def test_channels_last_layer():
    layer = bn.BatchNorm(3, axis=-1)
    x = batch(0, shape=(4, 5, 5, 3))
    y = layer(x)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-6)


def test_momentum_none_layer_tracks_exact_statistics():
    layer = bn.BatchNorm(3, momentum=None, dtype=np.float64)
    xs = [batch(s, shape=(n, 3, 2), dtype=np.float64) for s, n in enumerate([2, 5, 9])]
    for x in xs:
        layer(x)
    whole = np.concatenate(xs)
    np.testing.assert_allclose(layer.running_mean, whole.mean(axis=(0, 2)), rtol=1e-13)
    np.testing.assert_allclose(
        layer.running_var, whole.var(axis=(0, 2), ddof=1), rtol=1e-12
    )
    assert layer.num_values_seen == 16 * 2


def test_state_dict_round_trip_and_copies():
    a = bn.BatchNorm(3, momentum=0.5)
    a(batch(0))
    state = a.state_dict()
    state["running_mean"][:] = 123.0  # a copy: the layer is unaffected
    assert not np.any(a.running_mean == 123.0)
    b = bn.BatchNorm(3)
    b.load_state_dict(a.state_dict())
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[key], value)


def test_reset_running_stats():
    layer = bn.BatchNorm(2, momentum=0.0)
    layer(batch(0, shape=(4, 2)))
    layer.reset_running_stats()
    np.testing.assert_array_equal(layer.running_mean, 0.0)
    np.testing.assert_array_equal(layer.running_var, 1.0)
    assert layer.num_batches_tracked == 0 and layer.num_values_seen == 0


def test_nonfinite_batch_keeps_layer_state():
    layer = bn.BatchNorm(2, momentum=0.5)
    layer(batch(0, shape=(4, 2)))
    before = layer.state_dict()
    bad = batch(1, shape=(4, 2))
    bad[0, 0] = np.nan
    with pytest.raises(bn.NonFiniteStatisticsError):
        layer(bad)
    skipping = bn.BatchNorm(2, momentum=0.5, on_nonfinite="skip")
    skipping.load_state_dict(before)
    with pytest.warns(RuntimeWarning, match="left unchanged"):
        y = skipping(bad)
    assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1]).all()
    for lay in (layer, skipping):
        for key, value in before.items():
            np.testing.assert_array_equal(lay.state_dict()[key], value)


# -- presets --------------------------------------------------------------------------


def test_presets():
    torch_like = bn.BatchNorm.from_preset("torch", 4)
    assert (torch_like.momentum, torch_like.eps, torch_like.running_var_kind) == (
        0.9,
        1e-5,
        "unbiased",
    )
    keras = bn.BatchNorm.from_preset("keras", 4)
    assert (keras.momentum, keras.eps, keras.running_var_kind) == (0.99, 1e-3, "biased")
    onnx = bn.BatchNorm.from_preset("onnx", 4, eps=1e-3)
    assert (onnx.momentum, onnx.eps, onnx.running_var_kind) == (0.9, 1e-3, "biased")


def test_darknet_preset_reproduces_darknet_cpu_forward():
    """darknet: rolling stats from 0; normalize (x − μ)/(√var_{m−1} + 1e-6)."""
    layer = bn.BatchNorm.from_preset("darknet", 3, dtype=np.float64)
    np.testing.assert_array_equal(layer.running_mean, 0.0)
    np.testing.assert_array_equal(layer.running_var, 0.0)
    x = batch(0, dtype=np.float64)
    y = layer(x)
    moved = np.moveaxis(x, 1, -1).reshape(-1, 3)
    mean, var = moved.mean(0), moved.var(0, ddof=1)
    expected = (moved - mean) / (np.sqrt(var) + 1e-6)
    np.testing.assert_allclose(
        np.moveaxis(y, 1, -1).reshape(-1, 3), expected, rtol=1e-12
    )
    # darknet: scal(.99) then axpy(.01, variance) with the m−1 variance
    np.testing.assert_allclose(layer.running_mean, 0.01 * mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, 0.01 * var, rtol=1e-12)
    layer.eval()
    y_eval = layer(x)
    rolled = (moved - 0.01 * mean) / (np.sqrt(0.01 * var) + 1e-6)
    np.testing.assert_allclose(
        np.moveaxis(y_eval, 1, -1).reshape(-1, 3), rolled, rtol=1e-12
    )


# -- the layer's buffers ---------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_reuse_buffers(backend):
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(8, 3, 6, 6)).astype(np.float32) for _ in range(2)]
    dys = [rng.normal(size=x.shape).astype(np.float32) for x in xs]
    fresh = bn.BatchNorm(3, backend=backend)
    reusing = bn.BatchNorm(3, backend=backend, reuse_buffers=True)
    outputs = []
    for x, dy in zip(xs, dys, strict=True):
        y_ref, y = fresh(x), reusing(x)
        np.testing.assert_array_equal(y, y_ref)
        dx_ref, dx = fresh.backward(dy), reusing.backward(dy)
        np.testing.assert_array_equal(dx, dx_ref)
        outputs.append((y, dx, y_ref, dx_ref))
    (y0, dx0, y0_ref, dx0_ref), (y1, dx1, y1_ref, dx1_ref) = outputs
    assert y1 is y0 and dx1 is dx0  # the documented trade: the first call's arrays
    assert y0_ref is not y1_ref and dx0_ref is not dx1_ref
    reusing.eval()
    assert reusing(xs[0]) is y0
    np.testing.assert_array_equal(y0, fresh.eval()(xs[0]))


def test_layer_reuse_buffers_never_writes_over_its_input():
    layer = bn.BatchNorm(3, reuse_buffers=True)
    x = np.random.default_rng(0).normal(5.0, 2.0, size=(8, 3, 4)).astype(np.float32)
    y = layer(x)
    y_again = layer(y)  # the previous output as input: a new buffer, not an error
    assert y_again is not y
    np.testing.assert_allclose(y_again, bn.BatchNorm(3)(y.copy()), atol=1e-6)
