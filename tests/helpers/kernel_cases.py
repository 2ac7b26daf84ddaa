"""The cases the kernel tests run: layouts, dtypes, inputs, and the bound
within which two float64 sums of the same terms must agree (not used by src/).

See ``tests/kernels/test_numba.py`` for how the tolerances follow.
"""

from __future__ import annotations

import numpy as np

U64 = 2.0**-53

# (id, shape, axis, transform). Sizes from 65536 values up take the parallel loops;
# "cl fold" has C = 37, so 13 rows fold into one and 4099 % 13 = 4 rows remain.
LAYOUTS = [
    ("2d", (64, 5), 1, None),
    ("3d", (16, 4, 9), 1, None),
    ("nchw", (8, 3, 5, 7), 1, None),
    ("5d", (4, 3, 2, 5, 6), 1, None),
    ("channels-last", (8, 5, 7, 3), -1, None),
    ("axis middle 5d", (4, 2, 3, 5, 6), 2, None),
    ("C=1", (16, 1, 4, 4), 1, None),
    ("m=2", (2, 6), 1, None),
    ("strided", (8, 3, 10), 1, lambda a: a[:, :, ::2]),
    ("fortran", (8, 3, 5, 4), 1, np.asfortranarray),
    ("nchw parallel", (4, 3, 80, 80), 1, None),
    ("cl fold parallel", (4099, 37), 1, None),
    ("cl wide parallel", (70, 1030), 1, None),
    ("short rows parallel", (5000, 7, 2), 1, None),
    ("channels-last parallel", (16, 20, 20, 16), -1, None),
]
DTYPES = [np.float16, np.float32, np.float64]


def make(shape, axis, transform, dtype, *, mean=3.0, std=2.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(mean, std, size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    if transform is not None:
        x, dy = transform(x), transform(dy)
    c = x.shape[axis]
    return rng, x, dy, c, axis % x.ndim


def assert_sums_close(actual, expected, abs_terms, count):
    """|actual − expected| ≤ 2·n·u·Σ|terms| per channel (summation error bound)."""
    bound = 2 * count * U64 * abs_terms
    assert np.all(np.abs(actual - expected) <= bound), (actual, expected, bound)
