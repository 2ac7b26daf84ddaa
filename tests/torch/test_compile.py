"""``torch.compile`` of a model containing our modules.

Our operators are ``torch.library`` custom ops with fake (meta) implementations
and registered autograd, so dynamo traces them as single graph nodes: no graph
break (``fullgraph=True`` would raise on one), forward and backward.

Cost (2 cores): the inductor compile of the train step (forward and backward
graphs) and the eval recompile take ~19 s with an empty inductor cache (~47 s for
the very first compile on a fresh machine, which also builds inductor's C++
prerequisites) and ~3.5 s with a warm one (``/tmp/torchinductor_*``); the
recording-backend test (dynamo and AOTAutograd, no inductor) ~2.5 s.

Tolerance compiled vs eager (float32): ``1e-5`` of the largest magnitude, as
``test_modules.py`` justifies for float32; our operators compute the same
values in both, only inductor's fused elementwise/reduction code around them
(ReLU, the mean, the conv's weight gradient) rounds differently.
"""

from __future__ import annotations

import copy
import shutil

import pytest

torch = pytest.importorskip("torch")

from functorch.compile import make_boxed_func  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402

from batchnorm.torch import BatchNorm1d, BatchNorm2d  # noqa: E402

RTOL = 1e-5
OUR_OPS = {
    f"batchnorm.{name}.default"
    for name in ("forward_train", "backward_train", "forward_eval", "backward_eval")
}


class Net(torch.nn.Module):
    """conv → BatchNorm2d → ReLU → global average → BatchNorm1d."""

    def __init__(self, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = BatchNorm2d(4)
        self.head = BatchNorm1d(4, momentum=momentum)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def make(momentum: float | None = 0.1) -> Net:
    torch.manual_seed(0)
    net = Net(momentum)
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def data(seed: int, channels_last: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=g) * 2 + 0.5
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def assert_close(a, b, what: str) -> None:
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape and a.dtype == b.dtype, what
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a - b).abs().max())
    assert err <= RTOL * max(scale, 1e-30), f"{what}: {err:.3g} vs {scale:.3g}"


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, u), (_, v) in zip(
        a.state_dict().items(), b.state_dict().items(), strict=True
    ):
        if u.is_floating_point():
            assert_close(u, v, name)
        else:
            assert torch.equal(u, v), name


def train_step(model, x, dy, run=None):
    """Forward (through ``run``, the compiled model, when given) and backward;
    the output and ``model``'s parameter gradients."""
    model.zero_grad(set_to_none=True)
    y = (model if run is None else run)(x)
    y.backward(dy)
    return y.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_our_ops_are_graph_nodes_without_graph_breaks():
    """dynamo captures the whole model in one graph per mode (``fullgraph=True``)
    with our operators as nodes, and AOTAutograd's forward and backward graphs
    hold our forward and backward operators (recording compilers, no inductor);
    the results are eager's."""
    graphs: dict[str, list] = {"dynamo": [], "forward": [], "backward": []}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    def backend(gm, example_inputs):
        graphs["dynamo"].append(gm)
        return aot_autograd(
            fw_compiler=recorder("forward"), bw_compiler=recorder("backward")
        )(gm, example_inputs)

    model = make()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for training in (True, False):
        model.train(training)
        reference.train(training)
        x, dy = data(1 + training), data(3)[:, 0, 0, :4]
        y, grads = train_step(model, x, dy, compiled)
        y_ref, grads_ref = train_step(reference, x, dy)
        mode = "train" if training else "eval"
        assert_close(y, y_ref, f"{mode} y")
        for name in grads_ref:
            assert_close(grads[name], grads_ref[name], f"{mode} d{name}")
        assert_same_state(model, reference)

    def ops(kind):
        return [
            sorted({str(n.target) for n in gm.graph.nodes} & OUR_OPS)
            for gm in graphs[kind]
        ]

    assert len(graphs["dynamo"]) == 2  # train, then eval: no graph break
    assert ops("forward") == [
        ["batchnorm.forward_train.default"],
        ["batchnorm.forward_eval.default"],
    ]
    assert ops("backward") == [
        ["batchnorm.backward_train.default"],
        ["batchnorm.backward_eval.default"],
    ]

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(make())(data(1))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


# dynamo, resuming after the break, probes .grad of a non-leaf tensor: its warning
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor:UserWarning")
def test_cumulative_average_compiles_with_a_graph_break_as_torchs():
    """``momentum=None`` computes ``1 / float(num_batches_tracked)`` in Python, as
    torch's ``_BatchNorm.forward`` does: dynamo breaks the graph there (torch's
    own module fails ``fullgraph=True`` on it too), and the results are eager's."""
    model = make(momentum=None)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    for seed in (5, 6):  # the factor is 1, then 1/2
        x, dy = data(seed), data(7)[:, 0, 0, :4]
        y, grads = train_step(model, x, dy, compiled)
        y_ref, grads_ref = train_step(reference, x, dy)
        assert_close(y, y_ref, "y")
        for name in grads_ref:
            assert_close(grads[name], grads_ref[name], f"d{name}")
        assert_same_state(model, reference)
    assert int(model.head.num_batches_tracked) == 2


# torch's own import of inductor (torch.utils.mkldnn) warns; not ours.
@pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)
@pytest.mark.skipif(
    not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")),
    reason="inductor needs a C++ compiler",
)
def test_inductor_compiled_model_matches_eager():
    """``torch.compile`` (inductor, ``fullgraph=True``) of conv → BN → ReLU → BN
    on a channels_last batch: a train step (output, every parameter's gradient,
    running statistics, ``num_batches_tracked``), then eval."""
    model = make()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x, dy = data(3, channels_last=True), data(4)[:, 0, 0, :4]

    y, grads = train_step(model, x, dy, compiled)
    y_ref, grads_ref = train_step(reference, x, dy)
    assert_close(y, y_ref, "train y")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], f"d{name}")
    assert_same_state(model, reference)
    assert int(model.bn.num_batches_tracked) == 1

    model.eval()
    reference.eval()
    with torch.no_grad():
        assert_close(compiled(x), reference(x), "eval y")
