"""Parity with PyTorch 2.13 over several training steps and an eval step.

Conventions mapped (README's table): torch ``momentum=0.1`` on the NEW value is our
``momentum=0.9`` on the old one; ε = 1e-5 inside the root; both store the unbiased
running variance. Channels-last inputs (``axis=-1``) are compared against torch on
the same data permuted to channels-first.

Tolerances. In float64 both libraries compute the same formulas in the same
precision, so everything agrees to ``1e-10`` of the array's largest magnitude.
In float32 torch rounds every intermediate (``x·a + b`` for ``y``, the terms of
``dx``) to float32 while we round once at the end, so each library is within a
few float32 units in the last place (u = 2⁻²⁴ ≈ 6e-8 relative per rounding) of
the exact result; we allow ``FLOAT32_RTOL = 64 u ≈ 3.8e-6`` of the array's largest
magnitude (observed: at most ~18 u, for ``dx``; the float32 SGD steps carry
differences from step to step), far below any semantic difference (a wrong
momentum direction, ε or bias changes results at the 1e-3 level or more).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import batchnorm  # noqa: E402
from batchnorm import functional as F  # noqa: E402
from batchnorm import kernels  # noqa: E402

BACKENDS = kernels.available()
FLOAT64_RTOL = 1e-10
FLOAT32_RTOL = 64 * 2.0**-24
RTOL = {np.float64: FLOAT64_RTOL, np.float32: FLOAT32_RTOL}
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32}
NUM_TRAIN_STEPS = 4
LEARNING_RATE = 0.05
C = 3

# (channels-first shape, torch module) for (N, C), (N, C, L), (N, C, H, W),
# (N, C, D, H, W).
SHAPES = {
    "NC": ((16, C), torch.nn.BatchNorm1d),
    "NCL": ((4, C, 7), torch.nn.BatchNorm1d),
    "NCHW": ((4, C, 5, 6), torch.nn.BatchNorm2d),
    "NCDHW": ((2, C, 3, 4, 5), torch.nn.BatchNorm3d),
}


def assert_close(actual: np.ndarray, desired: np.ndarray, rtol: float, what: str):
    """Elementwise ``|a − d| ≤ rtol · max|d|``.

    Scaled by the largest magnitude because entries of ``dx`` (which sums to zero
    per channel) come from cancellation; their own relative error means nothing.
    """
    actual = np.asarray(actual, dtype=np.float64)
    desired = np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, what
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(
        actual, desired, rtol=0, atol=rtol * max(scale, 1e-300), err_msg=what
    )


def to_channels_last(x: np.ndarray) -> np.ndarray:
    """(N, C, *) → (N, *, C), contiguous."""
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def to_channels_first(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, -1, 1)


def make_ours(kind: str, dtype, axis: int, backend: str) -> batchnorm.BatchNorm:
    if kind == "preset":
        return batchnorm.BatchNorm.from_preset(
            "torch", C, axis=axis, dtype=dtype, backend=backend
        )
    return batchnorm.BatchNorm(
        C,
        axis=axis,
        eps=1e-5,
        momentum=0.9,
        running_var_kind="unbiased",
        dtype=dtype,
        backend=backend,
    )


def make_pair(
    module: Callable, kind: str, dtype, axis: int, backend: str, rng
) -> tuple[batchnorm.BatchNorm, torch.nn.Module]:
    ours = make_ours(kind, dtype, axis, backend)
    theirs = module(C, eps=1e-5, momentum=0.1, dtype=TORCH_DTYPE[dtype])
    gamma = rng.uniform(0.5, 2.0, C).astype(dtype)
    beta = rng.normal(0.0, 1.0, C).astype(dtype)
    ours.gamma, ours.beta = gamma.copy(), beta.copy()
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(gamma))
        theirs.bias.copy_(torch.from_numpy(beta))
    # Non-default starting running statistics make the momentum direction visible
    # from the first step.
    running_mean = rng.normal(0.0, 1.0, C).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, C).astype(dtype)
    ours.running_mean, ours.running_var = running_mean.copy(), running_var.copy()
    with torch.no_grad():
        theirs.running_mean.copy_(torch.from_numpy(running_mean))
        theirs.running_var.copy_(torch.from_numpy(running_var))
    return ours, theirs


def torch_step(
    theirs: torch.nn.Module, x_first: np.ndarray, dy_first: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Forward + backward in torch on channels-first data; returns y, dx, dγ, dβ."""
    theirs.zero_grad(set_to_none=True)
    x_t = torch.from_numpy(np.ascontiguousarray(x_first)).requires_grad_(True)
    y_t = theirs(x_t)
    y_t.backward(torch.from_numpy(np.ascontiguousarray(dy_first)))
    return (
        y_t.detach().numpy(),
        x_t.grad.numpy(),
        theirs.weight.grad.numpy(),
        theirs.bias.grad.numpy(),
    )


def sgd_step(ours: batchnorm.BatchNorm, theirs: torch.nn.Module) -> None:
    """Move γ and β so that later steps run with different parameters."""
    ours.gamma = (ours.gamma - LEARNING_RATE * ours.grad_gamma).astype(ours.dtype)
    ours.beta = (ours.beta - LEARNING_RATE * ours.grad_beta).astype(ours.dtype)
    with torch.no_grad():
        theirs.weight -= LEARNING_RATE * theirs.weight.grad
        theirs.bias -= LEARNING_RATE * theirs.bias.grad


def compare_step(ours, theirs, x_first, dy_first, channels_last, rtol, label):
    x_ours = to_channels_last(x_first) if channels_last else x_first
    dy_ours = to_channels_last(dy_first) if channels_last else dy_first
    y = ours(x_ours)
    dx = ours.backward(dy_ours)
    if channels_last:
        y, dx = to_channels_first(y), to_channels_first(dx)
    y_ref, dx_ref, dgamma_ref, dbeta_ref = torch_step(theirs, x_first, dy_first)
    assert y.dtype == x_first.dtype and dx.dtype == x_first.dtype
    assert_close(y, y_ref, rtol, f"{label}: y")
    assert_close(dx, dx_ref, rtol, f"{label}: dx")
    assert_close(ours.grad_gamma, dgamma_ref, rtol, f"{label}: dgamma")
    assert_close(ours.grad_beta, dbeta_ref, rtol, f"{label}: dbeta")
    assert_close(
        ours.running_mean, theirs.running_mean.numpy(), rtol, f"{label}: running_mean"
    )
    assert_close(
        ours.running_var, theirs.running_var.numpy(), rtol, f"{label}: running_var"
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["preset", "explicit"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["axis1", "axis-1"])
@pytest.mark.parametrize("layout", list(SHAPES))
def test_train_steps_then_eval_match_torch(layout, channels_last, kind, dtype, backend):
    shape, module = SHAPES[layout]
    rng = np.random.default_rng(zlib.crc32(f"{layout}-{channels_last}-{kind}".encode()))
    axis = -1 if channels_last else 1
    ours, theirs = make_pair(module, kind, dtype, axis, backend, rng)
    ours.train()
    theirs.train()
    channel_means = rng.normal(0.0, 3.0, (1, C) + (1,) * (len(shape) - 2))
    channel_stds = rng.uniform(0.5, 4.0, (1, C) + (1,) * (len(shape) - 2))
    for step in range(NUM_TRAIN_STEPS):
        x = (channel_means + channel_stds * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        compare_step(
            ours, theirs, x, dy, channels_last, RTOL[dtype], f"train step {step}"
        )
        sgd_step(ours, theirs)
    assert ours.num_batches_tracked == NUM_TRAIN_STEPS
    assert int(theirs.num_batches_tracked) == NUM_TRAIN_STEPS

    ours.eval()
    theirs.eval()
    x = (channel_means + channel_stds * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    compare_step(ours, theirs, x, dy, channels_last, RTOL[dtype], "eval step")


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_would_catch_torch_momentum_passed_unconverted(backend):
    """Guard: the comparison above distinguishes our 0.9 from a naive 0.1."""
    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 3.0, (16, C))
    ours = batchnorm.BatchNorm(
        C, eps=1e-5, momentum=0.1, dtype=np.float64, backend=backend
    )
    theirs = torch.nn.BatchNorm1d(C, eps=1e-5, momentum=0.1, dtype=torch.float64)
    ours(x)
    theirs(torch.from_numpy(x))
    assert not np.allclose(ours.running_mean, theirs.running_mean.numpy(), rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_functional_api_matches_torch_functional(dtype, backend):
    """forward_train / backward / update_running_stats vs F.batch_norm."""
    rng = np.random.default_rng(3)
    shape = (6, C, 4, 5)
    x = rng.normal(1.5, 2.0, shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, C).astype(dtype)
    beta = rng.normal(0.0, 1.0, C).astype(dtype)
    running_mean = rng.normal(0.0, 1.0, C).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, C).astype(dtype)

    y, cache = F.forward_train(x, gamma, beta, axis=1, eps=1e-5, backend=backend)
    dx, dgamma, dbeta = F.backward(dy, cache, backend=backend)
    new_mean, new_var = F.update_running_stats(
        running_mean, running_var, cache, momentum=0.9
    )

    rm_t, rv_t = torch.from_numpy(running_mean.copy()), torch.from_numpy(running_var)
    rv_t = rv_t.clone()
    x_t = torch.from_numpy(x).requires_grad_(True)
    w_t = torch.from_numpy(gamma).requires_grad_(True)
    b_t = torch.from_numpy(beta).requires_grad_(True)
    y_t = torch.nn.functional.batch_norm(
        x_t, rm_t, rv_t, w_t, b_t, training=True, momentum=0.1, eps=1e-5
    )
    y_t.backward(torch.from_numpy(dy))
    rtol = RTOL[dtype]
    assert_close(y, y_t.detach().numpy(), rtol, "y")
    assert_close(dx, x_t.grad.numpy(), rtol, "dx")
    assert_close(dgamma, w_t.grad.numpy(), rtol, "dgamma")
    assert_close(dbeta, b_t.grad.numpy(), rtol, "dbeta")
    assert_close(new_mean, rm_t.numpy(), rtol, "running_mean")
    assert_close(new_var, rv_t.numpy(), rtol, "running_var")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["axis1", "axis-1"])
def test_eval_mode_backward_matches_torch(channels_last, backend):
    """Eval-mode gradient: the running statistics are constants in both."""
    rng = np.random.default_rng(11)
    shape = (5, C, 4, 3)
    axis = -1 if channels_last else 1
    for kind in ("preset", "explicit"):
        ours, theirs = make_pair(
            torch.nn.BatchNorm2d, kind, np.float64, axis, backend, rng
        )
        ours.eval()
        theirs.eval()
        x = rng.normal(0.5, 2.0, shape)
        dy = rng.standard_normal(shape)
        compare_step(ours, theirs, x, dy, channels_last, FLOAT64_RTOL, "eval")
        assert ours.num_batches_tracked == 0


# -- momentum=None: where we deliberately differ ----------------------------------

BATCH_SIZES = (3, 11, 6, 20)  # uneven on purpose: that is where the two differ


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_none_is_exact_cumulative_unlike_torch(backend):
    """Ours: statistics of all values seen; torch: mean of per-batch statistics.

    ``torch.nn.BatchNorm*d(momentum=None)`` keeps a cumulative moving average with
    equal weight per batch (factor ``1/num_batches_tracked``), so a batch of 3
    counts as much as a batch of 20 and the average of per-batch variances misses
    the spread between batch means. Ours merges ``(count, mean, M2)`` (Chan et al.)
    and equals the float64 statistics of the concatenation of every batch.
    """
    rng = np.random.default_rng(5)
    ours = batchnorm.BatchNorm(
        C, eps=1e-5, momentum=None, dtype=np.float64, backend=backend
    )
    theirs = torch.nn.BatchNorm2d(C, eps=1e-5, momentum=None, dtype=torch.float64)
    batches = []
    for i, n in enumerate(BATCH_SIZES):
        # Batch means drift, so between-batch spread is a large part of the variance.
        x = rng.normal(float(i), 1.0, (n, C, 3, 2))
        batches.append(x)
        ours(x)
        theirs(torch.from_numpy(x))

    everything = np.concatenate(batches, axis=0)
    axes = (0, 2, 3)
    exact_mean = everything.mean(axis=axes)
    exact_var = everything.var(axis=axes, ddof=1)
    np.testing.assert_allclose(ours.running_mean, exact_mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ours.running_var, exact_var, rtol=1e-12)
    assert ours.num_values_seen == everything.size // C

    per_batch_mean = np.mean([b.mean(axis=axes) for b in batches], axis=0)
    per_batch_var = np.mean([b.var(axis=axes, ddof=1) for b in batches], axis=0)
    np.testing.assert_allclose(theirs.running_mean.numpy(), per_batch_mean, rtol=1e-12)
    np.testing.assert_allclose(theirs.running_var.numpy(), per_batch_var, rtol=1e-12)

    # The difference is real, not rounding: torch misses the between-batch spread.
    assert np.all(np.abs(ours.running_mean - theirs.running_mean.numpy()) > 0.1)
    assert np.all(ours.running_var > theirs.running_var.numpy() * 1.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_none_equal_batches_means_agree_with_torch(backend):
    """With equal batch sizes torch's running mean is exact too; the variance is not."""
    rng = np.random.default_rng(9)
    ours = batchnorm.BatchNorm(
        C, eps=1e-5, momentum=None, dtype=np.float64, backend=backend
    )
    theirs = torch.nn.BatchNorm1d(C, eps=1e-5, momentum=None, dtype=torch.float64)
    batches = [rng.normal(float(i), 1.0, (8, C)) for i in range(4)]
    for x in batches:
        ours(x)
        theirs(torch.from_numpy(x))
    everything = np.concatenate(batches)
    np.testing.assert_allclose(
        ours.running_mean, theirs.running_mean.numpy(), rtol=1e-12
    )
    np.testing.assert_allclose(ours.running_mean, everything.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(
        ours.running_var, everything.var(axis=0, ddof=1), rtol=1e-12
    )
    assert np.all(ours.running_var > theirs.running_var.numpy() * 1.2)
