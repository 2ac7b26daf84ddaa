"""SyncBatchNorm under mpiexec: equal to one process on the concatenated batch.

Run by tests/distributed/test_mpi.py as
``mpiexec -n N python -m pytest tests/distributed/mpi_suite/check_sync.py``; every
rank runs every test, in the same order, so the collectives line up.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.distributed import SyncBatchNorm, SyncError
from helpers.launcher_spy import spy_on_launcher

MPI = pytest.importorskip("mpi4py.MPI")
COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


def shard_bounds(sizes):
    edges = np.concatenate([[0], np.cumsum(sizes)])
    return int(edges[RANK]), int(edges[RANK + 1])


SHARDINGS = {
    "even": [4] * SIZE,
    "uneven": [1 + 3 * r for r in range(SIZE)],
    "rank 0 empty": [0] + [5] * (SIZE - 1),
    "one value on rank 0": [1] + [3] * (SIZE - 1),
}
TOLERANCE = {np.float64: 1e-12, np.float32: 1e-6}
# Both passes run on the layer's backend (the Numba one where it is installed).
BACKENDS = ["numpy"] + (["numba"] if importlib.util.find_spec("numba") else [])


@pytest.mark.parametrize("sharding", SHARDINGS.values(), ids=SHARDINGS.keys())
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("shape", "axis"), [((3, 6, 5), 1), ((4, 3, 3, 2), -1)])
@pytest.mark.parametrize("preset", ["seed", "darknet"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_equals_single_process(
    monkeypatch, sharding, dtype, shape, axis, preset, backend
):
    rng = np.random.default_rng(42)  # the same global data on every rank
    total = sum(sharding)
    c = shape[axis]
    options = {"momentum": 0.9, "dtype": dtype}
    if preset == "darknet":
        options.update(eps_placement="outside", ddof=1)
    # The reference is one process on the NumPy kernels; the synchronized layer
    # runs on the backend under test.
    single = bn.BatchNorm(c, axis=axis, backend="numpy", **options)
    sync = SyncBatchNorm(c, axis=axis, timeout=30, backend=backend, **options)
    launched = spy_on_launcher(monkeypatch) if backend == "numba" else None
    gamma = rng.uniform(0.5, 2.0, c).astype(dtype)
    beta = rng.normal(size=c).astype(dtype)
    for layer in (single, sync):
        layer.gamma[:], layer.beta[:] = gamma, beta
    lo, hi = shard_bounds(sharding)
    tol = TOLERANCE[dtype]
    for step in range(3):
        x = rng.normal(3.0 * step, 2.0, (total, *shape[1:])).astype(dtype)
        dy = rng.normal(size=x.shape).astype(dtype)
        y_full = single(x)
        dx_full = single.backward(dy)
        y = sync(x[lo:hi])
        if launched is not None:
            launched.clear()
        dx = sync.backward(dy[lo:hi])
        # Checked after the comparisons below, which every rank reaches together.
        ran_backward = None if launched is None else [op for _, op in launched]
        scale = np.abs(dx_full).max()
        np.testing.assert_allclose(y, y_full[lo:hi], rtol=tol, atol=tol)
        np.testing.assert_allclose(dx, dx_full[lo:hi], rtol=tol, atol=tol * scale)
        grad_gamma = COMM.allreduce(sync.grad_gamma.astype(np.float64))
        grad_beta = COMM.allreduce(sync.grad_beta.astype(np.float64))
        np.testing.assert_allclose(grad_gamma, single.grad_gamma, rtol=tol, atol=tol)
        np.testing.assert_allclose(grad_beta, single.grad_beta, rtol=tol, atol=tol)
        np.testing.assert_allclose(
            sync.running_mean, single.running_mean, rtol=tol, atol=tol
        )
        np.testing.assert_allclose(sync.running_var, single.running_var, rtol=tol)
        assert sync.num_values_seen == single.num_values_seen
        if ran_backward is not None:  # the backward's two halves ran the Numba loops
            from batchnorm.kernels.numba import _loops

            halves = [_loops.GRAD_SUMS, _loops.DX] if hi > lo else []
            assert ran_backward == halves, ran_backward
    # Running statistics are bitwise identical on every rank.
    everyone = COMM.allgather((sync.running_mean.tobytes(), sync.running_var.tobytes()))
    assert all(item == everyone[0] for item in everyone)


def test_eval_mode_communicates_nothing():
    sync = SyncBatchNorm(3, timeout=30, backend="numpy")
    sync(np.random.default_rng(RANK).normal(size=(4, 3)))
    before = sync.collectives
    sync.eval()
    x = np.random.default_rng(RANK).normal(size=(RANK + 1, 3))  # any size, even 1
    y = sync(x)
    sync.backward(np.ones_like(y))
    assert sync.collectives == before
    COMM.Barrier()


def test_communication_volume():
    c = 5
    sync = SyncBatchNorm(c, timeout=30, backend="numpy")
    x = np.random.default_rng(0).normal(size=(4, c, 2))
    sync(x)  # first call also agrees on C (8 bytes)
    sync.backward(x)
    first = sync.bytes_sent
    sync(x)
    sync.backward(x)
    assert sync.bytes_sent - first == 2 * (2 * c + 1) * 8
    assert sync.collectives == 5


def test_too_few_values_overall_is_an_error_on_every_rank():
    sync = SyncBatchNorm(2, timeout=30, backend="numpy")
    x = np.ones((1 if RANK == 0 else 0, 2))
    with pytest.raises(
        ValueError,
        match=r"at least 2 values per channel over all "
        r"ranks; the global batch has m = N · ∏ spatial = 1",
    ):
        sync(x)


def test_an_empty_global_batch_passes_and_changes_nothing():
    """Every shard empty: an empty output on every rank, zero gradients, the
    running statistics and counters untouched (as for one process)."""
    sync = SyncBatchNorm(2, timeout=30, backend="numpy")
    before = sync.state_dict()
    x = np.ones((0, 2))
    y = sync(x)
    dx = sync.backward(np.ones((0, 2)))
    assert y.shape == dx.shape == (0, 2)
    np.testing.assert_array_equal(sync.grad_gamma, np.zeros(2))
    np.testing.assert_array_equal(sync.grad_beta, np.zeros(2))
    after = sync.state_dict()
    assert after["num_batches_tracked"] == before["num_batches_tracked"] == 0
    assert after["num_values_seen"] == before["num_values_seen"] == 0
    np.testing.assert_array_equal(after["running_mean"], before["running_mean"])
    np.testing.assert_array_equal(after["running_var"], before["running_var"])


def test_mismatched_num_features_is_an_error_on_every_rank():
    c = 3 if RANK == 0 else 4
    sync = SyncBatchNorm(c, timeout=30, backend="numpy")
    with pytest.raises(SyncError, match="ranks disagree on num_features"):
        sync(np.ones((2, c)))


def test_backward_without_forward_on_one_rank():
    sync = SyncBatchNorm(2, timeout=30, backend="numpy")
    x = np.random.default_rng(RANK).normal(size=(3, 2))
    if RANK == 0:
        with pytest.raises(RuntimeError, match=r"backward\(\) called before forward"):
            sync.backward(x)
    else:
        with pytest.raises(
            SyncError,
            match=r"rank\(s\) \[0\] called backward\(\) "
            r"without a forward pass",
        ):
            sync(x)


def test_conversion_round_trip():
    layer = bn.BatchNorm.from_preset("torch", 3, backend="numpy")
    layer(np.random.default_rng(0).normal(size=(4, 3)))
    sync = SyncBatchNorm.from_layer(layer, timeout=30)
    assert sync.momentum == 0.9 and sync.num_batches_tracked == 1
    back = sync.to_layer()
    assert type(back) is bn.BatchNorm
    np.testing.assert_array_equal(back.running_var, layer.running_var)


@pytest.mark.parametrize("option", [{"virtual_batch_size": 2}, {"renorm": True}])
def test_per_process_options_are_rejected(option):
    with pytest.raises(ValueError, match="SyncBatchNorm does not support"):
        SyncBatchNorm(3, **option)
    with pytest.raises(ValueError, match="SyncBatchNorm does not support"):
        SyncBatchNorm.from_layer(bn.BatchNorm(3, **option))


def test_bad_input_on_one_rank_fails_every_rank_at_once():
    sync = SyncBatchNorm(3, timeout=30, backend="numpy")
    good = np.random.default_rng(RANK).normal(size=(4, 3))
    start = MPI.Wtime()
    if RANK == SIZE - 1:
        with pytest.raises(ValueError, match="x has 2 channels"):
            sync(good[:, :2])
    else:
        with pytest.raises(
            SyncError,
            match=rf"rank\(s\) \[{SIZE - 1}\] rejected their "
            r"input to forward\(\)",
        ):
            sync(good)
    assert MPI.Wtime() - start < 10  # not the 30 s deadline
    # both ranks still work together afterwards, and backward errors travel too
    sync(good)
    if RANK == 0:
        with pytest.raises(ValueError, match="dy must have the shape"):
            sync.backward(good[:2])
    else:
        with pytest.raises(
            SyncError,
            match=r"rank\(s\) \[0\] rejected their input "
            r"to backward\(\)",
        ):
            sync.backward(good)
    assert sync.num_batches_tracked == 1
