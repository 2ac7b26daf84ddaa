"""The one network walker: every layer of a network, nested containers included.

A container is anything with a ``layers`` list (:class:`~batchnorm.nn.Sequential`);
everything that visits a network's layers (training modes, inference tools,
synchronized conversion, file formats) goes through here, so a BatchNorm inside a
nested ``Sequential`` is never missed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from batchnorm.layer import BatchNorm

__all__ = ["batch_norms", "children", "replace_batch_norms", "walk"]


def children(model: Any) -> list[Any]:
    """The layers directly inside ``model``; ``[model]`` for a lone layer."""
    layers = getattr(model, "layers", None)
    return [model] if layers is None else list(layers)


def walk(model: Any) -> Iterator[Any]:
    """Every layer of ``model`` depth first, in forward order (containers too).

    >>> import batchnorm as bn
    >>> from batchnorm.nn import ReLU, Sequential
    >>> net = Sequential([ReLU(), Sequential([bn.BatchNorm(2)])])
    >>> [type(layer).__name__ for layer in walk(net)]
    ['Sequential', 'ReLU', 'Sequential', 'BatchNorm']
    """
    yield model
    layers = getattr(model, "layers", None)
    for layer in layers or ():
        yield from walk(layer)


def batch_norms(model: Any) -> list[BatchNorm]:
    """Every :class:`~batchnorm.BatchNorm` in ``model`` (subclasses too), in order."""
    return [layer for layer in walk(model) if isinstance(layer, BatchNorm)]


def replace_batch_norms(model: Any, convert: Callable[[BatchNorm], Any]) -> Any:
    """``model`` with every BatchNorm ``b`` replaced by ``convert(b)``, in place.

    Returns the converted layer when ``model`` itself is a BatchNorm.
    """
    if isinstance(model, BatchNorm):
        return convert(model)
    layers: list[Any] = getattr(model, "layers", [])
    for index, layer in enumerate(layers):
        layers[index] = replace_batch_norms(layer, convert)
    return model
