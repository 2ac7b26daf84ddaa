"""The layer's options: one frozen dataclass, checked when built and when set."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.options import OPTION_NAMES, LayerOptions


def test_config_lists_every_option_once_and_rebuilds_the_layer():
    layer = bn.BatchNorm.from_preset("darknet", 5, virtual_batch_size=4)
    config = layer.config()
    assert set(config) == OPTION_NAMES
    rebuilt = bn.BatchNorm(**config)
    assert rebuilt.options == layer.options


def test_options_are_frozen():
    options = LayerOptions(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.eps = 1e-3  # type: ignore[misc]


def test_setting_an_option_on_the_layer_checks_it_again():
    layer = bn.BatchNorm(3)
    layer.momentum = 0.5
    assert layer.momentum == 0.5 and layer.options.momentum == 0.5
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        layer.momentum = 2.0
    assert layer.momentum == 0.5  # a rejected value leaves the option as it was


@pytest.mark.parametrize("name", ["num_features", "affine", "dtype"])
def test_options_that_shape_the_state_are_fixed(name):
    layer = bn.BatchNorm(3)
    with pytest.raises(AttributeError, match=f"{name} is fixed"):
        setattr(layer, name, 4)


def test_unknown_option_names_the_known_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'momentun'.*momentum"):
        bn.BatchNorm(3, momentun=0.9)


def test_rmax_and_dmax_stay_plain_attributes_for_a_trainer():
    layer = bn.BatchNorm(3, renorm=True, rmax=2.0)
    layer.rmax, layer.dmax = 1.5, 0.5
    assert layer.config()["rmax"] == 1.5 and layer.config()["dmax"] == 0.5
    assert layer.options.rmax == 2.0  # the constructor's value, as built


def test_dtype_is_normalized_once():
    assert LayerOptions(2, dtype="float64").dtype == np.dtype(np.float64)
    assert LayerOptions(2, dtype="float64").config()["dtype"] == "float64"


def test_call_arguments_are_keywords_of_the_functional_calls():
    import inspect

    from batchnorm import renorm

    options = LayerOptions(3, axis=-1, eps=1e-3, ddof=1, backend="numpy")
    train, evaluate = options.train_arguments(), options.eval_arguments()
    assert train == {**evaluate, "ddof": 1}
    assert evaluate == {
        "axis": -1,
        "eps": 1e-3,
        "eps_placement": "inside",
        "backend": "numpy",
    }
    for call, arguments in [
        (bn.functional.forward_train, train),
        (bn.functional.forward_from_moments, train),
        (renorm.forward_renorm, train),
        (bn.functional.forward_eval, evaluate),
        (bn.functional.backward_eval, evaluate),
    ]:
        assert set(arguments) <= set(inspect.signature(call).parameters)
