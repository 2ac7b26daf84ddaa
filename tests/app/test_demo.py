"""``batchnorm demo --quick``: exit code, printed table, results.json and figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from batchnorm.app import demo
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


BAD_ARGUMENTS = {
    "unknown model": (["--models", "resnet"], "--models"),
    "no model": (["--models", ","], "--models"),
    "negative learning rate": (["--lrs", "0.1,-1"], "--lrs"),
    "zero learning rate": (["--lrs", "0"], "--lrs"),
    "nan learning rate": (["--lrs", "nan"], "--lrs"),
    "no steps": (["--steps", "0"], "--steps"),
    "no seeds": (["--seeds", "0"], "--seeds"),
    "batch of one": (["--batch-size", "1"], "--batch-size"),
    "batch over the training set": (["--batch-size", "5000"], "--batch-size"),
    "unknown backend": (["--backend", "cuda"], "--backend"),
    "negative shared learning rate": (["--shared-lr", "-1"], "--shared-lr"),
    "target accuracy over 1": (["--target-accuracy", "1.5"], "--target-accuracy"),
    "no workers": (["--jobs", "0"], "--jobs"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_demo_rejects_bad_arguments_before_training(
    case, tmp_path, monkeypatch, capsys
):
    argv, flag = BAD_ARGUMENTS[case]
    monkeypatch.setattr(demo, "_execute", _no_training)
    out = tmp_path / "out"
    assert cli.main(["demo", "--quick", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"batchnorm demo: error: {flag} "), err
    assert err.count("\n") == 1, err
    assert "; got " in err
    assert not out.exists()


def test_demo_rejects_an_out_that_is_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "_execute", _no_training)
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    for out in (existing, existing / "sub"):
        assert cli.main(["demo", "--quick", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("batchnorm demo: error: --out ") and err.count("\n") == 1
        assert str(existing) in err
    assert existing.read_text() == "keep me"


def test_demo_lrs_that_are_not_numbers_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--lrs", "0.1,fast"])
    assert exit_info.value.code == 2
    assert "argument --lrs: comma-separated numbers" in capsys.readouterr().err


def _no_training(*args, **kwargs):
    raise AssertionError("the demo started training before checking its arguments")
