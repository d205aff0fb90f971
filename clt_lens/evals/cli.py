"""``clt-lens eval [CONFIG.yaml] CHECKPOINT [--field value ...]``: the fields of
:class:`clt_lens.evals.config.EvalConfig` (``--help`` lists them)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from clt_lens.cli_args import add_config_arguments, add_positionals, command_config
from clt_lens.evals.config import EvalConfig

CONFIG = EvalConfig
POSITIONALS = ("checkpoint",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "clt-lens eval [CONFIG.yaml] CHECKPOINT [--field value ...]"
    add_positionals(p, *POSITIONALS)
    add_config_arguments(p, EvalConfig)
    # the first CLI's switch; its meaning is inverted, so it is an alias, not a renamed key
    p.add_argument("--no-single-layer", dest="single_layer_splices", action="store_const",
                   const=False, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # fmt: skip
    p.epilog = "Old spellings still work: --model, --dataset, --split, --context_size (now " \
               "--source.*), --tokens, --out, --graphs, --graph-max-nodes, --ablate, " \
               "--no-single-layer."


def load(args: argparse.Namespace, extra: list[str]) -> EvalConfig:
    return command_config(EvalConfig, args, extra, "eval", POSITIONALS)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from clt_lens.evals.evaluate import evaluate
    from clt_lens.evals.report import markdown_table

    cfg = load(args, extra)
    out = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.checkpoint) / "eval"
    kwargs = dataclasses.asdict(cfg)
    kwargs.pop("checkpoint")
    kwargs.update(kwargs.pop("source"))  # evaluate() takes the source fields as keywords
    kwargs["out_dir"] = out
    result = evaluate(cfg.checkpoint, **kwargs)
    print(markdown_table(result))
    print(f"\nwritten: {out / 'eval.json'}, {out / 'eval_layers.png'}, {out / 'density.png'}")
    return 0
