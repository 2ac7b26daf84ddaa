"""``batchnorm example``: the seed's claims checked on random data, in a few lines."""

from __future__ import annotations

import argparse

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    import batchnorm as bn

    rng = np.random.default_rng(args.seed)
    layer = bn.BatchNorm(4)
    print(layer)
    for step in range(200):
        x = rng.normal(1e4, 3.0, size=(32, 4, 8, 8)).astype(np.float32)
        y = layer(x)
        layer.backward(rng.normal(size=y.shape).astype(np.float32))
        if step == 0:
            mean, var = y.mean(axis=(0, 2, 3)), y.var(axis=(0, 2, 3))
            print(f"train step 0: output mean {mean.round(6)}, var {var.round(6)}")
    print(f"running mean after 200 steps: {layer.running_mean}  (data mean 1e4)")
    print(f"running var  after 200 steps: {layer.running_var}  (data var 9)")
    layer.eval()
    y = layer(rng.normal(1e4, 3.0, size=(8, 4, 8, 8)).astype(np.float32))
    print(f"eval output mean {y.mean():.4f}, var {y.var():.4f}")
    return 0
