"""Output arrays a layer keeps and reuses from call to call (``reuse_buffers=True``)."""

from __future__ import annotations

from typing import Any

import numpy as np


class OutputBuffers:
    """Named output arrays, each reused while it fits the next call's output."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, like: np.ndarray, *inputs: Any) -> np.ndarray:
        """The array ``name``, shaped like ``like``: the kept one, or a new one.

        Replaced when its shape or dtype no longer fits, or when it shares memory
        with ``like`` or ``inputs`` (a caller feeding an earlier output back in).
        """
        buffer = self._arrays.get(name)
        if (
            buffer is None
            or buffer.shape != like.shape
            or buffer.dtype != like.dtype
            or any(np.shares_memory(buffer, a) for a in (like, *inputs))
        ):
            buffer = np.empty(like.shape, like.dtype)
            self._arrays[name] = buffer
        return buffer
