"""Every error path, with its message pinned, and that failed calls change nothing."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn

F = bn.functional
X = np.random.default_rng(0).normal(size=(4, 3, 5))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: F.forward_train(np.ones(16), None, None),
            ValueError,
            r"at least 2 dimensions \(N, C, \.\.\.\); got shape \(16,\)\. "
            r".*x\[None, :\]",
        ),
        (
            lambda: F.forward_train(np.ones((4, 3), int), None, None),
            TypeError,
            r"x must have a floating dtype .* got dtype int64\. .*astype",
        ),
        (
            lambda: F.forward_train(np.ones((4, 3), complex), None, None),
            TypeError,
            r"got dtype complex128",
        ),
        (
            lambda: F.forward_train(np.ones((4, 3), bool), None, None),
            TypeError,
            r"got dtype bool",
        ),
        (lambda: F.forward_train(None, None, None), TypeError, r"x must be an array"),
        (
            lambda: F.forward_train(X, None, None, axis=3),
            ValueError,
            r"axis must be in \[-3, 2\] .* got axis=3",
        ),
        (
            lambda: F.forward_train(X, None, None, axis=1.0),
            TypeError,
            r"axis must be an int; got float",
        ),
        (
            lambda: F.forward_train(X, np.ones(4), None),
            ValueError,
            r"gamma must have shape \(3,\), one value per channel of x; "
            r"got shape \(4,\)",
        ),
        (
            lambda: F.forward_train(X, None, np.ones((3, 1))),
            ValueError,
            r"beta must have shape \(3,\)",
        ),
        (
            lambda: F.forward_train(X, np.ones(3, int), None),
            TypeError,
            r"gamma must have a floating dtype",
        ),
        (
            lambda: F.forward_train(X[:1, :, :1], None, None),
            ValueError,
            r"m = N · ∏ spatial = 1 · 1 = 1\. Use a batch of 2 or more",
        ),
        (
            lambda: F.forward_train(np.ones((1, 3)), None, None),
            ValueError,
            r"at least 2 values per channel .* m = N · ∏ spatial = 1\. Use",
        ),
        (
            lambda: F.forward_train(X, None, None, eps=-1.0),
            ValueError,
            r"eps must be a finite float > 0; got -1\.0",
        ),
        (
            lambda: F.forward_train(X, None, None, eps=0.0),
            ValueError,
            r"eps must be a finite float > 0; got 0\.0\. With eps = 0 a constant",
        ),
        (
            lambda: F.forward_eval(X, None, None, np.zeros(3), np.ones(3), eps=0),
            ValueError,
            r"eps must be a finite float > 0; got 0\.0",
        ),
        (
            lambda: F.forward_train(X, None, None, eps=np.nan),
            ValueError,
            r"eps must be a finite float",
        ),
        (
            lambda: F.forward_train(X, None, None, eps="1e-6"),
            TypeError,
            r"eps must be a positive float; got str",
        ),
        (
            lambda: F.forward_train(X, None, None, eps_placement="under"),
            ValueError,
            r"eps_placement must be one of 'inside', 'outside'; got 'under'",
        ),
        (
            lambda: F.forward_train(X, None, None, ddof=2),
            ValueError,
            r"ddof must be 0 .* or 1 .* got 2",
        ),
        (
            lambda: F.forward_train(X, None, None, backend="cuda"),
            ValueError,
            r"backend must be one of 'numpy', 'numba'; got 'cuda'",
        ),
        (
            lambda: F.backward(X, "cache"),
            TypeError,
            r"cache must be the Cache returned by forward_train; got str",
        ),
        (
            lambda: F.backward(X[:2], F.forward_train(X, None, None)[1]),
            ValueError,
            r"dy must have the shape of the forward input \(4, 3, 5\); got \(2, 3, 5\)",
        ),
        (
            lambda: F.forward_eval(X, None, None, np.zeros(3), -np.ones(3)),
            ValueError,
            r"running_var must be finite and >= 0 in every channel; 3 of 3 are not: "
            r"channels \[0, 1, 2\] hold \[-1\.0, -1\.0, -1\.0\]",
        ),
        (
            lambda: F.forward_eval(
                X, None, None, np.zeros(3), np.array([1, np.nan, 1.0])
            ),
            ValueError,
            r"channels \[1\] hold \[nan\]",
        ),
        (
            lambda: F.forward_eval(X, None, None, np.zeros(2), np.ones(3)),
            ValueError,
            r"running_mean must have shape \(3,\)",
        ),
        (
            lambda: F.forward_eval(X, None, None, None, np.ones(3)),
            TypeError,
            r"running_mean must be an array of shape \(3,\); got None",
        ),
        (
            lambda: F.backward_eval(X[:1], X, None, np.zeros(3), np.ones(3)),
            ValueError,
            r"dy must have the shape of the forward input",
        ),
    ],
)
def test_functional_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


M = bn.Moments(4, np.zeros(3), np.ones(3))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"momentum": 1.5},
            ValueError,
            r"momentum must be in \[0, 1\] \(the weight on the OLD running value.*1\.5",
        ),
        ({"momentum": 99}, ValueError, r"It is a weight, not a percentage"),
        ({"momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\]"),
        (
            {"momentum": "0.9"},
            TypeError,
            r"momentum must be a float in \[0, 1\] or None",
        ),
        (
            {"momentum": None},
            ValueError,
            r"momentum=None .* needs num_values_seen.* got None",
        ),
        ({"momentum": None, "num_values_seen": -1}, ValueError, r"got -1"),
        (
            {"running_var_kind": "sample"},
            ValueError,
            r"running_var_kind must be one of 'unbiased', 'biased'; got 'sample'",
        ),
        (
            {"on_nonfinite": "ignore"},
            ValueError,
            r"on_nonfinite must be one of 'raise', 'skip'; got 'ignore'",
        ),
    ],
)
def test_update_running_stats_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        F.update_running_stats(np.zeros(3), np.ones(3), M, **kwargs)


def test_update_running_stats_other_errors():
    with pytest.raises(
        TypeError, match="cache must be a Cache from forward_train or a"
    ):
        F.update_running_stats(np.zeros(3), np.ones(3), (1, 2))
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        F.update_running_stats(np.zeros(2), np.ones(3), M)
    one = bn.Moments(1, np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="'unbiased' needs more than 1 value"):
        F.update_running_stats(np.zeros(3), np.ones(3), one)


def test_moments_errors():
    with pytest.raises(ValueError, match="cannot merge Moments of 3 channels with"):
        M.merge(bn.Moments.empty(2))
    with pytest.raises(TypeError, match="other must be Moments"):
        M.merge(3)
    with pytest.raises(ValueError, match=r"var\(ddof=1\) needs more than 1 values"):
        bn.Moments(1, np.zeros(1), np.zeros(1)).var(1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"backend": "cuda"},
            ValueError,
            r"backend must be one of 'numpy', 'numba' or None .* got 'cuda'",
        ),
        (
            {"initial_running_var": -1.0},
            ValueError,
            r"initial_running_var finite and >= 0; got 0\.0 and -1\.0",
        ),
        (
            {"initial_running_mean": float("nan")},
            ValueError,
            r"initial_running_mean must be finite",
        ),
        ({"initial_running_var": float("inf")}, ValueError, r"got 0\.0 and inf"),
    ],
)
def test_layer_constructor_rejects_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        bn.BatchNorm(3, **kwargs)


def test_bfloat16_parameters_are_refused_with_the_reason():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with pytest.raises(TypeError, match="Inputs may be bfloat16"):
        bn.BatchNorm(3, dtype=ml_dtypes.bfloat16)
    # ... while bfloat16 input and a bfloat16 state dict are accepted
    layer = bn.BatchNorm(3)
    y = layer(np.ones((4, 3)).astype(ml_dtypes.bfloat16))
    assert y.dtype == ml_dtypes.bfloat16
    state = {
        k: (v.astype(ml_dtypes.bfloat16) if isinstance(v, np.ndarray) else v)
        for k, v in layer.state_dict().items()
    }
    layer.load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_features": 0}, ValueError, r"num_features must be >= 1; got 0"),
        ({"num_features": 3.0}, TypeError, r"num_features must be an int .* got float"),
        (
            {"num_features": 3, "axis": 0, "virtual_batch_size": 4},
            ValueError,
            r"virtual_batch_size splits the batch along axis 0, but axis=0",
        ),
        (
            {"num_features": 3, "eps": 0.0},
            ValueError,
            r"eps must be a finite float > 0",
        ),
        ({"num_features": 3, "momentum": 2}, ValueError, r"momentum must be in"),
        ({"num_features": 3, "eps": -1}, ValueError, r"eps must be a finite float"),
        (
            {"num_features": 3, "dtype": np.int32},
            TypeError,
            r"dtype \(of γ, β and the running statistics\) must be float16, "
            r"float32 or float64; got int32",
        ),
        ({"num_features": 3, "running_var_kind": "x"}, ValueError, r"running_var_kind"),
    ],
)
def test_layer_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        bn.BatchNorm(**kwargs)


def test_layer_call_errors():
    layer = bn.BatchNorm(3)
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        layer.backward(X)
    with pytest.raises(
        ValueError,
        match=r"x has 4 channels on axis 1 .* "
        r"num_features=3",
    ):
        bn.BatchNorm(3, affine=False)(np.ones((2, 4)))
    with pytest.raises(
        ValueError,
        match="preset must be one of 'darknet', 'torch', 'keras', 'onnx'; got 'caffe'",
    ):
        bn.BatchNorm.from_preset("caffe", 3)


def test_failed_forward_leaves_layer_untouched():
    layer = bn.BatchNorm(3, momentum=0.5)
    layer(X)
    before = layer.state_dict()
    cases = [
        (np.ones((1, 3)), ValueError, r"at least 2 values per channel"),
        (np.ones((4, 5)), ValueError, r"x has 5 channels on axis 1"),
        (np.ones((4, 3), int), TypeError, r"floating dtype .* got dtype int64"),
        (np.ones(3), ValueError, r"at least 2 dimensions"),
    ]
    for bad, error, match in cases:
        with pytest.raises(error, match=match):
            layer(bad)
    after = layer.state_dict()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda s: s.pop("gamma"), ValueError, r"missing \['gamma'\], unknown \[\]"),
        (lambda s: s.update(weight=1), ValueError, r"unknown \['weight'\]"),
        (
            lambda s: s.update(gamma=np.ones(4)),
            ValueError,
            r"state_dict\['gamma'\] must have shape \(3,\); got \(4,\)",
        ),
        (
            lambda s: s.update(beta=np.ones(3, int)),
            TypeError,
            r"state_dict\['beta'\] must be a floating array; got dtype int64",
        ),
        (
            lambda s: s.update(running_var=-np.ones(3)),
            ValueError,
            r"state_dict\['running_var'\] \(in float32\) must be finite and >= 0 in "
            r"every channel; 3 of 3 are not: channels \[0, 1, 2\] hold "
            r"\[-1\.0, -1\.0, -1\.0\]",
        ),
        (
            lambda s: s.update(running_mean=np.full(3, np.inf)),
            ValueError,
            r"state_dict\['running_mean'\] \(in float32\) must be finite in every "
            r"channel; 3 of 3 are not: channels \[0, 1, 2\] hold \[inf, inf, inf\]",
        ),
        (
            lambda s: s.update(gamma=np.array([1.0, np.nan, 1.0])),
            ValueError,
            r"state_dict\['gamma'\] \(in float32\) must be finite in every channel; "
            r"1 of 3 is not: channels \[1\] hold \[nan\]",
        ),
        (
            lambda s: s.update(beta=np.array([1.0, 1.0, 1e300])),
            ValueError,
            r"state_dict\['beta'\] \(in float32\) must be finite in every channel; "
            r"1 of 3 is not: channels \[2\]",
        ),
        (
            lambda s: s.update(num_batches_tracked=-1),
            ValueError,
            r"state_dict\['num_batches_tracked'\] must be >= 0 \(a count\); got -1",
        ),
        (
            lambda s: s.update(num_values_seen=2.5),
            TypeError,
            r"state_dict\['num_values_seen'\] must be an int; got float",
        ),
    ],
)
def test_load_state_dict_errors_leave_layer_untouched(mutate, error, match):
    layer = bn.BatchNorm(3, momentum=0.5)
    layer(X)
    before = layer.state_dict()
    state = layer.state_dict()
    state["running_mean"] = state["running_mean"] + 7.0  # a change that must not land
    mutate(state)
    with pytest.raises(error, match=match):
        layer.load_state_dict(state)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_load_state_dict_rejects_non_mapping():
    with pytest.raises(TypeError, match="state must be a mapping; got list"):
        bn.BatchNorm(3).load_state_dict([1, 2])


@pytest.mark.parametrize(
    "options",
    [{}, {"virtual_batch_size": 2}, {"renorm": True}],
    ids=["plain", "ghost", "renorm"],
)
def test_failed_forward_keeps_the_pending_backward(options):
    """A NaN batch raises, and backward() still differentiates the last good pass."""
    layer = bn.BatchNorm(3, momentum=0.5, dtype=np.float64, **options)
    x = np.random.default_rng(1).normal(size=(4, 3))
    dy = np.random.default_rng(2).normal(size=(4, 3))
    layer(x)
    expected = layer.backward(dy)
    before = layer.state_dict()
    bad = x.copy()
    bad[0, 1] = np.nan
    with pytest.raises(bn.NonFiniteStatisticsError, match=r"channels \[1\]"):
        layer(bad)
    np.testing.assert_array_equal(layer.backward(dy), expected)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
