"""``batchnorm demo --quick``: exit code, printed table, results.json and figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from batchnorm.app import main as cli


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # -W error: the command (and its worker processes) must not warn either.
    completed = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-m",
            "batchnorm.app.main",
            "demo",
            "--quick",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return completed, out


def test_quick_demo_exits_0_and_prints_the_table(quick_demo):
    completed, out = quick_demo
    assert completed.returncode == 0, completed.stderr
    assert "final test acc" in completed.stdout
    assert completed.stdout.count("mlp ") == 4 and completed.stdout.count("cnn ") == 4
    assert "Figure 1 network with BN" in completed.stdout


def test_quick_demo_writes_results_and_figures(quick_demo):
    _, out = quick_demo
    results = json.loads((out / "results.json").read_text())
    assert {
        "config",
        "summary",
        "runs",
        "paper_figure1",
        "ema_vs_batch",
        "drift",
        "figures",
        "wall_time_s",
        "environment",
    } <= set(results)
    assert len(results["summary"]) == 2 * 2 * 2  # model × BN × lr
    row = results["summary"][0]
    assert {
        "model",
        "batch_norm",
        "lr",
        "seeds",
        "final_test_accuracy",
        "steps_to_target",
        "roughness",
        "diverged",
        "diverged_seeds",
    } <= set(row)
    assert {"mean", "std", "per_seed"} <= set(row["final_test_accuracy"])
    assert len(row["final_test_accuracy"]["per_seed"]) == row["seeds"] == 2
    assert results["ema_vs_batch"]["identical_parameters"] is True
    assert set(results["paper_figure1"]) >= {"with_bn", "without_bn"}
    assert set(results["figures"]) == {
        "loss_curves.png",
        "accuracy_vs_lr.png",
        "drift.png",
        "paper_figure1.png",
        "ema_vs_batch.png",
    }
    for name in results["figures"]:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and 10_000 < len(data) < 300_000


def test_demo_rejects_unknown_models(tmp_path):
    with pytest.raises(SystemExit, match="--models"):
        cli.main(["demo", "--quick", "--models", "resnet", "--out", str(tmp_path)])
