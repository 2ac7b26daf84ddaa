"""One rank of a gloo job for ``tests/torch/test_sync.py``.

``python worker.py SCENARIO RANK WORLD STORE OUT TIMEOUT`` joins a gloo process
group of WORLD ranks through the file store STORE (no port to pick, none to
race for) with a collective timeout of TIMEOUT seconds, runs SCENARIO and
writes what it measured to ``OUT/rank{RANK}.json``:

- ``suite``: :class:`batchnorm.torch.SyncBatchNorm` against torch's and our
  batch norms on the concatenated batch (even, uneven and empty shards,
  float64 and float32, NCHW and channels_last, several steps), DDP training of
  a small CNN against one process, eval and one-rank groups without
  communication, a process subgroup, and the errors every rank must raise;
- ``raise`` / ``stall``: rank 1 raises (and its process dies) or sleeps instead
  of joining the second training step; rank 0 records the error it gets and
  how long it took.

Every rank computes the single-process reference itself from the same seeded
global batch and compares its own shard with its slice of the reference.
Importing this file (pytest's doctest collection does) runs nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

try:
    import torch
    import torch.distributed as dist
except ImportError:  # pragma: no cover - pytest imports this file for doctests
    import pytest

    pytest.skip("torch is not installed", allow_module_level=True)

C = 4
SPATIAL = (5, 6)
STEPS = 3
GAMMA = [0.5, 1.5, -2.0, 1.0]
BETA = [0.25, -1.0, 0.0, 2.0]


def shardings(world: int) -> dict[str, list[int]]:
    if world == 2:
        return {"even": [4, 4], "uneven": [5, 2], "empty": [6, 0]}
    return {"even": [3, 3, 3], "uneven": [4, 1, 2], "empty": [0, 5, 2]}


def rel(a, b) -> float:
    """``max |a − b| / max |b|``, float64 (0 for empty tensors)."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if b.numel() == 0:
        return 0.0
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def gather_all(t, group=None):
    rows = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, t.contiguous(), group=group)
    return rows


def bounds(sizes: list[int], index: int) -> tuple[int, int]:
    lo = sum(sizes[:index])
    return lo, lo + sizes[index]


class Spy:
    """Counts the layer's collectives (``batchnorm.torch.sync._gather``)."""

    def __init__(self) -> None:
        import batchnorm.torch.sync as sync

        self.calls = 0
        original = sync._gather

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        sync._gather = counted


# -- SyncBatchNorm against one process on the whole batch ----------------------


def make_layers(dtype, momentum, shape_dims):
    from batchnorm.torch import BatchNorm1d, BatchNorm2d, SyncBatchNorm

    theirs = torch.nn.BatchNorm2d if shape_dims == 4 else torch.nn.BatchNorm1d
    ours = BatchNorm2d if shape_dims == 4 else BatchNorm1d
    layers = [
        SyncBatchNorm(C, momentum=momentum, dtype=dtype),
        theirs(C, momentum=momentum, dtype=dtype),
        ours(C, momentum=momentum, dtype=dtype),
    ]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.tensor(GAMMA))
            layer.bias.copy_(torch.tensor(BETA))
    return layers


def compare_case(rank, world, name, sizes, dtype, channels_last, momentum, dims=4):
    """Train ``STEPS`` steps; errors relative to torch's and our batch norm."""
    sync, *refs = make_layers(dtype, momentum, dims)
    lo, hi = bounds(sizes, rank)
    gen = torch.Generator().manual_seed(1234)
    shape_tail = SPATIAL if dims == 4 else ()
    errors = {"torch": {}, "ours": {}}
    layout_kept = True

    def note(ref_name, quantity, value):
        table = errors[ref_name]
        table[quantity] = max(table.get(quantity, 0.0), value)

    for _ in range(STEPS):
        shape = (sum(sizes), C, *shape_tail)
        x_full = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 2).to(
            dtype
        )
        g_full = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        x = x_full[lo:hi].clone()
        g = g_full[lo:hi].clone()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            g = g.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y = sync(x)
        (y * g).sum().backward()
        if channels_last and x.numel():  # an empty tensor has every layout
            layout_kept &= y.is_contiguous(memory_format=torch.channels_last)
            layout_kept &= x.grad.is_contiguous(memory_format=torch.channels_last)
        dweight = sync.weight.grad.clone()
        dbias = sync.bias.grad.clone()
        dist.all_reduce(dweight)  # what DDP sums (and divides by the world size)
        dist.all_reduce(dbias)
        for ref_name, ref in zip(("torch", "ours"), refs, strict=True):
            xr = x_full.clone().requires_grad_(True)
            yr = ref(xr)
            (yr * g_full).sum().backward()
            note(ref_name, "y", rel(y, yr[lo:hi]))
            note(ref_name, "dx", rel(x.grad, xr.grad[lo:hi]))
            note(ref_name, "dweight", rel(dweight, ref.weight.grad))
            note(ref_name, "dbias", rel(dbias, ref.bias.grad))
            ref.zero_grad()
        sync.zero_grad()
    for ref_name, ref in zip(("torch", "ours"), refs, strict=True):
        note(ref_name, "running_mean", rel(sync.running_mean, ref.running_mean))
        note(ref_name, "running_var", rel(sync.running_var, ref.running_var))
        note(
            ref_name,
            "num_batches_tracked",
            float(int(sync.num_batches_tracked) != int(ref.num_batches_tracked)),
        )
    stats = torch.cat([sync.running_mean, sync.running_var]).double()
    bitwise = all(torch.equal(row, stats) for row in gather_all(stats))
    return {
        "name": name,
        "sizes": sizes,
        "dtype": str(dtype).removeprefix("torch."),
        "channels_last": channels_last,
        "momentum": momentum,
        "errors": errors,
        "running_bitwise_equal_across_ranks": bitwise,
        "layout_kept": layout_kept,
        "num_batches_tracked": int(sync.num_batches_tracked),
    }


def equivalence(rank, world, spy):
    cases = []
    for name, sizes in shardings(world).items():
        for dtype in (torch.float64, torch.float32):
            for channels_last in (False, True):
                momentum = None if name == "uneven" and not channels_last else 0.1
                before = spy.calls
                case = compare_case(
                    rank, world, name, sizes, dtype, channels_last, momentum
                )
                case["collectives"] = spy.calls - before
                cases.append(case)
    # (N, C) input, one value per channel on some ranks (which a local batch
    # norm refuses): the global batch has enough.
    sizes = [1, 2] if world == 2 else [1, 1, 1]
    for dtype in (torch.float64, torch.float32):
        cases.append(
            compare_case(rank, world, "one per rank", sizes, dtype, False, 0.1, 2)
        )
    return cases


# -- DDP against one process ----------------------------------------------------


def make_cnn(norm):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        norm(4),
        torch.nn.ReLU(),
        torch.nn.AvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 3 * 3, 5),
    ).double()


def ddp_training(rank, world, sizes, steps=4):
    from batchnorm.torch import BatchNorm2d, SyncBatchNorm

    total = sum(sizes)
    lo, hi = bounds(sizes, rank)
    single = make_cnn(BatchNorm2d)
    local = make_cnn(SyncBatchNorm)
    local.load_state_dict(single.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(local)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(total, 3, 6, 6, generator=gen, dtype=torch.float64)
        target = torch.randint(0, 5, (total,), generator=gen)
        opt_single.zero_grad()
        loss = torch.nn.functional.cross_entropy(single(x), target)  # mean over B
        loss.backward()
        opt_single.step()
        opt_ddp.zero_grad()
        out = ddp(x[lo:hi])
        # DDP averages the ranks' gradients: W/B · Σ_local makes that average
        # the gradient of the mean over the whole batch.
        local_loss = torch.nn.functional.cross_entropy(
            out, target[lo:hi], reduction="sum"
        ) * (world / total)
        local_loss.backward()
        opt_ddp.step()
    single_state, ddp_state = single.state_dict(), local.state_dict()
    errors = {
        name: rel(ddp_state[name], value)
        for name, value in single_state.items()
        if value.is_floating_point()
    }
    nbt = int(ddp_state["1.num_batches_tracked"])
    flat = torch.cat([v.double().flatten() for v in ddp_state.values()])
    same = all(torch.equal(row, flat) for row in gather_all(flat))
    return {
        "sizes": sizes,
        "errors": errors,
        "num_batches_tracked": [nbt, int(single_state["1.num_batches_tracked"])],
        "state_bitwise_equal_across_ranks": same,
    }


# -- no communication: eval, groups of one rank -----------------------------------


def eval_without_communication(rank, world, spy):
    """Rank 0 alone runs eval steps; the others never call the layer."""
    from batchnorm.torch import BatchNorm2d, SyncBatchNorm

    result = {}
    if rank == 0:
        layer, ref = SyncBatchNorm(C).double(), BatchNorm2d(C).double()
        with torch.no_grad():
            for m in (layer, ref):
                m.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5, 2.0]))
                m.running_var.copy_(torch.tensor([2.0, 0.5, 1.0, 4.0]))
        layer.eval()
        ref.eval()
        before = spy.calls
        x = torch.randn(3, C, *SPATIAL, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        xr = x.detach().clone().requires_grad_(True)
        ref(xr).sum().backward()
        # eval without running statistics: the local batch's statistics (torch)
        plain = SyncBatchNorm(C, track_running_stats=False).double().eval()
        local_ref = BatchNorm2d(C, track_running_stats=False).double()
        z = plain(x)
        result = {
            "collectives": spy.calls - before,
            "y": rel(y, ref(xr)),
            "dx": rel(x.grad, xr.grad),
            "no_running_stats_y": rel(z, local_ref(x)),
            "no_running_stats_collectives": spy.calls - before,
        }
    dist.barrier()  # the others waited here: nothing else was sent
    return result


def group_of_one(rank, world, spy):
    """Training in a group of one rank is local batch norm, no communication."""
    from batchnorm.torch import BatchNorm2d, SyncBatchNorm

    groups = [dist.new_group([r]) for r in range(world)]
    layer = SyncBatchNorm(C, process_group=groups[rank]).double()
    ref = BatchNorm2d(C).double()
    gen = torch.Generator().manual_seed(rank)
    before = spy.calls
    x = torch.randn(4, C, *SPATIAL, generator=gen, dtype=torch.float64)
    y = layer(x)
    return {
        "collectives": spy.calls - before,
        "y": rel(y, ref(x)),
        "running_var": rel(layer.running_var, ref.running_var),
    }


def subgroup(rank, world):
    """A group of ranks 0 and 2 (of 3): statistics of those two shards only."""
    from batchnorm.torch import BatchNorm2d, SyncBatchNorm

    members = [0, 2]
    group = dist.new_group(members)
    if rank not in members:
        return {}
    sizes = [3, 5]
    lo, hi = bounds(sizes, members.index(rank))
    gen = torch.Generator().manual_seed(5)
    x_full = torch.randn(8, C, *SPATIAL, generator=gen, dtype=torch.float64)
    layer = SyncBatchNorm(C, process_group=group).double()
    ref = BatchNorm2d(C).double()
    g_full = torch.randn(x_full.shape, generator=gen, dtype=torch.float64)
    x = x_full[lo:hi].clone().requires_grad_(True)
    (layer(x) * g_full[lo:hi]).sum().backward()
    xr = x_full.clone().requires_grad_(True)
    (ref(xr) * g_full).sum().backward()
    return {
        "dx": rel(x.grad, xr.grad[lo:hi]),
        "running_var": rel(layer.running_var, ref.running_var),
    }


# -- errors every rank must raise -----------------------------------------------


def expected_errors(rank, world):
    from batchnorm.torch import SyncBatchNorm

    out = {}
    # one value per channel over the whole group
    layer = SyncBatchNorm(C).double()
    n = 1 if rank == 0 else 0
    try:
        layer(torch.randn(n, C, dtype=torch.float64))
        out["one_value"] = "no error"
    except ValueError as exc:
        out["one_value"] = str(exc)
    # a rank with the wrong number of channels: it raises its own error and the
    # others learn about it in the same collective
    channels = C + 1 if rank == world - 1 else C
    try:
        layer(torch.randn(4, channels, dtype=torch.float64))
        out["bad_rank"] = "no error"
    except (RuntimeError, ValueError) as exc:
        out["bad_rank"] = f"{type(exc).__name__}: {exc}"
    # counted by the refused one-value batch (as torch), not by the failed call
    out["num_batches_tracked"] = int(layer.num_batches_tracked)
    # all empty: an empty output, no update, zero gradients
    layer = SyncBatchNorm(C).double()
    x = torch.randn(0, C, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    out["all_empty"] = {
        "shape": list(y.shape),
        "running_var_unchanged": bool(
            torch.equal(layer.running_var, torch.ones(C, dtype=torch.float64))
        ),
        "dweight_zero": bool(
            torch.equal(layer.weight.grad, torch.zeros(C, dtype=torch.float64))
        ),
    }
    return out


# -- scenarios --------------------------------------------------------------------


def suite(rank, world):
    spy = Spy()
    start = time.monotonic()
    result = {"equivalence": equivalence(rank, world, spy)}
    result["ddp"] = ddp_training(rank, world, shardings(world)["uneven"])
    if world == 3:
        result["ddp_empty_shard"] = ddp_training(rank, world, [5, 0, 5])
        result["subgroup"] = subgroup(rank, world)
    result["eval"] = eval_without_communication(rank, world, spy)
    result["group_of_one"] = group_of_one(rank, world, spy)
    result["errors"] = expected_errors(rank, world)
    dist.barrier()
    result["seconds"] = time.monotonic() - start
    return result


def failing(rank, world, mode):
    """Rank 1 fails (``raise``) or stalls (``stall``) before the second step."""
    from batchnorm.torch import SyncBatchNorm

    layer = SyncBatchNorm(C).double()
    x = torch.randn(4, C, *SPATIAL, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()  # one full step with every rank
    if rank == 1:
        if mode == "raise":
            raise RuntimeError("rank 1 fails before the collective")
        time.sleep(120)  # the test ends this process when rank 0 is done
        return {}
    start = time.monotonic()
    try:
        layer(x).sum().backward()
        error = None
    except Exception as exc:  # noqa: BLE001 - the survivor's error is the result
        error = f"{type(exc).__name__}: {exc}"
    return {
        "error": error,
        "seconds": time.monotonic() - start,
        "num_batches_tracked": int(layer.num_batches_tracked),
    }


def main(argv: list[str]) -> None:
    scenario, rank, world, store, out, timeout = argv
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=float(timeout)),
    )
    path = Path(out) / f"rank{rank}.json"
    try:
        if scenario == "suite":
            result = suite(rank, world)
        else:
            result = failing(rank, world, scenario)
    except BaseException:
        path.write_text(json.dumps({"crash": traceback.format_exc()}))
        sys.stdout.flush()
        os._exit(1)
    path.write_text(json.dumps(result))
    if scenario == "suite":
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # a survivor's group may hold a broken connection: do not wait


if __name__ == "__main__":
    main(sys.argv[1:])
