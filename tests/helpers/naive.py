"""A naive batch normalization written for obviousness: one channel at a time, float64.

Never imported by src/. It follows the seed's derivation term by term, so that the
vectorized kernels are checked against an independent, slow transcription.
"""

from __future__ import annotations

import math

import numpy as np


def channels(x: np.ndarray, axis: int) -> list[np.ndarray]:
    """The values of each channel as a flat float64 vector."""
    moved = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    return [moved[..., c].ravel() for c in range(moved.shape[-1])]


def from_channels(columns: list[np.ndarray], like: np.ndarray, axis: int) -> np.ndarray:
    moved_shape = np.moveaxis(np.empty(like.shape), axis, -1).shape
    out = np.empty(moved_shape, dtype=np.float64)
    for c, column in enumerate(columns):
        out[..., c] = column.reshape(moved_shape[:-1])
    return np.moveaxis(out, -1, axis)


def mean_var(values: np.ndarray, ddof: int = 0) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - ddof)
    return mean, var


def inv_std(var: float, eps: float, placement: str) -> float:
    if placement == "inside":
        return 1.0 / math.sqrt(var + eps)
    return 1.0 / (math.sqrt(var) + eps)


def forward_train(x, gamma, beta, axis=1, eps=1e-6, placement="inside", ddof=0):
    """Return (y, means, biased vars) per the seed: y = γ (x − M)/√(σ² + ε) + β."""
    columns, means, variances = [], [], []
    for c, values in enumerate(channels(x, axis)):
        mean, var = mean_var(values, ddof)
        g = 1.0 if gamma is None else float(gamma[c])
        b = 0.0 if beta is None else float(beta[c])
        columns.append(g * (values - mean) * inv_std(var, eps, placement) + b)
        means.append(mean)
        variances.append(mean_var(values, 0)[1])
    return from_channels(columns, x, axis), np.array(means), np.array(variances)


def forward_eval(
    x, gamma, beta, running_mean, running_var, axis=1, eps=1e-6, placement="inside"
):
    columns = []
    for c, values in enumerate(channels(x, axis)):
        g = 1.0 if gamma is None else float(gamma[c])
        b = 0.0 if beta is None else float(beta[c])
        s = inv_std(float(running_var[c]), eps, placement)
        columns.append(g * (values - float(running_mean[c])) * s + b)
    return from_channels(columns, x, axis)


def backward_train(dy, x, gamma, axis=1, eps=1e-6):
    """The seed's chain rule, ε inside, biased variance, term by term.

    ∂ŷ/∂x_i = 1/√(σ²+ε) + (∂ŷ/∂M)(∂M/∂x_i) + (∂ŷ/∂σ²)(∂σ²/∂x_i), summed over
    every output j that depends on x_i.
    """
    dxs, dgammas, dbetas = [], [], []
    for c, (values, grads) in enumerate(
        zip(channels(x, axis), channels(dy, axis), strict=True)
    ):
        n = len(values)
        g = 1.0 if gamma is None else float(gamma[c])
        mean, var = mean_var(values)
        root = math.sqrt(var + eps)
        dyhat = g * grads  # ∂L/∂ŷ_j
        dvar = np.sum(dyhat * (values - mean)) * -0.5 * (var + eps) ** -1.5
        dmean = np.sum(dyhat * -1.0 / root)  # Σ(x−M) = 0 drops a term
        dx = dyhat / root + dmean / n + dvar * 2.0 * (values - mean) / n
        x_hat = (values - mean) / root
        dxs.append(dx)
        dgammas.append(np.sum(grads * x_hat))
        dbetas.append(np.sum(grads))
    return from_channels(dxs, x, axis), np.array(dgammas), np.array(dbetas)
