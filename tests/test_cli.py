"""The clt-lens dispatcher: every listed command has a module that builds its parser."""

import argparse
import importlib

import pytest

from clt_lens.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_modules_build_their_parsers(name):
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    assert callable(module.run)


def test_config_errors_are_one_line_messages(capsys):
    assert main(["train", "--no_such_key", "1"]) == 2
    err = capsys.readouterr().err
    assert "no_such_key" in err and "Traceback" not in err
