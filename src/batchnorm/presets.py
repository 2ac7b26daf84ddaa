"""Presets (other systems' conventions in ours) and the BatchNorm state layout.

Momentum here always weighs the OLD running value (``run ← m·run + (1 − m)·batch``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from batchnorm._validation import bad_channels, bad_statistic_message, is_float_dtype

#: Conventions of other systems, expressed in ours (momentum on the OLD value).
PRESETS: dict[str, dict[str, Any]] = {
    # darknet's CPU code: (x - μ)/(√var + 1e-6) with var over m - 1, rolling
    # statistics allocated with calloc (start at 0), rolling = .99 old + .01 new.
    "darknet": {
        "eps": 1e-6,
        "eps_placement": "outside",
        "ddof": 1,
        "momentum": 0.99,
        "running_var_kind": "unbiased",
        "initial_running_var": 0.0,
    },
    # torch.nn.BatchNorm*d: momentum=0.1 on the NEW value, eps=1e-5, unbiased.
    "torch": {"eps": 1e-5, "momentum": 0.9, "running_var_kind": "unbiased"},
    # keras.layers.BatchNormalization: momentum=0.99 on the old value, eps=1e-3,
    # moving variance from the biased batch variance.
    "keras": {"eps": 1e-3, "momentum": 0.99, "running_var_kind": "biased"},
    # ONNX BatchNormalization (training mode): momentum 0.9, eps 1e-5, biased.
    "onnx": {"eps": 1e-5, "momentum": 0.9, "running_var_kind": "biased"},
}

#: Dtypes for γ, β and the running statistics.
PARAMETER_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

STATE_KEYS = (
    "gamma",
    "beta",
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "num_values_seen",
)


def check_state_dict(
    state: Any, num_features: int, dtype: np.dtype, *, affine: bool
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Validate a BatchNorm state dict; return its arrays (cast to ``dtype``) and
    counters. Checks keys, dtypes, shapes, finiteness (``running_var >= 0``) and
    counters, so that a caller can apply the result all at once or not at all.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping; got {type(state).__name__}.")
    expected = {k for k in STATE_KEYS if affine or k not in ("gamma", "beta")}
    missing = sorted(expected - set(state))
    unknown = sorted(set(state) - expected)
    if missing or unknown:
        raise ValueError(
            f"state_dict keys do not match this layer: missing {missing}, "
            f"unknown {unknown}. Expected exactly {sorted(expected)}."
        )
    arrays: dict[str, np.ndarray] = {}
    for key in ("gamma", "beta", "running_mean", "running_var"):
        if key not in expected:
            continue
        value = np.asarray(state[key])
        if not is_float_dtype(value.dtype):
            raise TypeError(
                f"state_dict[{key!r}] must be a floating array; got dtype "
                f"{value.dtype}."
            )
        if value.shape != (num_features,):
            raise ValueError(
                f"state_dict[{key!r}] must have shape ({num_features},); got "
                f"{value.shape}."
            )
        with np.errstate(over="ignore", invalid="ignore"):  # checked next
            cast = value.astype(dtype, copy=True)
        bad = bad_channels(cast, key)
        if bad.size:
            raise ValueError(
                bad_statistic_message(
                    f"state_dict[{key!r}] (in {dtype})",
                    key,
                    value,
                    bad,
                    "Load a good checkpoint, or reset_running_stats() to start the "
                    "statistics over.",
                )
            )
        arrays[key] = cast
    counters = {}
    for key in ("num_batches_tracked", "num_values_seen"):
        value = state[key]
        value = value.item() if isinstance(value, np.ndarray) else value
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(
                f"state_dict[{key!r}] must be an int; got {type(value).__name__}."
            )
        if value < 0:
            raise ValueError(
                f"state_dict[{key!r}] must be >= 0 (a count); got {value}."
            )
        counters[key] = int(value)
    return arrays, counters
