"""Closed-form properties of batch normalization, checked with Hypothesis."""

from __future__ import annotations

import warnings

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import batchnorm as bn

F = bn.functional
settings.register_profile("ci", deadline=None, max_examples=60)
settings.load_profile("ci")


@st.composite
def batches(draw, min_dims=2, max_dims=4):
    """A float64 batch with C at axis 1, m ≥ 2, channel spreads well above ε."""
    shape = draw(
        hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=5)
    )
    if np.prod(shape) // shape[1] < 2:
        shape = (shape[0] + 1, *shape[1:])
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    c = shape[1]
    means = rng.normal(0, draw(st.sampled_from([1.0, 1e3, 1e6])), c)
    stds = np.exp(rng.uniform(-3, 3, c))
    x = rng.normal(size=shape) * stds.reshape(1, c, *[1] * (len(shape) - 2))
    x += means.reshape(1, c, *[1] * (len(shape) - 2))
    return x, rng


def per_channel(a):
    return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])


def rounding_bound(x):
    """Per-channel error scale of float64 work on x: ε₆₄ · (1 + max|x| / std).

    Subtracting a mean of 1e6 from data spread by 0.05 leaves only the digits below
    the mean's ulp; every later step inherits that relative error, κ · ε₆₄.
    """
    cols = per_channel(x)
    std = cols.std(axis=0)
    kappa = 1.0 + np.abs(cols).max(axis=0) / np.where(std > 0, std, np.inf)
    return 64 * np.finfo(np.float64).eps * kappa


@given(batches(), st.sampled_from([1e-30, 1e-6, 1e-2]))
def test_output_mean_zero_and_variance_closed_form(data, eps):
    x, _ = data
    y, cache = F.forward_train(x, None, None, eps=eps, backend="numpy")
    cols = per_channel(y)
    var = cache.var
    if np.any(var == 0):  # constant channel: output is exactly 0
        return
    bound = rounding_bound(x)
    assert np.all(np.abs(cols.mean(axis=0)) <= bound)
    assert np.all(np.abs(cols.var(axis=0) - var / (var + eps)) <= bound)


@given(batches(), st.floats(1e-3, 1e3), st.floats(-1e3, 1e3))
def test_invariant_to_positive_scale_and_shift(data, scale, shift):
    """y(a·x + b; ε·a²) = y(x; ε): BN removes each channel's affine transform."""
    x, rng = data
    c = x.shape[1]
    a = scale * rng.uniform(0.5, 2.0, c).reshape(1, c, *[1] * (x.ndim - 2))
    b = shift * rng.normal(size=c).reshape(a.shape)
    eps = 1e-4
    y, _ = F.forward_train(x, None, None, eps=eps, backend="numpy")
    moved = a * x + b
    # eps is one scalar, so each channel is rescaled (and checked) on its own
    for k in range(c):
        yk, _ = F.forward_train(
            moved[:, k : k + 1],
            None,
            None,
            eps=eps * float(a.ravel()[k]) ** 2,
            backend="numpy",
        )
        np.testing.assert_allclose(yk, y[:, k : k + 1], atol=1e-7)


@given(batches(), st.sampled_from(["inside", "outside"]))
def test_input_gradient_sums_to_zero_per_channel(data, placement):
    x, rng = data
    dy = rng.normal(size=x.shape)
    gamma = rng.uniform(0.5, 2.0, x.shape[1])
    _, cache = F.forward_train(x, gamma, None, eps_placement=placement, backend="numpy")
    dx, _, _ = F.backward(dy, cache, backend="numpy")
    # dx is a sum of terms of size ~ γ·inv_std·|dy| (it can cancel to ~0, e.g. m = 2)
    term = np.abs(per_channel(dy)).max() * gamma * cache.inv_std
    sums = per_channel(dx).sum(axis=0)
    assert np.all(np.abs(sums) <= rounding_bound(x) * term * per_channel(dx).shape[0])


@given(batches(min_dims=3, max_dims=5))
def test_layout_equivariance(data):
    """Normalizing channels-last data along axis=-1 is the same map."""
    x, rng = data
    c = x.shape[1]
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    dy = rng.normal(size=x.shape)
    y, cache = F.forward_train(x, gamma, beta, backend="numpy")
    dx, dgamma, dbeta = F.backward(dy, cache, backend="numpy")
    x_last = np.moveaxis(x, 1, -1)
    y_last, cache_last = F.forward_train(x_last, gamma, beta, axis=-1, backend="numpy")
    dx_last, dgamma_last, dbeta_last = F.backward(
        np.moveaxis(dy, 1, -1), cache_last, backend="numpy"
    )
    np.testing.assert_allclose(np.moveaxis(y_last, -1, 1), y, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        np.moveaxis(dx_last, -1, 1), dx, rtol=1e-7, atol=1e-9 * np.abs(dx).max()
    )
    np.testing.assert_allclose(dgamma_last, dgamma, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dbeta_last, dbeta, rtol=1e-9, atol=1e-9)


@given(
    st.floats(0.0, 1.0), st.integers(1, 20), st.floats(-1e3, 1e3), st.floats(1e-3, 1e3)
)
def test_ema_closed_form(momentum, steps, batch_mean, batch_var):
    m = bn.Moments(5, np.array([batch_mean]), np.array([batch_var * 4]))
    mean, var = np.array([0.0]), np.array([1.0])
    with warnings.catch_warnings():  # momentum=1.0 warns (tests/core/test_edges.py)
        warnings.filterwarnings("ignore", "momentum=1.0 keeps", UserWarning)
        for _ in range(steps):
            mean, var = F.update_running_stats(mean, var, m, momentum=momentum)
    w = momentum**steps
    np.testing.assert_allclose(mean, (1 - w) * batch_mean, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(var, w + (1 - w) * batch_var, rtol=1e-9)


@given(batches(), st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_chunked_merge_equals_whole(data, cuts):
    x, _ = data
    n = x.shape[0]
    edges = sorted({min(n, sum(cuts[: i + 1])) for i in range(len(cuts))} | {0, n})
    merged = bn.Moments.empty(x.shape[1])
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        merged = merged.merge(bn.Moments.from_array(x[lo:hi]))
    whole = bn.Moments.from_array(x)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12, atol=1e-300)
    # Chan's δ = mean_b − mean_a carries the means' rounding, ε·|mean|, against a
    # spread σ: M2 inherits it relative to the channel's own size, κ·ε each way.
    bound = 2 * rounding_bound(x) * whole.m2 + 1e-300
    assert np.all(np.abs(merged.m2 - whole.m2) <= bound)
