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


def test_our_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    import clt_lens.evals.cli as eval_cli
    from clt_lens.cli import main
    from clt_lens.errors import InputError

    def bad_input(args, extra):
        raise InputError("layer 7 out of range for a CLT with 4 layers")

    monkeypatch.setattr(eval_cli, "run", bad_input)
    assert main(["eval", "somewhere"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("clt-lens eval: InputError: layer 7 out of range for a CLT with 4 "
                           "layers")

    def bug(args, extra):
        raise ValueError("an internal torch-style error")  # not ours: a bug, not bad input

    monkeypatch.setattr(eval_cli, "run", bug)
    with pytest.raises(ValueError, match="internal"):
        main(["eval", "somewhere"])
