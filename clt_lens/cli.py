"""The ``clt-lens`` command: one subcommand per step of the pipeline.

Each subcommand lives in its own module exposing ``CONFIG`` (its config dataclass),
``add_arguments(parser)`` (the options ``clt_lens.cli_args`` generates from ``CONFIG``) and
``run(args, extra) -> int``; ``extra`` holds what argparse did not recognise (refused by
name, or positional words given after an option). Modules are
imported only when their subcommand runs, so ``clt-lens --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from clt_lens.errors import CLTLensError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("clt_lens.demo", "run the whole path on the embedded default model"),
    "cache": ("clt_lens.cache.cli", "collect activations into a compressed, sharded cache"),
    "train": ("clt_lens.training.cli", "train a CLT from a cache or streamed activations"),
    "consolidate": ("clt_lens.training.consolidate",
                    "write a (feature-sharded) checkpoint as one SAELens folder"),
    "eval": ("clt_lens.evals.cli", "per-layer FVU/L0/dead features and replacement-model CE/KL"),
    "features": ("clt_lens.features.cli", "feature statistics and dashboard/Neuronpedia exports"),
    "autointerp": ("clt_lens.autointerp.cli", "explain and score features via an OpenAI-style API"),
    "export": ("clt_lens.circuits.cli_export", "write a circuit-tracer transcoder set"),
    "attribute": ("clt_lens.circuits.cli", "attribution graph for a prompt with circuit-tracer"),
    "serve": ("clt_lens.serve_cli", "local viewer for graphs and feature pages"),
    "upload": ("clt_lens.features.upload", "upload features to Neuronpedia"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clt-lens",
        description="Cross-Layer Transcoders: cache, train, evaluate, export, attribute.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\nRun 'clt-lens COMMAND --help' for a command's options.",
    )
    p.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    p.add_argument("--version", action="version", version=_version())
    return p


def _version() -> str:
    from clt_lens import __version__

    return f"clt-lens {__version__}"


def command_parser(name: str) -> tuple[ModuleType, argparse.ArgumentParser]:
    """The module of command ``name`` and its parser (what ``clt-lens NAME ...`` parses with)."""
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"clt-lens {name}", description=help_)
    module.add_arguments(parser)
    return module, parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] == "--version":
        print(_version())
        return 0
    if argv[0] not in COMMANDS:
        top.parse_args(argv[:1])  # prints the usage error listing valid commands
        return 2
    name = argv[0]
    module, parser = command_parser(name)
    args, extra = parser.parse_known_args(argv[1:])
    try:
        code = module.run(args, extra)
    except CLTLensError as e:
        # our errors name the bad input; a traceback adds nothing for a user, so print the
        # message (CLT_LENS_DEBUG=1 shows the traceback). Anything else is a bug: traceback.
        if os.environ.get("CLT_LENS_DEBUG"):
            raise
        print(f"clt-lens {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
