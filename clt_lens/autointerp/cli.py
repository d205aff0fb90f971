"""``clt-lens autointerp [CONFIG.yaml] FEATURES_DIR --model NAME [--field value ...]``.

Explains and scores the features of a features directory through any OpenAI-compatible
chat-completions server (OpenAI, vLLM, Ollama): the key and URL come from --api-key /
--base-url or OPENAI_API_KEY / OPENAI_BASE_URL. Re-running continues where a stopped or
killed run left off. Options are the fields of
:class:`clt_lens.autointerp.config.AutointerpConfig` (``--help`` lists them); the first CLI's
``--config FILE`` still names the YAML file.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from clt_lens.autointerp.config import AutointerpConfig
from clt_lens.cli_args import add_config_arguments, add_positionals, command_config


@dataclass(kw_only=True)
class AutointerpCommandConfig(AutointerpConfig):
    """An autointerp run from the command line: the run's config and where it reads."""

    features_dir: str  # directory written by 'clt-lens features'
    quiet: bool = False  # no progress bar or printed summary


CONFIG = AutointerpCommandConfig
POSITIONALS = ("features_dir",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "clt-lens autointerp [CONFIG.yaml] FEATURES_DIR --model NAME [--field value ...]"
    add_positionals(p, *POSITIONALS)
    p.add_argument("--config", metavar="FILE", help=argparse.SUPPRESS)  # the first CLI's spelling
    add_config_arguments(p, AutointerpCommandConfig)
    p.epilog = "Results: FEATURES_DIR/autointerp.jsonl and autointerp_summary.json."


def load(args: argparse.Namespace, extra: list[str]) -> AutointerpCommandConfig:
    scorers = getattr(args, "scorers", None)
    if isinstance(scorers, str) and scorers.strip().lower() == "none":
        args.scorers = []  # only explain
    return command_config(AutointerpCommandConfig, args, extra, "autointerp", POSITIONALS,
                          config=args.config)  # fmt: skip


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from clt_lens.autointerp.records import RunLocked
    from clt_lens.autointerp.runner import run_with_config

    cfg = load(args, extra)
    try:
        summary = run_with_config(cfg.features_dir, cfg, progress=not cfg.quiet)
    except KeyboardInterrupt:
        return 130
    except RunLocked as e:
        print(f"clt-lens autointerp: {e}", file=sys.stderr)
        return 1
    if summary["stopped"] in ("fatal_error", "unavailable"):
        return 1
    return 0
