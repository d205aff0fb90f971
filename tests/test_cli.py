"""The clt-lens dispatcher: every listed command has a module that builds its parser."""

import argparse
import importlib
import operator

import pytest

from clt_lens.cli import COMMANDS, main
from clt_lens.config import ConfigError


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


# -- every command is `clt-lens CMD [CONFIG.yaml] [--field value ...]` over a dataclass config --

PENDING: set[str] = set()  # commands not generated from a config yet (none left)


def _parse(name, argv):
    """The config `clt-lens NAME argv...` runs with (nothing runs)."""
    from clt_lens.cli import command_parser

    module, parser = command_parser(name)
    return module.load(*parser.parse_known_args(argv))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_lists_every_field_with_type_default_and_doc(name, capsys):
    from clt_lens.cli_args import _fmt_default, iter_fields, type_name

    if name in PENDING:
        pytest.xfail(f"{name} is not generated from a config yet")
    module = importlib.import_module(COMMANDS[name][0])
    with pytest.raises(SystemExit):
        main([name, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert text.startswith(f"usage: clt-lens {name} [CONFIG")
    for field, tp, default, doc in iter_fields(module.CONFIG):
        assert doc, f"{module.CONFIG.__name__}.{field} has no doc comment"
        at = text.find(f"--{field} ")
        assert at >= 0, f"'clt-lens {name} --help' does not list --{field}"
        expected = f"[{type_name(tp)}; default {_fmt_default(default)}]"
        end = text.find(expected, at)
        # within this option's entry: at most its own two spellings' metavars before it
        assert end >= 0 and text[at:end].count("[V]") <= 2, (field, expected, text[at:at + 300])


def test_pending_commands_are_still_pending():
    """Once a pending command gets a CONFIG, it joins the checks above."""
    for name in PENDING:
        assert not hasattr(importlib.import_module(COMMANDS[name][0]), "CONFIG"), name


# (command, the first CLI's spelling (README, tutorials, tests), the generated one, the fields
# both must give). Each pair must parse to the same config, and that config has the fields.
SPELLINGS = [
    ("eval", ["runs/clt", "--graphs", "24"],
     ["--checkpoint", "runs/clt", "--graph_prompts", "24"],
     {"checkpoint": "runs/clt", "graph_prompts": 24}),
    ("eval", ["run/final", "--tokens", "254", "--no-single-layer", "--density-tokens", "1016",
              "--graphs", "2", "--graph-max-nodes", "24", "--ablate", "2", "--out", "o",
              "--batch-size", "4", "--device", "cuda"],
     ["run/final", "--n_tokens", "254", "--single_layer_splices", "false", "--density_tokens",
      "1016", "--graph_prompts", "2", "--graph_max_feature_nodes", "24", "--graph_ablate", "2",
      "--out_dir", "o", "--batch_size", "4", "--device", "cuda"],
     {"n_tokens": 254, "single_layer_splices": False, "density_tokens": 1016,
      "graph_max_feature_nodes": 24, "graph_ablate": 2, "out_dir": "o", "batch_size": 4}),
    ("attribute", ["--clt", "runs/clt/final", "--prompt", "ROMEO: But soft", "--out",
                   "runs/graphs", "--features", "runs/features", "--max-feature-nodes", "200"],
     ["runs/clt/final", "ROMEO: But soft", "--out_dir", "runs/graphs", "--features_dir",
      "runs/features", "--max_feature_nodes", "200"],
     {"checkpoint": "runs/clt/final", "prompt": "ROMEO: But soft", "out_dir": "runs/graphs",
      "features_dir": "runs/features", "max_feature_nodes": 200}),
    ("attribute", ["--clt", "set", "--prompt", "p", "--model", "embedded", "--slug", "cli",
                   "--target", " question", "--target", " answer", "--batch-size", "64",
                   "--offload", "disk", "--verbose"],
     ["set", "p", "--model", "embedded", "--slug", "cli", "--targets",
      "[' question', ' answer']", "--batch_size", "64", "--offload", "disk", "--verbose",
      "true"],
     {"targets": [" question", " answer"], "batch_size": 64, "offload": "disk",
      "verbose": True}),
    ("export", ["ckpt", "set", "--layout", "per_layer", "--dtype", "float16", "--model-name",
                "gpt2", "--scan", "s"],
     ["--checkpoint", "ckpt", "--out_dir", "set", "--layout", "per_layer", "--dtype",
      "float16", "--model_name", "gpt2", "--scan", "s"],
     {"checkpoint": "ckpt", "out_dir": "set", "dtype": "float16", "model_name": "gpt2"}),
    ("consolidate", ["run", "--out", "o"], ["run", "--out_dir", "o"],
     {"checkpoint": "run", "out_dir": "o"}),
    ("upload", ["fdir", "--model-id", "tiny", "--source", "1-mine", "--layers", "3",
                "--batch-size", "50", "--no-explanations", "--dry-run", "--api-key", "k",
                "--base-url", "http://127.0.0.1:1/api"],
     ["fdir", "--model_id", "tiny", "--source", "1-mine", "--layers", "[3]", "--batch_size",
      "50", "--explanations", "false", "--dry_run", "true", "--api_key", "k", "--base_url",
      "http://127.0.0.1:1/api"],
     {"features_dir": "fdir", "layers": [3], "batch_size": 50, "explanations": False,
      "dry_run": True}),
    ("serve", ["runs/graphs", "--install-js", "--read-only", "--model", "embedded", "--js-dir",
               "js", "--port", "8040", "--clt", "c"],
     ["--graphs_dir", "runs/graphs", "--install-js", "--read_only", "true", "--model",
      "embedded", "--js_dir", "js", "--port", "8040", "--clt", "c"],
     {"graphs_dir": "runs/graphs", "read_only": True, "js_dir": "js", "port": 8040}),
    ("serve", ["--read-only", "runs/graphs"], ["runs/graphs", "--read_only"],
     {"graphs_dir": "runs/graphs", "read_only": True}),
    ("autointerp", ["runs/features", "--model", "gpt-4o-mini", "--max-requests", "2000",
                    "--concurrency", "8", "--features", "1:4,0:12", "--layers", "0,2",
                    "--scorers", "none", "--retry-failed", "--quiet", "--retry_base_delay",
                    "0.01", "--price-per-1k-input", "0.5"],
     ["runs/features", "--model", "gpt-4o-mini", "--max_requests", "2000", "--concurrency",
      "8", "--features", "['1:4', '0:12']", "--layers", "[0, 2]", "--scorers", "[]",
      "--retry_failed", "true", "--quiet", "true", "--retry_base_delay", "0.01",
      "--price_per_1k_input", "0.5"],
     {"features_dir": "runs/features", "max_requests": 2000, "features": ["1:4", "0:12"],
      "layers": [0, 2], "scorers": [], "retry_failed": True, "quiet": True}),
    ("features", ["runs/demo/final", "--tokens", "400", "--layers", "0,2", "--neuronpedia",
                  "--model-id", "tiny", "--top_k", "4", "--dashboard", "2:1,3", "--dashboard",
                  "0:5", "--out", "o", "--device", "cpu"],
     ["runs/demo/final", "--n_tokens", "400", "--layers", "[0, 2]", "--neuronpedia", "true",
      "--neuronpedia_model_id", "tiny", "--top_k", "4", "--dashboards", "['2:1,3', '0:5']",
      "--out_dir", "o", "--device", "cpu"],
     {"checkpoint": "runs/demo/final", "n_tokens": 400, "layers": [0, 2], "neuronpedia": True,
      "neuronpedia_model_id": "tiny", "dashboards": ["2:1,3", "0:5"], "out_dir": "o"}),
    # the source section: the flat spellings of eval and features (YAML and options alike)
    ("eval", ["ck", "--model", "gpt2", "--dataset", "data/", "--split", "val", "--context_size",
              "64", "--input_hook", "hook_resid_mid"],
     ["ck", "--source.model", "gpt2", "--source.dataset", "data/", "--source.split", "val",
      "--source.context_size", "64", "--source.input_hook", "hook_resid_mid"],
     {"source.model": "gpt2", "source.dataset": "data/", "source.split": "val",
      "source.context_size": 64, "source.input_hook": "hook_resid_mid",
      "source.output_hook": "auto"}),
    ("eval", ["ck"], ["ck", "--source.split", "heldout"],
     {"source.model": None, "source.dataset": None, "source.context_size": None}),
    ("features", ["ck", "--model", "embedded", "--dataset", "d", "--split", "train",
                  "--context-size", "32", "--output_hook", "hook_mlp_out"],
     ["ck", "--source.model", "embedded", "--source.dataset", "d", "--source.split", "train",
      "--source.context_size", "32", "--source.output_hook", "hook_mlp_out"],
     {"source.model": "embedded", "source.dataset": "d", "source.split": "train",
      "source.context_size": 32, "source.output_hook": "hook_mlp_out"}),
    ("demo", ["--out", "d", "--cache-tokens", "16384", "--steps", "30", "--feature-tokens",
              "4096", "--eval-tokens", "1024", "--fresh", "--device", "cuda"],
     ["--out_dir", "d", "--cache_tokens", "16384", "--n_steps", "30", "--feature_tokens",
      "4096", "--eval_tokens", "1024", "--fresh", "true", "--device", "cuda"],
     {"out_dir": "d", "cache_tokens": 16384, "n_steps": 30, "fresh": True}),
]


@pytest.mark.parametrize("name,old,new,fields", SPELLINGS,
                         ids=[f"{s[0]}-{i}" for i, s in enumerate(SPELLINGS)])
def test_old_spellings_parse_to_the_same_config(name, old, new, fields):
    got_old, got_new = _parse(name, old), _parse(name, new)
    assert got_old == got_new
    assert {k: operator.attrgetter(k)(got_new) for k in fields} == fields


def test_config_file_positionals_and_options(tmp_path):
    """YAML file < options; positionals fill fields; the first CLI's --config FILE works."""
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("checkpoint: from_yaml\nn_tokens: 7\nsplit: train\n")  # flat split: old
    got = _parse("eval", [str(cfg), "--tokens", "5"])
    assert (got.checkpoint, got.n_tokens, got.source.split) == ("from_yaml", 5, "train")
    new = tmp_path / "new.yaml"
    new.write_text("checkpoint: c\nsource: {split: train, dataset: d}\n")
    assert _parse("features", [str(new)]).source == _parse(
        "features", ["c", "--split", "train", "--dataset", "d"]).source
    assert _parse("eval", [str(new), "--split", "val"]).source.split == "val"  # option wins
    both = tmp_path / "both.yaml"
    both.write_text("checkpoint: c\nsplit: a\nsource: {split: b}\n")
    with pytest.raises(ConfigError, match="'split' and 'source.split' both given"):
        _parse("eval", [str(both)])
    assert _parse("eval", [str(cfg), "ckpt"]).checkpoint == "ckpt"
    assert _parse("eval", ["--tokens", "5", "ckpt"]).checkpoint == "ckpt"  # words after options
    ai = tmp_path / "ai.yaml"
    ai.write_text("model: m\nconcurrency: 3\n")
    assert _parse("autointerp", ["fdir", "--config", str(ai)]) == _parse("autointerp",
                                                                         [str(ai), "fdir"])
    assert _parse("autointerp", ["fdir", "--config", str(ai)]).concurrency == 3


@pytest.mark.parametrize("name,argv,message", [
    ("eval", [], "needs CHECKPOINT"),
    ("eval", ["a", "b"], "too many positional arguments"),
    ("eval", ["a", "--checkpoint", "b"], "given twice"),
    ("eval", ["a", "--bogus", "1"], "--bogus"),
    ("eval", ["a", "--tokens", "many"], "n_tokens"),
    ("export", ["ckpt"], "needs OUT_DIR"),
    ("attribute", ["ckpt", "p", "--offload", "gpu"], "offload"),
    ("autointerp", ["fdir", "--model", "m", "--features", "1-4"], "layer:index"),
    ("autointerp", ["fdir", "--config", "a.yaml", "b.yaml"], "two config files"),
    ("serve", ["--port", "http"], "port"),
])
def test_bad_command_lines_are_refused_by_name(name, argv, message):
    from clt_lens.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        _parse(name, argv)
