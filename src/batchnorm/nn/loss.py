"""Softmax cross-entropy: the loss of the training harness, with its gradient."""

from __future__ import annotations

import numpy as np

__all__ = ["SoftmaxCrossEntropy", "log_softmax"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log(softmax(logits))`` over the last axis, without overflow."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class SoftmaxCrossEntropy:
    """``L = reduce_n(−log softmax(logits)[n, y_n])``.

    Parameters
    ----------
    reduction : {"mean", "sum"}, default "mean"
        ``"sum"`` is darknet's convention: its per-sample ``delta = truth − p`` is
        ``−∂L/∂logits`` of the summed loss.

    Examples
    --------
    >>> import numpy as np
    >>> loss = SoftmaxCrossEntropy()
    >>> round(loss(np.zeros((2, 4)), np.array([0, 3])), 6)  # log(4)
    1.386294
    >>> loss.backward()
    array([[-0.375,  0.125,  0.125,  0.125],
           [ 0.125,  0.125,  0.125, -0.375]])
    """

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}.")
        self.reduction = reduction
        self._cache: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, logits: np.ndarray, labels: np.ndarray) -> float:
        return self.forward(logits, labels)

    def forward(self, logits: np.ndarray, labels: np.ndarray) -> float:
        """The loss, a Python float; ``logits`` (N, K), integer ``labels`` (N,)."""
        labels = np.asarray(labels)
        if logits.ndim != 2 or labels.shape != (logits.shape[0],):
            raise ValueError(
                f"logits must have shape (N, K) and labels shape (N,); got "
                f"{logits.shape} and {labels.shape}."
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must be integers; got dtype {labels.dtype}.")
        log_p = log_softmax(logits)
        picked = log_p[np.arange(len(labels)), labels]
        self._cache = (log_p, labels)
        total = -float(picked.sum())
        return total / len(labels) if self.reduction == "mean" else total

    def backward(self) -> np.ndarray:
        """``∂L/∂logits = softmax − onehot`` (divided by N for ``"mean"``)."""
        if self._cache is None:
            raise RuntimeError("backward() called before forward(logits, labels).")
        log_p, labels = self._cache
        grad = np.exp(log_p)
        grad[np.arange(len(labels)), labels] -= 1
        if self.reduction == "mean":
            grad /= len(labels)
        return grad
