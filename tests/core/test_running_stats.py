"""Running statistics: EMA direction and closed form, exact cumulative, non-finite."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import batchnorm as bn

F = bn.functional


def moments_of(x, axis=1):
    return bn.Moments.from_array(x, axis)


def test_ema_weights_the_old_value():
    batch = bn.Moments(4, np.array([10.0, -2.0]), np.array([12.0, 3.0]))
    old_mean, old_var = np.array([1.0, 1.0]), np.array([2.0, 5.0])
    mean, var = F.update_running_stats(old_mean, old_var, batch, momentum=0.99)
    np.testing.assert_allclose(mean, 0.99 * old_mean + 0.01 * np.array([10.0, -2.0]))
    # unbiased batch variance: M2 / (m − 1)
    np.testing.assert_allclose(var, 0.99 * old_var + 0.01 * np.array([4.0, 1.0]))
    _, var_b = F.update_running_stats(
        old_mean, old_var, batch, momentum=0.99, running_var_kind="biased"
    )
    np.testing.assert_allclose(var_b, 0.99 * old_var + 0.01 * np.array([3.0, 0.75]))


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_ema_closed_form(momentum):
    """k updates with a constant batch: run_k = μᵏ·run_0 + (1 − μᵏ)·batch."""
    batch = bn.Moments(3, np.array([4.0]), np.array([6.0]))  # unbiased var 3
    mean, var = np.array([0.0]), np.array([1.0])
    with warnings.catch_warnings():  # momentum=1.0 warns (tests/core/test_edges.py)
        warnings.filterwarnings("ignore", "momentum=1.0 keeps", UserWarning)
        for _ in range(7):
            mean, var = F.update_running_stats(mean, var, batch, momentum=momentum)
    w = momentum**7
    np.testing.assert_allclose(mean, (1 - w) * 4.0, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(var, w * 1.0 + (1 - w) * 3.0, rtol=1e-12)


@pytest.mark.parametrize("kind", ["unbiased", "biased"])
def test_momentum_none_is_exact_cumulative(kind):
    rng = np.random.default_rng(0)
    batches = [
        rng.normal(5.0 * i, 1.0 + i, size=(n, 3, 4))
        for i, n in enumerate([2, 7, 3, 11])
    ]
    mean, var = np.zeros(3), np.ones(3)
    seen = 0
    for x in batches:
        m = moments_of(x)
        mean, var = F.update_running_stats(
            mean, var, m, momentum=None, running_var_kind=kind, num_values_seen=seen
        )
        seen += m.count
    whole = np.concatenate(batches, axis=0)
    ddof = 1 if kind == "unbiased" else 0
    np.testing.assert_allclose(mean, whole.mean(axis=(0, 2)), rtol=1e-13)
    np.testing.assert_allclose(var, whole.var(axis=(0, 2), ddof=ddof), rtol=1e-12)


def test_momentum_none_first_batch_replaces_initial_values():
    m = bn.Moments(2, np.array([3.0]), np.array([8.0]))
    mean, var = F.update_running_stats(
        np.array([0.0]), np.array([1.0]), m, momentum=None, num_values_seen=0
    )
    assert mean[0] == 3.0 and var[0] == 8.0


def test_dtypes_of_running_stats_are_kept():
    m = bn.Moments(2, np.array([3.0]), np.array([8.0]))
    mean, var = F.update_running_stats(
        np.zeros(1, np.float32), np.ones(1, np.float32), m
    )
    assert mean.dtype == np.float32 and var.dtype == np.float32


def test_nonfinite_statistics_raise_by_default():
    x = np.ones((4, 2))
    x[1, 1] = np.nan
    _, cache = F.forward_train(x, None, None)
    rm, rv = np.zeros(2), np.ones(2)
    with pytest.raises(
        bn.NonFiniteStatisticsError, match=r"not finite in channels \[1\]"
    ):
        F.update_running_stats(rm, rv, cache)
    with pytest.warns(RuntimeWarning, match="left unchanged"):
        mean, var = F.update_running_stats(rm, rv, cache, on_nonfinite="skip")
    np.testing.assert_array_equal(mean, rm)
    np.testing.assert_array_equal(var, rv)
    assert mean is not rm


def test_infinite_input_is_nonfinite_too():
    x = np.array([[1.0], [np.inf]])
    _, cache = F.forward_train(x, None, None)
    with pytest.raises(bn.NonFiniteStatisticsError):
        F.update_running_stats(np.zeros(1), np.ones(1), cache)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_update_that_overflows_the_dtype_never_lands(dtype):
    """Finite float64 statistics can still overflow float32/float16 storage."""
    batch = bn.Moments(2, np.array([0.0, 1.0]), np.array([1e300, 1.0]))
    rm, rv = np.zeros(2, dtype), np.ones(2, dtype)
    with pytest.raises(bn.NonFiniteStatisticsError, match=r"overflow .* \[0\]"):
        F.update_running_stats(rm, rv, batch, momentum=0.9)
    with pytest.warns(RuntimeWarning, match="left unchanged"):
        mean, var = F.update_running_stats(rm, rv, batch, on_nonfinite="skip")
    np.testing.assert_array_equal(var, 1.0)


def test_layer_with_float16_parameters_keeps_finite_statistics():
    x = np.random.default_rng(0).normal(0.0, 3e4, size=(8, 2)).astype(np.float32)
    layer = bn.BatchNorm(2, dtype=np.float16)
    with pytest.raises(bn.NonFiniteStatisticsError, match="overflow float16"):
        layer(x)
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_var, 1.0)
    skipping = bn.BatchNorm(2, dtype=np.float16, on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="overflow float16"):
        skipping(x)
    assert skipping.num_batches_tracked == 0
    assert np.isfinite(skipping.running_var).all()


def test_nonfinite_running_mean_is_rejected():
    m = bn.Moments(2, np.array([3.0]), np.array([8.0]))
    with pytest.raises(ValueError, match=r"running_mean must be finite in every "):
        F.update_running_stats(np.array([np.nan]), np.ones(1), m)
