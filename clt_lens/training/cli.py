"""``clt-lens train CONFIG.yaml [--key value ...] [--resume DIR]``.

Under torchrun (``torchrun --nproc_per_node N -m clt_lens train CONFIG --distributed feature``)
every rank runs this same command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clt_lens.cli_args import add_config_arguments, command_config, reject_unknown
from clt_lens.errors import MissingFileError
from clt_lens.training.config import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name: str | None) -> Path | None:
    """A YAML path, or the name of a packaged config (e.g. ``demo``, ``gpt2-small``)."""
    if name is None:
        return None
    p = Path(name)
    if p.exists():
        return p
    packaged = CONFIG_DIR / f"{name}.yaml"
    if packaged.exists():
        return packaged
    choices = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise MissingFileError(f"config {name!r} is neither a file nor a packaged config {choices}")


CONFIG = TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "clt-lens train [CONFIG.yaml | PACKAGED_NAME] [--resume DIR] [--field value ...]"
    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="YAML file or packaged config (demo, gpt2-small, pythia-160m, "
                        "gemma-2-2b, llama-3.2-1b); options override its fields")  # fmt: skip
    p.add_argument("--resume", help="run or checkpoint directory to continue from")
    add_config_arguments(p, TrainConfig)
    p.epilog = (
        "Nested fields take dotted names (--clt.d_sae 512, --source.model gpt2); the old flat "
        "spellings (--d_sae, --model, --sparsity_c) still work."
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from clt_lens.training.runner import CLTTrainingRunner

    reject_unknown([w for w in extra if w.startswith("-")], "train")  # before reading CONFIG
    cfg = command_config(TrainConfig, args, extra, "train",
                         config=resolve_config_path(args.config))
    runner = CLTTrainingRunner(cfg, resume=args.resume)
    runner.run()
    if runner.par.is_main:
        print(f"final checkpoint: {Path(cfg.out_dir) / 'final'}")
    runner.par.shutdown()
    return 0
