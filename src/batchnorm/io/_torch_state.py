"""PyTorch state dicts: to and from ours, and ``.pt``/``.pth`` files.

The conventions converted, and the key names, are described in
:mod:`batchnorm.io.pytorch`, which re-exports the public functions here. torch is
imported only when a function here is called.
"""

from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from batchnorm.io._atomic import atomic_write
from batchnorm.io._structure import (
    FormatError,
    Network,
    build,
    check_declared,
    describe,
    fill,
    layer_prefix,
    layers_of,
)
from batchnorm.layer import BatchNorm
from batchnorm.nn.conv import Conv2d
from batchnorm.nn.layers import Linear

__all__ = [
    "exported_stats",
    "load",
    "load_state_dict",
    "read_state_dict",
    "recorded",
    "records_structure",
    "save",
    "structure_of",
    "to_state_dict",
    "torch_module",
]

_TORCH_BN = {"weight": "gamma", "bias": "beta"}


def torch_module() -> Any:
    """``torch``, imported on first use."""
    import torch

    return torch


def exported_stats(layer: BatchNorm) -> tuple[np.ndarray, float]:
    """Running variance and ε as PyTorch must see them (ε inside the root)."""
    var = layer.running_var.astype(np.float64)
    if layer.eps_placement == "outside":
        return var + 2 * layer.eps * np.sqrt(var), layer.eps**2
    return var, layer.eps


def to_state_dict(obj: Any) -> OrderedDict[str, Any]:
    """A PyTorch ``state_dict`` (CPU tensors) of a BatchNorm or harness network.

    Examples
    --------
    >>> import batchnorm as bn
    >>> sd = to_state_dict(bn.BatchNorm(2))        # doctest: +SKIP
    >>> sorted(sd)                                 # doctest: +SKIP
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """
    torch = torch_module()
    state: OrderedDict[str, Any] = OrderedDict()
    metadata: dict[str, Any] = {"": {"batchnorm": json.dumps(structure_of(obj))}}
    for index, layer in enumerate(layers_of(obj)):
        p = layer_prefix(obj, index)
        if isinstance(layer, BatchNorm):
            var, eps = exported_stats(layer)
            if layer.gamma is not None and layer.beta is not None:
                state[p + "weight"] = torch.from_numpy(layer.gamma.copy())
                state[p + "bias"] = torch.from_numpy(layer.beta.copy())
            state[p + "running_mean"] = torch.from_numpy(layer.running_mean.copy())
            state[p + "running_var"] = torch.from_numpy(var.astype(layer.dtype))
            state[p + "num_batches_tracked"] = torch.tensor(
                layer.num_batches_tracked, dtype=torch.int64
            )
            conventions = {
                "momentum_ours": layer.momentum,
                "momentum_torch": None
                if layer.momentum is None
                else 1 - layer.momentum,
                "eps": layer.eps,
                "eps_placement": layer.eps_placement,
                "torch_eps": eps,
                "running_var_kind": layer.running_var_kind,
                "num_values_seen": int(layer.num_values_seen),
            }
            metadata[p.rstrip(".")] = {
                "version": 2,
                "batchnorm": json.dumps(conventions),
            }
        elif isinstance(layer, Conv2d | Linear):
            state[p + "weight"] = torch.from_numpy(layer.weight.copy())
            if layer.bias is not None:
                state[p + "bias"] = torch.from_numpy(layer.bias.copy())
    state._metadata = metadata  # type: ignore[attr-defined]
    return state


def save(obj: Any, path: Any) -> None:
    """Write :func:`to_state_dict` of ``obj`` to ``path`` (``torch.save``, atomic)."""
    torch = torch_module()
    state = to_state_dict(obj)
    atomic_write(path, lambda file: torch.save(state, file))


def read_state_dict(path: Any) -> Mapping[str, Any]:
    """The state dict in a ``.pt``/``.pth`` file, read with ``weights_only=True``.

    A checkpoint that wraps it as ``{"state_dict": ...}`` is unwrapped. Only
    tensors and plain containers are unpickled; a file holding other Python
    objects is refused, never executed.

    Raises
    ------
    FileNotFoundError
    batchnorm.io.FormatError
        An empty, truncated or corrupt file, one that holds other objects, or
        one whose content is not a dict.
    """
    torch = torch_module()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises a dozen kinds for a damaged file
        raise FormatError(f"{path}: {_unreadable(exc)}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise FormatError(
            f"{path}: holds a {type(state).__name__}, not a state dict (a dict of "
            "tensors by name)."
        )
    return state


def _unreadable(exc: Exception) -> str:
    """Why torch.load failed, without torch's advice to unpickle anything."""
    if isinstance(exc, OSError):
        return f"cannot read: {exc.strerror or exc}."
    if isinstance(exc, pickle.UnpicklingError):
        return (
            "not a PyTorch state dict: the file is corrupt, or holds Python objects "
            "other than tensors, which batchnorm does not unpickle."
        )
    detail = str(exc).split(". ")[0][:200]
    if "weights_only" in detail or not detail:
        detail = ""
    name = type(exc).__name__
    return f"truncated or corrupt file ({name}{': ' + detail if detail else ''})."


def load(path: Any, obj: Any = None, *, allow_nonfinite: bool = False) -> Any:
    """A BatchNorm or network from a ``.pt``/``.pth`` file; all or nothing.

    :func:`read_state_dict` then :func:`load_state_dict` into ``obj`` (``None``:
    the network recorded in the file). Every problem is a
    :class:`batchnorm.io.FormatError` that names the file.
    """
    state = read_state_dict(path)
    return load_state_dict(
        obj, state, allow_nonfinite=allow_nonfinite, source=str(path)
    )


def structure_of(obj: Any) -> dict[str, Any]:
    """The layer specs (as in the native format) recorded in a state dict."""
    return {
        "kind": "layer" if isinstance(obj, BatchNorm) else "network",
        "layers": [describe(layer) for layer in layers_of(obj)],
        "metadata": dict(getattr(obj, "metadata", {}) or {}),
    }


def records_structure(state: Any) -> bool:
    """Whether ``state`` was written by :func:`to_state_dict` (records its network)."""
    return isinstance(recorded(state, ""), dict)


def recorded(state: Any, key: str) -> Any:
    """What :func:`to_state_dict` recorded under ``_metadata[key]`` (None if absent).

    ``key`` is ``""`` for the network structure, a layer's index for its
    conventions.
    """
    metadata = getattr(state, "_metadata", None)
    entry = metadata.get(key, {}) if isinstance(metadata, Mapping) else {}
    raw = entry.get("batchnorm") if isinstance(entry, Mapping) else None
    try:
        return json.loads(raw) if isinstance(raw, str) else None
    except (json.JSONDecodeError, RecursionError):
        return None


def _recorded_structure(state: Any, source: str) -> tuple[list[Any], bool, Any]:
    """``(specs, single, metadata)`` recorded in a state dict, checked."""
    structure = recorded(state, "")
    if not isinstance(structure, dict):
        raise FormatError(
            f"{source}: this state_dict does not record its network structure (it "
            "was not written by batchnorm); pass the network to load it into."
        )
    specs, kind = structure.get("layers"), structure.get("kind")
    if not isinstance(specs, list) or kind not in ("layer", "network"):
        raise FormatError(
            f"{source}: the recorded structure needs 'kind' ('layer' or 'network') "
            f"and a list of 'layers'; got kind {kind!r}, layers {specs!r:.80}."
        )
    if kind == "layer" and (
        len(specs) != 1
        or not isinstance(specs[0], Mapping)
        or specs[0].get("type") != "BatchNorm"
    ):
        raise FormatError(
            f"{source}: a recorded 'layer' must hold exactly one BatchNorm."
        )
    metadata = structure.get("metadata")
    return specs, kind == "layer", metadata if isinstance(metadata, dict) else {}


def _as_array(key: str, value: Any, source: str) -> np.ndarray:
    try:
        if hasattr(value, "detach"):
            return np.asarray(value.detach().cpu().numpy())
        return np.asarray(value)
    except Exception as exc:  # bfloat16 and other dtypes NumPy lacks, ragged lists
        dtype = getattr(value, "dtype", type(value).__name__)
        raise FormatError(
            f"{source}: {key!r} ({dtype}) cannot be read as a NumPy array: {exc}. "
            "Convert it to float32 first."
        ) from None


def _count(value: Any, key: str, source: str) -> int:
    array = np.asarray(value)
    if array.size != 1 or not np.issubdtype(array.dtype, np.integer):
        raise FormatError(
            f"{source}: num_batches_tracked {key!r} must be one integer; got an "
            f"array of shape {array.shape} and dtype {array.dtype}."
        )
    return int(array.reshape(()))


def load_state_dict(
    obj: Any,
    state: Mapping[str, Any] | None = None,
    *,
    allow_nonfinite: bool = False,
    source: str = "state_dict",
) -> Any:
    """Copy a PyTorch ``state_dict`` into ``obj``; all or nothing; returns ``obj``.

    ``obj`` may be ``None`` when ``state`` was written by :func:`to_state_dict`:
    the network recorded in it is rebuilt, after its sizes are checked against
    the tensors. Keys, shapes and finiteness are checked
    (:class:`batchnorm.io.FormatError`, with ``source`` naming the file).
    """
    if state is None or not isinstance(state, Mapping):
        raise TypeError(
            f"state must be a mapping (a state_dict); got {type(state).__name__}."
        )
    specs: list[Any] | None = None
    single = False
    if obj is None:
        specs, single, metadata = _recorded_structure(state, source)
        norms = {
            ("" if single else f"{i}.")
            for i, spec in enumerate(specs)
            if isinstance(spec, Mapping) and spec.get("type") == "BatchNorm"
        }
    else:
        norms = {
            layer_prefix(obj, i)
            for i, layer in enumerate(layers_of(obj))
            if isinstance(layer, BatchNorm)
        }
    arrays: dict[str, np.ndarray] = {}
    counters: dict[str, dict[str, int]] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise FormatError(
                f"{source}: key {key!r} is not a string; a state dict maps names "
                "to tensors."
            )
        p, _, name = key.rpartition(".")
        p = p + "." if p else ""
        if p in norms and name == "num_batches_tracked":
            counters.setdefault(p, {})["num_batches_tracked"] = _count(
                _as_array(key, value, source), key, source
            )
            continue
        if p in norms:
            name = _TORCH_BN.get(name, name)
        arrays[p + name] = _as_array(key, value, source)
    if specs is not None:
        shapes = {k: v.shape for k, v in arrays.items()}
        check_declared(specs, shapes, single=single, source=source)
        try:
            layers = [build(spec) for spec in specs]
        except FormatError as exc:
            raise FormatError(f"{source}: {exc}") from None
        obj = layers[0] if single else Network(layers, metadata)
    for p in norms:
        layer = obj if p == "" else layers_of(obj)[int(p[:-1])]
        conv = recorded(state, p.rstrip(".")) or {}
        counters.setdefault(p, {}).setdefault("num_batches_tracked", 0)
        try:
            counters[p]["num_values_seen"] = int(conv.get("num_values_seen", 0) or 0)
            eps = float(conv.get("eps", 0.0))
        except (TypeError, ValueError) as exc:
            raise FormatError(
                f"{source}: the conventions recorded for {p or 'the layer'} are "
                f"invalid: {exc}."
            ) from None
        var = arrays.get(p + "running_var")
        if (
            var is not None
            and conv.get("eps_placement") == "outside"
            and (layer.eps_placement == "outside")
        ):
            root = -eps + np.sqrt(eps * eps + np.maximum(var.astype(np.float64), 0))
            arrays[p + "running_var"] = (root * root).astype(var.dtype)
    fill(
        obj,
        arrays,
        counters,
        source=source,
        allow_nonfinite=allow_nonfinite,
        strict_dtype=False,
    )
    return obj
