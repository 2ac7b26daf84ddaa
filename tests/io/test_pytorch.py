"""PyTorch 2.13 interop: eval outputs equal after conversion in both directions."""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import batchnorm as bn  # noqa: E402
from batchnorm import io as bio  # noqa: E402
from batchnorm import nn  # noqa: E402
from batchnorm.io import pytorch  # noqa: E402

X = np.random.default_rng(1).normal(2.0, 3.0, size=(16, 1, 8, 8)).astype(np.float32)
# float32, different summation orders: a few units in the last place of values O(1-10)
ATOL = 1e-5


def torch_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    tn = torch.nn
    model = tn.Sequential(
        tn.Conv2d(1, 4, 3, padding=1, bias=False),
        tn.BatchNorm2d(4),
        tn.ReLU(),
        tn.MaxPool2d(2),
        tn.Flatten(),
        tn.Linear(64, 8, bias=False),
        tn.BatchNorm1d(8, momentum=0.3),
        tn.ReLU(),
        tn.Linear(8, 3),
    )
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.from_numpy(X))
    return model.eval()


def test_from_torch_module_same_eval_outputs_and_conventions():
    model = torch_net()
    ours = pytorch.from_module(model).eval()
    expected = model(torch.from_numpy(X)).detach().numpy()
    np.testing.assert_allclose(ours(X), expected, atol=ATOL, rtol=0)
    norm = ours.layers[6]
    assert norm.momentum == pytest.approx(0.7) and norm.eps == 1e-5
    assert norm.num_batches_tracked == 3


def test_to_torch_module_same_eval_outputs():
    net = nn.cnn(batch_norm=True, rng=np.random.default_rng(0))
    for _ in range(3):
        net(X[:, :, :, :])
    net.eval()
    module = pytorch.to_module(net)
    got = module(torch.from_numpy(X)).detach().numpy()
    np.testing.assert_allclose(got, net(X), atol=ATOL, rtol=0)
    assert module[1].momentum == pytest.approx(0.1)  # our 0.9 on the old value


def test_state_dict_keys_and_recorded_conventions_survive_torch_save():
    net = pytorch.from_module(torch_net())
    state = pytorch.to_state_dict(net)
    assert set(torch_net().state_dict()) == set(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    recorded = pytorch.recorded(loaded, "6")
    assert recorded["momentum_torch"] == pytest.approx(0.3)
    rebuilt = pytorch.load_state_dict(None, loaded).eval()
    np.testing.assert_array_equal(rebuilt(X), net.eval()(X))
    torch_net().load_state_dict(loaded)  # PyTorch accepts it as is


def test_darknet_eps_outside_exports_to_torch_within_float32_rounding():
    """√(var + 2ε√var + ε²) = √var + ε exactly; float32 storage rounds it once.

    Outputs reach ~1e6 here (running_var 0: division by ε = 1e-6), so the bound
    is relative: 8 float32 ulps of each output (torch's float32 arithmetic plus
    the rounded var' and eps'), and the variance comes back within 2 ulps.
    """
    layer = bn.BatchNorm.from_preset("darknet", 3)
    layer.running_var = np.array([0.0, 1e-4, 4.0], np.float32)
    layer.running_mean = np.array([1.0, -2.0, 3.0], np.float32)
    layer.eval()
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    module = pytorch.to_module(layer, num_spatial_dims=0)
    got = module(torch.from_numpy(x)).detach().numpy()
    want = layer(x)
    ulp = float(np.finfo(np.float32).eps)
    assert np.all(np.abs(got - want) <= 8 * ulp * np.abs(want))
    back = pytorch.load_state_dict(
        bn.BatchNorm.from_preset("darknet", 3), pytorch.to_state_dict(layer)
    )
    np.testing.assert_allclose(
        back.running_var, layer.running_var, rtol=2 * ulp, atol=1e-30
    )


def test_load_state_dict_errors_leave_the_network_unchanged():
    net = pytorch.from_module(torch_net())
    before = net.layers[1].running_mean.copy()
    state = torch_net().state_dict()
    state["1.running_mean"] = torch.full((4,), 7.0)
    del state["8.bias"]
    with pytest.raises(bio.FormatError, match=r"missing \['8.bias'\]"):
        pytorch.load_state_dict(net, state)
    np.testing.assert_array_equal(net.layers[1].running_mean, before)
    state = torch_net().state_dict()
    state["1.running_var"] = torch.full((4,), float("nan"))
    with pytest.raises(
        bio.FormatError,
        match=r"1\.running_var must be finite and >= 0 in every channel; "
        r"4 of 4 are not",
    ):
        pytorch.load_state_dict(net, state)
    with pytest.raises(bio.FormatError, match="does not record its network structure"):
        pytorch.load_state_dict(None, torch_net().state_dict())
    with pytest.raises(ValueError, match="no harness layer for torch module"):
        pytorch.from_module(torch.nn.Sequential(torch.nn.Tanh()))
