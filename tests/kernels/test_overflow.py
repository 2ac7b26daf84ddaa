"""Finite float64 data near the top of its range: statistics that would overflow on
the way are computed scaled (both backends alike), and a variance that float64
cannot hold is a ValueError, never y = 0 or NaN.

The expected values come from the naive formulas on each channel scaled by a power
of two (exact), so they hold at any magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import kernels

F = bn.functional
BACKENDS = kernels.available()

# (shape, axis): the fused small NCHW pass, the NCHW launcher, channels-last small
# and folded (the Numba backend's three paths to the moments).
LAYOUTS = [((16, 3, 20), 1), ((4, 3, 64, 96), 1), ((640, 3), 1), ((4096, 20), -1)]


def _reduce(x, axis):
    return tuple(a for a in range(x.ndim) if a != axis % x.ndim)


def _scaled(x, axis):
    """x scaled by a power of two per channel (exactly), its exponents, and the
    mean of each channel as ``x₀ + mean(x − x₀)`` (exact on a constant channel)."""
    axes = _reduce(x, axis)
    exponent = np.frexp(np.abs(x).max(axis=axes, keepdims=True))[1]
    xs = np.ldexp(x, -exponent)
    first = xs[_first_of_each_channel(xs, axis)].reshape(exponent.shape)
    return xs, exponent, first + (xs - first).mean(axis=axes, keepdims=True)


def exact_forward(x, axis, eps=1e-6):
    """``(mean, biased var, y)`` from the naive formulas on x scaled per channel."""
    axes = _reduce(x, axis)
    xs, exponent, mean = _scaled(x, axis)
    var = ((xs - mean) ** 2).mean(axis=axes, keepdims=True)
    denominator = np.sqrt(var + np.ldexp(eps, -2 * exponent))
    safe = np.where(denominator > 0, denominator, 1.0)  # 0 only where xs == mean
    y = (xs - mean) / safe
    scale = exponent.ravel()
    return np.ldexp(mean.ravel(), scale), np.ldexp(var.ravel(), 2 * scale), y


def exact_dx(dy, x, axis, eps=1e-6):
    """The training gradient at γ = 1, scaled as above: ε is negligible beside
    these variances, and alone on a constant channel (where x̂ = 0)."""
    axes = _reduce(x, axis)
    xs, exponent, mean = _scaled(x, axis)
    centered = xs - mean
    std = np.sqrt((centered**2).mean(axis=axes, keepdims=True))
    constant = std == 0
    x_hat = centered / np.where(constant, 1.0, std)
    with np.errstate(divide="ignore"):  # 1/std where constant is not used
        inv_std = np.where(constant, 1 / np.sqrt(eps), np.ldexp(1 / std, -exponent))
    inner = dy - dy.mean(axis=axes, keepdims=True)
    inner -= x_hat * (dy * x_hat).mean(axis=axes, keepdims=True)
    return inner * inv_std


def _first_of_each_channel(x, axis):
    index = [0] * x.ndim
    index[axis % x.ndim] = slice(None)
    return tuple(index)


def large_mean(shape, axis, rng):
    """Constant channels at ±1e308 and 1e307 (the plain sum overflows; any spread
    at that size would be a variance beyond float64) beside ordinary values."""
    x = np.moveaxis(np.empty(shape), axis, -1)
    x[..., 0], x[..., 1] = 1.5e308, -1e307
    x[..., 2:] = 1e150 + 1e149 * rng.standard_normal(x[..., 2:].shape)
    return np.moveaxis(x, -1, axis)


def shifted_sums_overflow(shape, axis, rng):
    """A first value of 0, the rest about 1e152: ``(Σ(x − x₀))²`` overflows although
    ``M2`` (about m·1e302) is representable."""
    x = 1e152 * (1.0 + 0.1 * rng.standard_normal(shape))
    x[_first_of_each_channel(x, axis)] = 0.0
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("make", [large_mean, shifted_sums_overflow])
def test_forward_train_of_finite_data_near_the_float64_limit_is_exact(
    backend, shape, axis, make
):
    x = make(shape, axis, np.random.default_rng(0))
    mean, var, expected = exact_forward(x, axis)
    y, cache = F.forward_train(x, None, None, axis=axis, backend=backend)
    np.testing.assert_allclose(cache.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(cache.var, var, rtol=1e-12)
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)
    dy = np.random.default_rng(1).standard_normal(shape)
    dx, dgamma, dbeta = F.backward(dy, cache, backend=backend)
    scale = np.abs(exact_dx(dy, x, axis)).max()
    np.testing.assert_allclose(dx, exact_dx(dy, x, axis), rtol=0, atol=1e-10 * scale)
    assert np.isfinite(dgamma).all() and np.isfinite(dbeta).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("magnitude", [1.4e154, 1e200, 1e307])
def test_a_variance_beyond_float64_is_a_value_error(backend, shape, axis, magnitude):
    """Finite data whose M2 exceeds 1.8e308 gave y = 0 (NumPy) or NaN (Numba)."""
    x = magnitude * np.random.default_rng(2).standard_normal(shape)
    with pytest.raises(
        ValueError, match=r"x has finite values .* beyond float64's range.* x / 1e"
    ):
        F.forward_train(x, None, None, axis=axis, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_still_propagates_without_error(backend):
    x = np.random.default_rng(3).standard_normal((16, 3, 20))
    x[0, 1, 0] = np.nan
    x[0, 2, 0] = 1e200  # channel 2 overflows but is finite: the error names it
    x[1, 2, 0] = -1e200
    with pytest.raises(ValueError, match="channel 2"):
        F.forward_train(x, None, None, backend=backend)
    x[:, 2] = 1.0
    y, cache = F.forward_train(x, None, None, backend=backend)
    assert np.isnan(cache.mean[1]) and np.isnan(y[:, 1]).all()
    assert np.isfinite(y[:, [0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_eval_and_its_gradient_at_1e200_with_representable_running_stats(
    backend, shape, axis
):
    """The running statistics hold (var 1e300 < 1.8e308): eval mode works at 1e200."""
    rng = np.random.default_rng(4)
    x = 3e200 + 1e199 * rng.standard_normal(shape)
    channels = x.shape[axis]
    running_mean = np.full(channels, 3e200)
    running_var = np.full(channels, 1e300)
    y = F.forward_eval(
        x, None, None, running_mean, running_var, axis=axis, backend=backend
    )
    inv_std = 1.0 / np.sqrt(running_var + 1e-6)
    shaped = [1] * x.ndim
    shaped[axis] = -1
    expected = (x - running_mean.reshape(shaped)) * inv_std.reshape(shaped)
    np.testing.assert_array_equal(y, expected)  # one rounding, as the reference
    dy = rng.standard_normal(shape)
    dx, dgamma, dbeta = F.backward_eval(
        dy, x, None, running_mean, running_var, axis=axis, backend=backend
    )
    np.testing.assert_array_equal(dx, dy * inv_std.reshape(shaped))
    axes = _reduce(x, axis)
    np.testing.assert_allclose(dgamma, (dy * expected).sum(axis=axes), rtol=1e-10)
    np.testing.assert_allclose(dbeta, dy.sum(axis=axes), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_eval_gradient_sums_at_1e307_scaled_by_the_running_variance(
    backend, shape, axis
):
    """``Σ dy·(x − mean)`` overflows at 1e307 while ``Σ dy·x̂`` does not: the Numba
    backend gave dgamma = −inf where the reference is finite."""
    rng = np.random.default_rng(5)
    x = 1e307 * (1.0 + rng.random(shape))
    channels = x.shape[axis]
    running_mean, running_var = np.zeros(channels), np.full(channels, 1e300)
    dy = rng.standard_normal(shape)
    _, dgamma, dbeta = F.backward_eval(
        dy, x, None, running_mean, running_var, axis=axis, backend=backend
    )
    axes = _reduce(x, axis)
    x_hat = x * (1.0 / np.sqrt(running_var + 1e-6)).reshape(
        [-1 if a == axis % x.ndim else 1 for a in range(x.ndim)]
    )
    np.testing.assert_allclose(dgamma, (dy * x_hat).sum(axis=axes), rtol=1e-10)
    np.testing.assert_allclose(dbeta, dy.sum(axis=axes), rtol=1e-10, atol=1e-10)
