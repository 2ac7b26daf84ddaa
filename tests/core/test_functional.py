"""Functional API against the naive reference; float64 gradient checks; edge cases."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import kernels
from helpers import naive
from helpers.gradchecks import directional_check, elementwise_check

F = bn.functional
BACKENDS = kernels.available()


def make(shape, *, axis=1, seed=0, mean=0.0, std=1.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(mean, std, size=shape).astype(dtype)
    c = shape[axis]
    gamma = rng.uniform(0.5, 2.0, c)
    beta = rng.normal(size=c)
    return rng, x, gamma, beta


# Table-driven cases: (name, shape, axis, transform applied to the array).
CASES = [
    ("2d", (16, 5), 1, None),
    ("C=1", (7, 1, 3), 1, None),
    ("m=2", (2, 3), 1, None),
    ("m=2 spatial", (1, 3, 2), 1, None),
    ("3d", (4, 3, 10), 1, None),
    ("4d", (4, 3, 5, 6), 1, None),
    ("5d", (2, 3, 2, 3, 4), 1, None),
    ("channels-last", (4, 5, 6, 3), -1, None),
    ("axis in the middle of 5d", (3, 4, 5, 2, 3), 2, None),
    ("strided", (6, 3, 8, 8), 1, lambda a: a[::2, :, 1::2, ::3]),
    ("fortran", (5, 4, 6), 1, np.asfortranarray),
    ("transposed view", (6, 7, 4), 1, lambda a: a.transpose(0, 2, 1)),
]


def case_input(shape, axis, transform, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, size=shape)
    if transform is not None:
        x = transform(x)
    c = x.shape[axis]
    return rng, x, rng.uniform(0.5, 2.0, c), rng.normal(size=c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "shape", "axis", "transform"), CASES)
def test_forward_train_matches_naive(backend, name, shape, axis, transform):
    _, x, gamma, beta = case_input(shape, axis, transform)
    y, cache = F.forward_train(x, gamma, beta, axis=axis, backend=backend)
    y_ref, mean_ref, var_ref = naive.forward_train(x, gamma, beta, axis=axis)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cache.mean, mean_ref, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(cache.var, var_ref, rtol=1e-12)
    assert cache.count == x.size // x.shape[axis]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "shape", "axis", "transform"), CASES)
def test_backward_matches_naive(backend, name, shape, axis, transform):
    rng, x, gamma, beta = case_input(shape, axis, transform)
    dy = rng.normal(size=x.shape)
    _, cache = F.forward_train(x, gamma, beta, axis=axis, backend=backend)
    dx, dgamma, dbeta = F.backward(dy, cache, backend=backend)
    dx_ref, dgamma_ref, dbeta_ref = naive.backward_train(dy, x, gamma, axis=axis)
    scale = np.abs(dx_ref).max()
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "shape", "axis", "transform"), CASES)
def test_forward_eval_matches_naive(backend, name, shape, axis, transform):
    rng, x, gamma, beta = case_input(shape, axis, transform)
    c = x.shape[axis]
    rm, rv = rng.normal(size=c), rng.uniform(0.1, 3.0, c)
    y = F.forward_eval(x, gamma, beta, rm, rv, axis=axis, backend=backend)
    y_ref = naive.forward_eval(x, gamma, beta, rm, rv, axis=axis)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)


# -- float64 gradient checks with a random upstream gradient -----------------------


PRESET_OPTIONS = {
    "seed": {"eps": 1e-6, "eps_placement": "inside", "ddof": 0},
    "large eps": {"eps": 0.5, "eps_placement": "inside", "ddof": 0},
    "darknet": {"eps": 1e-6, "eps_placement": "outside", "ddof": 1},
    "darknet large eps": {"eps": 0.3, "eps_placement": "outside", "ddof": 1},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", PRESET_OPTIONS.values(), ids=PRESET_OPTIONS.keys())
@pytest.mark.parametrize(
    ("shape", "axis"), [((5, 3), 1), ((3, 2, 4, 3), 1), ((3, 4, 2), -1)]
)
def test_train_gradient_directional(backend, options, shape, axis):
    rng, x, gamma, beta = make(shape, axis=axis, seed=1, mean=2.0, std=1.5)
    dy = rng.normal(size=shape)

    def loss(x_, gamma_, beta_):
        y, _ = F.forward_train(x_, gamma_, beta_, axis=axis, backend=backend, **options)
        return float(np.sum(y * dy))

    _, cache = F.forward_train(x, gamma, beta, axis=axis, backend=backend, **options)
    grads = F.backward(dy, cache, backend=backend)
    directional_check(loss, grads, [x, gamma, beta], rng)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", PRESET_OPTIONS.values(), ids=PRESET_OPTIONS.keys())
def test_train_gradient_elementwise(backend, options):
    rng, x, gamma, beta = make((4, 3, 2), seed=2, mean=-1.0, std=0.7)
    dy = rng.normal(size=x.shape)
    _, cache = F.forward_train(x, gamma, beta, backend=backend, **options)
    dx, dgamma, dbeta = F.backward(dy, cache, backend=backend)

    def y_of(x_, g_, b_):
        return F.forward_train(x_, g_, b_, backend=backend, **options)[0]

    elementwise_check(lambda v: np.sum(y_of(v, gamma, beta) * dy), dx, x)
    elementwise_check(lambda v: np.sum(y_of(x, v, beta) * dy), dgamma, gamma)
    elementwise_check(lambda v: np.sum(y_of(x, gamma, v) * dy), dbeta, beta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", ["inside", "outside"])
def test_eval_gradient(backend, placement):
    rng, x, gamma, beta = make((4, 3, 5), seed=3, mean=1.0)
    rm, rv = rng.normal(size=3), rng.uniform(0.2, 2.0, 3)
    dy = rng.normal(size=x.shape)
    kw = {"eps": 1e-3, "eps_placement": placement, "backend": backend}

    def loss(x_, gamma_, beta_):
        return float(np.sum(F.forward_eval(x_, gamma_, beta_, rm, rv, **kw) * dy))

    grads = F.backward_eval(dy, x, gamma, rm, rv, **kw)
    directional_check(loss, grads, [x, gamma, beta], rng)
    elementwise_check(lambda v: loss(v, gamma, beta), grads[0], x)
    elementwise_check(lambda v: loss(x, v, beta), grads[1], gamma)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_without_affine_parameters(backend):
    rng, x, _, _ = make((6, 2, 3), seed=4)
    dy = rng.normal(size=x.shape)
    _, cache = F.forward_train(x, None, None, backend=backend)
    dx, dgamma, dbeta = F.backward(dy, cache, backend=backend)
    ones, zeros = np.ones(2), np.zeros(2)
    _, cache1 = F.forward_train(x, ones, zeros, backend=backend)
    dx1, dgamma1, dbeta1 = F.backward(dy, cache1, backend=backend)
    np.testing.assert_array_equal(dx, dx1)
    np.testing.assert_array_equal(dgamma, dgamma1)
    np.testing.assert_array_equal(dbeta, dbeta1)


def test_all_ones_upstream_gives_zero_dx():
    """Why tests must not backprop all-ones: the exact dx is then zero."""
    _, x, gamma, beta = make((8, 3), seed=5)
    _, cache = F.forward_train(x, gamma, beta, backend="numpy")
    dx, _, _ = F.backward(np.ones_like(x), cache, backend="numpy")
    np.testing.assert_allclose(dx, 0.0, atol=1e-12)


# -- edge cases ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_channel(backend):
    x = np.ones((4, 2, 3))
    x[:, 1] = np.arange(12.0).reshape(4, 3)
    y, cache = F.forward_train(x, None, np.array([0.25, 0.0]), backend=backend)
    np.testing.assert_array_equal(y[:, 0], 0.25)  # (x − M) is exactly 0
    assert cache.var[0] == 0.0
    for placement, ddof in [("inside", 0), ("outside", 1)]:
        _, cache = F.forward_train(
            x, None, None, eps_placement=placement, ddof=ddof, backend=backend
        )
        dy = np.random.default_rng(0).normal(size=x.shape)
        dx, _, _ = F.backward(dy, cache, backend=backend)
        assert np.isfinite(dx).all()
        expected = (dy[:, 0] - dy[:, 0].mean()) * cache.inv_std[0]
        np.testing.assert_allclose(dx[:, 0], expected, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype", [np.float16, np.float32, np.float64, "bfloat16"], ids=str
)
def test_dtypes_keep_input_dtype(backend, dtype):
    finfo = np.finfo
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype, finfo = ml_dtypes.bfloat16, ml_dtypes.finfo
    rng, x64, gamma, beta = make((8, 3, 4), seed=6, mean=5.0, std=2.0)
    x = x64.astype(dtype)
    y, cache = F.forward_train(x, gamma, beta, backend=backend)
    assert y.dtype == x.dtype
    assert cache.mean.dtype == np.float64
    # The statistics are those of the rounded input, computed exactly.
    y_ref, mean_ref, var_ref = naive.forward_train(x.astype(np.float64), gamma, beta)
    np.testing.assert_allclose(cache.var, var_ref, rtol=1e-12)
    # y is computed in float64 and rounded once to the input dtype: half an ulp of
    # the dtype, plus the float64 pipeline's few roundings of terms of size ≲ 10.
    ulp = np.abs(y_ref) * float(finfo(dtype).eps) + float(finfo(dtype).tiny)
    bound = 0.5 * ulp + 16 * np.finfo(np.float64).eps * (np.abs(y_ref) + 10.0)
    assert np.all(np.abs(y.astype(np.float64) - y_ref) <= bound)
    dx, _, _ = F.backward(
        rng.normal(size=x.shape).astype(dtype), cache, backend=backend
    )
    assert dx.dtype == x.dtype
    y_eval = F.forward_eval(x, gamma, beta, cache.mean, cache.var, backend=backend)
    assert y_eval.dtype == x.dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [1, -1])
def test_large_mean_float32(backend, axis):
    for mean in (1e4, 1e6):
        shape = (16, 3, 6, 6) if axis == 1 else (16, 6, 6, 3)
        _, x, gamma, beta = make(shape, axis=axis, seed=7, mean=mean, dtype=np.float32)
        y, cache = F.forward_train(x, gamma, beta, axis=axis, backend=backend)
        y_ref, _, var_ref = naive.forward_train(x, gamma, beta, axis=axis)
        assert np.max(np.abs(cache.var - var_ref) / var_ref) <= 1e-6
        # |y| ≲ 8 here: half a float32 ulp of 8 is 4.8e-7.
        assert np.max(np.abs(y - y_ref)) <= 5e-7


def test_empty_batch():
    x = np.zeros((0, 3, 4), np.float32)
    y = F.forward_eval(x, None, None, np.zeros(3), np.ones(3))
    assert y.shape == (0, 3, 4) and y.dtype == np.float32
    y, cache = F.forward_train(x, None, None)  # empty in training too (tests/core/
    assert y.shape == (0, 3, 4) and cache.count == 0  # test_edges.py has the rest)


def test_inputs_are_not_modified():
    rng, x, gamma, beta = make((5, 3, 4), seed=8)
    copies = [a.copy() for a in (x, gamma, beta)]
    _, cache = F.forward_train(x, gamma, beta)
    F.backward(rng.normal(size=x.shape), cache)
    rm, rv = np.zeros(3), np.ones(3)
    F.update_running_stats(rm, rv, cache)
    for a, b in zip((x, gamma, beta), copies, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)


def test_darknet_forward_formula():
    """Darknet CPU: (x − μ)/(√var + 1e-6) with var over m − 1."""
    _, x, gamma, beta = make((6, 2, 3), seed=9)
    y, _ = F.forward_train(x, gamma, beta, eps_placement="outside", ddof=1)
    y_ref, _, _ = naive.forward_train(x, gamma, beta, placement="outside", ddof=1)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12)
    moved = np.moveaxis(x, 1, -1).reshape(-1, 2)
    by_hand = (moved - moved.mean(0)) / (moved.std(0, ddof=1) + 1e-6)
    np.testing.assert_allclose(
        np.moveaxis(y, 1, -1).reshape(-1, 2), by_hand * gamma + beta, rtol=1e-12
    )


def test_set_num_threads_reaches_the_kernels():
    numba_kernels = pytest.importorskip("batchnorm.kernels.numba")
    try:
        bn.set_num_threads(1)
        assert numba_kernels.get_num_threads() == 1
    finally:
        bn.set_num_threads(None)
    assert numba_kernels.get_num_threads() >= 1
