"""A small NumPy training harness around :class:`batchnorm.BatchNorm`.

Layers (:class:`Linear`, :class:`Conv2d`, :class:`ReLU`, :class:`Sigmoid`,
:class:`MaxPool2d`, :class:`GlobalAvgPool`, :class:`Flatten`, :class:`Sequential`)
share one protocol with the BatchNorm layer: ``forward``, ``backward``,
``parameters()`` yielding ``(name, value, grad)``. :class:`SoftmaxCrossEntropy`,
:class:`SGD`, the digits data and :func:`fit` complete a training loop; the demo
(``batchnorm demo``) is built from these parts.

>>> import numpy as np, batchnorm as bn
>>> from batchnorm import nn
>>> model = nn.Sequential([nn.Linear(4, 8, bias=False, rng=0), bn.BatchNorm(8),
...                        nn.ReLU(), nn.Linear(8, 3, rng=0)])
>>> loss = nn.SoftmaxCrossEntropy()
>>> x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
>>> y = np.arange(16) % 3
>>> value = loss(model(x), y)
>>> _ = model.backward(loss.backward())
>>> nn.SGD(model, lr=0.1, momentum=0.9).step()
"""

from batchnorm.nn.conv import Conv2d, GlobalAvgPool, MaxPool2d
from batchnorm.nn.data import Split, load_digits, minibatches, train_test_split
from batchnorm.nn.gradcheck import numerical_gradient
from batchnorm.nn.layers import (
    Flatten,
    LeakyReLU,
    Linear,
    Module,
    ReLU,
    Sequential,
    Sigmoid,
    Softmax,
)
from batchnorm.nn.loss import SoftmaxCrossEntropy
from batchnorm.nn.models import cnn, mlp, paper_mlp
from batchnorm.nn.optim import SGD, darknet_sgd, seed_sgd, takes_weight_decay
from batchnorm.nn.train import History, accuracy, fit, statistics_mode
from batchnorm.nn.walk import batch_norms, children, replace_batch_norms, walk

__all__ = [
    "SGD",
    "Conv2d",
    "Flatten",
    "GlobalAvgPool",
    "History",
    "LeakyReLU",
    "Linear",
    "MaxPool2d",
    "Module",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Softmax",
    "SoftmaxCrossEntropy",
    "Split",
    "accuracy",
    "batch_norms",
    "children",
    "cnn",
    "darknet_sgd",
    "fit",
    "load_digits",
    "minibatches",
    "mlp",
    "numerical_gradient",
    "paper_mlp",
    "replace_batch_norms",
    "seed_sgd",
    "statistics_mode",
    "takes_weight_decay",
    "train_test_split",
    "walk",
]
