"""A record of the Numba launcher's calls, for tests that check which path ran."""

from __future__ import annotations

from typing import Any


def spy_on_launcher(monkeypatch: Any) -> list[tuple[str, int]]:
    """From now on in this test, each call of ``_loops.launch`` as ``(build, op)``.

    ``build`` is ``"serial"`` or ``"parallel"``; ``op`` is the operation
    (``_loops.MOMENTS``, ``NORMALIZE``, ``GRAD_SUMS``, ``DX``), channels-last
    calls counted as their base operation. Imports Numba.
    """
    from batchnorm.kernels.numba import _loops

    ran: list[tuple[str, int]] = []
    pair = _loops.launch

    def spy(build: str, fn: Any) -> Any:
        def wrapped(op: int, *args: Any) -> Any:
            ran.append((build, int(op) % _loops.CHANNELS_LAST))
            return fn(op, *args)

        return wrapped

    monkeypatch.setattr(
        _loops,
        "launch",
        _loops.KernelPair(spy("serial", pair.serial), spy("parallel", pair.parallel)),
    )
    return ran
