"""Where a ResNet-18-shaped training step spends its time, ours against torch's.

Runs three SGD steps of ``bench_torch.py``'s network (batch 16 at 112², float32)
under ``torch.profiler`` for torch's batch norm and for ours (``convert`` of a
copy), and prints each step's self CPU time and the batch-norm operators' share
(``aten::native_batch_norm*`` for torch's, our autograd Functions for ours).

    python benchmarks/lab/torch_network_profile.py [THREADS] [cl|contig]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parents[1]))
from bench_torch import resnet18  # noqa: E402

import batchnorm.torch as bt  # noqa: E402
from batchnorm.kernels import numba as kn  # noqa: E402

BN_KEYS = ("batch_norm", "_train", "_eval", "batchnorm")


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    layout = sys.argv[2] if len(sys.argv) > 2 else "cl"
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    torch.set_num_threads(threads)
    kn.set_num_threads(threads)
    torch.manual_seed(0)
    theirs = resnet18().to(memory_format=fmt)
    ours = bt.convert(copy.deepcopy(theirs))
    x = torch.randn(16, 3, 112, 112).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (16,))
    for name, net in (("ours", ours), ("torch", theirs)):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def step(net=net, optimizer=optimizer) -> None:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), target).backward()
            optimizer.step()

        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 3e3
        bn = (
            sum(
                e.self_cpu_time_total
                for e in events
                if any(k in e.key.lower() for k in BN_KEYS)
            )
            / 3e3
        )
        print(
            f"{name:>5}: {total:7.1f} ms self CPU a step, batch norm {bn:5.1f} ms "
            f"({bn / total:.0%}), {threads} thread(s), {layout}"
        )


if __name__ == "__main__":
    main()
