"""Calling the compiled row bodies by address, so that each launcher stays small.

Numba links the code of every jitted function a loop calls into that loop's
module and optimizes it again there: with the row bodies called directly, both
builds of :func:`batchnorm.kernels.numba._loops.launch` (serial and ``prange``)
carried and re-optimized all of them, most of the cold compilation. Instead,
:func:`batchnorm.kernels.numba._loops.rows` (the dispatch over the bodies) is compiled
once per dtype for one fixed signature (:func:`rows_signature`), and the
launchers call it through its address (:func:`call_rows_jit`), in Numba's own
calling convention, the way Numba calls first-class functions.

The address is a plain integer argument of the launchers, so they cache like
any other loop; :func:`batchnorm.kernels.numba._loops.rows_address` compiles ``rows``
(or loads it from the cache) and looks the address up once per dtype and
process, and ``_loops.launch`` always passes the one for ``x``'s dtype. The
call converts each argument to the fixed signature's type (a writable array to
a read-only one is a no-op); an argument that does not convert without loss is
a typing error at compile time, never a call with the wrong layout. ``rows``
reports no errors (its bodies neither allocate nor raise), so the call does not
check its status: a body that could raise would need that check first. Under
``NUMBA_DISABLE_JIT`` (coverage, debugging) ``_loops.call_rows`` calls ``rows`` as
Python.
"""

from __future__ import annotations

from typing import Any

from numba import types
from numba.core import config, errors
from numba.core.imputils import impl_ret_borrowed
from numba.core.typeconv import Conversion
from numba.extending import intrinsic


def rows_signature(dtype: Any) -> tuple[Any, ...]:
    """Argument types of ``rows`` for arrays of Numba dtype ``dtype``.

    ``(op, x, dy, out, v0, v1, v2, v3, pivot, p0, p1, lo, hi, chunk)``: the
    inputs and per-channel vectors read-only, ``out`` and the float64 partial
    sums writable, all C-contiguous and aligned.
    """
    data = types.Array(dtype, 3, "C", readonly=True)
    vector = types.Array(types.float64, 1, "C", readonly=True)
    partials = types.Array(types.float64, 2, "C")
    return (
        types.int64,
        data,
        data,
        types.Array(dtype, 3, "C"),
        *(vector,) * 5,
        partials,
        partials,
        *(types.int64,) * 3,
    )


@intrinsic
def call_rows_jit(
    typingctx, address, op, x, dy, out, v0, v1, v2, v3, pivot, p0, p1, lo, hi, chunk
):
    """Call the ``rows`` compiled at ``address`` with these arguments (its
    status unchecked: see the module's docstring)."""
    given = (op, x, dy, out, v0, v1, v2, v3, pivot, p0, p1, lo, hi, chunk)
    target = rows_signature(x.dtype)
    for actual, expected in zip(given, target, strict=True):
        conversion = typingctx.can_convert(actual, expected)
        if conversion is None or conversion > Conversion.safe:
            raise errors.TypingError(
                f"call_rows: an argument of type {actual} does not convert to "
                f"{expected} without loss"
            )

    def codegen(context, builder, signature, args):
        values = [
            context.cast(builder, value, actual, expected)
            for value, actual, expected in zip(
                args[1:], signature.args[1:], target, strict=True
            )
        ]
        function = context.call_conv.get_function_type(types.none, target)
        pointer = builder.inttoptr(args[0], function.as_pointer())
        context.call_conv.call_function(builder, pointer, types.none, target, values)
        return context.get_dummy_value()

    return types.none(address, *given), codegen


@intrinsic
def _readonly_jit(typingctx, array):
    """``array`` typed read-only (the same data), for helpers shared with ``rows``."""
    if not isinstance(array, types.Array):
        return None
    result = array.copy(readonly=True)

    def codegen(context, builder, signature, args):
        value = context.cast(builder, args[0], signature.args[0], result)
        # A new reference to the same data: the caller releases it after use.
        return impl_ret_borrowed(context, builder, result, value)

    return result(array), codegen


#: Numba's JIT is off (``NUMBA_DISABLE_JIT``): the loops run as Python.
JIT_DISABLED = bool(config.DISABLE_JIT)  # type: ignore[attr-defined]


def _readonly_python(array: Any) -> Any:
    return array


#: ``readonly(array)``: ``array`` typed read-only (see ``_readonly_jit``).
readonly: Any = _readonly_python if JIT_DISABLED else _readonly_jit
