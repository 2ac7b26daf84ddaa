"""Ghost batch norm (virtual_batch_size) and batch renormalization (renorm=True)."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import functional as F
from batchnorm.ghost import group_slices
from batchnorm.renorm import (
    backward_renorm,
    forward_renorm,
    renorm_factors,
    renorm_schedule,
)
from helpers.gradchecks import directional_check, elementwise_check

C = 3


def data(shape, seed=0, mean=2.0, std=3.0):
    return np.random.default_rng(seed).normal(mean, std, size=shape)


def make_layer(**options):
    rng = np.random.default_rng(42)
    layer = bn.BatchNorm(C, dtype=np.float64, backend="numpy", **options)
    layer.gamma = rng.uniform(0.5, 2.0, C)
    layer.beta = rng.normal(size=C)
    return layer


def run(layer, x, gamma, beta):
    """Training forward without touching the running statistics."""
    layer.gamma, layer.beta = gamma, beta
    layer.use_batch_stats, layer.update_running_stats = True, False
    return layer(x)


def check_gradients(layer, x, seed=0):
    """Directional and element-wise checks of dx, dγ, dβ with a random dy."""
    # Not the seed of data(): dy drawn from the same normals as x would be an
    # affine function of x̂, for which the exact dx is zero.
    rng = np.random.default_rng(1000 + seed)
    gamma, beta = layer.gamma.copy(), layer.beta.copy()
    y = run(layer, x, gamma, beta)
    dy = rng.normal(size=y.shape)
    dx = layer.backward(dy)
    grads = (dx, layer.grad_gamma, layer.grad_beta)

    def loss(x_, g_, b_):
        return float(np.sum(dy * run(layer, x_, g_, b_)))

    directional_check(loss, grads, (x, gamma, beta), rng)
    elementwise_check(lambda x_: loss(x_, gamma, beta), dx, x, atol_scale=1e-6)
    elementwise_check(
        lambda g_: loss(x, g_, beta), layer.grad_gamma, gamma, atol_scale=1e-6
    )
    elementwise_check(
        lambda b_: loss(x, gamma, b_), layer.grad_beta, beta, atol_scale=1e-6
    )


# -- ghost batch norm ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "k", "per_sample", "sizes"),
    [
        (10, 4, 1, [4, 4, 2]),
        (9, 4, 1, [4, 5]),  # a remainder of one dense sample joins the last group
        (9, 4, 16, [4, 4, 1]),  # one image has 16 values per channel: own group
        (3, 4, 1, [3]),
        (8, 4, 1, [4, 4]),
        (2, 2, 1, [2]),
    ],
)
def test_group_slices(n, k, per_sample, sizes):
    slices = group_slices(n, k, per_sample)
    assert [s.stop - s.start for s in slices] == sizes
    assert slices[0].start == 0 and slices[-1].stop == n


@pytest.mark.parametrize(
    ("shape", "axis", "k"),
    [((10, C), 1, 4), ((9, C, 3, 3), 1, 4), ((11, 4, 2, C), -1, 3), ((9, C), 1, 4)],
)
def test_ghost_groups_are_independent_batch_norms(shape, axis, k):
    x = data(shape)
    layer = make_layer(virtual_batch_size=k, axis=axis)
    y = layer(x)
    per_sample = x.size // (shape[0] * C)
    for part in group_slices(shape[0], k, per_sample):
        expected, cache = F.forward_train(
            x[part], layer.gamma, layer.beta, axis=axis, backend="numpy"
        )
        np.testing.assert_allclose(y[part], expected, rtol=1e-13, atol=1e-13)
        # γ = 1, β = 0: per-group mean 0 and variance σ²/(σ² + ε)
        plain = make_layer(virtual_batch_size=k, axis=axis)
        plain.gamma, plain.beta = np.ones(C), np.zeros(C)
        z = plain(x)[part]
        axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
        np.testing.assert_allclose(z.mean(axis=axes), 0, atol=1e-12)
        np.testing.assert_allclose(
            z.var(axis=axes), cache.var / (cache.var + layer.eps), rtol=1e-10
        )


def test_ghost_running_stats_are_sequential_ema_updates():
    x = data((10, C, 2, 2), mean=5.0)
    layer = make_layer(virtual_batch_size=4, momentum=0.8)
    layer(x)
    mean, var = np.zeros(C), np.ones(C)
    for part in group_slices(10, 4, 4):
        moments = bn.Moments.from_array(x[part])
        mean, var = F.update_running_stats(mean, var, moments, momentum=0.8)
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-14)
    np.testing.assert_allclose(layer.running_var, var, rtol=1e-14)
    assert layer.num_batches_tracked == 3
    assert layer.num_values_seen == 40


def test_ghost_cumulative_running_stats_are_whole_batch():
    x = data((10, C))
    layer = make_layer(virtual_batch_size=3, momentum=None)
    layer(x)
    np.testing.assert_allclose(layer.running_mean, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, x.var(axis=0, ddof=1), rtol=1e-13)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_ghost_eval_is_unaffected_for_any_batch_size(n):
    ghost, plain = make_layer(virtual_batch_size=4), make_layer()
    for layer in (ghost, plain):
        layer.running_mean, layer.running_var = np.array([1.0, 2, 3]), np.full(C, 4.0)
        layer.eval()
    x = data((n, C), seed=1)
    np.testing.assert_array_equal(ghost(x), plain(x))
    np.testing.assert_array_equal(ghost.backward(x), plain.backward(x))


def test_ghost_batch_no_larger_than_k_is_plain_batch_norm():
    x = data((4, C, 3))
    ghost, plain = make_layer(virtual_batch_size=4), make_layer()
    np.testing.assert_array_equal(ghost(x), plain(x))
    dy = data((4, C, 3), seed=2)
    np.testing.assert_array_equal(ghost.backward(dy), plain.backward(dy))
    np.testing.assert_array_equal(ghost.grad_gamma, plain.grad_gamma)
    np.testing.assert_array_equal(ghost.running_var, plain.running_var)


@pytest.mark.parametrize(
    ("shape", "k"), [((10, C), 4), ((9, C), 4), ((7, C, 2, 3), 3), ((6, C), 2)]
)
def test_ghost_gradients(shape, k):
    check_gradients(make_layer(virtual_batch_size=k), data(shape))


def test_ghost_reuse_buffers_and_float32():
    x = data((10, C, 2)).astype(np.float32)
    reuse = bn.BatchNorm(C, virtual_batch_size=4, reuse_buffers=True)
    fresh = bn.BatchNorm(C, virtual_batch_size=4)
    np.testing.assert_array_equal(reuse(x), fresh(x))
    assert reuse(x).dtype == np.float32
    dy = data((10, C, 2), seed=3).astype(np.float32)
    np.testing.assert_array_equal(reuse.backward(dy), fresh.backward(dy))


def test_ghost_nonfinite_group_is_all_or_nothing():
    x = data((8, C))
    x[6, 1] = np.nan
    layer = make_layer(virtual_batch_size=4)
    with pytest.raises(bn.NonFiniteStatisticsError, match="not finite"):
        layer(x)
    np.testing.assert_array_equal(layer.running_var, np.ones(C))
    assert layer.num_batches_tracked == 0
    skip = make_layer(virtual_batch_size=4, on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="not finite"):
        skip(x)
    assert skip.num_batches_tracked == 1  # the finite first group only
    expected = F.update_running_stats(
        np.zeros(C), np.ones(C), bn.Moments.from_array(x[:4]), momentum=0.99
    )
    np.testing.assert_allclose(skip.running_mean, expected[0], rtol=1e-14)


def test_ghost_update_without_batch_stats_normalizes_with_updated_running():
    x = data((8, C))
    layer = make_layer(virtual_batch_size=4)
    layer.use_batch_stats, layer.update_running_stats = False, True
    y = layer(x)
    assert layer.num_batches_tracked == 2
    expected = F.forward_eval(
        x, layer.gamma, layer.beta, layer.running_mean, layer.running_var
    )
    np.testing.assert_allclose(y, expected, rtol=1e-14)


# -- batch renormalization ---------------------------------------------------------


def test_renorm_with_rmax_1_dmax_0_is_plain_batch_norm():
    x = data((6, C, 2, 2), mean=4.0)
    renorm, plain = make_layer(renorm=True, rmax=1.0, dmax=0.0), make_layer()
    renorm.running_mean, renorm.running_var = np.full(C, 3.0), np.full(C, 7.0)
    plain.running_mean, plain.running_var = np.full(C, 3.0), np.full(C, 7.0)
    np.testing.assert_allclose(renorm(x), plain(x), rtol=1e-15, atol=1e-15)
    dy = data(x.shape, seed=1)
    np.testing.assert_allclose(
        renorm.backward(dy), plain.backward(dy), rtol=1e-13, atol=1e-14
    )
    np.testing.assert_allclose(renorm.grad_gamma, plain.grad_gamma, rtol=1e-14)
    np.testing.assert_allclose(renorm.grad_beta, plain.grad_beta, rtol=1e-14)
    np.testing.assert_array_equal(renorm.running_mean, plain.running_mean)
    np.testing.assert_array_equal(renorm.running_var, plain.running_var)


@pytest.mark.parametrize("placement", ["inside", "outside"])
def test_renorm_r_d_closed_form_and_clipping(placement):
    x = data((50, C), mean=1.0, std=2.0)
    ddof = 1 if placement == "outside" else 0
    running_mean = np.array([1.0, 9.0, -60.0])
    running_var = np.array([4.0, 0.01, 900.0])
    eps = 1e-3
    _, cache = forward_renorm(
        x,
        None,
        None,
        running_mean,
        running_var,
        rmax=2.0,
        dmax=1.5,
        eps=eps,
        eps_placement=placement,
        ddof=ddof,
        backend="numpy",
    )

    def sigma(var):
        return np.sqrt(var + eps) if placement == "inside" else np.sqrt(var) + eps

    sigma_b = sigma(x.var(axis=0, ddof=ddof))
    r = np.clip(sigma_b / sigma(running_var), 0.5, 2.0)
    d = np.clip((x.mean(axis=0) - running_mean) / sigma(running_var), -1.5, 1.5)
    np.testing.assert_allclose(cache.r, r, rtol=1e-12)
    np.testing.assert_allclose(cache.d, d, rtol=1e-12)
    assert cache.r[1] == 2.0 and cache.r[2] == 0.5  # clipped both ways
    assert cache.d[1] == -1.5 and cache.d[2] == 1.5
    assert 0.5 < cache.r[0] < 2.0 and abs(cache.d[0]) < 1.5


@pytest.mark.parametrize("preset", [None, "darknet", "torch"])
def test_renorm_unclipped_training_output_is_eval_output(preset):
    options = {"renorm": True, "rmax": np.inf, "dmax": np.inf}
    if preset is None:
        layer = make_layer(**options)
    else:
        layer = bn.BatchNorm.from_preset(preset, C, dtype=np.float64, **options)
    layer.running_mean, layer.running_var = np.array([1.0, 2.0, 3.0]), np.full(C, 5.0)
    x = data((8, C, 3))
    layer.update_running_stats = False
    y_train = layer(x)
    np.testing.assert_allclose(y_train, layer.eval()(x), rtol=1e-12, atol=1e-12)


def test_renorm_running_stats_updated_as_usual():
    x = data((8, C))
    renorm, plain = make_layer(renorm=True), make_layer()
    for layer in (renorm, plain):
        layer(x)
        layer(x + 1)
    np.testing.assert_array_equal(renorm.running_mean, plain.running_mean)
    np.testing.assert_array_equal(renorm.running_var, plain.running_var)
    assert renorm.num_batches_tracked == 2


def test_renorm_gradient_where_clipped_is_the_full_gradient():
    # r and d are clipped (locally constant), so the stop-gradient is the gradient.
    layer = make_layer(renorm=True, rmax=2.0, dmax=0.5)
    layer.running_mean = np.array([20.0, -20.0, 20.0])
    layer.running_var = np.array([400.0, 0.01, 0.01])
    x = data((7, C, 2))
    _, cache = forward_renorm(
        x, None, None, layer.running_mean, layer.running_var, rmax=2.0, dmax=0.5
    )
    assert set(np.abs(cache.d)) == {0.5} and set(cache.r) <= {0.5, 2.0}
    check_gradients(layer, x)


@pytest.mark.parametrize("placement", ["inside", "outside"])
def test_renorm_gradient_holds_r_d_constant(placement):
    rng = np.random.default_rng(7)
    x = data((6, C, 2))
    gamma, beta = rng.uniform(0.5, 2, C), rng.normal(size=C)
    running_mean, running_var = np.array([2.5, 1.0, 2.0]), np.array([8.0, 10.0, 12.0])
    options = {
        "eps": 1e-2,
        "eps_placement": placement,
        "ddof": int(placement != "inside"),
    }
    y, cache = forward_renorm(
        x, gamma, beta, running_mean, running_var, rmax=3, dmax=5, **options
    )
    assert np.all((cache.r > 1 / 3) & (cache.r < 3)) and np.all(np.abs(cache.d) < 5)
    r, d = cache.r, cache.d
    dy = rng.normal(size=y.shape)
    dx, dgamma, dbeta = backward_renorm(dy, cache)

    def frozen(x_, g_, b_):  # y with r, d held at their values
        y_hat, _ = F.forward_train(x_, None, None, **options)
        y_hat = y_hat * r[:, None] + d[:, None]
        return float(np.sum(dy * (g_[:, None] * y_hat + b_[:, None])))

    directional_check(frozen, (dx, dgamma, dbeta), (x, gamma, beta), rng)
    elementwise_check(lambda x_: frozen(x_, gamma, beta), dx, x, atol_scale=1e-6)
    elementwise_check(lambda g_: frozen(x, g_, beta), dgamma, gamma, atol_scale=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {"renorm": True},
        {"virtual_batch_size": 3},
        {"renorm": True, "virtual_batch_size": 3},
    ],
)
def test_eval_gradient_of_new_modes(options):
    layer = make_layer(**options)
    layer(data((9, C)))
    layer.eval()
    x = data((5, C), seed=4)
    rng = np.random.default_rng(0)
    gamma, beta = layer.gamma.copy(), layer.beta.copy()
    dy = rng.normal(size=x.shape)
    layer(x)
    dx = layer.backward(dy)

    def loss(x_, g_, b_):
        layer.gamma, layer.beta = g_, b_
        return float(np.sum(dy * layer(x_)))

    directional_check(
        loss, (dx, layer.grad_gamma, layer.grad_beta), (x, gamma, beta), rng
    )


def test_ghost_renorm_uses_running_stats_updated_by_earlier_groups():
    x = data((8, C), mean=3.0)
    layer = make_layer(renorm=True, virtual_batch_size=4, momentum=0.5)
    y = layer(x)
    mean, var = np.zeros(C), np.ones(C)
    for part in (slice(0, 4), slice(4, 8)):
        expected, cache = forward_renorm(
            x[part], layer.gamma, layer.beta, mean, var, rmax=3.0, dmax=5.0
        )
        np.testing.assert_allclose(y[part], expected, rtol=1e-14)
        mean, var = F.update_running_stats(mean, var, cache.moments, momentum=0.5)
    clipped = make_layer(renorm=True, virtual_batch_size=4, rmax=1.5, dmax=0.5)
    clipped.running_mean, clipped.running_var = np.full(C, 30.0), np.full(C, 1e-4)
    check_gradients(clipped, x)


def test_renorm_schedule():
    assert renorm_schedule(0, 10, 20) == (1.0, 0.0)
    assert renorm_schedule(20, 10, 20) == (2.0, 2.5)
    assert renorm_schedule(10**6, 10, 20, rmax_final=2, dmax_final=1) == (2.0, 1.0)
    assert renorm_schedule(10, 10, 0) == (3.0, 5.0)
    assert renorm_schedule(9, 10, 0) == (1.0, 0.0)


def test_renorm_factors_with_zero_sigma():
    moments = bn.Moments(2, np.array([1.0, 0.0]), np.array([2.0, 0.0]))
    inv_std = F.inv_std_of(moments.var(0), 0.0)
    r, d = renorm_factors(
        moments,
        inv_std,
        np.zeros(2),
        np.zeros(2),
        rmax=3.0,
        dmax=5.0,
        eps=0.0,
        eps_placement="inside",
    )
    np.testing.assert_array_equal(r, [3.0, 1.0])
    np.testing.assert_array_equal(d, [5.0, 0.0])


def test_config_round_trip():
    layer = bn.BatchNorm(C, virtual_batch_size=5, renorm=True, rmax=2.0, dmax=1.0)
    clone = bn.BatchNorm(**layer.config())
    assert (clone.virtual_batch_size, clone.renorm, clone.rmax, clone.dmax) == (
        5,
        True,
        2.0,
        1.0,
    )


# -- error paths --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"virtual_batch_size": 1}, ValueError, "virtual_batch_size must be >= 2"),
        ({"virtual_batch_size": 2.5}, TypeError, "virtual_batch_size must be an int"),
        ({"virtual_batch_size": True}, TypeError, "virtual_batch_size must be an int"),
        ({"rmax": 0.5}, ValueError, "rmax must be >= 1"),
        ({"rmax": np.nan}, ValueError, "rmax must be >= 1"),
        ({"dmax": -1.0}, ValueError, "dmax must be >= 0"),
        ({"dmax": "5"}, TypeError, "dmax must be a float"),
    ],
)
def test_constructor_errors(options, error, match):
    with pytest.raises(error, match=match):
        bn.BatchNorm(C, **options)


def test_rmax_set_by_trainer_is_checked_at_forward():
    layer = bn.BatchNorm(C, renorm=True)
    layer.rmax = 0.9
    with pytest.raises(ValueError, match=r"rmax must be >= 1 .*; got 0.9"):
        layer(data((4, C)))


def test_other_errors():
    with pytest.raises(ValueError, match="warmup and ramp must be >= 0"):
        renorm_schedule(0, -1, 10)
    with pytest.raises(ValueError, match="rmax must be >= 1"):
        renorm_schedule(0, 1, 10, rmax_final=0.5)
    with pytest.raises(TypeError, match="RenormCache"):
        backward_renorm(np.ones((2, C)), object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        forward_renorm(np.ones((1, C)), None, None, np.zeros(C), np.ones(C))
    y, cache = forward_renorm(np.ones((0, C)), None, None, np.zeros(C), np.ones(C))
    assert y.shape == (0, C) and cache.moments.count == 0  # an empty batch passes
    layer = make_layer(virtual_batch_size=2)
    layer(data((4, C)))
    with pytest.raises(ValueError, match="dy must have the shape"):
        layer.backward(np.ones((3, C)))
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        make_layer(virtual_batch_size=2)(data((1, C)))
