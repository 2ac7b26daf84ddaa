"""The command line: help, the example, and argument errors."""

from __future__ import annotations

import pytest

from batchnorm.app.main import COMMANDS, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_example_runs_and_explains_momentum(capsys):
    assert main(["example", "--steps", "30"]) == 0
    out = capsys.readouterr().out
    assert "momentum 0.99" in out and "momentum 0.9 " in out
    assert "0.740 of the initial 0 remains" in out  # 0.99 ** 30


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fly'" in capsys.readouterr().err
