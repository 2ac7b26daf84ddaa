"""``batchnorm.torch.SyncBatchNorm`` over gloo with 2 and 3 processes.

The jobs (``sync_suite/worker.py``) start together, once per module: the suite
on 2 and on 3 ranks, and two 2-rank jobs in which rank 1 raises (its process
dies) or stalls before the second step. Each rank writes what it measured to a
JSON file; the tests here read them. Every rank compares its own shard with
its slice of the single-process reference, computed from the same seeded
global batch.

Tolerances, relative to the reference array's largest magnitude: float64
1e-12 (observed about 3e-15), float32 1e-6 against torch's float32 batch norm
(observed about 4e-7; torch rounds its intermediates to float32, we compute
statistics in float64 and round once), and exactly 0 against our own float32
``BatchNorm2d`` for ``y``, ``dx`` and the running statistics (the same float64
statistics, merged instead of computed at once: identical in these cases).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is unavailable", allow_module_level=True)

from batchnorm.torch import BatchNorm2d, SyncBatchNorm, convert, revert  # noqa: E402

WORKER = Path(__file__).parent / "sync_suite" / "worker.py"
SUITE_TIMEOUT = 30.0  # the process group's collective timeout in the suite
FAIL_TIMEOUT = 5.0  # ... and in the jobs with a failing rank
JOB_LIMIT = 120.0  # the test kills whatever still runs after this
TOLERANCE = {"float64": 1e-12, "float32": 1e-6}
STEPS = 3  # training steps per case (worker.STEPS)


class Job:
    """One gloo job: a worker process per rank."""

    def __init__(self, scenario: str, world: int, folder: Path, timeout: float):
        self.scenario, self.world, self.folder = scenario, world, folder
        folder.mkdir()
        loopback = "lo0" if sys.platform == "darwin" else "lo"
        env = {
            **os.environ,
            "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", loopback),
            "OMP_NUM_THREADS": "1",
            "NUMBA_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        args = [str(folder / "store"), str(folder), str(timeout)]
        self.start = time.monotonic()
        self.processes = []
        for rank in range(world):
            with open(folder / f"log{rank}.txt", "wb") as log:
                command = [sys.executable, str(WORKER), scenario, str(rank), str(world)]
                self.processes.append(
                    subprocess.Popen(
                        command + args, stdout=log, stderr=subprocess.STDOUT, env=env
                    )
                )
        self.seconds: float | None = None

    def survivor_only(self) -> bool:
        """Jobs with a failing rank end when rank 0, the survivor, has ended."""
        return self.scenario != "suite"

    def poll(self) -> bool:
        """True once the job is over (ending a stalled rank 1 if need be)."""
        if self.seconds is not None:
            return True
        codes = [p.poll() for p in self.processes]
        done = codes[0] is not None if self.survivor_only() else None not in codes
        if done:
            self.seconds = time.monotonic() - self.start
            self.stop()
        return done

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()

    def log(self) -> str:
        parts = []
        for rank, process in enumerate(self.processes):
            out = (self.folder / f"log{rank}.txt").read_text(errors="replace")
            parts.append(f"--- rank {rank} (exit {process.returncode}) ---\n{out}")
        return "\n".join(parts)[-6000:]

    def results(self) -> list[dict]:
        out = []
        for rank in range(self.world):
            path = self.folder / f"rank{rank}.json"
            out.append(json.loads(path.read_text()) if path.exists() else {})
        return out


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync")
    started = {
        ("suite", 2): Job("suite", 2, root / "suite2", SUITE_TIMEOUT),
        ("suite", 3): Job("suite", 3, root / "suite3", SUITE_TIMEOUT),
        ("raise", 2): Job("raise", 2, root / "raise", FAIL_TIMEOUT),
        ("stall", 2): Job("stall", 2, root / "stall", FAIL_TIMEOUT),
    }
    deadline = time.monotonic() + JOB_LIMIT
    try:
        while not all([job.poll() for job in started.values()]):  # poll each
            if time.monotonic() > deadline:
                pytest.fail(f"gloo jobs still running after {JOB_LIMIT} s (a hang)")
            time.sleep(0.05)
    finally:
        for job in started.values():
            job.stop()
    return started


def suite(jobs, world) -> list[dict]:
    job = jobs["suite", world]
    results = job.results()
    for rank, result in enumerate(results):
        assert result and "crash" not in result, (
            f"rank {rank}: {result.get('crash', 'no result')}\n{job.log()}"
        )
    return results


WORLDS = pytest.mark.parametrize("world", [2, 3])


# -- equal to one process on the concatenated batch ------------------------------


@WORLDS
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_equals_batch_norm_on_the_whole_batch(jobs, world, dtype):
    """y, dx, Σ_ranks dweight/dbias, running statistics and num_batches_tracked
    against torch.nn.BatchNorm2d/1d and ours, over STEPS steps."""
    checked = set()
    for rank, result in enumerate(suite(jobs, world)):
        for case in result["equivalence"]:
            if case["dtype"] != dtype:
                continue
            checked.add(case["name"])
            assert case["num_batches_tracked"] == STEPS
            for ref, errors in case["errors"].items():
                assert errors["num_batches_tracked"] == 0
                worst = max(errors, key=errors.get)
                assert errors[worst] <= TOLERANCE[dtype], (
                    f"rank {rank}, {case['name']} {case['sizes']}, channels_last="
                    f"{case['channels_last']}, against {ref}: {worst} off by "
                    f"{errors[worst]:.2e}"
                )
    assert checked == {"even", "uneven", "empty", "one per rank"}


@WORLDS
def test_float32_equals_our_batch_norm_exactly(jobs, world):
    """Merged float64 statistics round to the same float32 as ours at once."""
    for result in suite(jobs, world):
        for case in result["equivalence"]:
            errors = case["errors"]["ours"]
            for quantity in ("y", "dx", "running_mean", "running_var"):
                if case["dtype"] == "float32":
                    assert errors[quantity] == 0.0, (case["name"], quantity)


@WORLDS
def test_running_statistics_bitwise_equal_on_every_rank(jobs, world):
    for result in suite(jobs, world):
        for case in result["equivalence"]:
            assert case["running_bitwise_equal_across_ranks"], case["name"]


@WORLDS
def test_channels_last_stays_channels_last(jobs, world):
    cases = [c for r in suite(jobs, world) for c in r["equivalence"]]
    assert any(c["channels_last"] for c in cases)
    for case in cases:
        assert case["layout_kept"], case["name"]


@WORLDS
def test_one_collective_per_pass_on_every_rank(jobs, world):
    """Empty shards join both collectives too (else the others would wait)."""
    for result in suite(jobs, world):
        for case in result["equivalence"]:
            if "collectives" in case:
                assert case["collectives"] == 2 * STEPS, case


@WORLDS
def test_ddp_training_equals_one_process(jobs, world):
    """conv → SyncBatchNorm → relu → pool → linear, 4 SGD steps (momentum 0.9)
    under DDP with uneven shards (3 ranks: also with an empty shard), against
    one process on the whole batch; each rank's loss is W/B · Σ its samples'
    losses, so DDP's average of the gradients is the whole batch's mean loss's."""
    for result in suite(jobs, world):
        runs = [result["ddp"]] + (
            [result["ddp_empty_shard"]] if "ddp_empty_shard" in result else []
        )
        assert len(runs) == world - 1
        for run in runs:
            worst = max(run["errors"], key=run["errors"].get)
            assert run["errors"][worst] <= 1e-12, (run["sizes"], worst, run)
            assert run["num_batches_tracked"] == [4, 4]
            assert run["state_bitwise_equal_across_ranks"]


# -- no communication ---------------------------------------------------------------


@WORLDS
def test_eval_does_no_communication(jobs, world):
    """Rank 0 alone runs eval forward and backward while the others wait in a
    barrier: no collective, and the result is the local batch norm's."""
    first, *others = suite(jobs, world)
    assert all(r["eval"] == {} for r in others)
    assert first["eval"] == {
        "collectives": 0,
        "y": 0.0,
        "dx": 0.0,
        "no_running_stats_y": 0.0,
        "no_running_stats_collectives": 0,
    }


@WORLDS
def test_group_of_one_rank_is_local_batch_norm(jobs, world):
    for result in suite(jobs, world):
        assert result["group_of_one"] == {
            "collectives": 0,
            "y": 0.0,
            "running_var": 0.0,
        }


def test_subgroup_synchronizes_its_members_only(jobs):
    """Ranks 0 and 2 of 3 in a group; rank 1 never calls the layer."""
    results = suite(jobs, 3)
    assert results[1]["subgroup"] == {}
    for rank in (0, 2):
        sub = results[rank]["subgroup"]
        assert sub["dx"] <= 1e-12 and sub["running_var"] <= 1e-12, sub


# -- errors -----------------------------------------------------------------------


@WORLDS
def test_one_value_per_channel_over_the_group_raises_on_every_rank(jobs, world):
    for result in suite(jobs, world):
        message = result["errors"]["one_value"]
        assert message.startswith(
            "Expected more than 1 value per channel when training"
        ), message
        assert f"(per rank: {[1] + [0] * (world - 1)})" in message


@WORLDS
def test_a_rank_with_bad_input_fails_every_rank_at_once(jobs, world):
    *good, bad = suite(jobs, world)
    assert bad["errors"]["bad_rank"].startswith("ValueError: SyncBatchNorm(4) got")
    for result in good:
        message = result["errors"]["bad_rank"]
        assert message.startswith("RuntimeError: SyncBatchNorm.forward: rank(s) "), (
            message
        )
        assert f"[{world - 1}]" in message and "rejected their input" in message
    for result in [*good, bad]:  # only the refused one-value batch counted
        assert result["errors"]["num_batches_tracked"] == 1


@WORLDS
def test_an_empty_global_batch_is_an_empty_pass(jobs, world):
    for result in suite(jobs, world):
        assert result["errors"]["all_empty"] == {
            "shape": [0, 4, 3],
            "running_var_unchanged": True,
            "dweight_zero": True,
        }


@pytest.mark.parametrize("mode", ["raise", "stall"])
def test_a_failing_rank_ends_the_other_with_an_error(jobs, mode):
    """Rank 1 raises (its process dies) or sleeps instead of joining step 2:
    rank 0 raises, at once or after the group's timeout, never hangs."""
    job = jobs[mode, 2]
    survivor = job.results()[0]
    assert survivor and "crash" not in survivor, job.log()
    error = survivor["error"]
    assert error is not None and error.startswith(
        "RuntimeError: SyncBatchNorm.forward: the all_gather of the statistics failed"
    ), error
    assert job.processes[0].returncode == 0, job.log()
    assert survivor["num_batches_tracked"] == 1  # the failed step left it alone
    if mode == "raise":
        assert "rank 1 fails before the collective" in job.results()[1]["crash"]
        assert survivor["seconds"] < FAIL_TIMEOUT, survivor  # not the timeout
    else:
        assert FAIL_TIMEOUT - 0.5 <= survivor["seconds"] < FAIL_TIMEOUT + 10, survivor
    assert job.seconds is not None and job.seconds < 60


# -- without a process group (in this process) ----------------------------------------


def test_without_a_process_group_it_is_our_batch_norm():
    assert not dist.is_initialized()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    layer, ref = SyncBatchNorm(3).double(), BatchNorm2d(3).double()
    for _ in range(2):
        xs, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        (layer(xs) * g).sum().backward()
        (ref(xr) * g).sum().backward()
        assert torch.equal(xs.grad, xr.grad)
    for name, value in ref.state_dict().items():
        assert torch.equal(layer.state_dict()[name], value), name
    assert torch.equal(layer.weight.grad, ref.weight.grad)
    layer.eval()
    ref.eval()
    assert torch.equal(layer(x), ref(x))


def test_the_interface_is_torch_syncbatchnorm_s():
    import inspect

    ours = inspect.signature(SyncBatchNorm.__init__)
    theirs = inspect.signature(torch.nn.SyncBatchNorm.__init__)
    assert list(ours.parameters) == list(theirs.parameters)
    for name, parameter in theirs.parameters.items():
        assert ours.parameters[name].default == parameter.default, name
    layer = SyncBatchNorm(3, bias=False, process_group="group")
    assert layer.bias is None and layer.process_group == "group"
    assert sorted(SyncBatchNorm(3).state_dict()) == sorted(
        torch.nn.SyncBatchNorm(3).state_dict()
    )
    assert isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        SyncBatchNorm(3)(torch.randn(3))


def test_convert_and_revert_go_through_torch_syncbatchnorm():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.SyncBatchNorm(3))
    converted = convert(net)
    assert type(converted[1]) is SyncBatchNorm
    assert type(revert(converted)[1]) is torch.nn.SyncBatchNorm
    back = SyncBatchNorm.convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    )
    assert type(back[0]) is SyncBatchNorm
