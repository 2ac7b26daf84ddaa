"""Edges the peer suites hit: empty batches, eps, any channel axis, messages,
outputs that overlap inputs, and one layer used from two threads."""

from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import kernels
from batchnorm.inference import recalibrate
from batchnorm.renorm import backward_renorm, forward_renorm
from helpers import naive

F = bn.functional
BACKENDS = kernels.available()


# -- empty batches (PyTorch, Keras and TensorFlow return an empty output) ----------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (2, 3, 0)])
def test_empty_batch_in_training(backend, shape):
    x = np.zeros(shape, np.float32)
    gamma, beta = np.full(3, 2.0, np.float32), np.ones(3, np.float32)
    y, cache = F.forward_train(x, gamma, beta, backend=backend)
    assert y.shape == shape and y.dtype == np.float32 and cache.count == 0
    dx, dgamma, dbeta = F.backward(np.zeros(shape, np.float32), cache, backend=backend)
    assert dx.shape == shape and dx.dtype == np.float32
    np.testing.assert_array_equal(dgamma, np.zeros(3))
    np.testing.assert_array_equal(dbeta, np.zeros(3))
    mean, var = F.update_running_stats(np.full(3, 5.0), np.full(3, 2.0), cache)
    np.testing.assert_array_equal(mean, 5.0)
    np.testing.assert_array_equal(var, 2.0)


def test_empty_batch_with_out():
    x = np.zeros((0, 3), np.float32)
    out = np.empty_like(x)
    y, _ = F.forward_train(x, None, None, out=out)
    assert y is out


@pytest.mark.parametrize(
    "options",
    [{}, {"virtual_batch_size": 2}, {"renorm": True}, {"momentum": None}],
    ids=["plain", "ghost", "renorm", "cumulative"],
)
def test_empty_batch_leaves_the_layer_state_alone(options):
    layer = bn.BatchNorm(3, **options)
    layer(np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32))
    before = layer.state_dict()
    y = layer(np.zeros((0, 3), np.float32))
    assert y.shape == (0, 3)
    dx = layer.backward(np.zeros((0, 3), np.float32))
    assert dx.shape == (0, 3)
    np.testing.assert_array_equal(layer.grad_gamma, np.zeros(3))
    np.testing.assert_array_equal(layer.grad_beta, np.zeros(3))
    after = layer.state_dict()
    assert after["num_batches_tracked"] == before["num_batches_tracked"] >= 1
    assert after["num_values_seen"] == before["num_values_seen"] == 8
    for key in ("running_mean", "running_var", "gamma", "beta"):
        np.testing.assert_array_equal(after[key], before[key])


def test_empty_renorm_pass():
    y, cache = forward_renorm(np.ones((0, 2)), None, None, np.zeros(2), np.ones(2))
    dx, dgamma, dbeta = backward_renorm(np.ones((0, 2)), cache)
    assert y.shape == dx.shape == (0, 2)
    np.testing.assert_array_equal(dgamma, np.zeros(2))
    np.testing.assert_array_equal(dbeta, np.zeros(2))


def test_empty_batches_in_recalibrate_count_nothing():
    layer = bn.BatchNorm(2)
    x = np.random.default_rng(1).normal(size=(6, 2))
    (moments,) = recalibrate(layer, [x[:0], x, x[:0]])
    assert moments.count == 6


def test_empty_batch_has_no_variance():
    _, cache = F.forward_train(np.zeros((0, 2)), None, None)
    with pytest.raises(ValueError, match=r"count=0"):
        cache.var  # noqa: B018


# -- eps > 0 -------------------------------------------------------------------


def test_eps_zero_is_refused_before_it_turns_a_constant_channel_into_nan():
    x = np.ones((4, 2))
    with pytest.raises(ValueError, match=r"eps must be a finite float > 0; got 0\.0"):
        F.forward_train(x, None, None, eps=0.0)
    with pytest.raises(ValueError, match=r"eps must be a finite float > 0"):
        bn.BatchNorm(2, eps=0)
    layer = bn.BatchNorm(2)
    with pytest.raises(ValueError, match=r"eps must be a finite float > 0"):
        layer.eps = 0.0
    assert layer.eps == 1e-6


# -- any channel axis, 0 included (MXNet tests (C, N, ...) layouts) ------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 5), (3, 4, 5), (2, 6, 3, 3)])
def test_channel_axis_zero_matches_the_naive_reference(backend, shape):
    rng = np.random.default_rng(2)
    x = rng.normal(4.0, 3.0, size=shape)
    c = shape[0]
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    dy = rng.normal(size=shape)
    y, cache = F.forward_train(x, gamma, beta, axis=0, backend=backend)
    dx, dgamma, dbeta = F.backward(dy, cache, backend=backend)
    y_ref, mean_ref, var_ref = naive.forward_train(x, gamma, beta, axis=0)
    dx_ref, dgamma_ref, dbeta_ref = naive.backward_train(dy, x, gamma, axis=0)
    assert cache.count == x.size // c
    np.testing.assert_allclose(cache.mean, mean_ref, rtol=1e-12)
    np.testing.assert_allclose(cache.var, var_ref, rtol=1e-12)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-10, atol=1e-12)
    mean, var = rng.normal(size=c), rng.uniform(0.5, 2.0, size=c)
    y_eval = F.forward_eval(x, gamma, beta, mean, var, axis=0, backend=backend)
    y_eval_ref = naive.forward_eval(x, gamma, beta, mean, var, axis=0)
    np.testing.assert_allclose(y_eval, y_eval_ref, rtol=1e-10, atol=1e-12)


def test_layer_with_channel_axis_zero():
    layer = bn.BatchNorm(3, axis=0)
    x = np.random.default_rng(3).normal(size=(3, 10)).astype(np.float32)
    y = layer(x)
    np.testing.assert_allclose(y.mean(axis=1), 0.0, atol=1e-6)
    assert layer.num_values_seen == 10


# -- messages -------------------------------------------------------------------


def test_count_message_does_not_repeat_a_single_factor():
    with pytest.raises(ValueError) as error:
        F.forward_train(np.ones((1, 3)), None, None)
    assert "m = N · ∏ spatial = 1. Use" in str(error.value)
    assert "= 1 = 1" not in str(error.value)


@pytest.mark.parametrize(
    ("dtype", "advice"),
    [
        (np.float16, "Keep the running statistics in float32 or float64"),
        (np.float32, "Keep the running statistics in float64 (BatchNorm dtype=)"),
    ],
)
def test_overflow_message_advises_a_wider_dtype(dtype, advice):
    big = bn.Moments(4, np.array([0.0]), np.array([4.0 * float(np.finfo(dtype).max)]))
    with pytest.raises(F.NonFiniteStatisticsError) as error:
        F.update_running_stats(np.zeros(1, dtype), np.ones(1, dtype), big, momentum=0.0)
    assert advice in str(error.value)
    assert "in float32 or float64" not in str(error.value) or dtype == np.float16


def test_momentum_one_warns_that_the_statistics_never_move():
    with pytest.warns(UserWarning, match=r"momentum=1\.0 keeps the running"):
        layer = bn.BatchNorm(2, momentum=1.0)
    assert layer.momentum == 1.0
    moments = bn.Moments(3, np.ones(1), np.ones(1))
    with pytest.warns(UserWarning, match=r"PyTorch's momentum=1\.0 .* our momentum"):
        F.update_running_stats(np.zeros(1), np.ones(1), moments, momentum=1.0)


# -- outputs that overlap an input ------------------------------------------------


def _overlapping(out_dtype):
    """``out`` of shape (4, 3) whose first row is also ``shared`` (shape (3,))."""
    out = np.empty((4, 3), out_dtype)
    return out, out[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["gamma", "beta"])
def test_forward_train_refuses_a_parameter_inside_out(backend, name):
    x = np.random.default_rng(4).normal(size=(4, 3))
    out, shared = _overlapping(np.float64)
    shared[:] = 1.0
    arguments = {"gamma": None, "beta": None, name: shared}
    with pytest.raises(ValueError, match=f"out must not share memory with {name}"):
        F.forward_train(x, out=out, backend=backend, **arguments)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["gamma", "beta", "running_mean", "running_var"])
def test_forward_eval_refuses_a_vector_inside_out(backend, name):
    x = np.random.default_rng(5).normal(size=(4, 3))
    out, shared = _overlapping(np.float64)
    shared[:] = 1.0
    arguments = {
        "gamma": None,
        "beta": None,
        "running_mean": np.zeros(3),
        "running_var": np.ones(3),
        name: shared,
    }
    with pytest.raises(ValueError, match=f"out must not share memory with {name}"):
        F.forward_eval(x, out=out, backend=backend, **arguments)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_refuses_gamma_inside_out(backend):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, 3))
    out, shared = _overlapping(np.float64)
    shared[:] = 2.0
    _, cache = F.forward_train(x, shared, None, backend=backend)
    with pytest.raises(ValueError, match="out must not share memory with gamma"):
        F.backward(rng.normal(size=x.shape), cache, out=out, backend=backend)
    with pytest.raises(ValueError, match="out must not share memory with gamma"):
        F.backward_eval(
            rng.normal(size=x.shape),
            x,
            shared,
            np.zeros(3),
            np.ones(3),
            out=out,
            backend=backend,
        )


def test_renorm_refuses_running_statistics_inside_out():
    x = np.random.default_rng(7).normal(size=(4, 3))
    out, shared = _overlapping(np.float64)
    shared[:] = 1.0
    with pytest.raises(ValueError, match="out must not share memory with running_var"):
        forward_renorm(x, None, None, np.zeros(3), shared, out=out)


# -- one layer, two threads --------------------------------------------------------


def test_a_layer_used_from_two_threads_at_once_raises(monkeypatch):
    layer = bn.BatchNorm(3, backend="numpy")
    x = np.random.default_rng(8).normal(size=(64, 3))
    inside, release = threading.Event(), threading.Event()
    original = F.forward_train

    def slow_forward_train(*args, **kwargs):
        inside.set()  # the first thread is now inside the layer's forward pass
        release.wait(5)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "forward_train", slow_forward_train)
    errors: list[BaseException] = []

    def first() -> None:
        try:
            layer(x)
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert inside.wait(5)
        with pytest.raises(RuntimeError, match=r"another thread is inside this layer"):
            layer(x)
        with pytest.raises(RuntimeError, match=r"BatchNorm\.backward\(\) called while"):
            layer.backward(x)
    finally:
        release.set()
        thread.join(5)
    assert errors == []
    assert layer.num_batches_tracked == 1  # only the first thread's pass counted
    layer.backward(np.ones_like(x))  # free again once the other thread left


def test_a_layer_copies_and_pickles_with_its_own_guard():
    layer = bn.BatchNorm(3)
    layer(np.random.default_rng(9).normal(size=(4, 3)))
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._in_use is not layer._in_use
        clone(np.ones((4, 3)))
        np.testing.assert_array_equal(clone.gamma, layer.gamma)
