"""``batchnorm.torch.BatchNorm1d/2d/3d`` against ``torch.nn.BatchNorm1d/2d/3d``.

Every case builds our module and torch's with the same configuration and state,
feeds both the same tensor (same values, same strides) and compares outputs, the
three gradients (``dx``, ``dweight``, ``dbias`` for a random upstream gradient,
taken with ``torch.autograd.grad`` so that ``dx`` is the operator's own tensor,
strides included), the running statistics and ``num_batches_tracked``, over
several training steps and then an eval step.

Tolerances (elementwise, ``|ours − torch| ≤ rtol · max|torch|``; scaled by the
largest magnitude because ``dx`` sums to zero per channel and its small entries
come from cancellation):

- float64: ``1e-12``. Both compute the same formulas in float64; observed
  differences are a few units of 2⁻⁵² (≤ 2.3e-15 relative).
- float32: ``1e-5``. We compute the statistics exactly in float64 and round each
  result once (≤ 1 float32 unit, u = 2⁻²⁴ ≈ 6e-8); torch's float32 CPU kernel
  accumulates the statistics and forms ``y = x·a + b`` and the terms of ``dx`` in
  float32, each rounding costing up to u and a float32 sum over the m ≤ 120 values
  per channel here growing that to at most ~m·u ≈ 7e-6 in the worst case. 1e-5
  (~170 u) covers that; observed: ≤ 3.1e-7 (~5 u, ``dweight``), 2e-7 for y.
  A semantic difference (momentum direction, ε, biased running variance, a
  missing bias) shows at 1e-3 or more.
- float16 / bfloat16: compared with the float64 reference (torch's float64
  module on the same half-precision values), within ``4 u`` of the largest
  magnitude, u = 2⁻¹¹ (float16) or 2⁻⁸ (bfloat16) the unit roundoff: our
  statistics are float64 and each result is rounded once to the half type
  (≤ u), the normalization itself runs in float32 or better; observed ≤ 0.96 u
  (float16 ``y``). The running statistics: within 2 units of the buffers' dtype.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from batchnorm.torch import BatchNorm1d, BatchNorm2d, BatchNorm3d  # noqa: E402

OURS = {
    "BatchNorm1d": BatchNorm1d,
    "BatchNorm2d": BatchNorm2d,
    "BatchNorm3d": BatchNorm3d,
}
C = 3
NUM_TRAIN_STEPS = 3
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
HALF_ULPS = 4
HAS_BIAS_FLAG = "bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters

# (class, channels-first shape): input ranks 2 to 5.
SHAPES = {
    "NC": ("BatchNorm1d", (16, C)),
    "NCL": ("BatchNorm1d", (4, C, 7)),
    "NCHW": ("BatchNorm2d", (4, C, 5, 6)),
    "NCDHW": ("BatchNorm3d", (2, C, 3, 4, 5)),
}

MODES = {
    "default": {},
    "affine_false": {"affine": False},
    "bias_false": {"bias": False},
    "no_running_stats": {"track_running_stats": False},
    "momentum_none": {"momentum": None},
}


# -- building blocks ------------------------------------------------------------


def values(shape: tuple[int, ...], seed: int, dtype=torch.float64, loc=0.5, scale=2.0):
    """Reproducible normal data (drawn in float64, then cast)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(
        dtype
    )


def _swap01(v):
    """Memory order (C, N, *): dense, neither contiguous nor channels-last."""
    return v.transpose(0, 1).contiguous().transpose(0, 1)


def _channels_last(v):
    if v.dim() == 3:  # (N, C, L) stored as (N, L, C)
        return v.transpose(1, 2).contiguous().transpose(1, 2)
    fmt = torch.channels_last if v.dim() == 4 else torch.channels_last_3d
    return v.contiguous(memory_format=fmt)


def _sliced(v):
    """Every other element of the last dimension: not dense."""
    big = torch.zeros(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype)
    big[..., ::2] = v
    return big[..., ::2]


def _channels_last_sliced(v):
    """Every other sample of a channels-last batch: channels-last strides, not
    dense (torch keeps channels-last for it)."""
    big = _channels_last(torch.zeros(2 * v.shape[0], *v.shape[1:], dtype=v.dtype))
    big[::2] = v
    return big[::2]


LAYOUTS: dict[str, Callable[[Any], Any]] = {
    "contiguous": lambda v: v.clone(),
    "channels_last": _channels_last,
    "transposed": _swap01,
    "sliced": _sliced,
    "channels_last_sliced": _channels_last_sliced,
}


def layout_applies(shape: tuple[int, ...], layout: str) -> bool:
    if layout == "channels_last":
        return len(shape) >= 3  # (N, C) is channels-last already
    if layout == "channels_last_sliced":
        return len(shape) >= 4
    return True


def make_input(v, layout: str, requires_grad: bool = True):
    x = LAYOUTS[layout](v)
    return x.requires_grad_(requires_grad)


def make_pair(kind: str, dtype=torch.float64, seed: int = 0, **kwargs):
    """(ours, torch's): the same configuration, random parameters and non-default
    running statistics (so the momentum direction shows from the first step)."""
    ours = OURS[kind](C, dtype=dtype, **kwargs)
    theirs = getattr(torch.nn, kind)(C, dtype=dtype, **kwargs)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        if ours.weight is not None:
            ours.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
        if ours.bias is not None:
            ours.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
        if ours.running_mean is not None:
            ours.running_mean.copy_(torch.randn(C, generator=g, dtype=torch.float64))
            ours.running_var.copy_(
                torch.rand(C, generator=g, dtype=torch.float64) + 0.5
            )
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def params(module) -> list:
    return [p for p in (module.weight, module.bias) if p is not None]


def step(module, x, dy):
    """Forward and the gradients of ``(y · dy).sum()`` w.r.t. x and the parameters."""
    y = module(x)
    inputs = [x, *params(module)]
    grads = torch.autograd.grad(y, inputs, dy)
    return y.detach(), list(grads)


def assert_close(actual, desired, rtol: float, what: str) -> None:
    """Same shape and dtype; ``|a − d| ≤ rtol · max|d|`` elementwise."""
    assert actual.shape == desired.shape, what
    assert actual.dtype == desired.dtype, what
    a, d = actual.detach().double(), desired.detach().double()
    if d.numel() == 0:
        return
    scale = float(d.abs().max())
    err = float((a - d).abs().max())
    assert err <= rtol * max(scale, 1e-300), f"{what}: {err:.3g} > {rtol:g}·{scale:.3g}"


def assert_same_state(ours, theirs, rtol: float, what: str) -> None:
    if theirs.running_mean is None:
        assert ours.running_mean is None and ours.running_var is None, what
    else:
        assert_close(ours.running_mean, theirs.running_mean, rtol, f"{what} mean")
        assert_close(ours.running_var, theirs.running_var, rtol, f"{what} var")
    if theirs.num_batches_tracked is None:
        assert ours.num_batches_tracked is None, what
    else:
        assert ours.num_batches_tracked.dtype == torch.long, what
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked), what


def compare(ours, theirs, x, dy, rtol: float, what: str) -> None:
    """One forward/backward of both on the same x; outputs, gradients (values and
    strides) and statistics compared."""
    y_o, g_o = step(ours, x, dy)
    y_t, g_t = step(theirs, x, dy)
    assert_close(y_o, y_t, rtol, f"{what} y")
    assert y_o.stride() == y_t.stride(), f"{what} y strides"
    names = ["dx"] + [f"d{n}" for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, g_o, g_t, strict=True):
        assert_close(a, b, rtol, f"{what} {name}")
    assert g_o[0].stride() == g_t[0].stride(), f"{what} dx strides"
    assert_same_state(ours, theirs, rtol, what)


# -- parity: every rank, layout and mode, several training steps, then eval -----


CASES = [
    pytest.param(shape, layout, mode, id=f"{shape}-{layout}-{mode}")
    for shape in SHAPES
    for layout in LAYOUTS
    for mode in MODES
    if layout_applies(SHAPES[shape][1], layout)
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("shape", "layout", "mode"), CASES)
def test_training_steps_then_eval_match_torch(shape, layout, mode, dtype):
    if mode == "bias_false" and not HAS_BIAS_FLAG:
        pytest.skip("this torch's BatchNorm has no bias= argument")
    kind, dims = SHAPES[shape]
    ours, theirs = make_pair(kind, dtype, **MODES[mode])
    rtol = RTOL[dtype]
    for i in range(NUM_TRAIN_STEPS):
        x = make_input(values(dims, seed=i, dtype=dtype), layout)
        dy = values(dims, seed=100 + i, dtype=dtype, loc=0.0, scale=1.0)
        compare(ours, theirs, x, dy, rtol, f"train step {i}")
        with torch.no_grad():  # move the parameters, as an optimizer would
            for p_o, p_t in zip(params(ours), params(theirs), strict=True):
                p_o.mul_(0.9).add_(0.05)
                p_t.copy_(p_o)
    ours.eval()
    theirs.eval()
    x = make_input(values(dims, seed=50, dtype=dtype), layout)
    dy = values(dims, seed=150, dtype=dtype, loc=0.0, scale=1.0)
    compare(ours, theirs, x, dy, rtol, "eval")


@pytest.mark.parametrize("shape", ["NCHW", "NCDHW"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_in_channels_last_out(shape, training):
    """(torch has no channels-last format for 3-D tensors: an (N, C, L) input
    stored as (N, L, C) gives a contiguous output in both, checked above.)"""
    kind, dims = SHAPES[shape]
    ours, _ = make_pair(kind)
    ours.train(training)
    x = make_input(values(dims, seed=3), "channels_last")
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    for dy in (values(dims, seed=4), _channels_last(values(dims, seed=4))):
        y, (dx, *_) = step(ours, x, dy)
        assert y.is_contiguous(memory_format=fmt)
        assert dx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_output_of_a_permuted_input_is_contiguous_as_torchs(training):
    """torch writes ``y`` in the input's suggested memory format (contiguous for
    a permuted, non-channels-last input), so ``y.view(...)`` works after it."""
    x = _swap01(values((4, C, 5, 6), seed=5))
    ours, theirs = make_pair("BatchNorm2d")
    ours.train(training)
    theirs.train(training)
    y_o, y_t = ours(x), theirs(x)
    assert y_t.is_contiguous()
    assert y_o.is_contiguous()
    assert y_o.view(4, -1).shape == (4, C * 30)


# -- half precision -------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "layout"),
    [("NC", "contiguous")]
    + [
        (s, layout)
        for s in ("NCHW", "NCDHW")
        for layout in ("contiguous", "channels_last")
    ],
)
@pytest.mark.parametrize("module_dtype", ["same", "float32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_is_within_its_rounding_of_float64(
    shape, layout, module_dtype, dtype
):
    """float16/bfloat16 inputs, with a module of that dtype or a float32 one (as
    under mixed precision): train steps and eval against torch's float64 module
    on the same values, within ``HALF_ULPS`` units of the largest magnitude."""
    kind, dims = SHAPES[shape]
    mdtype = dtype if module_dtype == "same" else torch.float32
    ours, _ = make_pair(kind, mdtype)
    ref = getattr(torch.nn, kind)(C, dtype=torch.float64)
    ref.load_state_dict(
        {
            k: v.double() if v.is_floating_point() else v
            for k, v in ours.state_dict().items()
        }
    )
    bound = HALF_ULPS * UNIT_ROUNDOFF[dtype]
    for i, training in enumerate([True, True, False]):
        ours.train(training)
        ref.train(training)
        x = make_input(values(dims, seed=i, dtype=dtype), layout)
        dy = values(dims, seed=10 + i, dtype=dtype, loc=0.0, scale=1.0)
        y, grads = step(ours, x, dy)
        x64 = x.detach().double().requires_grad_()
        y_ref, grads_ref = step(ref, x64, dy.double())
        assert y.dtype == dtype and grads[0].dtype == dtype
        assert y.stride() == x.stride()
        assert_close(y.double(), y_ref, bound, f"step {i} y")
        assert_close(grads[0].double(), grads_ref[0], bound, f"step {i} dx")
        for a, b, name in zip(
            grads[1:], grads_ref[1:], ["dweight", "dbias"], strict=True
        ):
            assert a.dtype == mdtype
            assert_close(a.double(), b, bound, f"step {i} {name}")
        # The running statistics are one rounding of the float64 update away.
        ru = UNIT_ROUNDOFF.get(mdtype, 2.0**-24)
        assert_close(ours.running_mean.double(), ref.running_mean, 2 * ru, "mean")
        assert_close(ours.running_var.double(), ref.running_var, 2 * ru, "var")
        # The reference keeps the buffers' rounding out of the next step.
        with torch.no_grad():
            ref.running_mean.copy_(ours.running_mean)
            ref.running_var.copy_(ours.running_var)


# -- gradients ------------------------------------------------------------------

GRAD_MODES = {
    "affine": {},
    "no_affine": {"affine": False},
    "no_bias": {"bias": False},
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", list(GRAD_MODES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck(training, mode, layout):
    if mode == "no_bias" and not HAS_BIAS_FLAG:
        pytest.skip("this torch's BatchNorm has no bias= argument")
    module, _ = make_pair("BatchNorm2d", **GRAD_MODES[mode])
    module.train(training)
    names = [n for n, p in module.named_parameters()]
    x = make_input(values((3, C, 2, 2), seed=7), layout)
    inputs = (x, *[p.detach().clone().requires_grad_() for p in params(module)])

    def f(x, *ps):
        return torch.func.functional_call(
            module, dict(zip(names, ps, strict=True)), (x,)
        )

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_frozen_parameters_get_no_gradient():
    ours, theirs = make_pair("BatchNorm2d")
    for m in (ours, theirs):
        m.weight.requires_grad_(False)
    x = make_input(values((4, C, 3, 3), seed=8), "contiguous")
    for m in (ours, theirs):
        m(x).square().sum().backward()
    assert ours.weight.grad is None
    assert_close(ours.bias.grad, theirs.bias.grad, 1e-12, "dbias")
    assert x.grad is not None


# -- state dicts ------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(OURS))
def test_state_dict_round_trips_both_ways(kind):
    """Ours → torch's → ours, and torch's → ours, with ``strict=True``."""
    ours, theirs = make_pair(kind, torch.float32)
    dims = {"BatchNorm1d": (4, C), "BatchNorm2d": (4, C, 2, 2)}.get(
        kind, (2, C, 2, 2, 2)
    )
    x = values(dims, seed=9, dtype=torch.float32)
    ours(x)  # non-default running statistics and num_batches_tracked
    theirs(x)
    as_torch = getattr(torch.nn, kind)(C)
    as_torch.load_state_dict(ours.state_dict(), strict=True)
    back = OURS[kind](C)
    back.load_state_dict(as_torch.state_dict(), strict=True)
    from_torch = OURS[kind](C)
    from_torch.load_state_dict(theirs.state_dict(), strict=True)
    for name, value in ours.state_dict().items():
        assert torch.equal(as_torch.state_dict()[name], value), name
        assert torch.equal(back.state_dict()[name], value), name
    for name, value in theirs.state_dict().items():
        assert torch.equal(from_torch.state_dict()[name], value), name
    assert list(from_torch.state_dict()) == list(theirs.state_dict())
    assert_close(from_torch(x), theirs(x), RTOL[torch.float32], "y after loading")


# -- grad modes -------------------------------------------------------------------


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_grad_and_inference_mode(context, training):
    ours, theirs = make_pair("BatchNorm2d")
    ours.train(training)
    theirs.train(training)
    x = values((4, C, 3, 3), seed=11)
    with context():
        y_o, y_t = ours(x), theirs(x)
    assert not y_o.requires_grad
    assert y_o.is_inference() == y_t.is_inference()
    assert_close(y_o, y_t, 1e-12, "y")
    assert_same_state(ours, theirs, 1e-12, "state")


# -- empty batch ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["default", "momentum_none", "no_running_stats"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, C), (0, C, 4, 4), (0, C, 2, 2, 2)])
def test_empty_batch_as_torch(shape, training, mode):
    kind = {2: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    ours, theirs = make_pair(kind, **MODES[mode])
    ours.train(training)
    theirs.train(training)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    y_o, g_o = step(ours, x, torch.zeros(shape, dtype=torch.float64))
    y_t, g_t = step(theirs, x, torch.zeros(shape, dtype=torch.float64))
    assert y_o.shape == y_t.shape == shape
    for a, b in zip(g_o, g_t, strict=True):
        assert a.shape == b.shape
        assert torch.equal(a, b)  # an empty dx and zero parameter gradients
    assert_same_state(ours, theirs, 0.0, "state")
    for name in ("running_mean", "running_var"):
        if name in before:
            assert torch.equal(ours.state_dict()[name], before[name]), name


# -- errors -----------------------------------------------------------------------


def raised(module, x) -> tuple[type, str]:
    with pytest.raises(Exception) as info:  # noqa: B017 (compared with torch's below)
        module(x)
    return info.type, str(info.value)


def assert_raises_as_torch(kind: str, x, training: bool = True, **kwargs):
    """Both raise, the same exception type and message, and leave the same state."""
    ours, theirs = make_pair(kind, **kwargs)
    ours.train(training)
    theirs.train(training)
    got, expected = raised(ours, x), raised(theirs, x)
    assert got == expected
    assert_same_state(ours, theirs, 0.0, "state after the error")
    return got


@pytest.mark.parametrize(
    ("kind", "shape", "kwargs"),
    [
        ("BatchNorm1d", (1, C), {}),
        ("BatchNorm1d", (1, C, 1), {}),
        ("BatchNorm2d", (1, C, 1, 1), {}),
        ("BatchNorm3d", (1, C, 1, 1, 1), {"momentum": None}),
        ("BatchNorm2d", (1, C, 1, 1), {"track_running_stats": False}),
    ],
)
def test_one_value_per_channel_in_training(kind, shape, kwargs):
    kind_, message = assert_raises_as_torch(kind, values(shape, 0), **kwargs)
    assert kind_ is ValueError
    assert message.startswith("Expected more than 1 value per channel when training")


def test_one_value_per_channel_in_eval_without_running_stats():
    """torch normalizes with the batch's statistics then, and checks the same."""
    kind, message = assert_raises_as_torch(
        "BatchNorm2d",
        values((1, C, 1, 1), 0),
        training=False,
        track_running_stats=False,
    )
    assert kind is ValueError
    assert message.startswith("Expected more than 1 value per channel when training")


def test_one_value_per_channel_in_eval_with_running_stats_is_fine():
    ours, theirs = make_pair("BatchNorm2d")
    ours.eval()
    theirs.eval()
    x = values((1, C, 1, 1), 0)
    assert_close(ours(x), theirs(x), 1e-12, "y")


@pytest.mark.parametrize(
    ("kind", "shape", "expected"),
    [
        ("BatchNorm2d", (4, C), "expected 4D input (got 2D input)"),
        ("BatchNorm2d", (4, C, 5), "expected 4D input (got 3D input)"),
        ("BatchNorm1d", (4, C, 2, 2), "expected 2D or 3D input (got 4D input)"),
        ("BatchNorm3d", (4, C, 2, 2), "expected 5D input (got 4D input)"),
    ],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wrong_rank(kind, shape, expected, training):
    got = assert_raises_as_torch(kind, values(shape, 0), training)
    assert got == (ValueError, expected)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wrong_channel_count(mode, training):
    """torch's RuntimeError ("running_mean should contain 4 elements not 3", or
    "weight ..." without running statistics); the state left is torch's (both
    count the failed training call in ``num_batches_tracked``, nothing else)."""
    if mode == "bias_false" and not HAS_BIAS_FLAG:
        pytest.skip("this torch's BatchNorm has no bias= argument")
    x = values((4, C + 1, 2, 2), 0)
    kind, message = assert_raises_as_torch("BatchNorm2d", x, training, **MODES[mode])
    assert kind is RuntimeError
    assert message.endswith(f"should contain {C + 1} elements not {C}")


@pytest.mark.parametrize("eps", [0.0, -1.0])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eps_checks_as_torch(eps, training):
    """torch: ε > 0 when normalizing with batch statistics, ε ≥ 0 with running
    ones (ε = 0 is allowed in eval)."""
    x = values((4, C, 2, 2), 0)
    ours, theirs = make_pair("BatchNorm2d", eps=eps)
    ours.train(training)
    theirs.train(training)
    if eps == 0.0 and not training:
        assert_close(ours(x), theirs(x), 1e-12, "y")
        return
    assert_raises_as_torch("BatchNorm2d", x, training, eps=eps)


# -- exactness --------------------------------------------------------------------


def test_float32_channels_last_batch_variance_is_exact_at_mean_1e6():
    """Mean 1e6, std 1, float32, channels_last: our batch statistics are exact.

    Reference: the float32 values shifted by one of them, which is exact in
    float64 (two float32 numbers near 1e6 differ by a multiple of 2⁻⁴), then a
    float64 variance of well-conditioned numbers near 1 (≤ ~1e-15 relative; the
    unshifted float64 ``var`` is off by ~1e-11 here, from the conditioning).

    Measured with torch 2.13 (CPU) on this input: ``torch.nn.BatchNorm2d``'s batch
    variance (``running_var`` after one step with momentum 1) is off by ~1e-3
    relative (channels_last and contiguous alike); ours by < 1e-14 (M2), and its
    float32 ``running_var`` by one rounding.
    """
    dims = (8, 4, 16, 16)
    x = values(dims, seed=12, dtype=torch.float32, loc=1e6, scale=1.0)
    x = x.contiguous(memory_format=torch.channels_last)
    x64 = x.double()
    shifted = x64 - x64[:1, :, :1, :1]
    m = x.numel() // dims[1]
    ref_biased = shifted.var(dim=(0, 2, 3), unbiased=False)
    ref_unbiased = shifted.var(dim=(0, 2, 3), unbiased=True)
    ref_mean = x64.mean(dim=(0, 2, 3))

    y, mean, m2, inv_std = torch.ops.batchnorm.forward_train(x, None, None, 1e-5)
    assert mean.dtype == m2.dtype == torch.float64
    assert float(((m2 / m) / ref_biased - 1).abs().max()) < 1e-12
    assert float(((mean - ref_mean) / ref_mean).abs().max()) < 1e-15
    assert y.is_contiguous(memory_format=torch.channels_last)

    module = BatchNorm2d(dims[1], momentum=1.0)
    module(x)
    # float32 buffers: the exact unbiased variance, rounded once.
    assert (
        float((module.running_var.double() / ref_unbiased - 1).abs().max()) <= 2.0**-24
    )
    # The normalized output has mean 0 and variance ~1 per channel in float64.
    y64 = y.double()
    assert float(y64.mean(dim=(0, 2, 3)).abs().max()) < 1e-6
    assert float((y64.var(dim=(0, 2, 3), unbiased=False) - 1).abs().max()) < 1e-4


@pytest.mark.parametrize("affine", [True, False])
def test_registered_operators_have_first_and_second_derivatives(affine):
    # Eager modules run the kernels through autograd Functions; torch.compile and
    # torch.export see the registered operators, whose autograd is registered
    # separately: check those too, called directly.
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=affine)
    b = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=affine)
    rm = torch.randn(3, dtype=torch.float64, generator=gen)
    rv = torch.rand(3, dtype=torch.float64, generator=gen) + 0.5
    weight, bias = (w, b) if affine else (None, None)
    inputs = (x, w, b) if affine else (x,)

    def train(*args):
        ww, bb = (args[1], args[2]) if affine else (None, None)
        return torch.ops.batchnorm.forward_train(args[0], ww, bb, 1e-5)[0]

    def evaluate(*args):
        ww, bb = (args[1], args[2]) if affine else (None, None)
        return torch.ops.batchnorm.forward_eval(args[0], ww, bb, rm, rv, 1e-5)

    for fn in (train, evaluate):
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)
    # and they agree with the eager path the modules take
    from batchnorm.torch import _ops

    eager = _ops.train(x, weight, bias, 1e-5)[0]
    assert torch.equal(eager, train(*inputs))


@pytest.mark.parametrize("channels_last", [False, True])
def test_large_outputs_from_the_block_cache_behave_as_torch_tensors(channels_last):
    # Outputs of 1 MiB or more come from our block cache (batchnorm._memory):
    # they must be ordinary tensors to autograd (an in-place ReLU after the layer,
    # as torchvision's ResNets do, is forbidden on a custom Function's views) and
    # give their block back when freed.
    from batchnorm import _memory

    x = torch.randn(16, 64, 32, 32)  # 4 MiB in float32
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, theirs = BatchNorm2d(64), torch.nn.BatchNorm2d(64)
    grads = []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_()
        y = torch.relu_(layer(xi))
        y.backward(torch.ones_like(y))
        grads.append((y.detach(), xi.grad))
        assert y.is_contiguous(memory_format=_format(channels_last))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)
    _memory.release_buffers()
    grads.clear()
    del y, xi
    gc.collect()
    assert _memory.idle_bytes() >= x.numel() * 4  # y's and dx's blocks came back


def _format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_with_another_channel_count_is_torchs_empty_output(training):
    # torch checks per-channel sizes only for a non-empty batch: an empty one of
    # any channel count gives an empty output (and num_batches_tracked counts it)
    ours, theirs = (
        BatchNorm2d(3).train(training),
        torch.nn.BatchNorm2d(3).train(training),
    )
    for layer in (ours, theirs):
        x = torch.zeros(0, 4, 5, 5, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)
