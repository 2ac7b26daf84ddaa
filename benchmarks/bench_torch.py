"""PyTorch drop-in benchmark: ``batchnorm.torch`` against ``torch.nn.BatchNorm*d``.

One process, float32, at each thread count of ``--threads`` (``torch.set_num_threads``
and our kernels' ``batchnorm.kernels.numba.set_num_threads`` set to the same count).
Ours and torch's are timed interleaved (one call of each per repeat, the order
alternating), medians; every ratio is ours ÷ torch from the same run.

1. Per layer, ``BatchNorm2d`` on (64, 64, 56, 56), contiguous and channels_last:
   a training step (forward and backward of ``x`` with ``requires_grad`` and a
   random upstream gradient; weight and bias gradients too) and the eval forward
   (under ``torch.inference_mode``); and the tiny (8, 16, 16, 16), whose cost is
   call overhead: our per-call time minus torch's, in µs.
2. End to end, a ResNet-18-shaped network built here from ``torch.nn`` (the CPU
   build of torch has no torchvision), batch 16 at 112×112, channels_last and
   contiguous: one SGD training step (forward, cross-entropy, backward,
   ``optimizer.step``) and one eval forward, ours (``batchnorm.torch.convert`` of
   a deep copy) against torch's. The share of the step that batch norm takes is
   measured by timing, interleaved with the two, the same network with every
   batch norm replaced by ``torch.nn.Identity``: share = 1 − no-BN ÷ network.
3. Exactness: float32 channels_last inputs with every channel at mean 0, 1e4 or
   1e6 (std 1): max abs error of the training-mode output against torch in
   float64 on the float64 copy of the same data, and the relative error of the
   batch variance (unbiased, read from ``running_var`` after one step with
   momentum 1.0; ours also from ``torch.ops.batchnorm.forward_train``'s float64
   ``M2``) against a two-pass float64 variance.

Run::

    python benchmarks/bench_torch.py                              # about 3 min, 2 cores
    python benchmarks/bench_torch.py --write benchmarks/TORCH.md  # also write it
    python benchmarks/bench_torch.py --quick                      # smoke test

Numbers taken while other processes use the cores are the scheduler's: the run
warns when the load average is high, and rows whose calls waited off the CPU,
spread widely, or ran over twice as slow as at one thread are marked busy (their
targets are not judged). Run it on an idle
machine, or under ``chrt -f 1``. With ``--write``, everything below an
"## Analysis" heading of an existing file is kept.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchnorm.app import bench
from batchnorm.app.machine import machine
from batchnorm.kernels import numba as _numba
from batchnorm.torch import BatchNorm2d, convert

ANALYSIS = "## Analysis"
EPS = 1e-5
MAX_SPREAD = 0.5  # interquartile range over the median above which a row is busy
MAX_THREAD_SLOWDOWN = 2.0  # a row this much slower than at 1 thread is busy

# Targets: ours ÷ torch at most this.
TARGET_LAYER = {"training step": 0.5, "eval forward": 1.0}
TARGET_TINY = 1.5
TARGET_NETWORK = {"training step": 0.9, "eval forward": 1.0}


@dataclass(frozen=True)
class Sizes:
    layer: tuple[int, int, int, int]
    tiny: tuple[int, int, int, int]
    tiny_inner: int  # calls per timed sample of the tiny layer
    batch: int
    image: int
    exact: tuple[int, int, int, int]


FULL = Sizes((64, 64, 56, 56), (8, 16, 16, 16), 20, 16, 112, (64, 64, 56, 56))
QUICK = Sizes((4, 16, 16, 16), (8, 16, 16, 16), 5, 2, 32, (4, 8, 8, 8))
MEANS = (0.0, 1e4, 1e6)


# -- timing ----------------------------------------------------------------------


def interleave(
    calls: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    *,
    wake: bool,
    inner: int = 1,
) -> dict[str, bench.Timing]:
    """Per-call timings of each of ``calls``, one visit each per repeat.

    The order rotates each repeat (ours, torch / torch, ours / ...). With ``wake``
    every visit first makes one untimed call, which wakes the thread pools (an
    idle OpenMP worker sleeps, and waking it can take milliseconds; see
    ``batchnorm.app.bench._time``). A timed sample is ``inner`` calls back to
    back, divided by ``inner``. The process's CPU time is read around each
    sample (outside the wall clock's window) for the busy check.
    """
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                call = calls[name]
                if wake:
                    call()
                cpu_start = time.process_time()
                start = time.perf_counter()
                for _ in range(inner):
                    call()
                wall[name].append((time.perf_counter() - start) / inner)
                cpu[name].append((time.process_time() - cpu_start) / inner)
    finally:
        gc.enable()
    return {name: bench.Timing.of(wall[name], cpu[name]) for name in names}


def busy(timings: dict[str, bench.Timing], threads: int) -> str | None:
    """Why these timings are the scheduler's (see ``bench.busy_reason``), or None."""
    reasons = [bench.busy_reason(timings, threads)]
    spread = {k: t.spread for k, t in timings.items() if t.spread > MAX_SPREAD}
    if spread:
        listed = ", ".join(f"{k} {v:.0%}" for k, v in spread.items())
        reasons.append(
            f"calls spread by over {MAX_SPREAD:.0%} of their median ({listed})"
        )
    return "; ".join(r for r in reasons if r) or None


def mark_slower_with_threads(rows: list[dict[str, Any]]) -> None:
    """Mark busy the rows more than ``MAX_THREAD_SLOWDOWN`` × slower than at the
    fewest threads: a parallel call waiting at a barrier for a thread that another
    process holds spins on its CPU, so the CPU-time check does not see it."""
    key = ("shape", "layout", "op")
    fewest = min((r["threads"] for r in rows), default=1)
    base = {tuple(r[k] for k in key): r for r in rows if r["threads"] == fewest}
    for row in rows:
        first = base.get(tuple(row[k] for k in key))
        if first is None or row["threads"] == fewest:
            continue
        slower = [
            f"{name} {row[f'{name}_s'] / first[f'{name}_s']:.1f}×"
            for name in ("ours", "torch")
            if row[f"{name}_s"] > MAX_THREAD_SLOWDOWN * first[f"{name}_s"]
        ]
        if slower:
            reason = (
                f"slower at {row['threads']} threads than at {fewest} "
                f"({', '.join(slower)}): threads waited for cores"
            )
            row["busy"] = f"{row['busy']}; {reason}" if row["busy"] else reason


# -- 1. per layer ----------------------------------------------------------------


def _memory_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def layer_calls(
    shape: tuple[int, ...], layout: str, seed: int = 0
) -> dict[str, dict[str, Callable[[], Any]]]:
    """``calls[op]["ours" | "torch"]``: a training step and an eval forward."""
    torch.manual_seed(seed)
    fmt = _memory_format(layout)
    channels = shape[1]
    x = (torch.randn(shape) * 2 + 3).contiguous(memory_format=fmt)
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    xg = x.clone().requires_grad_()
    weight = torch.empty(channels).uniform_(0.5, 1.5)
    bias = torch.randn(channels)
    dims = [0, 2, 3]

    def module(cls: type, training: bool) -> nn.Module:
        m = cls(channels)
        with torch.no_grad():
            m.weight.copy_(weight)
            m.bias.copy_(bias)
            m.running_mean.copy_(x.mean(dims))
            m.running_var.copy_(x.var(dims))
        return m.train(training)

    def train_step(m: nn.Module) -> Callable[[], Any]:
        def step() -> None:
            xg.grad = None
            m.weight.grad = None
            m.bias.grad = None
            m(xg).backward(dy)

        return step

    def eval_forward(m: nn.Module) -> Callable[[], Any]:
        def forward() -> Any:
            with torch.inference_mode():
                return m(x)

        return forward

    classes = {"ours": BatchNorm2d, "torch": nn.BatchNorm2d}
    return {
        "training step": {k: train_step(module(c, True)) for k, c in classes.items()},
        "eval forward": {k: eval_forward(module(c, False)) for k, c in classes.items()},
    }


def layer_rows(
    sizes: Sizes, threads: int, repeats: int, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    rows = []
    for shape, tiny in ((sizes.layer, False), (sizes.tiny, True)):
        for layout in ("contiguous", "channels_last"):
            table = layer_calls(shape, layout)
            for op, calls in table.items():
                timings = interleave(
                    calls,
                    repeats,
                    warmup=3,
                    wake=True,
                    inner=sizes.tiny_inner if tiny else 1,
                )
                ours, theirs = timings["ours"].median_s, timings["torch"].median_s
                row = {
                    "shape": shape,
                    "layout": layout,
                    "op": op,
                    "threads": threads,
                    "ours_s": ours,
                    "torch_s": theirs,
                    "ratio": ours / theirs,
                    "target": TARGET_TINY if tiny else TARGET_LAYER[op],
                    "overhead_us": (ours - theirs) * 1e6 if tiny else None,
                    "busy": busy(timings, threads),
                }
                rows.append(row)
                log(_progress(row))
            del table
    return rows


# -- 2. end to end -----------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock``: two 3×3 convolutions with a shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def resnet18(num_classes: int = 1000) -> nn.Module:
    """ResNet-18 as torchvision builds it (its initialization too)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    inplanes = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers.append(
            nn.Sequential(
                BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)
            )
        )
        inplanes = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def without_bn(module: nn.Module) -> nn.Module:
    """``module`` with every batch norm replaced by ``nn.Identity`` (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            without_bn(child)
    return module


NETWORKS = ("ours", "torch", "no BN")


def network_calls(
    sizes: Sizes, layout: str, seed: int = 0
) -> tuple[dict[str, nn.Module], dict[str, Callable[[], Any]], dict[str, Any]]:
    """The three networks, their training steps and eval forwards, and a check
    that ours and torch's agree (forward from the same weights)."""
    torch.manual_seed(seed)
    fmt = _memory_format(layout)
    base = resnet18().to(memory_format=fmt)
    nets = {
        "ours": convert(copy.deepcopy(base)),
        "torch": base,
        "no BN": without_bn(copy.deepcopy(base)),
    }
    x = torch.randn(sizes.batch, 3, sizes.image, sizes.image).contiguous(
        memory_format=fmt
    )
    labels = torch.randint(0, 1000, (sizes.batch,))
    with torch.no_grad():
        out_ours, out_torch = nets["ours"](x), nets["torch"](x)
    check = {
        "max_abs_diff": (out_ours - out_torch).abs().max().item(),
        "max_abs": out_torch.abs().max().item(),
        "loss": {},
    }

    def step(name: str) -> Callable[[], Any]:
        net = nets[name]
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def train_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(x), labels)
            loss.backward()
            optimizer.step()
            check["loss"][name] = loss.item()

        return train_step

    def forward(name: str) -> Callable[[], Any]:
        net = nets[name]

        def eval_forward() -> Any:
            with torch.inference_mode():
                return net(x)

        return eval_forward

    calls = {
        "training step": {n: step(n) for n in NETWORKS},
        "eval forward": {n: forward(n) for n in NETWORKS},
    }
    return nets, calls, check


def network_rows(
    sizes: Sizes, threads: int, repeats: int, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    rows = []
    for layout in ("channels_last", "contiguous"):
        nets, table, check = network_calls(sizes, layout)
        for op, calls in table.items():
            for net in nets.values():
                net.train(op == "training step")
            timings = interleave(calls, repeats, warmup=2, wake=False)
            ours, theirs, plain = (timings[n].median_s for n in NETWORKS)
            row = {
                "shape": (sizes.batch, 3, sizes.image, sizes.image),
                "layout": layout,
                "op": op,
                "threads": threads,
                "ours_s": ours,
                "torch_s": theirs,
                "no_bn_s": plain,
                "ratio": ours / theirs,
                "target": TARGET_NETWORK[op],
                "share_ours": 1 - plain / ours,
                "share_torch": 1 - plain / theirs,
                "bn_ratio": (ours - plain) / (theirs - plain)
                if theirs > plain
                else math.nan,
                "agreement": check["max_abs_diff"] / check["max_abs"],
                "losses": dict(check["loss"]),
                "busy": busy(timings, threads),
            }
            rows.append(row)
            log(_progress(row))
        del nets, table
    return rows


# -- 3. exactness ----------------------------------------------------------------


def exactness(shape: tuple[int, ...], seed: int = 0) -> list[dict[str, Any]]:
    """Errors of ours and torch's (float32, channels_last) against float64."""
    rows = []
    channels = shape[1]
    dims = [0, 2, 3]
    count = math.prod(shape) // channels
    for mean in MEANS:
        g = torch.Generator().manual_seed(seed)
        x64 = torch.randn(shape, dtype=torch.float64, generator=g) + mean
        x = x64.float().contiguous(memory_format=torch.channels_last)
        del x64
        xr = x.double()  # the float64 copy of the same data (channels_last)
        weight = torch.empty(channels).uniform_(0.5, 1.5, generator=g)
        bias = torch.randn(channels, generator=g)
        w64, b64 = weight.double(), bias.double()
        with torch.no_grad():
            y_ref = nn.functional.batch_norm(xr, None, None, w64, b64, True, 0.0, EPS)
            centered = xr - xr.mean(dims, keepdim=True)
            sq = (centered * centered).sum(dims)
            var_ref = sq / (count - 1)
            formula = centered * torch.rsqrt(
                (sq / count).reshape(1, -1, 1, 1) + EPS
            ) * w64.reshape(1, -1, 1, 1) + b64.reshape(1, -1, 1, 1)
            reference_check = (y_ref - formula).abs().max().item()
            del centered, formula
            row: dict[str, Any] = {"mean": mean, "reference_check": reference_check}
            for name, cls in (("ours", BatchNorm2d), ("torch", nn.BatchNorm2d)):
                m = cls(channels, momentum=1.0)
                m.weight.copy_(weight)
                m.bias.copy_(bias)
                y = m.train()(x)
                row[f"{name}_y"] = (y.double() - y_ref).abs().max().item()
                row[f"{name}_var"] = _relative(m.running_var.double(), var_ref)
                del y
            _, _, m2, _ = torch.ops.batchnorm.forward_train(x, weight, bias, EPS)
            row["ours_var_m2"] = _relative(m2 / (count - 1), var_ref)
        rows.append(row)
        del x, xr, y_ref
    return rows


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs() / reference.abs()).max().item()


# -- report ----------------------------------------------------------------------


def _label(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


def _progress(row: dict[str, Any]) -> str:
    note = f" (busy: {row['busy']})" if row["busy"] else ""
    return (
        f"{_label(row['shape'])} {row['layout']} {row['op']} t={row['threads']}: "
        f"ours {row['ours_s'] * 1e3:.3f} ms, torch {row['torch_s'] * 1e3:.3f} ms, "
        f"ours/torch {row['ratio']:.2f}{note}"
    )


def _met(row: dict[str, Any], quick: bool) -> str:
    if quick:
        return "— (quick)"
    if row["busy"]:
        return "busy"
    return "yes" if row["ratio"] <= row["target"] else "**no**"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 1e-3 else f"{seconds * 1e3:.2f}"


def layer_table(rows: list[dict[str, Any]], quick: bool) -> list[str]:
    lines = [
        "| shape | layout | measures | threads | ours ms | torch ms | ours ÷ torch "
        "| target | met | ours − torch µs/call | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        overhead = "—" if r["overhead_us"] is None else f"{r['overhead_us']:+.1f}"
        lines.append(
            f"| {_label(r['shape'])} | {r['layout']} | {r['op']} | {r['threads']} "
            f"| {_ms(r['ours_s'])} | {_ms(r['torch_s'])} | {r['ratio']:.2f} "
            f"| ≤ {r['target']} | {_met(r, quick)} | {overhead} "
            f"| {'busy: ' + r['busy'] if r['busy'] else ''} |"
        )
    return lines


def network_table(rows: list[dict[str, Any]], quick: bool) -> list[str]:
    lines = [
        "| layout | measures | threads | ours ms | torch ms | no-BN ms "
        "| ours ÷ torch | target | met | BN share, ours | BN share, torch "
        "| BN time ours ÷ torch | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['op']} | {r['threads']} | {_ms(r['ours_s'])} "
            f"| {_ms(r['torch_s'])} | {_ms(r['no_bn_s'])} | {r['ratio']:.2f} "
            f"| ≤ {r['target']} | {_met(r, quick)} | {r['share_ours']:.0%} "
            f"| {r['share_torch']:.0%} | {r['bn_ratio']:.2f} "
            f"| {'busy: ' + r['busy'] if r['busy'] else ''} |"
        )
    return lines


def exactness_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| channel mean | ours y max abs err | torch y max abs err "
        "| ours var rel err (running_var) | ours var rel err (M2, float64) "
        "| torch var rel err (running_var) | reference check |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mean']:g} | {r['ours_y']:.2e} | {r['torch_y']:.2e} "
            f"| {r['ours_var']:.2e} | {r['ours_var_m2']:.2e} | {r['torch_var']:.2e} "
            f"| {r['reference_check']:.1e} |"
        )
    return lines


def report(
    layers: list[dict[str, Any]],
    networks: list[dict[str, Any]],
    exact: list[dict[str, Any]],
    sizes: Sizes,
    repeats: int,
    net_repeats: int,
    exact_threads: int,
    quick: bool,
) -> list[str]:
    any_busy = any(r["busy"] for r in layers + networks)
    agreement = max((r["agreement"] for r in networks), default=math.nan)
    losses = [v for r in networks for v in r["losses"].values()]
    finite = all(math.isfinite(v) for v in losses)
    lines = [
        f"## 1. Per layer: BatchNorm2d (medians of {repeats} interleaved calls)",
        "",
        "*training step*: `x.grad = None`, the layer's forward on `x` "
        "(`requires_grad`), `backward` of a random upstream gradient (dx, dweight, "
        "dbias; the running statistics updated); *eval forward*: the eval-mode "
        "forward under `torch.inference_mode`. Each timed call follows one untimed "
        f"call that wakes the thread pools; the {_label(sizes.tiny)} rows time "
        f"{sizes.tiny_inner} calls back to back per sample and give, last, our "
        "per-call time minus torch's: the call overhead.",
        "",
        *layer_table(layers, quick),
        "",
        f"## 2. End to end: ResNet-18-shaped, batch {sizes.batch} at "
        f"{sizes.image}×{sizes.image} (medians of {net_repeats} interleaved calls)",
        "",
        "*training step*: `zero_grad`, forward, cross-entropy, backward, SGD "
        "(momentum 0.9) `step`; *eval forward*: under `torch.inference_mode`. "
        "Ours is `batchnorm.torch.convert` of a deep copy of torch's network. "
        "The networks are timed in rotating order, one call each per repeat, "
        "after 2 warm-up calls and without the per-layer rows' untimed wake-up "
        "call (a step is hundreds of operations; a wake-up costs each alike). "
        "*BN share* = 1 − (no-BN ÷ network), where *no-BN* is the same network "
        "with every batch norm replaced by `nn.Identity`, timed interleaved with "
        "the other two (it counts what the batch norms cost the step, their "
        "effect on the layers around them included); *BN time ours ÷ torch* = "
        "(ours − no-BN) ÷ (torch − no-BN).",
        "",
        *network_table(networks, quick),
        "",
        f"Ours and torch's network agree before timing (training-mode forward "
        f"from the same weights): max |Δ logits| ÷ max |logits| = {agreement:.1e}; "
        "losses after the last timed training step "
        + ("finite." if finite else "**not all finite**: timings may be denormal."),
        "",
        f"## 3. Exactness: float32 channels_last {_label(sizes.exact)}, "
        f"std 1, training mode, at {exact_threads} thread(s)",
        "",
        "Errors against torch's `F.batch_norm` in float64 on the float64 copy of "
        "the same float32 data (output) and against a two-pass float64 unbiased "
        "variance (variance, max over channels). *running_var*: after one step "
        "with momentum 1.0 (float32 buffers); *M2*: "
        "`torch.ops.batchnorm.forward_train`'s float64 M2 ÷ (m − 1). *Reference "
        "check*: torch's float64 output against the explicit float64 formula.",
        "",
        *exactness_table(exact),
    ]
    if any_busy:
        lines += [
            "",
            "Rows marked busy were timed while other processes held the cores: "
            "their milliseconds are the scheduler's, so their targets are not "
            "judged. Rerun on an idle machine (or under chrt -f 1).",
        ]
    if quick:
        lines += [
            "",
            "--quick: smoke-test sizes, not the targets' shapes; nothing is judged.",
        ]
    return lines


def write(
    path: Path,
    body: list[str],
    info: dict[str, Any],
    command: str,
    seconds: float,
    load_before: list[float],
    note: str | None,
) -> None:
    kept = ""
    if path.exists():
        text = path.read_text()
        if ANALYSIS in text:
            kept = text[text.index(ANALYSIS) :]
    parts = [
        "# PyTorch module benchmark results",
        "",
        f"Made by `{command}` in {seconds:.0f} s (load average before the run: "
        f"{', '.join(f'{v:.2f}' for v in load_before)}; after: "
        f"{', '.join(f'{v:.2f}' for v in info['load_average'])}).",
        "",
        "`batchnorm.torch` against `torch.nn.BatchNorm2d`, float32, one process; "
        "at each thread count `torch.set_num_threads` and "
        "`batchnorm.kernels.numba.set_num_threads` are set to it; ours and "
        "torch's are timed interleaved (the order alternating every repeat) "
        "after a warm-up; medians; ratios ours ÷ torch from the same run.",
        "",
        *([f"**Note: {note}.**", ""] if note else []),
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in info.items()],
        "",
        *body,
        "",
    ]
    text = "\n".join(parts)
    path.write_text(text + ("\n" + kept if kept else ""))


# -- main ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per layer row (30)"
    )
    parser.add_argument(
        "--net-repeats",
        type=int,
        default=None,
        help="timed calls per network row (default: repeats ÷ 3, at least 3)",
    )
    parser.add_argument("--threads", default="1,2", help="comma-separated (1,2)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, 3 repeats: a smoke test"
    )
    parser.add_argument("--write", type=Path, default=None, help="results markdown")
    args = parser.parse_args(argv)
    cores = bench.usable_cores()
    threads = bench._thread_counts(args.threads, cores)
    if isinstance(threads, str):
        parser.error(threads)
    if max(threads) > _numba.max_threads():
        parser.error(
            f"--threads {max(threads)}: Numba's pool has {_numba.max_threads()} "
            "threads (NUMBA_NUM_THREADS)."
        )
    sizes = QUICK if args.quick else FULL
    repeats = args.repeats or (3 if args.quick else 30)
    net_repeats = args.net_repeats or max(3 if not args.quick else 2, repeats // 3)
    if repeats < 1 or net_repeats < 1:
        parser.error("--repeats and --net-repeats must be at least 1.")
    command = (
        "python benchmarks/bench_torch.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
    ).strip()
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) == os.SCHED_FIFO:
        command = f"chrt -f {os.sched_getparam(0).sched_priority} {command}"

    def log(line: str) -> None:
        print(line, flush=True)

    load_before = list(os.getloadavg())
    note = bench.load_note(load_before[0], cores, max(threads))
    if note:
        log(f"WARNING: {note}; rows marked busy below are not results.")
    start = time.perf_counter()
    layers: list[dict[str, Any]] = []
    networks: list[dict[str, Any]] = []
    seconds: dict[str, float] = {"layers": 0.0, "network": 0.0}
    try:
        for t in threads:
            torch.set_num_threads(t)
            _numba.set_num_threads(t)
            begin = time.perf_counter()
            layers += layer_rows(sizes, t, repeats, log)
            middle = time.perf_counter()
            networks += network_rows(sizes, t, net_repeats, log)
            seconds["layers"] += middle - begin
            seconds["network"] += time.perf_counter() - middle
        begin = time.perf_counter()
        exact = exactness(sizes.exact)
        seconds["exactness"] = time.perf_counter() - begin
    finally:
        _numba.set_num_threads(None)
    elapsed = time.perf_counter() - start
    mark_slower_with_threads(layers)
    mark_slower_with_threads(networks)
    info = machine()
    info["threads"] = ", ".join(map(str, threads))
    body = report(
        layers, networks, exact, sizes, repeats, net_repeats, threads[-1], args.quick
    )
    print()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
        f"numba {info['numba']} ({info['numba_threading_layer']}), threads "
        f"{info['threads']}, load average {info['load_average'][0]:.2f}, "
        f"{info['scheduling']}"
    )
    if note:
        print(f"WARNING: {note}.")
    print("\n".join(body))
    print(
        f"\n({elapsed:.0f} s: layers {seconds['layers']:.0f} s, network "
        f"{seconds['network']:.0f} s, exactness {seconds['exactness']:.0f} s)"
    )
    if args.write:
        write(args.write, body, info, command, elapsed, load_before, note)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
