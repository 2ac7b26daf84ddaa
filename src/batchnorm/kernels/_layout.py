"""Axis bookkeeping shared by kernels and the functional API."""

from __future__ import annotations


def reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """Every axis of an ``ndim``-array except the channel ``axis`` (already >= 0)."""
    return tuple(a for a in range(ndim) if a != axis)


def channel_shape(ndim: int, axis: int, num_channels: int) -> tuple[int, ...]:
    """Shape that broadcasts a (C,) vector along ``axis`` of an ``ndim``-array."""
    shape = [1] * ndim
    shape[axis] = num_channels
    return tuple(shape)
