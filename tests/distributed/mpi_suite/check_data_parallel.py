"""Data-parallel training under mpiexec equals one process on the whole batch."""

from __future__ import annotations

import numpy as np
import pytest

from batchnorm.distributed import data_parallel as dp
from batchnorm.nn import SGD, Split, cnn, fit, mlp

MPI = pytest.importorskip("mpi4py.MPI")
COMM = MPI.COMM_WORLD


def synthetic(shape, n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape))
    y = rng.integers(0, 10, n)
    x += y.reshape(-1, *[1] * len(shape)) * 0.3  # something to learn
    return Split(x[:150], y[:150], x[150:], y[150:])


MODELS = {
    "mlp": (
        lambda rng: mlp(
            batch_norm=True,
            rng=rng,
            in_features=64,
            hidden=(12, 9),
            dtype=np.float64,
            backend="numpy",
        ),
        (64,),
    ),
    "cnn": (
        lambda rng: cnn(
            batch_norm=True, rng=rng, channels=(3, 4), dtype=np.float64, backend="numpy"
        ),
        (1, 8, 8),
    ),
}


@pytest.mark.parametrize("batch_size", [30, 31])
@pytest.mark.parametrize("name", MODELS)
def test_parallel_training_equals_single_process(name, batch_size):
    build, shape = MODELS[name]
    data = synthetic(shape)
    single = build(np.random.default_rng(1))
    fit(
        single,
        SGD(single, lr=0.1, momentum=0.9, weight_decay=1e-3),
        data,
        steps=6,
        batch_size=batch_size,
        rng=np.random.default_rng(2),
    )
    model = dp.convert_sync_batchnorm(build(np.random.default_rng(1)), COMM, timeout=60)
    stats = dp.fit_data_parallel(
        model,
        SGD(model, lr=0.1, momentum=0.9, weight_decay=1e-3),
        data,
        steps=6,
        batch_size=batch_size,
        rng=np.random.default_rng(2),
        comm=COMM,
    )
    assert dp.parameters_agree(model, COMM)
    for (name_a, a, _), (name_b, b, _) in zip(
        single.parameters(), model.parameters(), strict=True
    ):
        assert name_a == name_b
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12, err_msg=name_a)
    for layer_a, layer_b in zip(single.layers, model.layers, strict=True):
        if hasattr(layer_a, "running_mean"):
            np.testing.assert_allclose(
                layer_b.running_mean, layer_a.running_mean, rtol=1e-10, atol=1e-12
            )
            np.testing.assert_allclose(
                layer_b.running_var, layer_a.running_var, rtol=1e-10
            )
    assert len(stats.loss) == 6 and np.all(np.isfinite(stats.loss))
    assert stats.bn_collectives == 6 * 2 * 2 + 2  # 2 BN layers; +1 C check each


def test_revert_gives_plain_layers():
    model = dp.convert_sync_batchnorm(MODELS["mlp"][0](np.random.default_rng(0)), COMM)
    plain = dp.revert_sync_batchnorm(model)
    kinds = {type(layer).__name__ for layer in plain.layers}
    assert "SyncBatchNorm" not in kinds and "BatchNorm" in kinds
