"""``batchnorm fold NET.cfg NET.weights --out-cfg F.cfg --out-weights F.weights``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from batchnorm.app import fold as fold_command
from batchnorm.app.main import main
from batchnorm.io import darknet
from helpers.processes import run_python

CFG = """\
[net]
height=6
width=6
channels=3

[convolutional]
filters=4
size=3
pad=1
activation=linear

[batchnorm]

[convolutional]
batch_normalize=1
filters=4
size=3
pad=1
activation=leaky

[batchnorm]

[maxpool]
size=2
stride=2

[connected]
output=5
batch_normalize=1
activation=linear
"""


@pytest.fixture
def pair(tmp_path):
    """A network on disk: (cfg, weights)."""
    cfg, weights = tmp_path / "net.cfg", tmp_path / "net.weights"
    cfg.write_text(CFG)
    darknet.write(darknet.synthetic(cfg, seed=1), weights)
    return cfg, weights


def outputs(tmp_path):
    return tmp_path / "folded.cfg", tmp_path / "folded.weights"


def fold(cfg, weights, out_cfg, out_weights, *extra):
    return main(
        [
            "fold",
            str(cfg),
            str(weights),
            "--out-cfg",
            str(out_cfg),
            "--out-weights",
            str(out_weights),
            *extra,
        ]
    )


def test_fold_writes_the_pair_and_says_what_it_did(pair, tmp_path, capsys):
    cfg, weights = pair
    out_cfg, out_weights = outputs(tmp_path)
    assert fold(cfg, weights, out_cfg, out_weights) == 0
    out, err = capsys.readouterr()
    assert err == ""
    folded = darknet.read(out_cfg, out_weights)
    for layer in folded:  # nothing left to fold but the kept [batchnorm]
        assert layer.type == "batchnorm" or not layer.batch_normalize
    assert [layer.type for layer in folded] == [
        "convolutional",
        "convolutional",
        "batchnorm",
        "maxpool",
        "connected",
    ]
    expected = darknet.fold(darknet.read(cfg, weights))
    assert out_cfg.read_text() == expected.cfg_text
    for a, b in zip(folded, expected, strict=True):
        for name in b.arrays:
            np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
    lines = out.splitlines()
    assert lines[0] == (
        f"read {cfg} ({cfg.stat().st_size:,} bytes) and {weights} "
        f"({weights.stat().st_size:,} bytes): 6 layers, dialect pjreddie"
    )
    assert "batch normalization of 2 unit(s) (in 2 layer(s))" in lines[1]
    assert lines[2] == (
        "standalone [batchnorm]: 1 of 2 folded (layer 1 into layer 0; its section "
        "removed); 1 kept:"
    )
    assert lines[3] == (
        "  layer 3 (line 21): layer 2 [convolutional] has activation=leaky, not linear"
    )
    assert lines[4] == (
        f"wrote {out_cfg} ({out_cfg.stat().st_size:,} bytes) and {out_weights} "
        f"({out_weights.stat().st_size:,} bytes): 5 layers"
    )
    rounding = float(re.search(r"float32: (\S+) \(", lines[5]).group(1))
    assert 0 < rounding <= 2.0**-24 * 1.001
    assert "at most 2^-24" in lines[5]
    assert len(lines) == 6


def test_nothing_to_fold_still_writes_the_copy(tmp_path, capsys):
    cfg = tmp_path / "plain.cfg"
    cfg.write_text("[net]\ninputs=3\n[connected]\noutput=2\nactivation=relu\n")
    darknet.write(darknet.synthetic(cfg), tmp_path / "plain.weights")
    out_cfg, out_weights = outputs(tmp_path)
    assert fold(cfg, tmp_path / "plain.weights", out_cfg, out_weights) == 0
    out = capsys.readouterr().out
    assert "of 0 unit(s)" in out and "standalone" not in out
    assert "relative rounding of a folded weight to float32: 0 " in out
    assert out_weights.read_bytes() == (tmp_path / "plain.weights").read_bytes()


def test_outputs_may_replace_the_inputs(pair, capsys):
    cfg, weights = pair
    expected = darknet.fold(darknet.read(cfg, weights))
    assert fold(cfg, weights, cfg, weights) == 0
    out = capsys.readouterr().out
    assert "6 layers" in out.splitlines()[0] and "5 layers" in out.splitlines()[4]
    again = darknet.read(cfg, weights)
    assert cfg.read_text() == expected.cfg_text
    assert weights.stat().st_size == expected.weights_size()
    np.testing.assert_array_equal(
        again[0].arrays["weights"], expected[0].arrays["weights"]
    )
    assert not list(cfg.parent.glob("*.tmp"))


def test_dialect_alexeyab(tmp_path, capsys):
    """AlexeyAB's [batchnorm] stores biases: read as pjreddie the file is too
    long, and the error says which flag reads it."""
    cfg = tmp_path / "ab.cfg"
    cfg.write_text(CFG)
    weights = tmp_path / "ab.weights"
    net = darknet.synthetic(cfg, seed=2, dialect="alexeyab")
    net[2].arrays["rolling_variance"][:] = 1e-5  # where the dialects differ
    darknet.write(net, weights)
    out_cfg, out_weights = outputs(tmp_path)
    assert fold(cfg, weights, out_cfg, out_weights) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchnorm fold: error: ") and err.count("\n") == 1
    assert "too long" in err and "add --dialect alexeyab" in err
    assert not out_cfg.exists() and not out_weights.exists()
    assert fold(cfg, weights, out_cfg, out_weights, "--dialect", "alexeyab") == 0
    assert "dialect alexeyab" in capsys.readouterr().out
    expected = darknet.fold(net)
    assert expected.dialect == "alexeyab"
    folded = darknet.read(out_cfg, out_weights, dialect="alexeyab")
    for a, b in zip(folded, expected, strict=True):
        for name in b.arrays:
            np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
    pj = darknet.fold(net, dialect="pjreddie")
    assert not np.allclose(
        folded[1].arrays["weights"], pj[1].arrays["weights"], rtol=0.1
    )


def test_dialects_match_the_library():
    assert fold_command.DIALECTS == darknet.DIALECTS


# -- errors: one line, exit 2, outputs untouched -----------------------------------


@pytest.fixture
def existing_outputs(tmp_path):
    """Outputs that exist already, to show an error leaves them as they were."""
    out_cfg, out_weights = outputs(tmp_path)
    out_cfg.write_text("old cfg")
    out_weights.write_bytes(b"old weights")
    return out_cfg, out_weights


def failed(capsys, existing, *needles):
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("batchnorm fold: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    out_cfg, out_weights = existing
    assert out_cfg.read_text() == "old cfg"
    assert out_weights.read_bytes() == b"old weights"
    assert not list(out_cfg.parent.glob("*.tmp"))
    return err


@pytest.mark.parametrize("missing", ["--out-cfg", "--out-weights"])
def test_each_output_is_required(pair, existing_outputs, capsys, missing):
    cfg, weights = pair
    out_cfg, out_weights = existing_outputs
    argv = ["fold", str(cfg), str(weights)]
    for flag, path in (("--out-cfg", out_cfg), ("--out-weights", out_weights)):
        if flag != missing:
            argv += [flag, str(path)]
    assert main(argv) == 2
    failed(capsys, existing_outputs, f"{missing} is required", f"Add {missing} ")


def test_unknown_dialect(pair, existing_outputs, capsys):
    assert fold(*pair, *existing_outputs, "--dialect", "darknet") == 2
    failed(
        capsys,
        existing_outputs,
        "--dialect must be pjreddie or alexeyab; got 'darknet'",
    )


def test_swapped_inputs(pair, existing_outputs, capsys):
    cfg, weights = pair
    assert fold(weights, cfg, *existing_outputs) == 2
    err = failed(capsys, existing_outputs, "NET.cfg NET.weights, in that order")
    assert f"Run batchnorm fold {cfg} {weights}" in err


def test_both_outputs_to_one_file(pair, existing_outputs, capsys):
    out_cfg, _ = existing_outputs
    assert fold(*pair, out_cfg, out_cfg) == 2
    failed(capsys, existing_outputs, "are the same file", "its own path")


@pytest.mark.parametrize("which", [0, 1])
def test_missing_input(pair, existing_outputs, capsys, which):
    paths = list(pair)
    paths[which] = paths[which].with_name("absent" + paths[which].suffix)
    assert fold(*paths, *existing_outputs) == 2
    failed(capsys, existing_outputs, f"{paths[which]}: no such file")


def test_weights_of_another_network(pair, tmp_path, existing_outputs, capsys):
    cfg, _ = pair
    other = tmp_path / "other.cfg"
    other.write_text(CFG.replace("output=5", "output=7"))
    darknet.write(darknet.synthetic(other), tmp_path / "other.weights")
    assert fold(cfg, tmp_path / "other.weights", *existing_outputs) == 2
    err = failed(
        capsys,
        existing_outputs,
        "other.weights: too long for",
        "belongs to another network",
        "add --dialect alexeyab",  # the cfg has [batchnorm] sections
    )
    plain = tmp_path / "plain.cfg"
    plain.write_text("[net]\ninputs=3\n[connected]\noutput=2\n")
    assert fold(plain, tmp_path / "other.weights", *existing_outputs) == 2
    err = failed(capsys, existing_outputs, "too long for")
    assert "--dialect" not in err  # no [batchnorm]: the dialect cannot be why


def test_a_cfg_darknet_cannot_parse(pair, tmp_path, existing_outputs, capsys):
    bad = tmp_path / "bad.cfg"
    bad.write_text(CFG.replace("[maxpool]", "[pooling]"))
    assert fold(bad, pair[1], *existing_outputs) == 2
    failed(capsys, existing_outputs, "bad.cfg, line 23", "[pooling]")


@pytest.mark.parametrize("layer", [0, 2])
def test_negative_variance_names_the_layer(pair, existing_outputs, capsys, layer):
    cfg, weights = pair
    net = darknet.read(cfg, weights)
    net[layer + 1 if layer == 0 else layer].arrays["rolling_variance"][3] = -0.5
    darknet.write(net, weights)
    assert fold(cfg, weights, *existing_outputs) == 2
    name = "layer 1 [batchnorm]" if layer == 0 else "layer 2 [convolutional]"
    failed(capsys, existing_outputs, f"{weights}: cannot fold {name}", "channels [3]")


def test_nan_variance(pair, existing_outputs, capsys):
    cfg, weights = pair
    net = darknet.read(cfg, weights)
    net[5].arrays["rolling_variance"][0] = np.nan
    darknet.write(net, weights)
    assert fold(cfg, weights, *existing_outputs) == 2
    failed(capsys, existing_outputs, "layer 5 [connected]", "not finite")


def test_output_folder_missing(pair, tmp_path, existing_outputs, capsys):
    absent = tmp_path / "nowhere" / "f.weights"
    assert fold(*pair, existing_outputs[0], absent) == 2
    failed(capsys, existing_outputs, "nowhere")
    assert not (tmp_path / "nowhere").exists()


# -- the command line stays lazy -------------------------------------------------------


def test_fold_help_imports_only_its_own_module():
    code = (
        "import json, sys\n"
        "from batchnorm.app import main\n"
        "try:\n"
        "    main.main(['fold', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "sys.stdout.flush()\n"
        "print('\\n' + json.dumps(sorted(m for m in sys.modules "
        "if m.startswith('batchnorm'))))\n"
    )
    output = run_python(code)
    assert "--out-cfg FILE" in output and "{pjreddie,alexeyab}" in output
    loaded = set(json.loads(output.splitlines()[-1]))
    app = {m for m in loaded if m.startswith("batchnorm.app.")}
    assert app == {"batchnorm.app.main", "batchnorm.app.fold"}
    heavy = ("batchnorm.nn", "batchnorm.io", "batchnorm.distributed")
    assert not [m for m in loaded if m.startswith(heavy)]


def test_fold_is_listed_in_the_main_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "fold a darknet network's batch normalization" in capsys.readouterr().out
