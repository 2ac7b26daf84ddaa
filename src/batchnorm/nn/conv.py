"""Image layers of the harness: Conv2d (im2col + BLAS), MaxPool2d, GlobalAvgPool.

All take and return NCHW arrays, so a following ``batchnorm.BatchNorm(C)`` with its
default ``axis=1`` normalizes per channel over (N, H, W), as the seed describes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from batchnorm.nn.layers import (
    Module,
    Parameter,
    _require_forward,
    _rng_of,
    init_weight,
)

__all__ = ["Conv2d", "GlobalAvgPool", "MaxPool2d"]


def _check_nchw(x: np.ndarray, name: str, channels: int | None = None) -> None:
    if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
        expected = f"(N, {channels}, H, W)" if channels is not None else "(N, C, H, W)"
        raise ValueError(
            f"{name} expects x of shape {expected}; got {x.shape}. For 8×8 grey "
            "images stored as rows of 64, use x.reshape(-1, 1, 8, 8)."
        )


def _windows(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """View of shape (N, C, H_out, W_out, kernel, kernel); no copy."""
    view = sliding_window_view(x, (kernel, kernel), axis=(2, 3))
    return view[:, :, ::stride, ::stride]


class Conv2d(Module):
    """2-D convolution (cross-correlation, as every framework computes it).

    ``y[n, f, i, j] = Σ_{c, a, b} weight[f, c, a, b] · x_pad[n, c, s·i + a, s·j + b]
    + bias[f]``, computed as one matrix product of the im2col matrix
    (N·H_out·W_out, C·k·k) with the weights (C·k·k, F).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int
        Square kernels only.
    stride : int, default 1
    padding : int, default 0
        Zeros on each side of H and W. ``H_out = (H + 2·padding − k) // stride + 1``.
    bias : bool, default True
        ``False`` when a BatchNorm follows (its β replaces the bias).
    rng, init, dtype
        As in :class:`batchnorm.nn.Linear`; ``fan_in = C·k·k``.

    Examples
    --------
    >>> import numpy as np
    >>> conv = Conv2d(1, 4, 3, padding=1, rng=0)
    >>> y = conv(np.zeros((2, 1, 8, 8), np.float32))
    >>> y.shape, conv.backward(np.ones_like(y)).shape
    ((2, 4, 8, 8), (2, 1, 8, 8))
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        rng: np.random.Generator | int | None = None,
        init: str | float = "he",
        dtype: Any = np.float32,
    ) -> None:
        if kernel_size < 1 or stride < 1 or padding < 0:
            raise ValueError(
                f"Conv2d needs kernel_size >= 1, stride >= 1, padding >= 0; got "
                f"{kernel_size}, {stride}, {padding}."
            )
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        shape = (self.out_channels, self.in_channels, kernel_size, kernel_size)
        fan_in = self.in_channels * kernel_size * kernel_size
        self.weight = init_weight(_rng_of(rng), shape, fan_in, init, dtype)
        self.bias = np.zeros(self.out_channels, dtype) if bias else None
        self.grad_weight: np.ndarray | None = None
        self.grad_bias: np.ndarray | None = None
        self._cache: tuple[np.ndarray, tuple[int, ...]] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        _check_nchw(x, "Conv2d", self.in_channels)
        p, k = self.padding, self.kernel_size
        if p:
            x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        if x.shape[2] < k or x.shape[3] < k:
            raise ValueError(
                f"Conv2d kernel {k} is larger than the padded input {x.shape[2:]}."
            )
        windows = _windows(x, k, self.stride)  # (N, C, Ho, Wo, k, k)
        n, c, h_out, w_out = windows.shape[:4]
        cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h_out * w_out, -1)
        y = cols @ self.weight.reshape(self.out_channels, -1).T  # (N·Ho·Wo, F)
        if self.bias is not None:
            y += self.bias
        self._cache = (cols, x.shape)
        return np.ascontiguousarray(
            y.reshape(n, h_out, w_out, self.out_channels).transpose(0, 3, 1, 2)
        )

    def backward(self, dy: np.ndarray) -> np.ndarray:
        cols, padded_shape = _require_forward(self._cache, "Conv2d")
        n, f, h_out, w_out = dy.shape
        dy_mat = dy.transpose(0, 2, 3, 1).reshape(-1, f)  # (N·Ho·Wo, F)
        w_mat = self.weight.reshape(f, -1)
        self.grad_weight = (dy_mat.T @ cols).reshape(self.weight.shape)
        self.grad_weight = self.grad_weight.astype(self.weight.dtype, copy=False)
        if self.bias is not None:
            self.grad_bias = dy_mat.sum(axis=0).astype(self.bias.dtype, copy=False)
        k, s, p = self.kernel_size, self.stride, self.padding
        dcols = (dy_mat @ w_mat).reshape(n, h_out, w_out, self.in_channels, k, k)
        dx = np.zeros(padded_shape, dtype=dcols.dtype)
        # col2im: each kernel offset (a, b) scatters to a strided slice; the
        # slices of different offsets overlap, so they are added one at a time.
        for a in range(k):
            for b in range(k):
                dx[:, :, a : a + s * h_out : s, b : b + s * w_out : s] += dcols[
                    :, :, :, :, a, b
                ].transpose(0, 3, 1, 2)
        if p:
            dx = dx[:, :, p:-p, p:-p]
        return dx

    def parameters(self) -> Iterator[Parameter]:
        yield "weight", self.weight, self.grad_weight
        if self.bias is not None:
            yield "bias", self.bias, self.grad_bias

    def __repr__(self) -> str:
        return (
            f"Conv2d({self.in_channels}, {self.out_channels}, {self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, "
            f"bias={self.bias is not None})"
        )


class MaxPool2d(Module):
    """Maximum over ``kernel × kernel`` windows; the gradient goes to the first
    maximum of each window.

    Examples
    --------
    >>> import numpy as np
    >>> pool = MaxPool2d(2)
    >>> pool(np.arange(16.0).reshape(1, 1, 4, 4))
    array([[[[ 5.,  7.],
             [13., 15.]]]])
    """

    def __init__(self, kernel_size: int, stride: int | None = None) -> None:
        stride = kernel_size if stride is None else stride
        if kernel_size < 1 or stride < 1:
            raise ValueError(
                f"MaxPool2d needs kernel_size >= 1 and stride >= 1; got {kernel_size} "
                f"and {stride}. A window of 0 values has no maximum."
            )
        self.kernel_size, self.stride = int(kernel_size), int(stride)
        self._cache: tuple[np.ndarray, tuple[int, ...]] | None = None

    def _tiles(self, shape: tuple[int, ...]) -> bool:
        """Non-overlapping windows that cover the input exactly (the common case)."""
        k = self.kernel_size
        return self.stride == k and shape[2] % k == 0 and shape[3] % k == 0

    def forward(self, x: np.ndarray) -> np.ndarray:
        _check_nchw(x, "MaxPool2d")
        k = self.kernel_size
        n, c, h, w = x.shape
        if self._tiles(x.shape):  # one reshape-copy instead of a strided gather
            flat = x.reshape(n, c, h // k, k, w // k, k).transpose(0, 1, 2, 4, 3, 5)
            flat = flat.reshape(n, c, h // k, w // k, k * k)
        else:
            windows = _windows(x, k, self.stride)
            flat = windows.reshape(*windows.shape[:4], k * k)
        argmax = flat.argmax(axis=-1)
        self._cache = (argmax, x.shape)
        return np.take_along_axis(flat, argmax[..., None], axis=-1)[..., 0]

    def backward(self, dy: np.ndarray) -> np.ndarray:
        argmax, shape = _require_forward(self._cache, "MaxPool2d")
        k, s = self.kernel_size, self.stride
        n, c, h_out, w_out = argmax.shape
        if self._tiles(shape):
            routed = np.where(argmax[..., None] == np.arange(k * k), dy[..., None], 0)
            routed = routed.reshape(n, c, h_out, w_out, k, k).transpose(
                0, 1, 2, 4, 3, 5
            )
            return routed.reshape(shape).astype(dy.dtype, copy=False)
        dx = np.zeros(shape, dtype=dy.dtype)
        for offset in range(k * k):
            a, b = divmod(offset, k)
            dx[:, :, a : a + s * h_out : s, b : b + s * w_out : s] += np.where(
                argmax == offset, dy, 0
            )
        return dx

    def __repr__(self) -> str:
        return f"MaxPool2d({self.kernel_size}, stride={self.stride})"


class GlobalAvgPool(Module):
    """Mean over H and W: (N, C, H, W) → (N, C)."""

    def __init__(self) -> None:
        self._shape: tuple[int, ...] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        _check_nchw(x, "GlobalAvgPool")
        self._shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, dy: np.ndarray) -> np.ndarray:
        n, c, h, w = _require_forward(self._shape, "GlobalAvgPool")
        return np.broadcast_to(dy[:, :, None, None] / (h * w), (n, c, h, w)).copy()

    def __repr__(self) -> str:
        return "GlobalAvgPool()"
