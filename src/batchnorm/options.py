"""The BatchNorm layer's options: one frozen dataclass, checked once when built.

Options the layer shares with the functional API (``eps``, ``momentum``, ...) are
checked by the same functions as there (:mod:`batchnorm._validation`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from batchnorm import kernels
from batchnorm._validation import (
    EPS_PLACEMENTS,
    ON_NONFINITE,
    RUNNING_VAR_KINDS,
    bad_channels,
    check_choice,
    check_ddof,
    check_eps,
    check_momentum,
)
from batchnorm.presets import PARAMETER_DTYPES
from batchnorm.renorm import check_renorm_limits


@dataclass(frozen=True)
class LayerOptions:
    """How a :class:`~batchnorm.BatchNorm` normalizes; every field is checked here.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    axis : int, default 1
        Channel axis of the input; ``-1`` for channels-last, ``0`` for (C, N, ...).
    eps : float > 0, default 1e-6
    momentum : float in [0, 1] or None, default 0.99
        Weight on the OLD running value (PyTorch's 0.1 is our 0.9). ``None``: exact
        cumulative statistics of every value seen.
    running_var_kind : {"unbiased", "biased"}
    affine : bool, default True
        Learn γ and β; when False they are ``None`` (γ = 1, β = 0).
    eps_placement : {"inside", "outside"}
    ddof : {0, 1}
        Normalizing variance; see :func:`batchnorm.functional.forward_train`.
    on_nonfinite : {"raise", "skip"}
        What a batch with NaN/inf statistics does; running stats never take them.
    initial_running_mean, initial_running_var : float, default 0 and 1
    dtype : numpy dtype, default float32
        Dtype of γ, β and the running statistics.
    backend : {"numpy", "numba"} or None
    reuse_buffers : bool, default False
        Write each output (``y`` of the forward pass, ``dx`` of the backward pass)
        into an array the layer keeps and reuses on the next call of the same
        shape, instead of allocating a new one. The array returned by one call is
        then overwritten by the next: copy it if you need it longer. A buffer that
        shares memory with the call's input is never used for its output. (On the
        Numba backend new large outputs already reuse the blocks of outputs you
        have dropped, see ``batchnorm.release_buffers``; this option also keeps
        the address fixed and covers the NumPy backend.)
    virtual_batch_size : int >= 2 or None, default None
        Ghost batch norm: in training, each run of ``virtual_batch_size``
        consecutive samples (axis 0) is normalized with its own statistics; a
        remainder is its own group when it has m >= 2 values per channel and joins
        the previous group otherwise (:func:`batchnorm.ghost.group_slices`). The
        running statistics take one update per group, in order, as if the groups
        were separate batches (``num_batches_tracked`` counts groups). The gradient
        is exact (each group is an independent batch norm). Eval mode is unaffected
        and takes any batch size.
    renorm : bool, default False
        Batch renormalization (Ioffe, 2017): in training ``y = γ (x̂ r + d) + β``
        with r, d from the running statistics, clipped by ``rmax``, ``dmax`` and
        held constant in backward; see :mod:`batchnorm.renorm`. Combined with
        ``virtual_batch_size``, each group is renormalized in turn.
    rmax, dmax : float, default 3 and 5
        Initial clipping limits of renorm (``rmax >= 1``, ``dmax >= 0``; ``inf``
        clips nothing). The layer keeps them as plain attributes that a trainer
        sets every step, e.g. from :func:`batchnorm.renorm.renorm_schedule`.

    Examples
    --------
    >>> LayerOptions(4, momentum=0.9).config()["momentum"]
    0.9
    >>> LayerOptions(4, ddof=2)
    Traceback (most recent call last):
    ...
    ValueError: ddof must be 0 (biased variance, the seed) or 1 (darknet's m-1); got 2.
    """

    num_features: int
    axis: int = 1
    eps: float = 1e-6
    momentum: float | None = 0.99
    running_var_kind: str = "unbiased"
    affine: bool = True
    eps_placement: str = "inside"
    ddof: int = 0
    on_nonfinite: str = "raise"
    initial_running_mean: float = 0.0
    initial_running_var: float = 1.0
    dtype: Any = np.float32
    backend: str | None = None
    reuse_buffers: bool = False
    virtual_batch_size: int | None = None
    renorm: bool = False
    rmax: float = 3.0
    dmax: float = 5.0

    def __post_init__(self) -> None:
        checked = {
            "num_features": check_num_features(self.num_features),
            "axis": check_layer_axis(self.axis),
            "eps": check_eps(self.eps),
            "momentum": check_momentum(self.momentum),
            "running_var_kind": check_choice(
                self.running_var_kind, "running_var_kind", RUNNING_VAR_KINDS
            ),
            "eps_placement": check_choice(
                self.eps_placement, "eps_placement", EPS_PLACEMENTS
            ),
            "ddof": check_ddof(self.ddof),
            "on_nonfinite": check_choice(
                self.on_nonfinite, "on_nonfinite", ON_NONFINITE
            ),
            "affine": bool(self.affine),
            "dtype": check_parameter_dtype(self.dtype),
            "backend": check_backend(self.backend),
            "reuse_buffers": bool(self.reuse_buffers),
            "virtual_batch_size": check_virtual_batch_size(self.virtual_batch_size),
            "renorm": bool(self.renorm),
        }
        checked["rmax"], checked["dmax"] = check_renorm_limits(self.rmax, self.dmax)
        checked["initial_running_mean"], checked["initial_running_var"] = (
            check_initial_running_stats(
                self.initial_running_mean, self.initial_running_var
            )
        )
        if checked["virtual_batch_size"] is not None and checked["axis"] == 0:
            raise ValueError(
                "virtual_batch_size splits the batch along axis 0, but axis=0 makes "
                "axis 0 the channel axis; got axis=0 with virtual_batch_size="
                f"{checked['virtual_batch_size']}. Put the batch first (N, C, ...) "
                "with axis=1, or drop virtual_batch_size."
            )
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def eval_arguments(self) -> dict[str, Any]:
        """Keyword arguments of the functional eval calls (``forward_eval``, ...)."""
        return {
            "axis": self.axis,
            "eps": self.eps,
            "eps_placement": self.eps_placement,
            "backend": self.backend,
        }

    def train_arguments(self) -> dict[str, Any]:
        """Keyword arguments of the functional training calls (``forward_train``,
        ``forward_renorm``, ``forward_from_moments``)."""
        return {**self.eval_arguments(), "ddof": self.ddof}

    def config(self) -> dict[str, Any]:
        """The constructor arguments, as plain values (``dtype`` by name)."""
        config = {field.name: getattr(self, field.name) for field in fields(self)}
        config["dtype"] = self.dtype.name
        return config


#: Option names; a layer reads each of them through to its :class:`LayerOptions`.
OPTION_NAMES = frozenset(field.name for field in fields(LayerOptions))


def check_num_features(num_features: Any) -> int:
    """C, the number of channels: an int >= 1."""
    if isinstance(num_features, bool) or not isinstance(num_features, int | np.integer):
        raise TypeError(
            f"num_features must be an int (the number of channels C); got "
            f"{type(num_features).__name__}."
        )
    if num_features < 1:
        raise ValueError(
            f"num_features must be >= 1; got {num_features}. Pass the number of "
            "channels C of the input (x.shape[axis])."
        )
    return int(num_features)


def check_layer_axis(axis: Any) -> int:
    """The channel axis: an int (each input checks it against its rank)."""
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis must be an int; got {type(axis).__name__}.")
    return int(axis)


def check_parameter_dtype(dtype: Any) -> np.dtype:
    """The dtype of γ, β and the running statistics: float16, float32 or float64."""
    dtype = np.dtype(dtype)
    if dtype not in PARAMETER_DTYPES:
        raise TypeError(
            f"dtype (of γ, β and the running statistics) must be float16, "
            f"float32 or float64; got {dtype}. Inputs may be bfloat16; "
            "parameters stay in a NumPy float dtype (float32 is the default)."
        )
    return dtype


def check_backend(backend: str | None) -> str | None:
    """A backend name, or None (``$BATCHNORM_BACKEND``, else the fastest installed)."""
    if backend is not None and backend not in kernels.BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(map(repr, kernels.BACKENDS))} "
            f"or None (use $BATCHNORM_BACKEND, else the fastest); got {backend!r}."
        )
    return backend


def check_initial_running_stats(mean: Any, var: Any) -> tuple[float, float]:
    """Floats: a finite initial running mean, a finite initial running var >= 0."""
    mean, var = float(mean), float(var)
    if (
        bad_channels([mean], "running_mean").size
        or bad_channels([var], "running_var").size
    ):
        raise ValueError(
            "initial_running_mean must be finite and initial_running_var finite "
            f"and >= 0; got {mean} and {var}. The defaults are 0 and 1 (darknet: 0 "
            "and 0)."
        )
    return mean, var


def check_virtual_batch_size(value: Any) -> int | None:
    """``None`` or an int >= 2."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"virtual_batch_size must be an int >= 2 or None; got "
            f"{type(value).__name__}."
        )
    if value < 2:
        raise ValueError(
            f"virtual_batch_size must be >= 2 samples (a group of one sample has no "
            f"batch variance for dense inputs); got {value}. Use None to normalize "
            "the whole batch at once."
        )
    return int(value)
