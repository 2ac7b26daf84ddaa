"""Compile options of the Numba loops: the decorators and the serial/parallel pair.

Every compiled loop of :mod:`batchnorm.kernels.numba._loops`,
:mod:`batchnorm.kernels.numba._loops_channels_last` and :mod:`batchnorm.app.bench.floor`
goes through :func:`_jit`: ``nogil``, ``cache=True`` (compiled in every process
when no cache directory is writable, and whenever the cache fails: see
:class:`_TolerantCache`), no C-callback wrapper, and ``fastmath``
limited to reassociation and contraction, for the reductions only. Helpers that
only compiled code calls get no Python wrapper; :func:`serial_and_parallel`
compiles one loop twice, without threads and with ``prange``.

Numba's on-disk cache checks only the source file of the function it caches,
while a loop compiled with helpers from other modules (``_loops.rows`` with the
channels-last bodies) carries their code too: edited alone, a helper's module
would leave the old code in that loop's cache entry. So every cached loop is
named after a digest of this package's sources (:data:`SOURCES_DIGEST`), and any
edit here compiles everything anew.
"""

from __future__ import annotations

import hashlib
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numba

_REASSOC = ("reassoc", "contract")


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


#: Digest of the kernel modules' sources, part of every cached loop's name.
SOURCES_DIGEST = _sources_digest()


def _renamed(fn: Callable[..., Any], suffix: str) -> Callable[..., Any]:
    """A copy of ``fn`` whose name (and so its Numba cache entry) ends in ``suffix``."""
    copy = types.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__
    )
    copy.__qualname__ = fn.__qualname__ + suffix
    copy.__module__ = fn.__module__
    copy.__doc__ = fn.__doc__
    return copy


class KernelPair(NamedTuple):
    """One loop compiled twice: without threads and with ``prange``."""

    serial: Any
    parallel: Any


def _parallel_options() -> dict[str, bool]:
    """``prange`` only: NumPy calls inside a kernel (``np.zeros``) stay serial.

    Otherwise Numba turns each into a parallel region of its own, and every
    region is a launch that may have to wake a sleeping thread.
    """
    return {
        "prange": True,
        **dict.fromkeys(
            ("comprehension", "reduction", "inplace_binop", "setitem", "numpy"), False
        ),
        **dict.fromkeys(("stencil", "fusion"), False),
    }


def _jit(
    fn: Callable[..., Any], *, parallel: bool, fastmath: bool, entry: bool = True
) -> Any:
    """``numba.njit`` with the options of this module.

    No C-callback wrapper (nothing here is used as a first-class function), and
    for helpers that only compiled code calls (``entry=False``) no Python
    wrapper either: each wrapper is LLVM code generated, optimized and cached for
    every specialization, part of the cold compile time.
    """
    options: dict[str, Any] = {
        "nogil": True,
        "parallel": _parallel_options() if parallel else False,
        "fastmath": set(_REASSOC) if fastmath else False,
        "no_cfunc_wrapper": True,
        # NumPy's rules for scalar arithmetic too: 1/0 is inf, not an exception
        # (train_ncs divides per channel, and ε = 0 on a constant channel is legal).
        "error_model": "numpy",
        "no_cpython_wrapper": not entry,
    }
    try:
        dispatcher = numba.njit(
            _renamed(fn, "_" + SOURCES_DIGEST), cache=True, **options
        )
    except RuntimeError:
        # No writable cache directory anywhere (numba tries $NUMBA_CACHE_DIR, the
        # package's __pycache__, then ~/.cache/numba): compile in every process.
        return numba.njit(fn, **options)
    cache = getattr(dispatcher, "_cache", None)  # None: NUMBA_DISABLE_JIT
    if cache is not None:
        dispatcher._cache = _TolerantCache(cache)  # type: ignore[attr-defined]
    return dispatcher


class CacheWarning(RuntimeWarning):
    """Numba's on-disk cache of the kernels could not be read or written.

    The kernels are then compiled in the process (slower first calls, the same
    results); issued once per process.
    """


_cache_warned: list[bool] = []  # one warning per process, whichever cache failed


class _TolerantCache:
    """Numba's cache of one function, whose failures cost a compilation, not a call.

    Numba lets an error of its cache reach the call that compiles: a corrupt index
    or data file (``UnpicklingError``, ``EOFError``, ``ValueError``…), a full disk
    (``OSError`` ENOSPC), a directory that went away. Here a failed load compiles
    instead, and resets the function's index so that the compiled code replaces
    the broken entry; a failed save keeps the compiled code for this process.
    Everything else goes to Numba's cache object.
    """

    def __init__(self, cache: Any) -> None:
        self._cache = cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        try:
            return self._cache.load_overload(sig, target_context)
        except Exception as exc:  # noqa: BLE001 - unpickling raises anything
            _warn_cache("read", self._cache, exc)
            try:
                self._cache.flush()  # an empty index, rewritten on the next save
            except Exception:  # noqa: BLE001, S110 - the warning has been given
                pass
            return None

    def save_overload(self, sig: Any, data: Any) -> None:
        try:
            self._cache.save_overload(sig, data)
        except Exception as exc:  # noqa: BLE001 - a full disk, a removed directory
            _warn_cache("written", self._cache, exc)


def _warn_cache(action: str, cache: Any, exc: Exception) -> None:
    if _cache_warned:
        return
    _cache_warned.append(True)
    path = getattr(cache, "cache_path", "?")
    warnings.warn(
        f"Numba's cache of the batchnorm kernels in {path} could not be {action} "
        f"({type(exc).__name__}: {exc}); the kernels are compiled in this process "
        "instead (slower first calls, the same results). Free disk space, delete "
        "that directory (it is rebuilt), or set NUMBA_CACHE_DIR to another writable "
        "directory. Further cache errors in this process are not reported.",
        CacheWarning,
        stacklevel=2,
    )


def serial_and_parallel(
    *, fastmath: bool = False
) -> Callable[[Callable[..., Any]], KernelPair]:
    def compile_both(fn: Callable[..., Any]) -> KernelPair:
        # Numba's on-disk cache keys a function by its qualified name and line,
        # not by its options, so the serial build must have a name of its own.
        return KernelPair(
            _jit(_renamed(fn, "_serial"), parallel=False, fastmath=fastmath),
            _jit(fn, parallel=True, fastmath=fastmath),
        )

    return compile_both


def _helper(fn: Callable[..., Any]) -> Any:
    """A serial loop that only other compiled loops call."""
    return _jit(fn, parallel=False, fastmath=True, entry=False)


def _helper_exact(fn: Callable[..., Any]) -> Any:
    """A helper evaluated exactly as written (no reassociation, no contraction)."""
    return _jit(fn, parallel=False, fastmath=False, entry=False)


def _jit_serial_exact(fn: Callable[..., Any]) -> Any:
    return _jit(fn, parallel=False, fastmath=False)


def _jit_entry_reassoc(fn: Callable[..., Any]) -> Any:
    """A serial loop called from Python whose additions may reassociate."""
    return _jit(fn, parallel=False, fastmath=True)
