"""Weights files and interop: native ``.npz``, darknet, PyTorch, ONNX.

- :func:`save` / :func:`load`: the self-describing native format
  (:mod:`batchnorm.io.native`), atomic on save, fully checked on load;
- :func:`check_input_shape`: trace one sample's shape through a network (the
  writers that record an input shape, ONNX and darknet ``.cfg``, call it first);
- :mod:`batchnorm.io.darknet`: ``.cfg`` networks and ``.weights`` files;
- :mod:`batchnorm.io.pytorch`: state dicts and ``torch.nn`` modules;
- :mod:`batchnorm.io.onnx_export`: ONNX inference graphs.

Every reader raises :class:`FormatError` (a ``ValueError``) for a bad file and
never returns a half-loaded model; every writer replaces its files atomically
(:mod:`batchnorm.io._atomic`). See ``docs/INTEROP.md``.

>>> import tempfile, pathlib, numpy as np, batchnorm as bn
>>> from batchnorm import io, nn
>>> net = nn.Sequential([nn.Linear(4, 3, bias=False), bn.BatchNorm(3), nn.ReLU()])
>>> path = pathlib.Path(tempfile.mkdtemp()) / "net.npz"
>>> io.save(net, path)
>>> io.load(path).layers
[Linear(4, 3, bias=False), BatchNorm(3, ...), ReLU()]
"""

from batchnorm.io._shapes import check_input_shape
from batchnorm.io._structure import FormatError, Network
from batchnorm.io.native import FORMAT_VERSION, load, save
from batchnorm.nn.layers import LeakyReLU, Softmax

__all__ = [
    "FORMAT_VERSION",
    "FormatError",
    "LeakyReLU",
    "Network",
    "Softmax",
    "check_input_shape",
    "load",
    "save",
]
