"""``batchnorm.torch.convert`` / ``revert`` on models with nested batch norms.

A model of torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (nested in
submodules, one in eval mode) is copied, converted, and run next to the copy:
outputs, gradients, parameters after an optimizer step and running statistics
agree to float64 rounding (both compute the same formulas in float64; see
``test_modules.py``). ``SyncBatchNorm`` (torch's and ours) runs as a local batch
norm here: no process group is initialized.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from batchnorm.torch import (  # noqa: E402
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    convert,
    revert,
)
from batchnorm.torch.sync import SyncBatchNorm  # noqa: E402

RTOL = 1e-12
nn = torch.nn
TORCH_TO_OURS = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


class Block(nn.Module):
    """conv → BatchNorm2d → ReLU → (flatten → BatchNorm1d on (N, C, L))."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.inner = nn.Sequential(nn.Flatten(2), nn.BatchNorm1d(4, momentum=None))

    def forward(self, x):
        n, _, h, w = x.shape
        return self.inner(torch.relu(self.bn(self.conv(x)))).reshape(n, 4, h, w)


class Net(nn.Module):
    def __init__(self, sync: bool) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.ModuleDict(
            {
                "bn3": nn.BatchNorm3d(2, affine=False),
                "frozen": nn.BatchNorm2d(4).eval(),  # stays in eval mode
                "bn1": nn.BatchNorm1d(4, track_running_stats=False),
            }
        )
        self.sync = nn.SyncBatchNorm(4) if sync else nn.Identity()

    def forward(self, x):
        n, _, h, w = x.shape
        x = self.block(x)
        x = self.head["bn3"](x.reshape(n, 2, 2, h, w)).reshape(n, 4, h, w)
        x = self.head["frozen"](self.sync(x))
        return self.head["bn1"](x.mean(dim=(2, 3)))


def make_net(sync: bool) -> Net:
    torch.manual_seed(0)
    net = Net(sync).double()
    with torch.no_grad():  # non-default state everywhere
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_()
                if m.running_mean is not None:
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
    return net


def data(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64) * 2 + 0.5


def assert_close(a, b, what: str) -> None:
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape and a.dtype == b.dtype, what
    scale = float(b.abs().max()) if b.numel() else 0.0
    assert float((a - b).abs().max()) <= RTOL * max(scale, 1e-300), what


def assert_same_model_state(ours: nn.Module, theirs: nn.Module) -> None:
    state_o, state_t = ours.state_dict(), theirs.state_dict()
    assert list(state_o) == list(state_t)
    for name, value in state_t.items():
        if value.is_floating_point():
            assert_close(state_o[name], value, name)
        else:
            assert torch.equal(state_o[name], value), name


def batch_norms(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def train_step(model: nn.Module, optimizer, x, dy):
    optimizer.zero_grad()
    y = model(x)
    y.backward(dy)
    optimizer.step()
    return y.detach()


@pytest.mark.parametrize(
    "sync",
    [False, True],
    ids=["no_sync_module", "with_torch_SyncBatchNorm"],
)
def test_convert_keeps_outputs_parameters_and_flags(sync):
    model = make_net(sync)
    reference = copy.deepcopy(model)
    old = batch_norms(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)

    assert convert(model) is model
    new = batch_norms(model)
    assert list(new) == list(old)
    for name, m in new.items():
        kind = type(old[name])
        if kind is nn.SyncBatchNorm:
            assert type(m) is SyncBatchNorm, name
        else:
            assert type(m) is TORCH_TO_OURS[kind], name
            assert isinstance(m, kind), name  # ours subclass torch's
        assert m.training == old[name].training, name
        for attr in (
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "num_batches_tracked",
        ):
            assert getattr(m, attr) is getattr(old[name], attr), (name, attr)
        for attr in (
            "num_features",
            "eps",
            "momentum",
            "affine",
            "track_running_stats",
        ):
            assert getattr(m, attr) == getattr(old[name], attr), (name, attr)
    assert not model.head["frozen"].training and model.block.bn.training

    # eval: the same outputs
    model.eval()
    reference.eval()
    x = data(1)
    assert_close(model(x), reference(x), "eval y")

    # one training step with the optimizer built before the conversion
    model.train()
    reference.train()
    model.head["frozen"].eval()
    reference.head["frozen"].eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, dy = data(2), data(3)[:, 0, 0, :4]
    y = train_step(model, optimizer, x, dy)
    y_ref = train_step(reference, ref_optimizer, x, dy)
    assert_close(y, y_ref, "train y")
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} not updated by the optimizer"
    assert_same_model_state(model, reference)
    assert int(model.block.bn.num_batches_tracked) == 1
    assert int(model.head["frozen"].num_batches_tracked) == 0


def test_convert_of_a_bare_layer_returns_the_new_layer():
    old = nn.BatchNorm2d(5, eps=1e-3, momentum=0.3).double()
    old.eval()
    new = convert(old)
    assert type(new) is BatchNorm2d and type(old) is nn.BatchNorm2d
    assert new.weight is old.weight and new.running_var is old.running_var
    assert not new.training
    assert (new.eps, new.momentum) == (1e-3, 0.3)
    x = torch.randn(3, 5, 2, 2, dtype=torch.float64)
    assert_close(new(x), old(x), "y")


@pytest.mark.skipif(
    "bias" not in __import__("inspect").signature(nn.BatchNorm2d.__init__).parameters,
    reason="this torch's BatchNorm has no bias= argument",
)
def test_convert_keeps_bias_false():
    old = nn.BatchNorm1d(3, bias=False)
    new = convert(old)
    assert new.bias is None and new.weight is old.weight
    assert sorted(new.state_dict()) == sorted(old.state_dict())


def test_subclasses_and_our_modules_are_left_alone():
    class MyBatchNorm(nn.BatchNorm2d):
        pass

    model = nn.Sequential(
        MyBatchNorm(3), nn.LazyBatchNorm2d(), BatchNorm2d(3), nn.BatchNorm2d(3)
    )
    kept = list(model)
    convert(model)
    assert model[0] is kept[0] and type(model[0]) is MyBatchNorm
    assert model[1] is kept[1] and type(model[1]) is nn.LazyBatchNorm2d
    assert model[2] is kept[2]  # already ours
    assert type(model[3]) is BatchNorm2d
    again = list(model)
    convert(model)  # idempotent
    assert list(model) == again


@pytest.mark.parametrize("sync", [False, True], ids=["convert", "convert_sync"])
def test_revert_gives_torchs_classes_back(sync):
    model = make_net(sync=True)
    reference = copy.deepcopy(model)
    old = batch_norms(model)
    convert(model, sync=sync)
    if sync:
        assert all(type(m) is SyncBatchNorm for m in batch_norms(model).values())
    x = data(4)
    model.eval()
    reference.eval()
    assert_close(model(x), reference(x), "converted y")
    model.block.bn.train()  # flags as they are now are what revert keeps
    flags = {name: m.training for name, m in batch_norms(model).items()}
    assert revert(model) is model
    back = batch_norms(model)
    for name, m in back.items():
        expected = nn.SyncBatchNorm if sync else type(old[name])
        assert type(m) is expected, name
        assert m.weight is old[name].weight, name
        assert m.running_mean is old[name].running_mean, name
        assert m.training == flags[name], name
    model.eval()
    assert_close(model(x), reference(x), "reverted y")
    assert_same_model_state(model, reference)


def test_revert_of_a_bare_layer():
    ours = BatchNorm3d(2)
    theirs = revert(ours)
    assert type(theirs) is nn.BatchNorm3d
    assert theirs.weight is ours.weight


def test_sync_conversion_takes_our_modules_too():
    # convert(model) then convert(model, sync=True): our BatchNorm2d becomes our
    # SyncBatchNorm as torch's would, sharing the same parameters and buffers
    from batchnorm.torch import BatchNorm2d as Ours
    from batchnorm.torch import SyncBatchNorm, convert

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    convert(model)
    assert type(model[1]) is Ours
    weight, mean = model[1].weight, model[1].running_mean
    convert(model, sync=True)
    assert type(model[1]) is SyncBatchNorm
    assert model[1].weight is weight and model[1].running_mean is mean
    assert SyncBatchNorm.convert_sync_batchnorm(model) is model
