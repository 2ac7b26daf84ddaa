"""``out=``: every operation on both backends writes the result it would allocate,
and refuses an ``out`` of another shape or dtype, read-only or overlapping."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

import batchnorm as bn  # noqa: E402
from helpers.kernel_cases import LAYOUTS, make  # noqa: E402

F = bn.functional

# -- out= -------------------------------------------------------------------------
BACKENDS = ["numpy", "numba"]
OUT_LAYOUTS = [LAYOUTS[2], LAYOUTS[4], LAYOUTS[8], LAYOUTS[10], LAYOUTS[11]]


def run_op(op, x, dy, gamma, beta, axis, backend, out=None):
    c = x.shape[axis]
    running_mean, running_var = np.full(c, 3.0), np.full(c, 4.0)
    if op == "forward_train":
        return F.forward_train(x, gamma, beta, axis=axis, backend=backend, out=out)[0]
    if op == "forward_eval":
        return F.forward_eval(
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            axis=axis,
            backend=backend,
            out=out,
        )
    if op == "backward":
        _, cache = F.forward_train(x, gamma, beta, axis=axis, backend=backend)
        return F.backward(dy, cache, backend=backend, out=out)[0]
    return F.backward_eval(
        dy, x, gamma, running_mean, running_var, axis=axis, backend=backend, out=out
    )[0]


OPS = ["forward_train", "forward_eval", "backward", "backward_eval"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "shape", "axis", "transform"), OUT_LAYOUTS)
def test_out_gives_the_allocating_result(
    threads, op, backend, name, shape, axis, transform
):
    rng, x, dy, c, axis = make(shape, axis, transform, np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    expected = run_op(op, x, dy, gamma, beta, axis, backend)
    for out in (np.empty_like(x, order="C"), np.empty(x.shape[::-1], x.dtype).T):
        out[...] = np.nan
        result = run_op(op, x, dy, gamma, beta, axis, backend, out=out)
        assert result is out
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_eval_empty_batch_returns_out(backend):
    x = np.empty((0, 3), np.float32)
    out = np.empty_like(x)
    y = F.forward_eval(x, None, None, np.zeros(3), np.ones(3), backend=backend, out=out)
    assert y is out


X = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
DY = np.ones_like(X)
_, CACHE = F.forward_train(X, None, None, backend="numpy")
RUNNING = (np.zeros(3), np.ones(3))
READ_ONLY = np.empty_like(X)
READ_ONLY.flags.writeable = False


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: F.forward_train(X, None, None, out=np.empty((4, 3))),
            ValueError,
            r"out must have the shape of x \(4, 3, 5\); got \(4, 3\)",
        ),
        (
            lambda: F.forward_train(X, None, None, out=np.empty(X.shape)),
            TypeError,
            r"out must have the dtype of x \(float32\); got float64",
        ),
        (
            lambda: F.forward_train(X, None, None, out=READ_ONLY),
            ValueError,
            "out must be writeable",
        ),
        (
            lambda: F.forward_train(X, None, None, out=X),
            ValueError,
            "out must not share memory with x",
        ),
        (
            lambda: F.forward_train(X, None, None, out=X.tolist()),
            TypeError,
            "out must be a numpy.ndarray or None; got list",
        ),
        (
            lambda: F.forward_eval(X, None, None, *RUNNING, out=X[::-1]),
            ValueError,
            "out must not share memory with x",
        ),
        (
            lambda: F.backward(DY, CACHE, out=DY),
            ValueError,
            "out must not share memory with dy",
        ),
        (
            lambda: F.backward(DY, CACHE, out=X),
            ValueError,
            "out must not share memory with x",
        ),
        (
            lambda: F.backward_eval(DY, X, None, *RUNNING, out=DY),
            ValueError,
            "out must not share memory with dy",
        ),
        (
            lambda: F.backward_eval(DY, X, None, *RUNNING, out=np.empty((3,))),
            ValueError,
            "out must have the shape of x",
        ),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_out_raises(call, error, match, backend, monkeypatch):
    monkeypatch.setenv("BATCHNORM_BACKEND", backend)
    with pytest.raises(error, match=match):
        call()
