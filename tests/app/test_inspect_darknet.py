"""``batchnorm inspect NET.cfg NET.weights``: any darknet network, its statistics
per batch-normalized unit, problem flags, ``--json`` and ``--plot``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from batchnorm.app.main import main
from batchnorm.io import darknet

# yolov3-tiny-like: convolutions with batch_normalize around a maxpool, a plain
# convolution, a route back, and a connected layer with batch_normalize.
# Layers: 0 conv+BN, 1 maxpool, 2 conv+BN, 3 conv, 4 route, 5 conv+BN, 6 connected+BN
CFG = """\
[net]
height=16
width=16
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[convolutional]
filters=6
size=1
stride=1
activation=linear

[route]
layers=-2

[conv]
batch_normalize=1
filters=4
size=1
activation=leaky

[connected]
batch_normalize=1
output=5
activation=leaky
"""
BN_LAYERS = [0, 2, 5, 6]

GRU = """\
[net]
inputs=10

[gru]
batch_normalize=1
output=6

[connected]
output=3
activation=linear
"""
GRU_PREFIXES = ["wz.", "wr.", "wh.", "uz.", "ur.", "uh."]

STANDALONE = """\
[net]
height=4
width=4
channels=2

[convolutional]
filters=3
size=1
activation=linear

[batchnorm]
"""


def pair(tmp_path, text=CFG, edit=None, name="net"):
    """A cfg and a synthetic .weights for it (``edit(network)`` first)."""
    cfg = tmp_path / f"{name}.cfg"
    cfg.write_text(text)
    network = darknet.synthetic(cfg, seed=0)
    if edit is not None:
        edit(network)
    weights = tmp_path / f"{name}.weights"
    darknet.write(network, weights)
    return cfg, weights


def inspect(capsys, *args):
    code = main(["inspect", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows(out):
    """Table rows by layer index (the lines that start with a layer number)."""
    found = {}
    for line in out.splitlines():
        match = re.match(r"\s*(\d+) ", line)
        if match:
            found.setdefault(int(match.group(1)), []).append(line)
    return found


def test_healthy_network_exits_0_with_a_row_per_unit(tmp_path, capsys):
    cfg, weights = pair(tmp_path)
    code, out, err = inspect(capsys, cfg, weights)
    assert code == 0 and err == ""
    assert "7 layers, 4 batch-normalized units (33 channels)" in out
    assert "weights version 0.2.0, seen 0" in out
    table = rows(out)
    assert sorted(table) == BN_LAYERS
    assert table[6][0].split()[:5] == ["6", "connected", str(_line(CFG, 7)), "-", "5"]
    assert table[5][0].split()[1] == "conv"  # the section as written
    assert "problems:" not in out
    assert out.rstrip().endswith("healthy: 4 batch-normalized units, no problems")
    # the statistics are those of the arrays
    network = darknet.read(cfg, weights)
    scales = network[2].arrays["scales"]
    numbers = table[2][0].split()[5:8]
    assert numbers == [f"{v:.3g}" for v in np.percentile(scales, [0, 50, 100])]


def _line(text, section):
    """The line of the ``section``-th section after [net] (1-based)."""
    heads = [i for i, line in enumerate(text.splitlines(), 1) if line.startswith("[")]
    return heads[section]


INJECTIONS = {
    "nan-scale": (2, "scales", [3], np.nan, "non-finite"),
    "inf-bias": (0, "biases", [1, 6], np.inf, "non-finite"),
    "nan-variance": (5, "rolling_variance", [0], np.nan, "non-finite"),
    "negative-variance": (5, "rolling_variance", [2], -0.5, "negative-variance"),
    "tiny-variance": (0, "rolling_variance", [0, 7], 1e-9, "tiny-variance"),
    "zero-variance": (6, "rolling_variance", [4], 0.0, "tiny-variance"),
    "dead-gamma": (6, "scales", [1, 2], 0.0, "dead-gamma"),
}


@pytest.mark.parametrize("case", INJECTIONS)
def test_each_problem_is_flagged_on_its_unit(tmp_path, capsys, case):
    layer, array, channels, value, flag = INJECTIONS[case]

    def inject(network):
        network[layer].arrays[array][channels] = value

    cfg, weights = pair(tmp_path, edit=inject)
    code, out, err = inspect(capsys, cfg, weights)
    assert code == 1 and err == ""
    table = rows(out)
    for index in BN_LAYERS:
        assert table[index][0].endswith(flag) == (index == layer), table[index][0]
    listed = ", ".join(map(str, channels))
    problem = re.search(
        rf"^  \[{flag}\] layer {layer} \[\w+\] line \d+: (.*)$", out, re.M
    )
    assert problem is not None, out
    assert f"at {len(channels)} of " in problem.group(1)
    assert f"channels [{listed}]" in problem.group(1)
    assert array in problem.group(1) or flag == "dead-gamma"
    assert (
        f"1 problem(s) (1 {flag}) in 1 of 4 batch-normalized units, layers {layer}"
        in out
    )

    code, out, err = inspect(capsys, cfg, weights, "--json")
    assert code == 1 and err == ""
    document = json.loads(out)
    assert [(p["layer"], p["flag"], p["array"]) for p in document["problems"]] == [
        (layer, flag, array)
    ]
    assert document["problems"][0]["first_channels"] == channels
    assert document["problems"][0]["count"] == len(channels)
    flagged = {u["layer"]: u["flags"] for u in document["units"]}
    assert flagged == {i: [flag] if i == layer else [] for i in BN_LAYERS}
    assert document["healthy"] is False
    assert document["totals"]["problems"] == 1
    assert document["totals"]["by_flag"][flag] == 1


def test_json_of_a_healthy_network(tmp_path, capsys):
    cfg, weights = pair(tmp_path)
    code, out, err = inspect(capsys, weights, cfg, "--json")
    assert code == 0 and err == ""
    document = json.loads(out)  # nothing else on stdout
    assert document["header"] == {"major": 0, "minor": 2, "revision": 0, "seen": 0}
    assert document["cfg"] == str(cfg) and document["weights"] == str(weights)
    assert document["thresholds"] == {"var_tiny": 1e-6, "gamma_tiny": 1e-6}
    assert document["totals"] == {
        "units": 4,
        "channels": 33,
        "units_with_problems": 0,
        "problems": 0,
        "by_flag": dict.fromkeys(
            ["non-finite", "negative-variance", "tiny-variance", "dead-gamma"], 0
        ),
    }
    unit = document["units"][0]
    assert (unit["layer"], unit["section"], unit["prefix"], unit["channels"]) == (
        0,
        "convolutional",
        "",
        8,
    )
    variance = darknet.read(cfg, weights)[0].arrays["rolling_variance"]
    stats = unit["stats"]["rolling_variance"]
    assert stats["median"] == pytest.approx(float(np.median(variance)))
    assert stats["q1"] <= stats["median"] <= stats["q3"] and stats["finite"] == 8
    assert set(unit["stats"]) == {
        "scales",
        "biases",
        "rolling_mean",
        "rolling_variance",
    }


def test_all_nan_statistics_are_null_in_json(tmp_path, capsys):
    def poison(network):
        network[2].arrays["rolling_mean"][:] = np.nan

    cfg, weights = pair(tmp_path, edit=poison)
    code, out, _ = inspect(capsys, cfg, weights, "--json")
    assert code == 1
    unit = json.loads(out)["units"][1]
    assert unit["stats"]["rolling_mean"] == dict.fromkeys(
        ["min", "q1", "median", "q3", "max"]
    ) | {"finite": 0}
    assert unit["problems"][0]["count"] == 16


def test_thresholds_are_flags(tmp_path, capsys):
    cfg, weights = pair(tmp_path)
    variance = darknet.read(cfg, weights)[0].arrays["rolling_variance"]
    limit = float(np.sort(variance)[2])  # flags the two smallest of layer 0
    code, out, _ = inspect(capsys, cfg, weights, "--var-tiny", limit, "--json")
    assert code == 1
    first = next(p for p in json.loads(out)["problems"] if p["layer"] == 0)
    assert first["flag"] == "tiny-variance" and first["count"] == 2
    assert sorted(first["first_channels"]) == sorted(np.argsort(variance)[:2].tolist())
    code, out, _ = inspect(capsys, cfg, weights, "--gamma-tiny", "10")
    assert (
        code == 1 and "[dead-gamma] layer 0" in out and "|scales| < 10 at 8 of 8" in out
    )
    code, _, err = inspect(capsys, cfg, weights, "--var-tiny", "-1")
    assert code == 2
    assert err.strip() == (
        "batchnorm inspect: error: --var-tiny must be a number >= 0 (e.g. 1e-06); "
        "got '-1'."
    )


def test_recurrent_units_are_listed_with_their_prefixes(tmp_path, capsys):
    def inject(network):
        network[0].arrays["uh.rolling_variance"][5] = -1.0

    cfg, weights = pair(tmp_path, GRU, edit=inject)
    code, out, _ = inspect(capsys, cfg, weights)
    assert code == 1
    table = rows(out)
    assert [line.split()[3] for line in table[0]] == GRU_PREFIXES
    assert table[0][-1].endswith("negative-variance")
    assert "[negative-variance] layer 0 [gru] line 4 unit uh.: " in out
    code, out, _ = inspect(capsys, cfg, weights, "--json")
    units = json.loads(out)["units"]
    assert [(u["layer"], u["prefix"], u["channels"]) for u in units] == [
        (0, prefix, 6) for prefix in GRU_PREFIXES
    ]
    assert [u["flags"] for u in units][-1] == ["negative-variance"]


def test_standalone_batchnorm_has_no_biases(tmp_path, capsys):
    cfg, weights = pair(tmp_path, STANDALONE)
    code, out, _ = inspect(capsys, cfg, weights, "--json")
    assert code == 0
    (unit,) = json.loads(out)["units"]
    assert unit["section"] == "batchnorm" and unit["channels"] == 3
    assert set(unit["stats"]) == {"scales", "rolling_mean", "rolling_variance"}


def test_network_without_batch_normalization(tmp_path, capsys):
    cfg, weights = pair(tmp_path, "[net]\ninputs=4\n[connected]\noutput=2\n")
    code, out, _ = inspect(capsys, cfg, weights)
    assert code == 0 and "no batch-normalized units: nothing to check" in out


def test_old_spelling_and_either_order_give_the_same_report(tmp_path, capsys):
    cfg, weights = pair(tmp_path)
    reports = [
        inspect(capsys, cfg, weights),
        inspect(capsys, weights, cfg),
        inspect(capsys, weights, "--cfg", cfg),
    ]
    assert reports[0][0] == 0 and reports[0] == reports[1] == reports[2]


def test_truncated_weights_exit_2_with_the_format_error(tmp_path, capsys):
    cfg, weights = pair(tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    for extra in ([], ["--json"]):
        code, out, err = inspect(capsys, cfg, weights, *extra)
        assert code == 2 and out == ""
        message = err.strip()
        assert "\n" not in message
        assert message.startswith(f"batchnorm inspect: error: {weights}: too short for")
        assert "layer 6 [connected]" in message and "100 bytes are missing" in message


def test_a_weights_file_of_another_network_names_the_newer_file(tmp_path, capsys):
    cfg, weights = pair(tmp_path)
    cfg.write_text(CFG.replace("filters=8", "filters=9"))
    stamp = weights.stat().st_mtime - 30
    os.utime(weights, (stamp, stamp))
    code, _, err = inspect(capsys, cfg, weights)
    assert code == 2
    assert f"{cfg} is newer (modified 30 s after {weights})" in err


@pytest.mark.parametrize("missing", ["cfg", "weights"])
def test_missing_file_is_named(tmp_path, capsys, missing):
    cfg, weights = pair(tmp_path)
    gone = {"cfg": cfg, "weights": weights}[missing]
    gone.unlink()
    code, out, err = inspect(capsys, cfg, weights)
    assert code == 2 and out == ""
    assert err.strip() == (
        f"batchnorm inspect: error: {gone}: no such file. Check the path "
        f"(relative to {os.getcwd()})."
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["net.cfg"], "net.cfg: a darknet .cfg needs its .weights"),
        (["net.weights"], "net.weights: a darknet .weights file needs its .cfg"),
        (["net.cfg", "net.cfg"], "takes a darknet pair, one .cfg and one .weights"),
        (["net.cfg", "net.weights", "--cfg", "net.cfg"], "both name a .cfg"),
        (["net.cfg", "net.weights", "--like", "m.npz"], "--like goes with a .pt"),
        (["net.cfg", "net.weights", "--plot", "x.jpg"], "must end in .png"),
        (["net.cfg", "net.weights", "--plot", "no/x.png"], "the folder no does not"),
        (["m.npz", "--json"], "--json inspect darknet networks"),
        (["m.npz", "--plot", "x.png"], "--plot inspect darknet networks"),
    ],
)
def test_arguments_that_do_not_go_together(
    tmp_path, capsys, monkeypatch, argv, expected
):
    monkeypatch.chdir(tmp_path)
    pair(tmp_path)
    code, out, err = inspect(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("batchnorm inspect: error: ") and err.count("\n") == 1
    assert expected in err
    assert not (tmp_path / "x.png").exists()


PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")

    def inject(network):
        network[5].arrays["rolling_variance"][1] = -1.0
        network[2].arrays["scales"][0] = np.nan

    cfg, weights = pair(tmp_path, edit=inject)
    target = tmp_path / "bn.png"
    code, out, _ = inspect(capsys, cfg, weights, "--plot", target)
    assert code == 1 and out.rstrip().endswith(f"wrote {target}")
    data = target.read_bytes()
    assert data.startswith(PNG) and len(data) > 20_000
    width, height = (
        int.from_bytes(data[16:20], "big"),
        int.from_bytes(data[20:24], "big"),
    )
    assert width >= 600 and height >= 600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # with --json, stdout is the document alone; it names the plot
    target.unlink()
    code, out, _ = inspect(capsys, cfg, weights, "--plot", target, "--json")
    assert code == 1 and json.loads(out)["plot"] == str(target)
    assert target.read_bytes().startswith(PNG)


def test_plot_without_matplotlib_says_so_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    cfg, weights = pair(tmp_path)
    weights.unlink()  # would be an error if anything were read
    code, out, err = inspect(capsys, cfg, weights, "--plot", tmp_path / "x.png")
    assert code == 2 and out == ""
    assert err.strip() == (
        "batchnorm inspect needs matplotlib, which is not installed: "
        "pip install 'batchnorm[demo]'"
    )
    assert not (tmp_path / "x.png").exists()


def test_console_json_is_clean(tmp_path):
    """In a fresh interpreter: stdout is JSON alone, stderr is empty."""

    def inject(network):
        network[0].arrays["scales"][2] = 0.0

    cfg, weights = pair(tmp_path, edit=inject)
    result = subprocess.run(
        [sys.executable, "-m", "batchnorm.app.main", "inspect", str(cfg), str(weights)]
        + ["--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1 and result.stderr == ""
    assert json.loads(result.stdout)["problems"][0]["flag"] == "dead-gamma"
