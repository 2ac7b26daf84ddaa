"""Dense layers, activations and the Sequential container of the training harness.

Every layer has ``forward(x)`` (also ``layer(x)``), ``backward(dy) -> dx`` for the
last forward pass, and ``parameters()`` yielding ``(name, value, grad)`` triples
exactly like :meth:`batchnorm.BatchNorm.parameters`; optimizers update ``value`` in
place. Layers keep what their backward pass needs from the last forward pass and
nothing else. :class:`batchnorm.BatchNorm` is used as a layer as it is: it already
follows this protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np

__all__ = [
    "Flatten",
    "Layer",
    "Linear",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "init_weight",
]

#: ``(name, value, grad)``: ``grad`` is ``None`` before the first backward pass.
Parameter = tuple[str, np.ndarray, np.ndarray | None]


class Layer(Protocol):
    """What :class:`Sequential` and the optimizers need from a layer."""

    def forward(self, x: np.ndarray) -> np.ndarray: ...

    def backward(self, dy: np.ndarray) -> np.ndarray: ...

    def parameters(self) -> Iterator[Parameter]: ...


def _require_forward(cached: Any, name: str) -> Any:
    if cached is None:
        raise RuntimeError(
            f"{name}.backward() called before forward(): run layer(x) first, then "
            "layer.backward(dy) with dy shaped like the output."
        )
    return cached


class Module:
    """Base of the harness layers: ``__call__`` is ``forward``; no parameters."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def parameters(self) -> Iterator[Parameter]:
        return iter(())

    def train(self) -> Module:
        return self

    def eval(self) -> Module:
        return self


def init_weight(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    fan_in: int,
    init: str | float,
    dtype: Any,
) -> np.ndarray:
    """Gaussian weights: ``"he"`` (std √(2/fan_in), for ReLU), ``"xavier"``
    (std √(1/fan_in), for sigmoid) or a float: that standard deviation."""
    if isinstance(init, str):
        gains = {"he": 2.0, "xavier": 1.0}
        if init not in gains:
            raise ValueError(
                f"init must be 'he', 'xavier' or a float std; got {init!r}."
            )
        std = float(np.sqrt(gains[init] / fan_in))
    else:
        std = float(init)
    return rng.normal(0.0, std, size=shape).astype(dtype)


def _rng_of(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


class Linear(Module):
    """``y = x @ weight.T + bias``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
        Use ``False`` when a BatchNorm follows: its β takes the bias's place
        (darknet does the same), and a bias before BN gets no gradient.
    rng : numpy Generator or int seed, optional
    init : "he", "xavier" or float, default "he"
        See :func:`init_weight`.
    dtype : numpy dtype, default float32

    Shapes: ``x`` (N, in_features) → ``y`` (N, out_features).

    Examples
    --------
    >>> import numpy as np
    >>> layer = Linear(3, 2, rng=0)
    >>> y = layer(np.ones((4, 3), np.float32))
    >>> dx = layer.backward(np.ones_like(y))
    >>> y.shape, dx.shape, [name for name, _, _ in layer.parameters()]
    ((4, 2), (4, 3), ['weight', 'bias'])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        rng: np.random.Generator | int | None = None,
        init: str | float = "he",
        dtype: Any = np.float32,
    ) -> None:
        self.in_features, self.out_features = int(in_features), int(out_features)
        shape = (self.out_features, self.in_features)
        self.weight = init_weight(_rng_of(rng), shape, self.in_features, init, dtype)
        self.bias = np.zeros(self.out_features, dtype) if bias else None
        self.grad_weight: np.ndarray | None = None
        self.grad_bias: np.ndarray | None = None
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"Linear expects x of shape (N, {self.in_features}); got {x.shape}. "
                "Put a Flatten() before it for image inputs."
            )
        self._x = x
        y = x @ self.weight.T
        if self.bias is not None:
            y += self.bias
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        x = _require_forward(self._x, "Linear")
        self.grad_weight = (dy.T @ x).astype(self.weight.dtype, copy=False)
        if self.bias is not None:
            self.grad_bias = dy.sum(axis=0).astype(self.bias.dtype, copy=False)
        return dy @ self.weight

    def parameters(self) -> Iterator[Parameter]:
        yield "weight", self.weight, self.grad_weight
        if self.bias is not None:
            yield "bias", self.bias, self.grad_bias

    def __repr__(self) -> str:
        return (
            f"Linear({self.in_features}, {self.out_features}, "
            f"bias={self.bias is not None})"
        )


class ReLU(Module):
    """``max(x, 0)``; NaN stays NaN (so divergence shows); the gradient at 0 is 0."""

    def __init__(self) -> None:
        self._mask: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._mask = x > 0
        return np.maximum(x, 0).astype(x.dtype, copy=False)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        mask = _require_forward(self._mask, "ReLU")
        return np.where(mask, dy, 0).astype(dy.dtype, copy=False)

    def __repr__(self) -> str:
        return "ReLU()"


class Sigmoid(Module):
    """``1 / (1 + exp(−x))``, computed without overflow for large ``|x|``."""

    def __init__(self) -> None:
        self._y: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        # exp of a non-positive number never overflows.
        z = np.exp(-np.abs(x))
        y = np.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z)).astype(x.dtype)
        self._y = y
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        y = _require_forward(self._y, "Sigmoid")
        return dy * y * (1 - y)

    def __repr__(self) -> str:
        return "Sigmoid()"


class Flatten(Module):
    """``(N, *)`` → ``(N, ∏ *)``."""

    def __init__(self) -> None:
        self._shape: tuple[int, ...] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return dy.reshape(_require_forward(self._shape, "Flatten"))

    def __repr__(self) -> str:
        return "Flatten()"


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    ``parameters()`` prefixes each name with the layer's index (``"0.weight"``,
    ``"1.gamma"``), so optimizers can tell BatchNorm's γ and β apart by name.
    ``train()`` and ``eval()`` are passed to every layer that has them.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> model = Sequential([Linear(4, 3, bias=False, rng=0), bn.BatchNorm(3), ReLU()])
    >>> y = model(np.ones((5, 4), np.float32))
    >>> [name for name, _, _ in model.parameters()]
    ['0.weight', '1.gamma', '1.beta']
    """

    def __init__(self, layers: Iterable[Any]) -> None:
        self.layers: list[Any] = list(layers)

    def __getitem__(self, index: int) -> Any:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def parameters(self) -> Iterator[Parameter]:
        for index, layer in enumerate(self.layers):
            for name, value, grad in layer.parameters():
                yield f"{index}.{name}", value, grad

    def train(self) -> Sequential:
        for layer in self.layers:
            if hasattr(layer, "train"):
                layer.train()
        return self

    def eval(self) -> Sequential:
        for layer in self.layers:
            if hasattr(layer, "eval"):
                layer.eval()
        return self

    def __repr__(self) -> str:
        inner = "".join(f"\n  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"


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
