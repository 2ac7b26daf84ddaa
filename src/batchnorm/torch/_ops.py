"""Our kernels as torch operators (``torch.ops.batchnorm.*``).

Each operator works on the tensors' own memory: a CPU tensor is viewed as a
NumPy array (``Tensor.numpy()`` shares the storage) and the result is written
into a tensor from ``torch.empty_like`` through ``out=``, in the layout torch
gives a batch norm's output (the input's suggested memory format: channels-last
or contiguous). A ``channels_last`` tensor is viewed as its contiguous NHWC
permutation and takes the channels-last kernels. float16 runs on the NumPy view
too (statistics in float64); bfloat16, which NumPy lacks, is computed from a
float32 copy and rounded back once.

The training forward returns the batch's exact ``mean`` and ``M2`` (float64,
from the kernels' per-channel ``(count, mean, M2)``) and ``inv_std``; the
backward rebuilds the forward's :class:`batchnorm.functional.Cache` from them,
so the gradient is that of the forward actually computed. The first backward
runs our kernel; a backward that must itself be differentiated (autograd with
``create_graph=True``, as ``gradgradcheck`` does) uses a composite torch
formula instead, which recomputes the statistics from ``x`` in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from batchnorm import _memory
from batchnorm import functional as F
from batchnorm.moments import Cache, Moments

__all__ = [
    "backward_eval",
    "backward_train",
    "evaluate",
    "forward_eval",
    "forward_train",
    "train",
]


def _order(x: Tensor) -> tuple[int, ...] | None:
    """The permutation that makes a channels-last ``x`` contiguous (N, *, C),
    or None to use ``x`` as it is (N, C, *) with whatever strides it has."""
    if x.dim() >= 3 and not x.is_contiguous():
        order = (0, *range(2, x.dim()), 1)
        if x.permute(order).is_contiguous():
            return order
    return None


def _np(t: Tensor, order: tuple[int, ...] | None) -> np.ndarray:
    """A NumPy view of ``t`` (permuted by ``order``) sharing its memory."""
    t = t.detach()
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16
        t = t.float()
    return (t.permute(order) if order else t).numpy()


def _param(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else _np(t, None)


def _like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An empty tensor shaped like ``x`` in torch's layout for a batch norm's
    output and ``dx``: ``x``'s suggested memory format (channels-last for a 4-D
    or 5-D ``x`` with channels-last strides, else contiguous), as ATen's
    ``empty_like(x, x.suggest_memory_format())``. Not ``x``'s own strides: a
    permuted or sliced ``x`` gives a contiguous result, as torch's, which
    ``view`` accepts.

    In eager mode a large one (1 MiB or more) comes from our output block cache
    (:mod:`batchnorm._memory`): torch's CPU allocator returns large blocks to
    the system, and mapping fresh pages for every 51 MB output costs as much as
    a pass over it. The tensor owns a NumPy block that goes back to the cache
    when the tensor is freed (``Tensor.resize_`` refuses such storage)."""
    dtype = dtype or x.dtype
    fmt = _suggested_format(x)
    size = x.numel() * dtype.itemsize
    if size < _memory.MIN_BYTES or dtype not in _NUMPY or _compiling():
        return torch.empty_like(x, dtype=dtype, memory_format=fmt)
    shape = tuple(x.shape)
    if fmt in (torch.channels_last, torch.channels_last_3d):
        order = (0, *range(2, x.dim()), 1)
        block = torch.from_numpy(
            _memory.empty(tuple(shape[i] for i in order), _NUMPY[dtype])
        )
        back = (0, x.dim() - 1, *range(1, x.dim() - 1))
        stride = block.permute(back).stride()
        # a tensor of its own on the block's storage, not a view (autograd
        # forbids modifying a custom Function's view outputs in place)
        out = torch.empty(0, dtype=dtype)
        return out.set_(block.untyped_storage(), 0, shape, stride)
    return torch.from_numpy(_memory.empty(shape, _NUMPY[dtype]))


def _suggested_format(x: Tensor) -> torch.memory_format:
    """``suggest_memory_format``'s answer, from the cheap checks first."""
    if x.dim() < 4 or x.is_contiguous():
        return torch.contiguous_format
    return suggest_memory_format(x)


_NUMPY = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
}


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def _output(x: Tensor) -> tuple[Tensor, Tensor]:
    """The tensor to return (``x``'s dtype, torch's layout) and the one to write."""
    y = _like(x)
    if x.dtype == torch.bfloat16:
        return y, _like(x, torch.float32)
    return y, y


def _tensors(*arrays: Any) -> tuple[Tensor, ...]:
    return tuple(torch.from_numpy(np.array(a, np.float64)) for a in arrays)


# -- training forward ---------------------------------------------------------


@torch.library.custom_op("batchnorm::forward_train", mutates_args=())
def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, M2, inv_std)``: ``x`` normalized with its batch statistics
    (biased variance ``M2 / m``, ε inside the root, as torch)."""
    return _train(x, weight, bias, eps)


def _train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, target = _output(x)
    order = _order(x)
    axis = x.dim() - 1 if order else 1
    _, cache = F.forward_train(
        _np(x, order),
        _param(weight),
        _param(bias),
        axis=axis,
        eps=eps,
        out=_np(target, order),
    )
    if target is not y:
        y.copy_(target)
    mean, m2, inv_std = _tensors(cache.moments.mean, cache.moments.m2, cache.inv_std)
    return y, mean, m2, inv_std


@forward_train.register_fake
def _(x, weight, bias, eps):
    channels = x.shape[1]
    stats = [x.new_empty(channels, dtype=torch.float64) for _ in range(3)]
    return (_like(x), *stats)


@torch.library.custom_op("batchnorm::backward_train", mutates_args=())
def backward_train(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    m2: Tensor,
    inv_std: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`forward_train` (float64 parameter
    gradients are cast to the parameters' dtype by the caller)."""
    return _train_grad(dy, x, weight, mean, m2, inv_std, eps)


def _train_grad(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    m2: Tensor,
    inv_std: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, target = _output(x)
    order = _order(x)
    axis = x.dim() - 1 if order else 1
    count = x.numel() // max(x.shape[1], 1)
    moments = Moments(count, mean.numpy(), m2.numpy())
    cache = Cache(
        _np(x, order), moments, inv_std.numpy(), _param(weight), axis, eps, "inside", 0
    )
    _, dgamma, dbeta = F.backward(_np(dy, order), cache, out=_np(target, order))
    if target is not dx:
        dx.copy_(target)
    dweight, dbias = _tensors(dgamma, dbeta)
    return dx, dweight, dbias


@backward_train.register_fake
def _(dy, x, weight, mean, m2, inv_std, eps):
    channels = x.shape[1]
    return (
        _like(x),
        x.new_empty(channels, dtype=torch.float64),
        x.new_empty(channels, dtype=torch.float64),
    )


def _broadcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def _composite_train(
    dy: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The training backward as differentiable torch operations (float64)."""
    dims = [d for d in range(x.dim()) if d != 1]
    x64, dy64 = x.double(), dy.double()
    mean = x64.mean(dims, keepdim=True)
    inv_std = torch.rsqrt(((x64 - mean) ** 2).mean(dims, keepdim=True) + eps)
    xhat = (x64 - mean) * inv_std
    dbias = dy64.sum(dims)
    dweight = (dy64 * xhat).sum(dims)
    gain = inv_std if weight is None else inv_std * _broadcast(weight.double(), x)
    m = x.numel() // x.shape[1]
    dx = gain * (dy64 - _broadcast(dbias, x) / m - xhat * _broadcast(dweight, x) / m)
    return dx.to(x.dtype), dweight, dbias


def _setup_train(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, weight, _, eps = inputs
    _, mean, m2, inv_std = output
    ctx.save_for_backward(x, weight, mean, m2, inv_std)
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, m2, inv_std)


def _backward_train(
    ctx: Any, dy: Tensor, *_: Any, kernel: Any = None
) -> tuple[Any, ...]:
    x, weight, mean, m2, inv_std = ctx.saved_tensors
    if torch.is_grad_enabled():  # the backward will be differentiated again
        dx, dweight, dbias = _composite_train(dy, x, weight, ctx.eps)
    else:
        kernel = kernel or backward_train
        dx, dweight, dbias = kernel(dy, x, weight, mean, m2, inv_std, ctx.eps)
    dtype = weight.dtype if weight is not None else x.dtype
    return (
        dx,
        None if weight is None else dweight.to(dtype),
        dbias.to(dtype) if ctx.needs_input_grad[2] else None,
        None,
    )


forward_train.register_autograd(_backward_train, setup_context=_setup_train)


# -- eval forward ---------------------------------------------------------------


@torch.library.custom_op("batchnorm::forward_eval", mutates_args=())
def forward_eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    """``x`` normalized with the running statistics."""
    return _eval(x, weight, bias, running_mean, running_var, eps)


def _eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    y, target = _output(x)
    order = _order(x)
    F.forward_eval(
        _np(x, order),
        _param(weight),
        _param(bias),
        _param(running_mean),
        _param(running_var),
        axis=x.dim() - 1 if order else 1,
        eps=eps,
        out=_np(target, order),
    )
    if target is not y:
        y.copy_(target)
    return y


@forward_eval.register_fake
def _(x, weight, bias, running_mean, running_var, eps):
    return _like(x)


@torch.library.custom_op("batchnorm::backward_eval", mutates_args=())
def backward_eval(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`forward_eval` (statistics constant)."""
    return _eval_grad(dy, x, weight, running_mean, running_var, eps)


def _eval_grad(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, target = _output(x)
    order = _order(x)
    _, dgamma, dbeta = F.backward_eval(
        _np(dy, order),
        _np(x, order),
        _param(weight),
        _param(running_mean),
        _param(running_var),
        axis=x.dim() - 1 if order else 1,
        eps=eps,
        out=_np(target, order),
    )
    if target is not dx:
        dx.copy_(target)
    dweight, dbias = _tensors(dgamma, dbeta)
    return dx, dweight, dbias


@backward_eval.register_fake
def _(dy, x, weight, running_mean, running_var, eps):
    channels = x.shape[1]
    return (
        _like(x),
        x.new_empty(channels, dtype=torch.float64),
        x.new_empty(channels, dtype=torch.float64),
    )


def _composite_eval(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    dims = [d for d in range(x.dim()) if d != 1]
    inv_std = torch.rsqrt(_broadcast(running_var.double(), x) + eps)
    xhat = (x.double() - _broadcast(running_mean.double(), x)) * inv_std
    dy64 = dy.double()
    gain = inv_std if weight is None else inv_std * _broadcast(weight.double(), x)
    return (dy64 * gain).to(x.dtype), (dy64 * xhat).sum(dims), dy64.sum(dims)


def _setup_eval(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, weight, _, running_mean, running_var, eps = inputs
    ctx.save_for_backward(x, weight, running_mean, running_var)
    ctx.eps = eps


def _backward_eval(ctx: Any, dy: Tensor, kernel: Any = None) -> tuple[Any, ...]:
    x, weight, running_mean, running_var = ctx.saved_tensors
    args = (dy, x, weight, running_mean, running_var, ctx.eps)
    if torch.is_grad_enabled():
        dx, dweight, dbias = _composite_eval(*args)
    else:
        dx, dweight, dbias = (kernel or backward_eval)(*args)
    dtype = weight.dtype if weight is not None else x.dtype
    return (
        dx,
        None if weight is None else dweight.to(dtype),
        dbias.to(dtype) if ctx.needs_input_grad[2] else None,
        None,
        None,
        None,
    )


forward_eval.register_autograd(_backward_eval, setup_context=_setup_eval)


# -- eager mode -------------------------------------------------------------------
#
# The registered operators are what torch.compile and torch.export see. Called
# eagerly, torch.library's dispatch, dynamo guards and autograd wrappers cost
# about 0.3 ms a call, which rules a small layer; eager calls therefore go
# through these autograd Functions, which run the same kernels and the same
# backward (composite when differentiated twice).


class _Train(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        output = _train(x, weight, bias, eps)
        _setup_train(ctx, (x, weight, bias, eps), output)
        return output

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_: Any) -> tuple[Any, ...]:
        return _backward_train(ctx, dy, kernel=_train_grad)


class _Eval(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
    ) -> Tensor:
        inputs = (x, weight, bias, running_mean, running_var, eps)
        _setup_eval(ctx, inputs, None)
        return _eval(*inputs)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:
        return _backward_eval(ctx, dy, kernel=_eval_grad)


def train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`forward_train` with autograd: the operator when compiling, else
    the eager path (same kernels, less dispatch)."""
    if _compiling():
        return torch.ops.batchnorm.forward_train(x, weight, bias, eps)
    return _Train.apply(x, weight, bias, eps)


def evaluate(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    """:func:`forward_eval` with autograd (see :func:`train`)."""
    if _compiling():
        return torch.ops.batchnorm.forward_eval(
            x, weight, bias, running_mean, running_var, eps
        )
    return _Eval.apply(x, weight, bias, running_mean, running_var, eps)
