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
from types import ModuleType

from batchnorm.kernels import _fork

BACKENDS = ("numpy", "numba")
_MODULES = {"numpy": "batchnorm.kernels.reference", "numba": "batchnorm.kernels.numba"}
# Filled once per process: every functional call resolves its backend, and the
# import machinery costs each call even for a module imported already. Only
# modules whose import has finished go in here, so no thread gets one that
# another thread is still importing.
_loaded: dict[str, ModuleType] = {}
_fastest: list[str] = []  # the default without $BATCHNORM_BACKEND, once known

# Before any kernel runs, so that every fork() of this process is covered.
_fork.register()


def _load(name: str) -> ModuleType:
    """The kernel module of backend ``name``; raises ImportError.

    In a forked child that must not touch Numba (see :mod:`._fork`), ``"numba"``
    not imported yet is the reference: the same values, without Numba.
    """
    module = _loaded.get(name)
    if module is None:
        with _fork.import_lock:  # a fork() waits until the import is done
            if name == "numba" and _fork.numba_unusable:
                return _load("numpy")
            module = _loaded[name] = importlib.import_module(_MODULES[name])
    return module


def available() -> tuple[str, ...]:
    """Backends that import on this machine."""
    names = []
    for name in BACKENDS:
        try:
            _load(name)
        except ImportError:
            continue
        names.append(name)
    return tuple(names)


def default() -> str:
    """``$BATCHNORM_BACKEND`` if set, else ``"numba"`` when it imports, else numpy."""
    env = os.environ.get("BATCHNORM_BACKEND")
    if env:
        return env
    if not _fastest:
        _fastest.append("numba" if "numba" in available() else "numpy")
    return _fastest[0]


def resolve(backend: str | None) -> ModuleType:
    """The kernel module for ``backend`` (``None``: :func:`default`)."""
    name = default() if backend is None else backend
    if name not in BACKENDS:
        source = "BATCHNORM_BACKEND" if backend is None else "backend"
        raise ValueError(
            f"{source} must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}."
        )
    try:
        return _load(name)
    except ImportError as exc:
        raise ImportError(
            f"backend {name!r} is not available ({exc}). Install it with "
            "pip install 'batchnorm[fast]', or pass backend='numpy'."
        ) from exc
