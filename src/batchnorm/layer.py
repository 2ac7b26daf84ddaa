"""The BatchNorm layer: state only (γ, β, running statistics, mode, the last cache).

All math is delegated to :mod:`batchnorm.functional`; the layer owns no optimizer,
no file format and no communication. Its option checks and config are in
:mod:`batchnorm._layer_options`; the rules that change its state (running-statistics
update, reset, state dicts) in :mod:`batchnorm._layer_state`; output-buffer reuse in
:mod:`batchnorm._buffers`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from batchnorm import _groups, _layer_options, _layer_state
from batchnorm import functional as F
from batchnorm._buffers import OutputBuffers
from batchnorm._layer_options import (
    check_backend,
    check_initial_running_stats,
    check_layer_axis,
    check_num_features,
    check_parameter_dtype,
)
from batchnorm._validation import (
    EPS_PLACEMENTS,
    ON_NONFINITE,
    RUNNING_VAR_KINDS,
    check_choice,
    check_ddof,
    check_eps,
    check_input,
    check_momentum,
)
from batchnorm.presets import PRESETS
from batchnorm.renorm import check_renorm_limits


class BatchNorm:
    """Batch normalization over the channel ``axis`` of inputs of any rank.

    ``y = γ (x − μ) / √(σ² + ε) + β``, with μ and the biased σ² taken per channel
    over every other axis of the batch in training, and the running statistics in
    eval mode. ``run ← momentum · run + (1 − momentum) · batch``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    axis : int, default 1
        Channel axis of the input; ``-1`` for channels-last.
    eps : float, default 1e-6
    momentum : float in [0, 1] or None, default 0.99
        Weight on the OLD running value (PyTorch's 0.1 is our 0.9). ``None``: exact
        cumulative statistics of every value seen.
    running_var_kind : {"unbiased", "biased"}
    affine : bool, default True
        Learn γ and β; when False they are ``None`` (γ = 1, β = 0).
    eps_placement : {"inside", "outside"}
    ddof : {0, 1}
        Normalizing variance; see :func:`batchnorm.functional.forward_train`.
    on_nonfinite : {"raise", "skip"}
        What a batch with NaN/inf statistics does; running stats never take them.
    initial_running_mean, initial_running_var : float, default 0 and 1
    dtype : numpy dtype, default float32
        Dtype of γ, β and the running statistics.
    backend : {"numpy", "numba"} or None
    reuse_buffers : bool, default False
        Write each output (``y`` of the forward pass, ``dx`` of the backward pass)
        into an array the layer keeps and reuses on the next call of the same
        shape, instead of allocating a new one. The array returned by one call is
        then overwritten by the next: copy it if you need it longer. A buffer that
        shares memory with the call's input is never used for its output. (On the
        Numba backend new large outputs already reuse the blocks of outputs you
        have dropped, see ``batchnorm.release_buffers``; this option also keeps
        the address fixed and covers the NumPy backend.)
    virtual_batch_size : int >= 2 or None, default None
        Ghost batch norm: in training, each run of ``virtual_batch_size``
        consecutive samples (axis 0) is normalized with its own statistics; a
        remainder is its own group when it has m >= 2 values per channel and joins
        the previous group otherwise (:func:`batchnorm._groups.group_slices`). The
        running statistics take one update per group, in order, as if the groups
        were separate batches (``num_batches_tracked`` counts groups). The gradient
        is exact (each group is an independent batch norm). Eval mode is unaffected
        and takes any batch size.
    renorm : bool, default False
        Batch renormalization (Ioffe, 2017): in training ``y = γ (x̂ r + d) + β``
        with r, d from the running statistics, clipped by ``rmax``, ``dmax`` and
        held constant in backward; see :mod:`batchnorm.renorm`. Combined with
        ``virtual_batch_size``, each group is renormalized in turn.
    rmax, dmax : float, default 3 and 5
        Clipping limits of renorm (``rmax >= 1``, ``dmax >= 0``; ``inf`` clips
        nothing). Plain attributes: a trainer sets them every step, e.g. from
        :func:`batchnorm.renorm.renorm_schedule`.

    Attributes
    ----------
    gamma, beta : ndarray, shape (C,), or None
    running_mean, running_var : ndarray, shape (C,)
    num_batches_tracked, num_values_seen : int
    use_batch_stats, update_running_stats : bool
        The mode; :meth:`train`, :meth:`eval` and :meth:`freeze` set both.
    grad_gamma, grad_beta : ndarray or None
        Set by :meth:`backward`.

    Examples
    --------
    >>> import numpy as np
    >>> layer = BatchNorm(3, backend="numpy")
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, (8, 3, 4, 4)).astype(np.float32)
    >>> y = layer(x)
    >>> bool(abs(y.mean()) < 1e-6), layer.num_batches_tracked
    (True, 1)
    >>> dy = np.random.default_rng(1).normal(size=y.shape).astype(np.float32)
    >>> dx = layer.backward(dy)            # sets layer.grad_gamma, layer.grad_beta
    >>> y_test = layer.eval()(x)           # running statistics, nothing updated
    """

    def __init__(
        self,
        num_features: int,
        *,
        axis: int = 1,
        eps: float = 1e-6,
        momentum: float | None = 0.99,
        running_var_kind: str = "unbiased",
        affine: bool = True,
        eps_placement: str = "inside",
        ddof: int = 0,
        on_nonfinite: str = "raise",
        initial_running_mean: float = 0.0,
        initial_running_var: float = 1.0,
        dtype: Any = np.float32,
        backend: str | None = None,
        reuse_buffers: bool = False,
        virtual_batch_size: int | None = None,
        renorm: bool = False,
        rmax: float = 3.0,
        dmax: float = 5.0,
    ) -> None:
        self.num_features = check_num_features(num_features)
        self.axis = check_layer_axis(axis)
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        self.running_var_kind = check_choice(
            running_var_kind, "running_var_kind", RUNNING_VAR_KINDS
        )
        self.eps_placement = check_choice(
            eps_placement, "eps_placement", EPS_PLACEMENTS
        )
        self.ddof = check_ddof(ddof)
        self.on_nonfinite = check_choice(on_nonfinite, "on_nonfinite", ON_NONFINITE)
        self.affine = bool(affine)
        self.dtype = check_parameter_dtype(dtype)
        self.backend = check_backend(backend)
        self.reuse_buffers = bool(reuse_buffers)
        self.virtual_batch_size = _groups.check_virtual_batch_size(virtual_batch_size)
        self.renorm = bool(renorm)
        self.rmax, self.dmax = check_renorm_limits(rmax, dmax)
        self._groups: _groups.GroupPass | None = None
        self._buffers = OutputBuffers()
        self.initial_running_mean, self.initial_running_var = (
            check_initial_running_stats(initial_running_mean, initial_running_var)
        )
        c = self.num_features
        self.gamma: np.ndarray | None = np.ones(c, self.dtype) if affine else None
        self.beta: np.ndarray | None = np.zeros(c, self.dtype) if affine else None
        self.grad_gamma: np.ndarray | None = None
        self.grad_beta: np.ndarray | None = None
        self.running_mean = np.empty(c, self.dtype)
        self.running_var = np.empty(c, self.dtype)
        self.num_batches_tracked = 0
        self.num_values_seen = 0
        self.reset_running_stats()
        self.use_batch_stats = True
        self.update_running_stats = True
        self.trainable = True
        self._cache: F.Cache | None = None
        self._eval_input: np.ndarray | None = None

    # -- construction ---------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, num_features: int, **overrides: Any) -> BatchNorm:
        """A layer with another system's conventions, expressed in ours.

        ``"darknet"``: ε = 1e-6 added to √var, variance over m − 1, running
        statistics start at 0, momentum 0.99. ``"torch"``: momentum 0.9 (their 0.1),
        ε = 1e-5. ``"keras"``: 0.99, ε = 1e-3, biased running variance. ``"onnx"``:
        0.9, ε = 1e-5, biased running variance.

        >>> BatchNorm.from_preset("torch", 4).momentum
        0.9
        """
        if name not in PRESETS:
            raise ValueError(
                f"preset must be one of {', '.join(map(repr, PRESETS))}; got {name!r}."
            )
        return cls(num_features, **{**PRESETS[name], **overrides})

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this layer (without its state).

        >>> BatchNorm(**BatchNorm.from_preset("keras", 2).config()).eps
        0.001
        """
        return _layer_options.config(self)

    # -- modes ------------------------------------------------------------------
    def train(self) -> BatchNorm:
        """Normalize with batch statistics and update the running ones."""
        self.use_batch_stats, self.update_running_stats, self.trainable = (
            True,
            True,
            True,
        )
        return self

    def eval(self) -> BatchNorm:
        """Normalize with the running statistics; update nothing."""
        self.use_batch_stats, self.update_running_stats = False, False
        return self

    def freeze(self) -> BatchNorm:
        """Eval mode and, in addition, γ and β are not trainable (no parameters).

        For fine-tuning with small batches (detectron2's FrozenBatchNorm).
        :meth:`train` undoes it.
        """
        self.eval()
        self.trainable = False
        return self

    # -- forward / backward -------------------------------------------------------
    def __call__(self, x: Any) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: Any) -> np.ndarray:
        """Normalize ``x`` according to the mode; see the class docstring."""
        x, _ = check_input(x, self.axis)
        self._check_channels(x)
        if not (self.use_batch_stats or self.update_running_stats):
            return self._forward_eval(x)
        if self.virtual_batch_size is not None or self.renorm:
            y, groups = _groups.train_pass(self, x, self._buffer("y", x))
            if self.use_batch_stats:
                self._remember(groups=groups)
                return y
            return self._forward_eval(x)
        y, cache = F.forward_train(
            x,
            self.gamma,
            self.beta,
            axis=self.axis,
            eps=self.eps,
            eps_placement=self.eps_placement,
            ddof=self.ddof,
            backend=self.backend,
            out=self._buffer("y", x),
        )
        if self.update_running_stats:
            _layer_state.absorb(self, cache.moments)
        if self.use_batch_stats:
            self._remember(cache=cache)
            return y
        # update_running_stats without use_batch_stats: normalize with the
        # freshly updated running statistics.
        return self._forward_eval(cache.x)

    def _forward_eval(self, x: Any) -> np.ndarray:
        y = F.forward_eval(
            x,
            self.gamma,
            self.beta,
            self.running_mean,
            self.running_var,
            axis=self.axis,
            eps=self.eps,
            eps_placement=self.eps_placement,
            backend=self.backend,
            out=self._buffer("y", x),
        )
        self._remember(eval_input=np.asarray(x))
        return y

    def _remember(
        self,
        *,
        cache: F.Cache | None = None,
        groups: _groups.GroupPass | None = None,
        eval_input: np.ndarray | None = None,
    ) -> None:
        """What :meth:`backward` needs from the forward pass that just succeeded."""
        self._cache, self._groups, self._eval_input = cache, groups, eval_input

    def _buffer(self, name: str, like: np.ndarray, *inputs: Any) -> np.ndarray | None:
        """Reused output array ``name`` (:class:`OutputBuffers`); None by default."""
        return self._buffers.get(name, like, *inputs) if self.reuse_buffers else None

    def _check_channels(self, x: np.ndarray) -> None:
        if x.shape[self.axis] != self.num_features:
            raise ValueError(
                f"x has {x.shape[self.axis]} channels on axis {self.axis} (shape "
                f"{x.shape}); this layer has num_features={self.num_features}. Check "
                "the channel axis (axis=-1 for channels-last) or build the layer "
                f"with num_features={x.shape[self.axis]}."
            )

    def backward(self, dy: Any) -> np.ndarray:
        """Gradient of the last forward pass; sets ``grad_gamma`` and ``grad_beta``.

        Uses the training-mode gradient after a forward with batch statistics and
        the eval-mode gradient after a forward with running statistics.

        Raises
        ------
        RuntimeError
            When no forward pass came first.
        """
        if self._groups is not None:
            out = self._buffer("dx", self._groups.x, np.asarray(dy))
            dx, dgamma, dbeta = _groups.backward_pass(self, self._groups, dy, out)
        elif self._cache is not None:
            out = self._buffer("dx", self._cache.x, np.asarray(dy))
            dx, dgamma, dbeta = F.backward(
                dy, self._cache, backend=self.backend, out=out
            )
        elif self._eval_input is not None:
            dx, dgamma, dbeta = F.backward_eval(
                dy,
                self._eval_input,
                self.gamma,
                self.running_mean,
                self.running_var,
                axis=self.axis,
                eps=self.eps,
                eps_placement=self.eps_placement,
                backend=self.backend,
                out=self._buffer("dx", self._eval_input, np.asarray(dy)),
            )
        else:
            raise RuntimeError(
                "backward() called before forward(): run layer(x) first, then "
                "layer.backward(dy) with dy shaped like the output."
            )
        if self.affine:
            self.grad_gamma = dgamma.astype(self.dtype)
            self.grad_beta = dbeta.astype(self.dtype)
        return dx

    def parameters(self) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
        """Yield ``(name, value, grad)`` for γ and β (none when frozen or not affine).

        Optimizers update ``value`` in place.
        """
        if not (self.affine and self.trainable):
            return
        assert self.gamma is not None and self.beta is not None
        yield "gamma", self.gamma, self.grad_gamma
        yield "beta", self.beta, self.grad_beta

    # -- state ------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        """Running statistics back to their initial values; counters to 0."""
        _layer_state.reset_running_stats(self)

    def state_dict(self) -> dict[str, Any]:
        """Copies of γ, β (when affine), running statistics and counters."""
        return _layer_state.state_dict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the state with ``state``; on any error the layer is unchanged.

        Raises
        ------
        TypeError, ValueError
            Missing or unknown keys, wrong shapes, non-floating arrays, negative or
            non-finite running variance, negative counters.
        """
        _layer_state.load_state_dict(self, state)
        self._cache = self._eval_input = self._groups = None

    def __repr__(self) -> str:
        mode = (
            "train"
            if self.use_batch_stats and self.update_running_stats
            else "eval"
            if not (self.use_batch_stats or self.update_running_stats)
            else f"use_batch_stats={self.use_batch_stats}, "
            f"update_running_stats={self.update_running_stats}"
        )
        return (
            f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, "
            f"momentum={self.momentum}, running_var_kind={self.running_var_kind!r}, "
            f"affine={self.affine}, mode={mode})"
        )
