"""Read, write, inspect and fold a yolov3-sized darknet file: time and peak memory.

Writes a yolov3-shaped cfg (pjreddie's yolov3.cfg layer sequence at 416x416,
generated here) and a .weights file of random values for it: 248,007,048 bytes,
the size of pjreddie's yolov3.weights. Then times, in one process, medians of
``--repeats`` runs (the file is in the page cache after the first):

- ``darknet.read`` (one pass into one float32 buffer) and ``read(mmap=True)``,
  plus a full pass over the mapped values (what inspect or fold would touch);
- ``darknet.write`` back (and checks the bytes are identical);
- ``darknet.fold``;

and reports the peak of traced allocations (tracemalloc, which sees NumPy's
buffers) against the file size: a reader that held two copies would show ~2x.

    python benchmarks/bench_darknet_read.py [--repeats 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from batchnorm.io import darknet

YOLOV3_BYTES = 248_007_048


def conv(filters: int, size: int, stride: int = 1, bn: bool = True) -> str:
    return (
        f"[convolutional]\n{'batch_normalize=1' + chr(10) if bn else ''}"
        f"filters={filters}\nsize={size}\nstride={stride}\npad=1\n"
        f"activation={'leaky' if bn else 'linear'}\n"
    )


def yolov3_cfg() -> str:
    """pjreddie's yolov3.cfg layer sequence at 416x416 (80 classes)."""
    out = ["[net]\nbatch=1\nwidth=416\nheight=416\nchannels=3\n", conv(32, 3)]
    for filters, blocks in ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)):
        out.append(conv(filters, 3, 2))
        for _ in range(blocks):
            out += [conv(filters // 2, 1), conv(filters, 3)]
            out.append("[shortcut]\nfrom=-3\nactivation=linear\n")
    yolo = "[yolo]\nmask={}\nanchors=10,13,16,30,33,23,30,61,62,45,59,119,116,90,156,198,373,326\nclasses=80\nnum=9\n"  # noqa: E501
    for filters, mask, skip in (
        (512, "6,7,8", 61),
        (256, "3,4,5", 36),
        (128, "0,1,2", None),
    ):
        for _ in range(3):
            out += [conv(filters, 1), conv(filters * 2, 3)]
        out += [conv(255, 1, bn=False), yolo.format(mask)]
        if skip is not None:
            out += ["[route]\nlayers=-4\n", conv(filters // 2, 1)]
            out += ["[upsample]\nstride=2\n", f"[route]\nlayers=-1,{skip}\n"]
    return "\n".join(out)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak(fn) -> int:
    gc.collect()
    tracemalloc.start()
    result = fn()
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result
    return top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        cfg, weights = folder / "yolov3.cfg", folder / "yolov3.weights"
        cfg.write_text(yolov3_cfg())
        darknet.write(darknet.synthetic(cfg, seed=0), weights)
        size = weights.stat().st_size
        assert size == YOLOV3_BYTES, f"{size} bytes, not yolov3's {YOLOV3_BYTES}"
        weights.read_bytes()  # into the page cache

        def read_mapped_and_touch() -> float:
            network = darknet.read(cfg, weights, mmap=True)
            return sum(
                float(a.sum()) for layer in network for a in layer.arrays.values()
            )

        network = darknet.read(cfg, weights)
        out = folder / "copy.weights"
        rows = [
            (
                "read",
                median_time(lambda: darknet.read(cfg, weights), args.repeats),
                peak(lambda: darknet.read(cfg, weights)),
            ),
            (
                "read(mmap=True)",
                median_time(
                    lambda: darknet.read(cfg, weights, mmap=True), args.repeats
                ),
                peak(lambda: darknet.read(cfg, weights, mmap=True)),
            ),
            (
                "read(mmap=True) + sum of every array",
                median_time(read_mapped_and_touch, args.repeats),
                peak(read_mapped_and_touch),
            ),
            (
                "write",
                median_time(lambda: darknet.write(network, out), args.repeats),
                peak(lambda: darknet.write(network, out)),
            ),
            (
                "fold",
                median_time(lambda: darknet.fold(network), args.repeats),
                peak(lambda: darknet.fold(network)),
            ),
        ]
        identical = out.read_bytes() == weights.read_bytes()
    print(
        f"yolov3-shaped network, {len(network)} layers, {size:,} bytes "
        f"({size / 2**20:.1f} MiB); median of {args.repeats} runs, page cache warm"
    )
    print(f"{'operation':<40} {'time (s)':>9} {'peak alloc / file':>18}")
    for name, seconds, top in rows:
        print(f"{name:<40} {seconds:>9.3f} {top / size:>18.2f}")
    print(f"write gives identical bytes: {identical}")


if __name__ == "__main__":
    main()
