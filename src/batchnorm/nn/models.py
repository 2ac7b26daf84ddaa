"""The demo's networks: an MLP, a small CNN, and Ioffe & Szegedy's Figure 1 network.

With ``batch_norm=True`` a :class:`batchnorm.BatchNorm` follows every hidden linear
or convolutional layer, before the nonlinearity, and that layer has no bias (β
replaces it, as in darknet).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batchnorm.layer import BatchNorm
from batchnorm.nn.conv import Conv2d, MaxPool2d
from batchnorm.nn.layers import Flatten, Linear, ReLU, Sequential, Sigmoid

__all__ = ["cnn", "mlp", "paper_mlp"]


def _batch_norm(channels: int, momentum: float, dtype: Any, backend: str | None) -> Any:
    # on_nonfinite="raise" (the default) on purpose: the training loop catches
    # NonFiniteStatisticsError and records the run as diverged.
    return BatchNorm(channels, momentum=momentum, dtype=dtype, backend=backend)


def mlp(
    *,
    batch_norm: bool,
    rng: np.random.Generator,
    in_features: int = 64,
    hidden: tuple[int, ...] = (100, 100),
    num_classes: int = 10,
    activation: str = "relu",
    bn_momentum: float = 0.9,
    dtype: Any = np.float32,
    backend: str | None = None,
) -> Sequential:
    """``[Linear → (BN) → activation] × len(hidden) → Linear``.

    ReLU networks use He initialization, sigmoid networks Xavier's.

    Examples
    --------
    >>> import numpy as np
    >>> mlp(batch_norm=True, rng=np.random.default_rng(0), hidden=(8,))[:3]
    [Linear(64, 8, bias=False), BatchNorm(8, ...), ReLU()]
    """
    act, init = {"relu": (ReLU, "he"), "sigmoid": (Sigmoid, "xavier")}[activation]
    layers: list[Any] = []
    width = in_features
    for size in hidden:
        layers.append(
            Linear(width, size, bias=not batch_norm, rng=rng, init=init, dtype=dtype)
        )
        if batch_norm:
            layers.append(_batch_norm(size, bn_momentum, dtype, backend))
        layers.append(act())
        width = size
    layers.append(Linear(width, num_classes, rng=rng, init="xavier", dtype=dtype))
    return Sequential(layers)


def paper_mlp(
    *, batch_norm: bool, rng: np.random.Generator, bn_momentum: float = 0.9, **kw: Any
) -> Sequential:
    """Ioffe & Szegedy (2015), Figure 1: three hidden layers of 100 sigmoid units."""
    return mlp(
        batch_norm=batch_norm,
        rng=rng,
        hidden=(100, 100, 100),
        activation="sigmoid",
        bn_momentum=bn_momentum,
        **kw,
    )


def cnn(
    *,
    batch_norm: bool,
    rng: np.random.Generator,
    channels: tuple[int, int] = (8, 16),
    num_classes: int = 10,
    bn_momentum: float = 0.9,
    dtype: Any = np.float32,
    backend: str | None = None,
) -> Sequential:
    """For (N, 1, 8, 8) digits: two ``conv3×3 → (BN) → ReLU → maxpool2`` blocks
    (8×8 → 4×4 → 2×2), then ``Flatten → Linear``."""
    layers: list[Any] = []
    width = 1
    for size in channels:
        conv = Conv2d(
            width, size, 3, padding=1, bias=not batch_norm, rng=rng, dtype=dtype
        )
        layers.append(conv)
        if batch_norm:
            layers.append(_batch_norm(size, bn_momentum, dtype, backend))
        layers += [ReLU(), MaxPool2d(2)]
        width = size
    layers += [
        Flatten(),
        Linear(width * 4, num_classes, rng=rng, init="xavier", dtype=dtype),
    ]
    return Sequential(layers)
