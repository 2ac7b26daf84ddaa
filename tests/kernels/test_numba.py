"""Numba kernels against the NumPy reference: every op, layout, dtype, thread count.

Tolerances follow from how each value is computed, not from what passed:

- ``normalize`` (forward ``y``, eval ``dx``) evaluates ``(x − mean)·scale + shift``
  in float64 in the reference's order with no fused multiply-add and rounds once,
  so given the same per-channel vectors it is bit-identical: compared exactly.
- Reductions (``mean``, ``M2``, ``dgamma``, ``dbeta``) are float64 sums in another
  order. Recursive summation of ``n`` terms errs by at most ``n·u·Σ|terms|``
  (u = 2⁻⁵³; Higham, Accuracy and Stability, §4.2), for each implementation, so
  they must agree within ``2·n·u·Σ|terms|`` per channel. For ``M2`` from shifted
  sums that is ``Σd²`` with ``d = x − pivot`` (the first value of the channel).
- ``dx`` in training uses those reductions, so it may differ by one rounding of
  the output dtype (one ulp) plus the reductions' float64 discrepancy.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

import batchnorm as bn  # noqa: E402
from batchnorm.kernels import numba as _numba  # noqa: E402
from batchnorm.kernels import reference  # noqa: E402
from batchnorm.kernels.numba import (  # noqa: E402
    _loops,
    _loops_channels_last,
)
from helpers.channels import channel_sums, first_per_channel, per_channel  # noqa: E402
from helpers.kernel_cases import (  # noqa: E402
    DTYPES,
    LAYOUTS,
    U64,
    assert_sums_close,
    make,
)
from helpers.processes import run_python  # noqa: E402

F = bn.functional

# The fixtures ``threads`` (1 and 2 threads) and ``loops`` (the launcher calls
# that ran) are in tests/kernels/conftest.py.


def assert_path(ran, name, ops, *arrays):
    """The launcher ran exactly the operations ``ops`` iff the inputs are
    float32/64, C-contiguous and of one dtype (else none: the reference); the
    parallel build iff the case is a parallel size and more than one thread is
    in effect (the ``threads`` fixture asks for 2; a 1-core machine has 1)."""
    covered = all(
        a.dtype in (np.float32, np.float64)
        and a.flags.c_contiguous
        and a.dtype == arrays[0].dtype
        for a in arrays
    )
    assert {op for _, op in ran} == (set(ops) if covered else set()), (name, ran)
    parallel = covered and _numba.get_num_threads() > 1 and "parallel" in name
    assert any(build == "parallel" for build, _ in ran) == parallel, (name, ran)
    ran.clear()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("name", "shape", "axis", "transform"), LAYOUTS)
def test_batch_moments(threads, loops, name, shape, axis, transform, dtype):
    _, x, _, _, axis = make(shape, axis, transform, dtype, mean=1e4, std=1.0)
    count, mean, m2 = _numba.batch_moments(x, axis)
    assert_path(loops, name, [_loops.MOMENTS], x)
    count_ref, mean_ref, m2_ref = reference.batch_moments(x, axis)
    assert count == count_ref
    x64 = x.astype(np.float64)
    d = x64 - per_channel(first_per_channel(x64, axis), x64, axis)
    abs_x, abs_d = channel_sums(np.abs(x64), axis), channel_sums(np.abs(d), axis)
    assert_sums_close(mean * count, mean_ref * count, abs_x + abs_d, count)
    assert_sums_close(m2, m2_ref, channel_sums(d * d, axis), count)


@pytest.mark.parametrize(
    "shift_dtype", [np.float32, np.float64, None], ids=["beta", "float64 beta", "none"]
)
@pytest.mark.parametrize(
    "mean_dtype", [np.float64, np.float32], ids=["batch mean", "running mean"]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("name", "shape", "axis", "transform"), LAYOUTS)
def test_normalize_is_bit_identical(
    threads, loops, name, shape, axis, transform, dtype, mean_dtype, shift_dtype
):
    """Bit for bit, whatever the mean and shift: float32 values (β and the
    running mean of float32 parameters) reach the wide channels-last loop as
    float32, others (a batch mean, a float64 β) as float64."""
    rng, x, _, c, axis = make(shape, axis, transform, dtype)
    mean = rng.normal(3.0, 1.0, c).astype(mean_dtype).astype(np.float64)
    scale = rng.uniform(0.2, 2.0, c)
    shift = None if shift_dtype is None else rng.normal(size=c).astype(shift_dtype)
    y = _numba.normalize(x, axis, mean, scale, shift, x.dtype)
    assert_path(loops, name, [_loops.NORMALIZE], x)
    y_ref = reference.normalize(x, axis, mean, scale, shift, x.dtype)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, y_ref)


def gradient_inputs(rng, x, c, axis):
    count, mean, m2 = reference.batch_moments(x, axis)
    inv_std = 1.0 / np.sqrt(m2 / count + 1e-6)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    return count, mean, inv_std, gamma


def assert_param_grads_close(dgamma, dbeta, dy, x, mean, inv_std, axis, count):
    dy64 = dy.astype(np.float64)
    x_hat = (x.astype(np.float64) - per_channel(mean, x, axis)) * per_channel(
        inv_std, x, axis
    )
    _, dgamma_ref, dbeta_ref = reference.param_grads(dy, x, axis, mean, inv_std)
    assert_sums_close(dbeta, dbeta_ref, channel_sums(np.abs(dy64), axis), count)
    # dgamma is inv_std · Σ dy·(x − mean) here and Σ dy·x̂ there: one more rounding.
    abs_terms = channel_sums(np.abs(dy64 * x_hat), axis)
    assert_sums_close(dgamma, dgamma_ref, abs_terms * (1 + 4 / count), count)
    return dgamma_ref, dbeta_ref, abs_terms


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("name", "shape", "axis", "transform"), LAYOUTS)
def test_backward_train(threads, loops, name, shape, axis, transform, dtype):
    rng, x, dy, c, axis = make(shape, axis, transform, dtype)
    count, mean, inv_std, gamma = gradient_inputs(rng, x, c, axis)
    k = np.full(c, -1.0 / count)
    dx, dgamma, dbeta = _numba.backward_train(
        dy, x, axis, mean, inv_std, gamma, k, count
    )
    assert_path(loops, name, [_loops.GRAD_SUMS, _loops.DX], x, dy)
    dx_ref, _, _ = reference.backward_train(dy, x, axis, mean, inv_std, gamma, k, count)
    _, _, abs_terms = assert_param_grads_close(
        dgamma, dbeta, dy, x, mean, inv_std, axis, count
    )
    assert dx.dtype == x.dtype and dx.shape == x.shape
    # One rounding of the output dtype, plus the float64 discrepancy of the
    # per-channel constants Σdy/m and k·Σdy·x̂ carried through x̂ and γ·inv_std.
    ulp = np.finfo(dtype).eps
    gain = per_channel(inv_std * gamma, x, axis)
    x_hat = np.abs(x.astype(np.float64) - per_channel(mean, x, axis)) * per_channel(
        inv_std, x, axis
    )
    carried = (
        gain
        * (1 + x_hat)
        * per_channel(
            4 * count * U64 * (abs_terms + channel_sums(np.abs(dy), axis)) / count,
            x,
            axis,
        )
    )
    bound = ulp * np.abs(dx_ref.astype(np.float64)) + carried
    assert np.all(np.abs(dx.astype(np.float64) - dx_ref) <= bound)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("name", "shape", "axis", "transform"), LAYOUTS)
def test_backward_eval(threads, loops, name, shape, axis, transform, dtype):
    rng, x, dy, c, axis = make(shape, axis, transform, dtype)
    count, mean, inv_std, gamma = gradient_inputs(rng, x, c, axis)
    dx, dgamma, dbeta = _numba.backward_eval(dy, x, axis, mean, inv_std, gamma)
    assert_path(loops, name, [_loops.GRAD_SUMS, _loops.NORMALIZE], x, dy)
    dx_ref, _, _ = reference.backward_eval(dy, x, axis, mean, inv_std, gamma)
    np.testing.assert_array_equal(dx, dx_ref)  # dy · (γ·inv_std): same float64 op
    assert_param_grads_close(dgamma, dbeta, dy, x, mean, inv_std, axis, count)


# -- accuracy at large means ---------------------------------------------------
ACCURACY_LAYOUTS = [
    ("nchw", (16, 8, 24, 24), 1),
    ("channels-last", (16, 24, 24, 8), -1),
    ("2d", (4096, 64), 1),
    ("axis middle 5d", (8, 4, 6, 10, 10), 2),
    ("nchw small (fused)", (8, 16, 16, 16), 1),
]


@pytest.mark.parametrize("mean", [0.0, 1e4, 1e6])
@pytest.mark.parametrize(("name", "shape", "axis"), ACCURACY_LAYOUTS)
def test_float32_variance_accuracy_at_large_means(threads, name, shape, axis, mean):
    """The issue's bar: relative variance error ≤ 1e-6 against float64."""
    x = (mean + np.random.default_rng(1).standard_normal(shape)).astype(np.float32)
    axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    var_ref = x.astype(np.float64).var(axis=axes)
    _, cache = F.forward_train(x, None, None, axis=axis, backend="numba")
    assert np.max(np.abs(cache.var - var_ref) / var_ref) <= 1e-6


# -- fused small forward_train ------------------------------------------------------
FUSED_LAYOUTS = [
    ("3d", (16, 4, 9), 1),
    ("nchw", (8, 3, 5, 7), 1),
    ("nchw bench", (8, 16, 16, 16), 1),
    ("5d", (4, 3, 2, 5, 6), 1),
    ("axis middle 5d", (4, 2, 3, 5, 6), 2),
    ("C=1", (16, 1, 4, 4), 1),
]


def composed_forward_train(x, axis, gamma, beta, eps, eps_placement, ddof):
    """What functional.forward_train computes without the fused kernel."""
    count, mean, m2 = _numba.batch_moments(x, axis)
    inv_std = F.inv_std_of(m2 / (count - ddof), eps, eps_placement)
    scale = inv_std if gamma is None else inv_std * gamma.astype(np.float64)
    y = _numba.normalize(x, axis, mean, scale, beta, x.dtype)
    return count, mean, m2, inv_std, y


@pytest.mark.parametrize("placement", ["inside", "outside"])
def test_fused_forward_train_with_zero_eps_on_a_constant_channel(placement):
    """ε = 0 (which the functional API refuses; the kernels stay total) and a
    channel whose values are all equal (a dead ReLU channel): ``inv_std`` is inf
    and ``y`` NaN there, as in the composed path and the NumPy kernels, not an
    exception from a scalar division by zero."""
    x = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
    x[:, 1] = 2.5
    fused = _numba.forward_train(x, 1, None, None, 0.0, placement, 0)
    assert fused is not None
    want = composed_forward_train(x, 1, None, None, 0.0, placement, 0)
    for got, expected in zip(fused[1:], want[1:], strict=True):
        np.testing.assert_array_equal(got, expected)
    assert np.isinf(fused[3][1]) and np.isnan(fused[4][:, 1]).all()
    with np.errstate(divide="ignore", invalid="ignore"):  # the NumPy kernels
        count, mean, m2 = reference.batch_moments(x, 1)
        inv_std_ref = F.inv_std_of(m2 / count, 0.0, placement)
        y_ref = reference.normalize(x, 1, mean, inv_std_ref, None, x.dtype)
    np.testing.assert_array_equal(np.isinf(fused[3]), np.isinf(inv_std_ref))
    np.testing.assert_array_equal(np.isnan(fused[4]), np.isnan(y_ref))


@pytest.mark.parametrize("mean", [0.0, 1e4, 1e6])
@pytest.mark.parametrize(
    "options", [(1e-6, "inside", 0), (1e-3, "outside", 1), (1e-30, "inside", 0)]
)
@pytest.mark.parametrize("params", [True, False], ids=["gamma beta", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "shape", "axis"), FUSED_LAYOUTS)
def test_fused_forward_train_equals_the_composition(
    threads, name, shape, axis, dtype, params, options, mean
):
    """One compiled call gives bit for bit what batch_moments + normalize give."""
    rng, x, _, c, axis = make(shape, axis, None, dtype, mean=mean, std=1.0)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32) if params else None
    beta = rng.normal(size=c).astype(np.float32) if params else None
    fused = _numba.forward_train(x, axis, gamma, beta, *options)
    assert fused is not None
    want = composed_forward_train(x, axis, gamma, beta, *options)
    assert fused[0] == want[0]
    for got, expected in zip(fused[1:], want[1:], strict=True):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    # and within the reductions' bound of the reference, through forward_train
    y, cache = F.forward_train(
        x,
        gamma,
        beta,
        axis=axis,
        eps=options[0],
        eps_placement=options[1],
        ddof=options[2],
        backend="numba",
    )
    np.testing.assert_array_equal(y, fused[4])
    _, mean_ref, m2_ref = reference.batch_moments(x, axis)
    x64 = x.astype(np.float64)
    d = x64 - per_channel(first_per_channel(x64, axis), x64, axis)
    abs_x, abs_d = channel_sums(np.abs(x64), axis), channel_sums(np.abs(d), axis)
    count = cache.count
    assert_sums_close(cache.mean * count, mean_ref * count, abs_x + abs_d, count)
    assert_sums_close(cache.moments.m2, m2_ref, channel_sums(d * d, axis), count)
    if dtype == np.float32 and options[2] == 0:
        axes = tuple(a for a in range(x.ndim) if a != axis)
        var_ref = x64.var(axis=axes)
        assert np.max(np.abs(cache.var - var_ref) / var_ref) <= 1e-6


def test_fused_forward_train_out_is_written():
    _, x, _, c, axis = make((8, 16, 16, 16), 1, None, np.float32)
    out = np.full_like(x, np.nan)
    y, _ = F.forward_train(x, None, None, backend="numba", out=out)
    assert y is out
    np.testing.assert_array_equal(
        out, _numba.forward_train(x, 1, None, None, 1e-6, "inside", 0)[4]
    )


def test_fused_forward_train_nan_stays_in_its_channel(threads):
    _, x, _, c, axis = make((8, 4, 6, 6), 1, None, np.float32, mean=1e4)
    x[3, 1, 2, 2] = np.nan
    x[5, 2, 0, 0] = np.inf
    fused = _numba.forward_train(x, 1, None, None, 1e-6, "inside", 0)
    assert fused is not None
    _, mean, m2, inv_std, y = fused
    assert np.isnan(mean[1]) and np.isnan(m2[1]) and np.isnan(inv_std[1])
    assert not np.isfinite(mean[2]) and not np.isfinite(m2[2])
    assert np.all(np.isnan(y[:, 1])) and not np.any(np.isfinite(y[:, 2]))
    finite = [0, 3]
    rest = np.ascontiguousarray(x[:, finite])  # the same sums per channel
    want = composed_forward_train(rest, 1, None, None, 1e-6, "inside", 0)
    np.testing.assert_array_equal(mean[finite], want[1])
    np.testing.assert_array_equal(m2[finite], want[2])
    np.testing.assert_array_equal(y[:, finite], want[4])


@pytest.mark.parametrize(
    ("shape", "axis", "transform", "dtype"),
    [
        ((8, 5, 7, 3), -1, None, np.float32),  # channels-last
        ((64, 5), 1, None, np.float32),  # (N, C)
        ((4, 3, 80, 80), 1, None, np.float32),  # parallel size
        ((8, 3, 10), 1, lambda a: a[:, :, ::2], np.float32),  # strided
        ((8, 3, 5, 7), 1, None, np.float16),
    ],
    ids=["channels-last", "2d", "large", "strided", "float16"],
)
def test_fused_forward_train_declines_what_it_does_not_cover(
    shape, axis, transform, dtype
):
    _, x, _, _, axis = make(shape, axis, transform, dtype)
    assert _numba.forward_train(x, axis, None, None, 1e-6, "inside", 0) is None
    assert reference.forward_train(x, axis, None, None, 1e-6, "inside", 0) is None


# -- fallback and edge values ------------------------------------------------------
def test_fallback_covers_bfloat16_non_native_order_and_mixed_dtypes():
    """Inputs the loops do not cover give the reference's result, bit for bit."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(0).normal(2.0, 1.0, (6, 3, 4))
    cases = [
        (x.astype(ml_dtypes.bfloat16), x.astype(ml_dtypes.bfloat16)),
        (x.astype(">f4"), x.astype(">f4")),
        (x.astype(np.float32), x.astype(np.float64)),  # dy of another dtype
    ]
    for xs, dy in cases:
        count, mean, m2 = reference.batch_moments(xs, 1)
        if xs.dtype != np.float32:
            got = _numba.batch_moments(xs, 1)
            for a, b in zip(got, (count, mean, m2), strict=True):
                np.testing.assert_array_equal(a, b)
        inv_std, k = 1.0 / np.sqrt(m2 / count + 1e-6), np.full(3, -1.0 / count)
        args = (dy, xs, 1, mean, inv_std, None, k, count)
        for got, want in zip(
            _numba.backward_train(*args), reference.backward_train(*args), strict=True
        ):
            np.testing.assert_array_equal(got, want)


def test_non_finite_values_stay_in_their_channel(threads):
    x = np.random.default_rng(0).normal(size=(8, 4, 50, 50)).astype(np.float32)
    x[3, 1, 2, 2] = np.nan
    x[5, 2, 0, 0] = np.inf
    _, mean, m2 = _numba.batch_moments(x, 1)
    _, mean_ref, m2_ref = reference.batch_moments(x, 1)
    finite = [0, 3]
    assert np.isnan(mean[1]) and not np.isfinite(mean[2])
    assert not np.isfinite(m2[1]) and not np.isfinite(m2[2])
    np.testing.assert_allclose(mean[finite], mean_ref[finite], rtol=1e-12)
    np.testing.assert_allclose(m2[finite], m2_ref[finite], rtol=1e-12)


def test_constant_channel_has_exactly_zero_m2(threads):
    x = np.full((64, 2, 40, 40), 1e6 + 0.5, np.float32)
    _, mean, m2 = _numba.batch_moments(x, 1)
    np.testing.assert_array_equal(mean, np.float32(1e6 + 0.5))
    np.testing.assert_array_equal(m2, 0.0)


# -- the two halves of the training gradient (synchronized layers) -------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "shape", "axis", "transform"), LAYOUTS)
def test_grad_sums_and_backward_apply(
    threads, loops, name, shape, axis, transform, dtype
):
    """Each half against the reference, with sums over more data than ``x``."""
    rng, x, dy, c, axis = make(shape, axis, transform, dtype)
    count, mean, inv_std, gamma = gradient_inputs(rng, x, c, axis)
    dgamma, dbeta = _numba.grad_sums(dy, x, axis, mean, inv_std)
    assert_path(loops, name, [_loops.GRAD_SUMS], x, dy)
    assert_param_grads_close(dgamma, dbeta, dy, x, mean, inv_std, axis, count)
    # As if another rank held a shard with other sums: global count and sums.
    total = 3 * count
    sum_dgamma, sum_dbeta = dgamma + rng.normal(size=c), dbeta + rng.normal(size=c)
    k = np.full(c, -1.0 / total)
    args = (dy, x, axis, mean, inv_std, gamma, k, total, sum_dgamma, sum_dbeta)
    dx = _numba.backward_apply(*args)
    assert_path(loops, name, [_loops.DX], x, dy)
    dx_ref = reference.backward_apply(*args)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    # Both compute ((x − m)·s·kΣ + dy − v)·w in float64, with s = inv_std,
    # kΣ = k·Σdy·x̂, v = Σdy/total and w = γ·s: the reference as ((x − m)·s)·kΣ,
    # the loop as (x − m)·(s·kΣ). The first terms A share the roundings of x − m
    # and of kΣ and differ in two others each: |ΔA| ≤ 4u|A|. Adding dy and
    # subtracting v round once more in each (2u|A + dy| and 2u|A + dy − v| apart
    # at most), the product with w once more (2u|dx|); then both round to the
    # output dtype, where values this close can land one ulp apart.
    x_hat = np.abs(x.astype(np.float64) - per_channel(mean, x, axis)) * per_channel(
        inv_std, x, axis
    )
    first = x_hat * per_channel(np.abs(k * sum_dgamma), x, axis)
    v = per_channel(np.abs(sum_dbeta / total), x, axis)
    gain = per_channel(inv_std * gamma, x, axis)
    dx_ref64 = np.abs(dx_ref.astype(np.float64))
    slack = gain * (8 * first + 4 * np.abs(dy.astype(np.float64)) + 2 * v)
    bound = np.finfo(dtype).eps * dx_ref64 + U64 * (slack + 2 * dx_ref64)
    assert np.all(np.abs(dx.astype(np.float64) - dx_ref) <= bound)


# -- wide channels-last rows: dx two rows at a time -----------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("build", ["serial", "parallel"])
@pytest.mark.parametrize("rows", [1, 2, 7, 64])
def test_wide_dx_row_pairs_equal_one_row_at_a_time(rows, build, dtype):
    """From ``WIDE_ROW`` columns on, ``dx`` sweeps rows in pairs (plus one row
    left over when a chunk's count is odd); every value is the same float64
    expression, so it equals, bit for bit, the one-row sweep that the same columns
    get in two narrower blocks (each under ``WIDE_ROW``)."""
    width = _loops_channels_last.WIDE_ROW + 6
    rng = np.random.default_rng(rows)
    x, dy = (rng.normal(3.0, 2.0, (1, rows, width)).astype(dtype) for _ in range(2))
    vectors = [rng.uniform(-2.0, 2.0, width) for _ in range(4)]
    op = _loops.DX + _loops.CHANNELS_LAST
    chunks = 3 if build == "parallel" else 1  # 7 rows: 2, 2 and 3 per chunk
    out = np.full_like(x, np.nan)
    getattr(_loops.launch, build)(op, x, dy, out, *vectors, chunks)
    expected = np.full_like(x, np.nan)
    for cols in (slice(0, width // 2), slice(width // 2, width)):
        part = np.empty_like(x[:, :, cols])
        inputs = [np.ascontiguousarray(a[:, :, cols]) for a in (x, dy)]
        narrow = [v[cols].copy() for v in vectors]
        _loops.launch.serial(op, *inputs, part, *narrow, 1)
        expected[:, :, cols] = part
    assert not np.isnan(expected).any()
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("width", [40, _loops_channels_last.WIDE_ROW])
@pytest.mark.parametrize("build", ["serial", "parallel"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 23, 64, 203])
def test_channels_last_reductions_add_every_row_once(rows, build, width):
    """The channels-last reductions sweep four rows a quarter of each chunk's
    range apart (moments on rows of ``WIDE_ROW`` values or more first sweep eight
    rows an eighth apart), then the rows left over: whatever the count of rows
    per chunk (0 to 7 left over, fewer rows than a sweep), every row is added
    exactly once. Integer-valued data keeps every float64 sum exact, so the sums
    must equal NumPy's bit for bit."""
    rng = np.random.default_rng(rows)
    x = rng.integers(-50, 50, (1, rows, width)).astype(np.float32)
    dy = rng.integers(-8, 8, (1, rows, width)).astype(np.float32)
    pivot = x[0, 0].astype(np.float64) + 0.5  # no row's values: every d != 0
    mean = np.round(x[0].astype(np.float64).mean(axis=0))
    none = np.empty(0)
    chunks = 3 if build == "parallel" else 1
    launch = getattr(_loops.launch, build)
    last = _loops.CHANNELS_LAST
    vectors = (none, none, none, chunks)
    sums, squares = launch(_loops.MOMENTS + last, x, x, x, pivot, *vectors)
    d = x[0].astype(np.float64) - pivot
    np.testing.assert_array_equal(sums, d.sum(axis=0))
    np.testing.assert_array_equal(squares, (d * d).sum(axis=0))
    got = launch(_loops.GRAD_SUMS + last, x, dy, x, mean, *vectors)
    g = dy[0].astype(np.float64)
    np.testing.assert_array_equal(got[0], g.sum(axis=0))
    np.testing.assert_array_equal(got[1], (g * (x[0] - mean)).sum(axis=0))


def test_call_by_address_refuses_arguments_of_another_type():
    """The launchers call ``_loops.rows`` by address (``_loops.call_rows``): an
    argument that does not convert to its fixed signature fails to compile, so
    no call ever passes arrays of another layout."""
    import numba
    from numba.core.errors import TypingError

    @numba.njit
    def call(x, v, p):
        _loops.call_rows(0, 0, x, x, x, v, v, v, v, v, p, p, 0, 0, 0)

    vector, partials = np.empty(0), np.empty((0, 0))
    with pytest.raises(TypingError, match="does not convert"):
        call(np.empty((2, 2), np.float32), vector, partials)  # 2-D, not (A, C, S)
    with pytest.raises(TypingError, match="does not convert"):
        call(np.empty((1, 2, 2), np.float32), vector.astype(np.float32), partials)


def test_normalize_gets_the_shift_as_float32_only_when_it_holds_every_bit():
    """On channels-last rows of ``WIDE_ROW`` values or more, ``normalize`` takes
    the shift as float32 bytes in ``v3`` (``v2`` empty) when float32 holds it bit
    for bit, and as float64 in ``v2`` otherwise: a float64 value, or a NaN whose
    payload float32 would drop. Narrower rows always take float64."""
    op = _loops.NORMALIZE + _loops.CHANNELS_LAST
    wide = _loops_channels_last.WIDE_ROW
    inexact_mean = 0.1  # not a float32: the mean stays float64 in v0

    def pack(shift, k=1):
        vectors = (np.full(shift.size, inexact_mean), np.ones(shift.size), shift)
        return _numba._launch_vectors(op, vectors, k, True)

    exact = np.resize([0.5, -0.0, np.inf, -3.25], wide // 2 + 1)  # odd: padded
    v0, _, v2, v3 = pack(exact, k=2)  # folded twice: WIDE_ROW + 2 values
    assert v0.size == v2.size + 2 * exact.size and v3.dtype == np.float64
    narrow = v3.view(np.float32)
    expected = np.tile(exact, 2).astype(np.float32)
    assert narrow.size == expected.size  # even: no padding
    np.testing.assert_array_equal(narrow.view(np.uint32), expected.view(np.uint32))
    _, _, v2, v3 = pack(np.resize(exact, wide + 1))
    assert v2.size == 0 and v3.view(np.float32).size == wide + 2  # padded
    _, _, v2, v3 = pack(exact[: wide // 2])  # under WIDE_ROW: float64
    assert v3.size == 0
    payload = np.resize([1.0, 2.0], wide)
    payload.view(np.uint64)[0] = 0x7FF8000000000001  # a NaN float32 cannot carry
    for shift in (np.resize([0.1, 1.0], wide), payload):
        _, _, v2, v3 = pack(shift)
        assert v3.size == 0
        np.testing.assert_array_equal(v2.view(np.uint64), shift.view(np.uint64))


@pytest.mark.parametrize(
    "shift_dtype", [np.float32, np.float64], ids=["beta", "float64 beta"]
)
@pytest.mark.parametrize(
    "mean_dtype", [np.float64, np.float32], ids=["batch mean", "running mean"]
)
@pytest.mark.parametrize("rows", [70, 3])
def test_narrowed_normalize_is_bit_identical(
    threads, loops, monkeypatch, rows, mean_dtype, shift_dtype
):
    """The float32 vectors that only large tensors get (``NARROW_MIN_BYTES``),
    forced on small ones: the same values, bit for bit."""
    monkeypatch.setattr(_numba, "NARROW_MIN_BYTES", 0)
    packed = []
    original = _numba._launch_vectors
    monkeypatch.setattr(
        _numba, "_launch_vectors", lambda *a: packed.append(original(*a)) or packed[-1]
    )
    rng, x, _, c, axis = make((rows, 1030), 1, None, np.float32)
    mean = rng.normal(3.0, 1.0, c).astype(mean_dtype).astype(np.float64)
    scale = rng.uniform(0.2, 2.0, c)
    shift = rng.normal(size=c).astype(shift_dtype)
    y = _numba.normalize(x, axis, mean, scale, shift, x.dtype)
    assert [op for _, op in loops] == [_loops.NORMALIZE]
    narrowed = packed[0][3].size > 0  # v3: float32 values
    assert narrowed == (shift_dtype == np.float32)
    np.testing.assert_array_equal(
        y, reference.normalize(x, axis, mean, scale, shift, x.dtype)
    )


def test_normalize_narrows_its_vectors_from_narrow_min_bytes_on(monkeypatch):
    """``_channels_last`` asks for float32 vectors exactly when ``x`` has
    ``NARROW_MIN_BYTES`` bytes or more; the default is a quarter of the largest
    cache sysfs reports."""
    assert _numba.NARROW_MIN_BYTES == _numba._last_level_cache_bytes() // 4 > 0
    asked = []
    original = _numba._launch_vectors

    def spy(op, vectors, k, narrow):
        asked.append(narrow)
        return original(op, vectors, k, narrow)

    monkeypatch.setattr(_numba, "_launch_vectors", spy)
    x = np.ones((3, _loops_channels_last.WIDE_ROW), np.float32)
    c = x.shape[1]
    for threshold, expected in [(x.nbytes, True), (x.nbytes + 1, False)]:
        monkeypatch.setattr(_numba, "NARROW_MIN_BYTES", threshold)
        _numba.normalize(x, 1, np.zeros(c), np.ones(c), np.zeros(c), x.dtype)
        assert asked.pop() is expected


def test_launch_vectors_stay_float64_unless_narrow():
    """Without ``narrow`` the float32-exact mean and shift stay float64 in v0, v2."""
    op = _loops.NORMALIZE + _loops.CHANNELS_LAST
    wide = _loops_channels_last.WIDE_ROW
    mean, scale, shift = np.full(wide, 0.5), np.ones(wide), np.full(wide, -2.0)
    v0, v1, v2, v3 = _numba._launch_vectors(op, (mean, scale, shift), 1, False)
    assert v0 is mean and v1 is scale and v2 is shift and v3.size == 0
    v0, _, v2, v3 = _numba._launch_vectors(op, (mean, scale, shift), 1, True)
    assert v0.size == v2.size == 0 and v3.view(np.float32).size == 2 * wide


def test_last_level_cache_bytes_reads_the_largest_size(tmp_path):
    """Sizes as sysfs writes them (``32K``, ``1024K``, ``32M``); the largest
    wins; entries it cannot read or parse are skipped; nothing readable gives
    32 MiB."""
    assert _numba._last_level_cache_bytes(tmp_path) == 32 << 20
    for index, size in enumerate(["32K", "1024K", "junk", "96M", "²K", "", "7G"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    (tmp_path / "index9").mkdir()
    (tmp_path / "index9" / "size").write_bytes(b"\xff\xfeK")  # not UTF-8
    (tmp_path / "index8" / "size").mkdir(parents=True)  # unreadable as a file
    assert _numba._last_level_cache_bytes(tmp_path) == 96 << 20


def test_normalize_gets_a_float32_mean_with_a_float32_shift():
    """A mean that float32 holds bit for bit (a running mean of float32
    parameters) goes with a float32 shift into ``v3``, mean first, and ``v0`` is
    empty; with a float64 shift, or a mean float32 cannot hold (one NaN payload
    is enough), the mean stays float64 in ``v0``."""
    op = _loops.NORMALIZE + _loops.CHANNELS_LAST
    wide = _loops_channels_last.WIDE_ROW + 1  # odd: 2·wide values, no padding
    mean = np.resize([1e6 + 0.5, -(2.0**-140), 3.0], wide)  # one float32 subnormal
    shift = np.resize([0.25, -1.0], wide)
    v0, v1, v2, v3 = _numba._launch_vectors(op, (mean, np.ones(wide), shift), 1, True)
    assert v0.size == 0 and v2.size == 0 and v1.size == wide
    narrow = v3.view(np.float32)
    assert narrow.size == 2 * wide
    np.testing.assert_array_equal(narrow[:wide].astype(np.float64), mean)
    np.testing.assert_array_equal(narrow[wide : 2 * wide].astype(np.float64), shift)
    v0, _, v2, v3 = _numba._launch_vectors(
        op, (mean, np.ones(wide), shift + 0.1), 1, True
    )
    assert v0 is mean and v2.size == wide and v3.size == 0  # float64 shift
    payload = mean.copy()
    payload.view(np.uint64)[0] = 0x7FF8000000000001
    v0, _, v2, v3 = _numba._launch_vectors(op, (payload, np.ones(wide), shift), 1, True)
    assert v0 is payload and v2.size == 0 and v3.view(np.float32).size == wide + 1


def test_kernels_run_as_python_with_numba_jit_disabled():
    """``NUMBA_DISABLE_JIT=1`` (coverage, debugging): the launchers run as Python
    and call the row dispatch directly, with the reference's values."""
    code = """
import numpy as np
from batchnorm.kernels import numba as _numba
from batchnorm.kernels import reference
rng = np.random.default_rng(0)
ok = []
for shape, axis in [((3, 2, 4), 1), ((5, 3), 1), ((2, 3, 1030), 2)]:
    x, dy = rng.normal(size=shape), rng.normal(size=shape)
    c = x.shape[axis]
    mean, inv, k = rng.normal(size=c), np.ones(c), np.full(c, -0.5)
    a, b = _numba.batch_moments(x, axis), reference.batch_moments(x, axis)
    ok.append(np.allclose(a[1], b[1]) and np.allclose(a[2], b[2]))
    y = _numba.normalize(x, axis, mean, inv, inv, x.dtype)
    ok.append(np.array_equal(y, reference.normalize(x, axis, mean, inv, inv, x.dtype)))
    d = _numba.backward_train(dy, x, axis, mean, inv, inv, k, 2)[0]
    e = reference.backward_train(dy, x, axis, mean, inv, inv, k, 2)[0]
    ok.append(np.allclose(d, e, rtol=1e-12, atol=1e-12))
print(ok)
"""
    assert run_python(code, NUMBA_DISABLE_JIT="1") == str([True] * 9)
