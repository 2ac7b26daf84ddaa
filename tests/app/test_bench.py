"""`batchnorm bench`: every implementation timed, ratios consistent, table complete."""

from __future__ import annotations

import json

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
    assert table.count("\n") == 2 + len(bench.OPS) - 1
    assert "no cache" in table.splitlines()[0]


def test_cli_json(monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICK_CASES", (TINY,))
    monkeypatch.setattr(bench, "FULL_CASES", (TINY,) * 5)
    assert cli.main(["bench", "--threads", "1", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["machine"]["cores"] >= 1
    assert {r["implementation"] for r in report["rows"]} == set(bench.IMPLEMENTATIONS)
