"""The BatchNorm layer: state only (γ, β, running statistics, mode, the last cache).

All math is delegated to :mod:`batchnorm.functional` (and :mod:`batchnorm.ghost` for
ghost batches and renormalization); the options are one checked
:class:`~batchnorm.options.LayerOptions`. The layer owns no optimizer, no file
format and no communication.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from batchnorm import functional as F
from batchnorm import ghost
from batchnorm._memory import OutputBuffers
from batchnorm._validation import check_input
from batchnorm.moments import Moments
from batchnorm.options import OPTION_NAMES, LayerOptions
from batchnorm.presets import PRESETS, check_state_dict
from batchnorm.running_stats import RunningState

#: Options fixed at construction: the state's shapes and dtype depend on them.
_FIXED_OPTIONS = frozenset({"num_features", "affine", "dtype"})


class BatchNorm:
    """Batch normalization over the channel ``axis`` of inputs of any rank.

    ``y = γ (x − μ) / √(σ² + ε) + β``, with μ and the biased σ² taken per channel
    over every other axis of the batch in training, and the running statistics in
    eval mode. ``run ← momentum · run + (1 − momentum) · batch``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    **options
        Every other field of :class:`~batchnorm.options.LayerOptions` (``axis``,
        ``eps``, ``momentum``, ``running_var_kind``, ``affine``, ...), documented
        there once. Each is readable as an attribute (``layer.eps``); setting one
        checks it again. ``num_features``, ``affine`` and ``dtype`` are fixed at
        construction.

    Attributes
    ----------
    options : LayerOptions
        The checked options; :meth:`config` gives them as keyword arguments.
    rmax, dmax : float
        Renorm's clipping limits now (a trainer may set them every step; checked
        at the next forward pass).
    gamma, beta : ndarray, shape (C,), or None
    running_mean, running_var : ndarray, shape (C,)
    num_batches_tracked, num_values_seen : int
    use_batch_stats, update_running_stats : bool
        The mode; :meth:`train`, :meth:`eval` and :meth:`freeze` set both.
    grad_gamma, grad_beta : ndarray or None
        Set by :meth:`backward`.

    Notes
    -----
    A layer is not thread-safe: use one per thread. A call that enters a layer
    another thread is inside raises ``RuntimeError`` instead of mixing the two
    threads' passes and running statistics.

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

    def __init__(self, num_features: int, **options: Any) -> None:
        unknown = sorted(set(options) - OPTION_NAMES)
        if unknown:
            raise TypeError(
                f"BatchNorm got unknown option(s) {', '.join(map(repr, unknown))}; "
                f"the options are {', '.join(sorted(OPTION_NAMES - {'num_features'}))}."
            )
        opts = LayerOptions(num_features, **options)
        object.__setattr__(self, "options", opts)
        self.rmax, self.dmax = opts.rmax, opts.dmax
        c = opts.num_features
        self.gamma: np.ndarray | None = np.ones(c, opts.dtype) if opts.affine else None
        self.beta: np.ndarray | None = np.zeros(c, opts.dtype) if opts.affine else None
        self.grad_gamma: np.ndarray | None = None
        self.grad_beta: np.ndarray | None = None
        self.running_mean = np.empty(c, opts.dtype)
        self.running_var = np.empty(c, opts.dtype)
        self.num_batches_tracked = 0
        self.num_values_seen = 0
        self.reset_running_stats()
        self.use_batch_stats = True
        self.update_running_stats = True
        self.trainable = True
        self._buffers = OutputBuffers()
        self._in_use = threading.RLock()
        self._cache: F.Cache | None = None
        self._groups: ghost.GroupPass | None = None
        self._eval_input: np.ndarray | None = None

    # -- options ----------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Called only for names that are not instance attributes: the options.
        options = self.__dict__.get("options")  # absent while unpickling
        if options is not None and name in OPTION_NAMES:
            return getattr(options, name)
        raise AttributeError(
            f"{type(self).__name__!r} object has no attribute {name!r}"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in OPTION_NAMES and name not in ("rmax", "dmax"):
            if name in _FIXED_OPTIONS:
                raise AttributeError(
                    f"{name} is fixed when the layer is built (the state depends on "
                    f"it); build a new layer: BatchNorm(**{{**layer.config(), "
                    f"{name!r}: {value!r}}})."
                )
            value = dataclasses.replace(self.options, **{name: value})
            name = "options"
        object.__setattr__(self, name, value)

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
        return {**self.options.config(), "rmax": self.rmax, "dmax": self.dmax}

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
        self._claim("forward")
        try:
            return self._forward(x)
        finally:
            self._in_use.release()

    def _claim(self, call: str) -> None:
        """Hold the layer for this thread; another thread inside it is an error.

        A layer is not thread-safe: its forward pass is what the next backward
        pass differentiates, and each training pass updates the running
        statistics. Two threads in one layer would silently mix both.
        """
        if not self._in_use.acquire(blocking=False):
            raise RuntimeError(
                f"{type(self).__name__}.{call}() called while another thread is "
                "inside this layer: a layer is not thread-safe. Use one layer per "
                "thread (copy.deepcopy(layer)), or hold a lock around its calls."
            )

    def _forward(self, x: Any) -> np.ndarray:
        x, _ = check_input(x, self.options.axis)
        self._check_channels(x)
        if not (self.use_batch_stats or self.update_running_stats):
            return self._forward_eval(x)
        if self.options.virtual_batch_size is not None or self.options.renorm:
            y, groups, running = ghost.train_pass(
                self.options,
                self.gamma,
                self.beta,
                self._running_state(),
                x,
                self._buffer("y", x),
                rmax=self.rmax,
                dmax=self.dmax,
                update_running_stats=self.update_running_stats,
            )
            self._set_running_state(running)
            if self.use_batch_stats:
                self._remember(groups=groups)
                return y
            return self._forward_eval(x)
        y, cache = F.forward_train(
            x,
            self.gamma,
            self.beta,
            out=self._buffer("y", x),
            **self.options.train_arguments(),
        )
        if self.update_running_stats:
            self.absorb_moments(cache.moments)
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
            out=self._buffer("y", x),
            **self.options.eval_arguments(),
        )
        self._remember(eval_input=np.asarray(x))
        return y

    def _remember(
        self,
        *,
        cache: F.Cache | None = None,
        groups: ghost.GroupPass | None = None,
        eval_input: np.ndarray | None = None,
    ) -> None:
        """What :meth:`backward` needs from the forward pass that just succeeded."""
        self._cache, self._groups, self._eval_input = cache, groups, eval_input

    def _buffer(self, name: str, like: np.ndarray, *inputs: Any) -> np.ndarray | None:
        """Reused output array ``name`` (:class:`OutputBuffers`); None by default."""
        return (
            self._buffers.get(name, like, *inputs)
            if self.options.reuse_buffers
            else None
        )

    def _check_channels(self, x: np.ndarray) -> None:
        axis, num_features = self.options.axis, self.options.num_features
        if x.shape[axis] != num_features:
            raise ValueError(
                f"x has {x.shape[axis]} channels on axis {axis} (shape "
                f"{x.shape}); this layer has num_features={num_features}. Check "
                "the channel axis (axis=-1 for channels-last) or build the layer "
                f"with num_features={x.shape[axis]}."
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
        self._claim("backward")
        try:
            return self._backward(dy)
        finally:
            self._in_use.release()

    def _backward(self, dy: Any) -> np.ndarray:
        if self._groups is not None:
            out = self._buffer("dx", self._groups.x, np.asarray(dy))
            dx, dgamma, dbeta = ghost.backward_pass(self.options, self._groups, dy, out)
        elif self._cache is not None:
            out = self._buffer("dx", self._cache.x, np.asarray(dy))
            dx, dgamma, dbeta = F.backward(
                dy, self._cache, backend=self.options.backend, out=out
            )
        elif self._eval_input is not None:
            dx, dgamma, dbeta = F.backward_eval(
                dy,
                self._eval_input,
                self.gamma,
                self.running_mean,
                self.running_var,
                out=self._buffer("dx", self._eval_input, np.asarray(dy)),
                **self.options.eval_arguments(),
            )
        else:
            raise RuntimeError(
                "backward() called before forward(): run layer(x) first, then "
                "layer.backward(dy) with dy shaped like the output."
            )
        if self.options.affine:
            self.grad_gamma = dgamma.astype(self.options.dtype)
            self.grad_beta = dbeta.astype(self.options.dtype)
        return dx

    def parameters(self) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
        """Yield ``(name, value, grad)`` for γ and β (none when frozen or not affine).

        Optimizers update ``value`` in place.
        """
        if not (self.options.affine and self.trainable):
            return
        assert self.gamma is not None and self.beta is not None
        yield "gamma", self.gamma, self.grad_gamma
        yield "beta", self.beta, self.grad_beta

    # -- state ------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        """Running statistics back to their initial values; counters to 0."""
        c, dtype = self.options.num_features, self.options.dtype
        self._set_running_state(
            RunningState(
                np.full(c, self.options.initial_running_mean, dtype),
                np.full(c, self.options.initial_running_var, dtype),
                0,
                0,
            )
        )

    def absorb_moments(self, moments: Moments) -> None:
        """Fold one batch's ``moments`` into the running statistics, all or nothing.

        The layer's ``momentum``, ``running_var_kind`` and ``on_nonfinite`` apply;
        a skipped batch changes nothing (not even the counters).
        """
        self._set_running_state(
            self._running_state().absorbed(
                moments,
                momentum=self.options.momentum,
                running_var_kind=self.options.running_var_kind,
                on_nonfinite=self.options.on_nonfinite,
            )
        )

    def _running_state(self) -> RunningState:
        return RunningState(
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            self.num_values_seen,
        )

    def _set_running_state(self, state: RunningState) -> None:
        self.running_mean, self.running_var = state.mean, state.var
        self.num_batches_tracked = state.num_batches_tracked
        self.num_values_seen = state.num_values_seen

    def state_dict(self) -> dict[str, Any]:
        """Copies of γ, β (when affine), running statistics and counters."""
        state: dict[str, Any] = {
            "running_mean": self.running_mean.copy(),
            "running_var": self.running_var.copy(),
            "num_batches_tracked": self.num_batches_tracked,
            "num_values_seen": self.num_values_seen,
        }
        if self.gamma is not None and self.beta is not None:
            state["gamma"] = self.gamma.copy()
            state["beta"] = self.beta.copy()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the state with ``state``; on any error the layer is unchanged.

        Raises
        ------
        TypeError, ValueError
            Missing or unknown keys, wrong shapes, non-floating arrays, negative or
            non-finite running variance, negative counters.
        """
        arrays, counters = check_state_dict(
            state,
            self.options.num_features,
            self.options.dtype,
            affine=self.options.affine,
        )
        if self.options.affine:
            self.gamma, self.beta = arrays["gamma"], arrays["beta"]
        self._set_running_state(
            RunningState(
                arrays["running_mean"],
                arrays["running_var"],
                counters["num_batches_tracked"],
                counters["num_values_seen"],
            )
        )
        self._cache = self._eval_input = self._groups = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_in_use"]  # a lock is per object and cannot be copied
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__["_in_use"] = threading.RLock()

    def __repr__(self) -> str:
        mode = (
            "train"
            if self.use_batch_stats and self.update_running_stats
            else "eval"
            if not (self.use_batch_stats or self.update_running_stats)
            else f"use_batch_stats={self.use_batch_stats}, "
            f"update_running_stats={self.update_running_stats}"
        )
        o = self.options
        return (
            f"BatchNorm({o.num_features}, axis={o.axis}, eps={o.eps}, "
            f"momentum={o.momentum}, running_var_kind={o.running_var_kind!r}, "
            f"affine={o.affine}, mode={mode})"
        )
