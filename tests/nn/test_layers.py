"""Harness layers refuse sizes they cannot compute with, when they are built."""

from __future__ import annotations

import pytest

from batchnorm import nn


@pytest.mark.parametrize(("kernel", "stride"), [(0, None), (0, 1), (2, 0), (-1, 1)])
def test_maxpool_refuses_empty_windows_and_steps(kernel, stride):
    with pytest.raises(ValueError, match=r"MaxPool2d needs kernel_size >= 1"):
        nn.MaxPool2d(kernel, stride)


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(0, 1, 0), (3, 0, 0)])
def test_conv_refuses_empty_kernels_and_steps(kernel, stride, padding):
    with pytest.raises(ValueError, match=r"Conv2d needs kernel_size >= 1"):
        nn.Conv2d(1, 1, kernel, stride=stride, padding=padding)
