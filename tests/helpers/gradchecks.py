"""Float64 finite-difference checks shared by the gradient tests (not used by src/)."""

from __future__ import annotations

import numpy as np


def directional_check(loss, grads, params, rng, h=1e-6):
    """Compare (L(p + h v) − L(p − h v)) / 2h with Σ ⟨grad, v⟩ for a random v."""
    directions = [rng.normal(size=p.shape) for p in params]

    def shifted(sign):
        return loss(
            *[p + sign * h * v for p, v in zip(params, directions, strict=True)]
        )

    numeric = (shifted(+1) - shifted(-1)) / (2 * h)
    analytic = sum(np.sum(g * v) for g, v in zip(grads, directions, strict=True))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def elementwise_check(loss, grad, param, h=1e-6, *, atol=1e-8, atol_scale=None):
    """Central differences for every element of ``param`` (small arrays only).

    ``atol_scale`` makes the absolute tolerance relative to the largest numeric
    gradient, for losses whose sums carry rounding noise in proportion to them.
    """
    numeric = np.zeros_like(param)
    for idx in np.ndindex(param.shape):
        bump = np.zeros_like(param)
        bump[idx] = h
        numeric[idx] = (loss(param + bump) - loss(param - bump)) / (2 * h)
    if atol_scale is not None:
        atol = atol_scale * float(np.abs(numeric).max())
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=atol)
