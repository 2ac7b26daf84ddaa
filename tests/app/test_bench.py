"""`batchnorm bench`: every implementation timed, ratios consistent, table complete."""

from __future__ import annotations

import json
import os
import time

import pytest

pytest.importorskip("numba")
pytest.importorskip("torch")

from batchnorm.app import bench  # noqa: E402
from batchnorm.app import main as cli

TINY = bench.Case((4, 3, 8, 8), "nchw")


def test_measure_rows_have_every_implementation_and_consistent_ratios():
    rows = bench.measure((TINY,), [1], repeats=2, numpy_repeats=1, warmup=1)
    assert {r["op"] for r in rows} == set(bench.OPS)
    for op in bench.OPS:
        by_impl = {r["implementation"]: r for r in rows if r["op"] == op}
        assert set(by_impl) == set(bench.IMPLEMENTATIONS)
        floor, torch = by_impl["floor"]["median_s"], by_impl["torch"]["median_s"]
        for r in by_impl.values():
            assert r["median_s"] > 0
            assert r["ratio_floor"] == pytest.approx(r["median_s"] / floor)
            assert r["ratio_torch"] == pytest.approx(r["median_s"] / torch)
    table = bench.format_table(rows)
    lines = table.splitlines()
    assert "no cache" in lines[0]
    # one row per op (a busy machine adds a note column and a footnote, no rows)
    assert sum(line.startswith("| 4×3×8×8 |") for line in lines) == len(bench.OPS)


def test_cli_json(monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICK_CASES", (TINY,))
    monkeypatch.setattr(bench, "FULL_CASES", (TINY,) * 5)
    assert cli.main(["bench", "--threads", "1", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["machine"]["cores"] >= 1
    assert {r["implementation"] for r in report["rows"]} == set(bench.IMPLEMENTATIONS)


def test_cli_table_says_where_the_full_benchmark_lives(monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICK_CASES", (TINY,))
    assert cli.main(["bench", "--threads", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 4×3×8×8 | nchw | forward_train | 1 |" in out
    last = out.strip().splitlines()[-1]
    assert "benchmarks/bench_kernels.py" in last and "clone" in last, last


@pytest.mark.parametrize(
    ("threads", "expected"),
    [
        ("1,3", "--threads 3: this machine has 2 cores"),
        ("0", "--threads must be"),
        ("1,two", "--threads must be"),
    ],
)
def test_threads_beyond_the_cores_are_a_one_line_error(
    threads, expected, monkeypatch, capsys
):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(bench, "measure", _no_measuring)
    assert cli.main(["bench", "--threads", threads]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"batchnorm bench: error: {expected}"), err
    assert err.count("\n") == 1, err


def test_zero_repeats_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(bench, "measure", _no_measuring)
    assert cli.main(["bench", "--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchnorm bench: error: --repeats must be")
    assert err.count("\n") == 1


def _no_measuring(*args, **kwargs):
    raise AssertionError("bench started measuring before checking its arguments")


# The bogus rows: a 2-thread run on a busy 2-core machine, whose calls
# took scheduler slices of 8 and 16 ms instead of tens of microseconds.
def _timing(median_s=5e-5, spread=0.1, cpu_per_wall=1.0):
    return bench.Timing(median_s=median_s, spread=spread, cpu_per_wall=cpu_per_wall)


def test_calls_that_wait_off_the_cpu_are_seen():
    def descheduled(threads):  # wall time passes, no CPU time: a lost slice
        time.sleep(0.008)

    calls = {"floor": descheduled, "numba_out": lambda threads: None}
    timings = bench._time(calls, 1, {"floor": 4, "numba_out": 4}, warmup=0)
    assert timings["floor"].median_s >= 0.008
    assert timings["floor"].cpu_per_wall < 0.5
    reason = bench.busy_reason(timings, threads=1)
    assert reason is not None and "floor" in reason and "CPU" in reason


def test_busy_reason_names_each_sign_of_a_busy_machine():
    clean = {name: _timing() for name in bench.IMPLEMENTATIONS}
    assert bench.busy_reason(clean, threads=1) is None
    assert bench.busy_reason({**clean, "floor": _timing(cpu_per_wall=1.9)}, 2) is None
    # the floor's repeats spread over scheduler slices
    spread = {**clean, "floor": _timing(median_s=0.008, spread=1.5)}
    assert "spread" in bench.busy_reason(spread, threads=1)
    # two floor threads on one core: the other thread waited for a slice
    shared = {**clean, "floor": _timing(cpu_per_wall=1.0)}
    assert "ran on 1.0 of 2 cores" in bench.busy_reason(shared, threads=2)
    # torch's median was a slice: 0.05 ms of work in 16 ms
    starved = {**clean, "torch": _timing(median_s=0.016, cpu_per_wall=0.003)}
    assert "torch" in bench.busy_reason(starved, threads=1)


def test_busy_rows_are_not_printed_as_results():
    rows = bench.measure((TINY,), [1], repeats=2, numpy_repeats=1, warmup=1)
    assert all("busy" in r and "cpu_per_wall" in r for r in rows)
    for r in rows:
        r["busy"] = "the floor kernel's calls spread by 150% of their median"
    table = bench.format_table(rows)
    body = table.splitlines()[2:]
    assert all("busy: the floor kernel's calls spread" in line for line in body[:3])
    assert all("(" not in line.split("| busy:")[0] for line in body[:3])  # no ratios
    assert "not results" in table.splitlines()[-1]


def test_cli_reports_a_loaded_machine(monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICK_CASES", (TINY,))
    monkeypatch.setattr(os, "getloadavg", lambda: (7.5, 7.0, 6.0))
    assert cli.main(["bench", "--threads", "1", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["load_average_before"] == 7.5
    assert "load average 7.50" in report["busy"]
    assert cli.main(["bench", "--threads", "1", "--repeats", "1"]) == 0
    assert "load average 7.50" in capsys.readouterr().out
