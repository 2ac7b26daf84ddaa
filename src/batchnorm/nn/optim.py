"""SGD with momentum and weight decay; the seed's and darknet's update rules through it.

The seed updates ``γ ← γ + rate · Σ(x̂ · δ)`` and ``β ← β + rate · Σ δ`` with
``δ = −∂L/∂y`` summed over the batch. Since ``∂L/∂γ = Σ(∂L/∂y · x̂)``, that is plain
gradient descent: ``SGD(lr=rate)`` on the summed loss, or ``SGD(lr=rate·batch)`` on
the mean loss. Darknet accumulates the summed gradients in ``*_updates`` arrays,
adds ``−decay·batch·w`` to the weights' (never to γ, β or biases), steps by
``lr/batch · updates`` and then scales the updates by ``momentum``; on the mean loss
that is exactly :class:`SGD` with ``lr``, ``momentum`` and ``weight_decay=decay``
(heavy-ball momentum, decay added to the gradient before momentum).
``tests/nn/test_optim.py`` checks both equivalences step by step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from batchnorm.nn.layers import Parameter

__all__ = ["SGD", "darknet_sgd", "seed_sgd", "takes_weight_decay"]

#: Parameter names (last component) that are never decayed: BatchNorm's γ and β,
#: and biases, as in darknet's update functions.
NO_DECAY = frozenset({"gamma", "beta", "bias"})


def takes_weight_decay(name: str) -> bool:
    """False for γ, β and biases (``"3.gamma"``, ``"0.bias"``), True otherwise."""
    return name.rsplit(".", 1)[-1] not in NO_DECAY


class SGD:
    """Stochastic gradient descent with heavy-ball momentum and weight decay.

    For every parameter ``w`` with gradient ``g``::

        g ← g + weight_decay · w        (only where decay(name) is true)
        v ← momentum · v + g
        w ← w − lr · v

    Parameters
    ----------
    model : object with ``parameters()``
        Yielding ``(name, value, grad)``; it is asked again at every step, because
        layers replace their gradient arrays on each backward pass.
    lr : float
    momentum : float in [0, 1), default 0
    weight_decay : float, default 0
    decay : callable(name) -> bool, default :func:`takes_weight_decay`
        Which parameters weight decay applies to (not BatchNorm's γ, β, nor biases).

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm.nn import Linear
    >>> layer = Linear(2, 1, rng=0)
    >>> _ = layer(np.ones((1, 2), np.float32)); _ = layer.backward(np.ones((1, 1)))
    >>> before = layer.weight.copy()
    >>> SGD(layer, lr=0.5).step()
    >>> layer.weight - before
    array([[-0.5, -0.5]], dtype=float32)
    """

    def __init__(
        self,
        model: Any,
        lr: float,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        decay: Callable[[str], bool] = takes_weight_decay,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0; got {lr}.")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}.")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0; got {weight_decay}.")
        self.model = model
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.decay = decay
        self.velocity: dict[str, np.ndarray] = {}

    def _parameters(self) -> Iterator[Parameter]:
        return iter(self.model.parameters())

    def step(self) -> None:
        """Update every parameter in place from its current gradient."""
        for name, value, grad in self._parameters():
            if grad is None:
                raise RuntimeError(
                    f"parameter {name!r} has no gradient: run model.backward(dy) "
                    "before optimizer.step()."
                )
            g = grad.astype(value.dtype, copy=True)
            if self.weight_decay and self.decay(name):
                g += self.weight_decay * value
            if self.momentum:
                v = self.velocity.get(name)
                g = g if v is None else self.momentum * v + g
                self.velocity[name] = g
            value -= self.lr * g


def seed_sgd(model: Any, rate: float, batch_size: int) -> SGD:
    """The seed's rule ``γ ← γ + rate·Σ(x̂·δ)``, ``β ← β + rate·Σδ`` for a mean loss.

    δ is the gradient of the *summed* loss, ``batch_size`` times that of the mean
    loss the harness uses, hence ``lr = rate · batch_size``.
    """
    return SGD(model, lr=rate * batch_size)


def darknet_sgd(
    model: Any, learning_rate: float, momentum: float = 0.9, decay: float = 0.0005
) -> SGD:
    """Darknet's update (``rate = learning_rate/batch`` on summed gradients,
    momentum kept in the gradient sums, decay on weights only) for a mean loss.

    The ``1/batch`` and darknet's summed gradients cancel, so the learning rate is
    darknet's ``learning_rate`` from the ``.cfg`` unchanged.
    """
    return SGD(model, lr=learning_rate, momentum=momentum, weight_decay=decay)
