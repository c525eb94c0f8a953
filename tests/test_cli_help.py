"""Every command answers --help (argparse formats help strings with %, so a stray % breaks it)."""

from __future__ import annotations

import pytest

from caloman.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert command in capsys.readouterr().out
