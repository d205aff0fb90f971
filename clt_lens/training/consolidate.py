"""``clt-lens consolidate RUN``: a checkpoint (feature-sharded or not) as one SAELens folder.

A feature-sharded run's checkpoints hold one file per feature slice. ``consolidate`` streams
them into ``cfg.json`` + ``sae_weights.safetensors`` (what ``SAE.load_from_disk`` and
``clt-lens export`` read) a chunk at a time: one chunk (``chunk_bytes``, or one layer of
``W_enc`` if that is larger) and one shard's part of it are in memory, never the model.
Training runs it at the end of every run to write ``final/``; the command is for other
checkpoints.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from clt_lens.cli_args import add_config_arguments, add_positionals, command_config
from clt_lens.clt.storage import (
    WEIGHTS_STEM,
    TensorReader,
    TensorSpec,
    is_sharded,
    write_safetensors_streaming,
)
from clt_lens.config import ConfigError
from clt_lens.fsutil import fsync_dir
from clt_lens.training import checkpoint as ckpt_io

CHUNK_BYTES = 16 * 2**20


def consolidate(ckpt: str | Path, out: str | Path, *, chunk_bytes: int = CHUNK_BYTES) -> Path:
    """Write checkpoint ``ckpt`` (a checkpoint or run directory) as a SAELens folder ``out``.

    The folder is assembled in a temporary sibling and renamed, so ``out`` is either the old
    folder or the complete new one.
    """
    src = ckpt_io.resolve_checkpoint(ckpt)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = tmp / f"{WEIGHTS_STEM}.safetensors"
    if is_sharded(src):
        with TensorReader(src, WEIGHTS_STEM) as reader:
            specs = [TensorSpec(n, reader.dtype(n), reader.shape(n)) for n in reader.names()]

            def chunks(spec: TensorSpec):
                row = spec.nbytes // max(spec.shape[0], 1) if spec.shape else spec.nbytes
                return reader.chunks(spec.name, rows=max(1, chunk_bytes // max(row, 1)))

            write_safetensors_streaming(weights, specs, chunks)
    else:
        shutil.copyfile(src / weights.name, weights)
    for f in ("cfg.json", ckpt_io.CONFIG_FILE):
        shutil.copyfile(src / f, tmp / f)
    fsync_dir(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    fsync_dir(out.parent)
    return out


@dataclass
class ConsolidateConfig:
    checkpoint: str  # a run directory (its newest checkpoint) or a checkpoint
    # output folder; default: RUN/final for a run directory, else CHECKPOINT-consolidated
    out_dir: str | None = None
    # bytes of weights read per step (at least one layer of W_enc): the memory it needs
    chunk_bytes: int = CHUNK_BYTES

    renamed_keys: ClassVar[dict[str, str]] = {"out": "out_dir"}

    def validate(self) -> None:
        if self.chunk_bytes < 1:
            raise ConfigError(f"config key 'chunk_bytes' must be >= 1, got {self.chunk_bytes}")


CONFIG = ConsolidateConfig
POSITIONALS = ("checkpoint",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "clt-lens consolidate [CONFIG.yaml] CHECKPOINT [--field value ...]"
    add_positionals(p, *POSITIONALS)
    add_config_arguments(p, ConsolidateConfig)


def load(args: argparse.Namespace, extra: list[str]) -> ConsolidateConfig:
    return command_config(ConsolidateConfig, args, extra, "consolidate", POSITIONALS)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = load(args, extra)
    src = ckpt_io.resolve_checkpoint(cfg.checkpoint)
    given = Path(cfg.checkpoint)
    if cfg.out_dir:
        out = Path(cfg.out_dir)
    elif given.resolve() != src.resolve():
        out = given / "final"
    else:
        out = src.with_name(src.name + "-consolidated")
    print(f"consolidated {src} -> {consolidate(src, out, chunk_bytes=cfg.chunk_bytes)}")
    return 0
