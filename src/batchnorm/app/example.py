"""``batchnorm example``: the seed's claims checked on random data, in a few lines."""

from __future__ import annotations

import argparse

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--steps", type=int, default=200, help="training steps (default 200)"
    )


def run(args: argparse.Namespace) -> int:
    import batchnorm as bn

    rng = np.random.default_rng(args.seed)

    def batch(n: int) -> np.ndarray:  # 4 channels, mean 1e4, standard deviation 3
        return rng.normal(1e4, 3.0, size=(n, 4, 8, 8)).astype(np.float32)

    seed_layer = bn.BatchNorm(4)  # momentum 0.99, the seed's choice
    torch_like = bn.BatchNorm.from_preset("torch", 4)  # momentum 0.9 (torch's 0.1)
    for step in range(args.steps):
        x = batch(32)
        for layer in (seed_layer, torch_like):
            y = layer(x)
            layer.backward(rng.normal(size=y.shape).astype(np.float32))
        if step == 0:
            mean, var = y.mean(axis=(0, 2, 3)), y.var(axis=(0, 2, 3))
            print(f"train step 0: output mean {mean.round(6)}, var {var.round(6)}")
    x_test = batch(8)
    for name, layer in (("momentum 0.99", seed_layer), ("momentum 0.9 ", torch_like)):
        left = layer.momentum**args.steps
        y_test = layer.eval()(x_test)
        print(
            f"{name}: running mean {layer.running_mean.mean():9.2f} (data 1e4; "
            f"{left:.3f} of the initial 0 remains), running var "
            f"{layer.running_var.mean():.3f} (data 9); eval output mean "
            f"{y_test.mean():+.4f}, var {y_test.var():.4f}"
        )
    print(
        "A larger momentum averages over more batches and forgets its start more "
        "slowly: after enough steps both match the data (try --steps 2000)."
    )
    return 0
