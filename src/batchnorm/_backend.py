"""Kernel choice: the argument, else $BATCHNORM_BACKEND, else the fastest installed.

Both backends expose the same functions (``batch_moments``, ``normalize``,
``forward_train``, ``backward_train``, ``backward_eval``, and the two halves of
``backward_train`` that synchronized layers call around their collective,
``grad_sums`` and ``backward_apply``) with the same arguments; tests hold the fast
one equal to the NumPy reference.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

BACKENDS = ("numpy", "numba")
_MODULES = {"numpy": "batchnorm.kernels._numpy", "numba": "batchnorm.kernels._numba"}


def available() -> tuple[str, ...]:
    """Backends that import on this machine."""
    names = []
    for name in BACKENDS:
        try:
            importlib.import_module(_MODULES[name])
        except ImportError:
            continue
        names.append(name)
    return tuple(names)


def default() -> str:
    """``$BATCHNORM_BACKEND`` if set, else ``"numba"`` when it imports, else numpy."""
    env = os.environ.get("BATCHNORM_BACKEND")
    if env:
        return env
    if _MODULES["numba"] in sys.modules:  # imported once: no import machinery
        return "numba"  # (available() costs 1.6 µs, every functional call)
    return "numba" if "numba" in available() else "numpy"


def resolve(backend: str | None) -> ModuleType:
    """The kernel module for ``backend`` (``None``: :func:`default`)."""
    name = default() if backend is None else backend
    if name not in BACKENDS:
        source = "BATCHNORM_BACKEND" if backend is None else "backend"
        raise ValueError(
            f"{source} must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}."
        )
    module = sys.modules.get(_MODULES[name])  # imported already: the common case
    if module is not None:
        return module
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:
        raise ImportError(
            f"backend {name!r} is not available ({exc}). Install it with "
            "pip install 'batchnorm[fast]', or pass backend='numpy'."
        ) from exc
