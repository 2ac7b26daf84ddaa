"""Measured fold error on a real-shaped network, against ``darknet.fold_error_bound``.

For every batch-normalized convolution of a darknet network (with random
weights from ``darknet.synthetic`` unless ``--weights`` is given), feeds one
N(0, 1) input of the layer's input shape through

- darknet's unfolded float32 computation: the convolution in float32, then
  ``normalize_cpu`` (``x - mean`` in float, divided by ``sqrt(var) + 1e-6f`` in
  double, stored as float), ``scale_bias`` and ``add_bias`` in float;
- the folded layer in float32: ``W' x + b'``;

and prints, per layer, the largest ``|folded − unfolded|``, the largest ratio of
that difference to :func:`batchnorm.io.darknet.fold_error_bound` (≤ 1 is the
claim), and the output's scale for context.

    python benchmarks/darknet_fold_error.py NET.cfg [--weights NET.weights] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np

from batchnorm.io import darknet


def im2col(x: np.ndarray, size: int, stride: int, padding: int) -> np.ndarray:
    """(c·size², out_h·out_w) patches of one (c, h, w) image, darknet's order."""
    c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding)))
    oh = (h + 2 * padding - size) // stride + 1
    ow = (w + 2 * padding - size) // stride + 1
    cols = np.empty((c, size, size, oh, ow), x.dtype)
    for ky in range(size):
        for kx in range(size):
            cols[:, ky, kx] = padded[
                :, ky : ky + stride * oh : stride, kx : kx + stride * ow : stride
            ]
    return cols.reshape(c * size * size, oh * ow)


def conv(
    weights: np.ndarray,
    x: np.ndarray,
    size: int,
    stride: int,
    padding: int,
    groups: int,
) -> np.ndarray:
    """(n, out_h·out_w) output of a grouped convolution in ``weights.dtype``."""
    n = weights.shape[0]
    per_in, per_out = x.shape[0] // groups, n // groups
    out = []
    for g in range(groups):
        cols = im2col(x[g * per_in : (g + 1) * per_in], size, stride, padding)
        w = weights[g * per_out : (g + 1) * per_out].reshape(per_out, -1)
        out.append(w @ cols.astype(w.dtype))
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cfg")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    net = (
        darknet.read(args.cfg, args.weights)
        if args.weights
        else darknet.synthetic(args.cfg, seed=args.seed)
    )
    folded = darknet.folding(net)
    new_index = {}
    removed = {i for i, _ in folded.merged}
    for old in range(len(net)):
        new_index[old] = old - sum(1 for r in removed if r < old)
    rng = np.random.default_rng(args.seed)
    print(f"{args.cfg}: batch-normalized convolutions, one N(0, 1) input each")
    print(
        f"{'layer':>5} {'n':>5} {'fan-in':>7} {'max |folded - unfolded|':>24} "
        f"{'max ratio to bound':>19} {'max |output|':>13}"
    )
    worst = 0.0
    for layer in net:
        if layer.type != "convolutional" or not layer.batch_normalize:
            continue
        a = layer.arrays
        size = int(layer.option("size") or 1)
        stride = int(layer.option("stride") or 1)
        padding = (
            size // 2
            if int(layer.option("pad") or 0)
            else int(layer.option("padding") or 0)
        )
        groups = int(layer.option("groups") or 1)
        x = rng.standard_normal((layer.input.c, layer.input.h, layer.input.w))
        x = x.astype(np.float32)
        out = conv(a["weights"], x, size, stride, padding, groups).T  # channels last
        d = np.sqrt(a["rolling_variance"].astype(np.float64)) + float(np.float32(1e-6))
        centred = out - a["rolling_mean"]  # float - float
        unfolded = (centred.astype(np.float64) / d).astype(np.float32)
        unfolded = unfolded * a["scales"] + a["biases"]
        f = folded.network[new_index[layer.index]].arrays
        mine = conv(f["weights"], x, size, stride, padding, groups).T + f["biases"]
        magnitude = conv(
            np.abs(a["weights"].astype(np.float64)),
            np.abs(x),
            size,
            stride,
            padding,
            groups,
        ).T
        fan_in = a["weights"][0].size
        bound = darknet.fold_error_bound(
            magnitude,
            a["scales"],
            a["rolling_mean"],
            a["rolling_variance"],
            a["biases"],
            fan_in=fan_in,
        )
        diff = np.abs(mine.astype(np.float64) - unfolded)
        ratio = float(np.max(diff / bound))
        worst = max(worst, ratio)
        print(
            f"{layer.index:>5} {a['scales'].size:>5} {fan_in:>7} "
            f"{diff.max():>24.3g} {ratio:>19.3f} {np.abs(unfolded).max():>13.3g}"
        )
    print(f"largest ratio to the bound: {worst:.3f} (the bound holds when <= 1)")


if __name__ == "__main__":
    main()
