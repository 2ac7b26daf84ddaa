"""Layers darknet and ONNX networks need that the harness lacks: Softmax, LeakyReLU.

They follow the harness protocol (``forward``, ``backward``, ``parameters``) so
that a network read from a darknet ``.cfg`` is an ordinary
:class:`batchnorm.nn.Sequential`.
"""

from __future__ import annotations

import numpy as np

from batchnorm.nn.layers import Module, _require_forward

__all__ = ["LeakyReLU", "Softmax"]


class Softmax(Module):
    """Softmax over axis 1 of (N, K) inputs (darknet's ``[softmax]`` with groups=1).

    >>> import numpy as np
    >>> Softmax()(np.zeros((1, 4), np.float32))
    array([[0.25, 0.25, 0.25, 0.25]], dtype=float32)
    """

    def __init__(self) -> None:
        self._y: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2:
            raise ValueError(
                f"Softmax expects x of shape (N, K); got {x.shape}. Put a Flatten() "
                "before it for image inputs."
            )
        z = np.exp(x - x.max(axis=1, keepdims=True))
        y = (z / z.sum(axis=1, keepdims=True)).astype(x.dtype, copy=False)
        self._y = y
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        y = _require_forward(self._y, "Softmax")
        return y * (dy - (dy * y).sum(axis=1, keepdims=True))

    def __repr__(self) -> str:
        return "Softmax()"


class LeakyReLU(Module):
    """``x`` for ``x > 0``, else ``slope · x`` (darknet's ``leaky``: slope 0.1).

    >>> import numpy as np
    >>> LeakyReLU()(np.array([[-1.0, 2.0]]))
    array([[-0.1,  2. ]])
    """

    def __init__(self, slope: float = 0.1) -> None:
        self.slope = float(slope)
        self._mask: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._mask = x > 0
        return np.where(self._mask, x, x * self.slope).astype(x.dtype, copy=False)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        mask = _require_forward(self._mask, "LeakyReLU")
        return np.where(mask, dy, dy * self.slope).astype(dy.dtype, copy=False)

    def __repr__(self) -> str:
        return f"LeakyReLU({self.slope})"
