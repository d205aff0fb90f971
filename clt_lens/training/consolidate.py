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
from pathlib import Path

from clt_lens.clt.storage import (
    WEIGHTS_STEM,
    TensorReader,
    TensorSpec,
    is_sharded,
    write_safetensors_streaming,
)
from clt_lens.errors import InputError
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a checkpoint")
    p.add_argument("--out", help="output folder (default: RUN/final for a run directory, "
                   "else CHECKPOINT-consolidated)")  # fmt: skip


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise InputError(f"unexpected arguments {extra}")
    src = ckpt_io.resolve_checkpoint(args.checkpoint)
    given = Path(args.checkpoint)
    if args.out:
        out = Path(args.out)
    elif given.resolve() != src.resolve():
        out = given / "final"
    else:
        out = src.with_name(src.name + "-consolidated")
    print(f"consolidated {src} -> {consolidate(src, out)}")
    return 0
