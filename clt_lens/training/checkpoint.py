"""Checkpoints: written by every rank in parallel, each its own slice, committed atomically.

Layout of a run directory::

    run/
      train_config.json        the TrainConfig of the run
      metrics.jsonl            one JSON object per logged step
      training_curves.png
      checkpoints/step_00000100/
          cfg.json                       the CLT's SAELens config (all F features)
          sae_weights.safetensors        one feature shard: a SAELens folder (SAE.load_from_disk)
          optimizer.safetensors          Adam moments ("W_enc.exp_avg", ...) and "since_fired"
        or, written by K feature ranks:
          sae_weights.f{k}-of-{K}.safetensors, optimizer.f{k}-of-{K}.safetensors, shards.json
          training_state.json            step, tokens, Adam step, scaler, L0-target state, world
          ranks/rank_{r:05d}.json        per rank: every RNG, the decode-mode hint
          data_state.json                data-source position(s)
          train_config.json
      checkpoints/LATEST       name of the newest complete checkpoint
      final/                   the last checkpoint as a plain SAELens folder

Feature shard k holds features [k F/K, (k+1) F/K) of every tensor with a feature axis (see
``clt_lens.clt.storage``); a resume at any world size reads only its slice from them. A
checkpoint is assembled in a staging sibling (``.step_X.tmp``) that every rank writes into, and
renamed into place by rank 0 after all ranks have fsynced; LATEST is replaced afterwards. A
crash of any rank at any moment leaves the previous checkpoint whole. Checkpoints need a
directory every rank can write (one machine, or a shared filesystem across nodes).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from clt_lens.clt.storage import (
    OPTIMIZER_STEM,
    WEIGHTS_STEM,
    ShardError,
    TensorReader,
    feature_dim,
    file_name,
    is_sharded,
)
from clt_lens.fsutil import atomic_write_text, fsync_dir

STATE_FILE = "training_state.json"
LEGACY_STATE_FILE = "training_state.pt"  # before per-rank checkpoints (still resumable)
DATA_STATE_FILE = "data_state.json"
CONFIG_FILE = "train_config.json"
LATEST_FILE = "LATEST"
RANKS_DIR = "ranks"
# data_state.json of a run whose data ranks read different data: one position per data rank
PER_DATA_RANK = "per_data_rank"


class CheckpointError(ShardError):
    """A checkpoint directory is missing, incomplete or incompatible."""


def staging_dir(ckpt_root: Path, name: str) -> Path:
    return ckpt_root / f".{name}.tmp"


def begin(ckpt_root: Path, name: str) -> Path:
    """(rank 0) An empty staging directory for checkpoint ``name``."""
    tmp = staging_dir(ckpt_root, name)
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / RANKS_DIR).mkdir(parents=True)
    return tmp


def write_json(path: Path, obj: Any) -> None:
    """Write and fsync (inside a staging directory, so no rename is needed)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


def rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / RANKS_DIR / f"rank_{rank:05d}.json"


def commit(ckpt_root: Path, name: str, keep: int = 2) -> Path:
    """(rank 0, after every rank finished writing) Move the staging directory into place."""
    tmp, final = staging_dir(ckpt_root, name), ckpt_root / name
    fsync_dir(tmp)
    fsync_dir(tmp / RANKS_DIR)
    if final.exists():
        old = ckpt_root / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(ckpt_root)
    atomic_write_text(ckpt_root / LATEST_FILE, name)
    _prune(ckpt_root, keep, protect=name)
    return final


def _prune(ckpt_root: Path, keep: int, protect: str) -> None:
    done = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for p in done[:-keep] if keep > 0 else []:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_root.glob(".step_*"):  # leftovers of a killed writer
        shutil.rmtree(p, ignore_errors=True)


def _is_checkpoint(p: Path) -> bool:
    return (p / STATE_FILE).is_file() or (p / LEGACY_STATE_FILE).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir (uses checkpoints/LATEST) or a checkpoint dir -> the checkpoint dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"resume path {str(p)!r} does not exist")
    if _is_checkpoint(p):
        return p
    for root in (p / "checkpoints", p):
        latest = root / LATEST_FILE
        if latest.is_file():
            ck = root / latest.read_text().strip()
            if _is_checkpoint(ck):
                return ck
            raise CheckpointError(f"{latest} names {ck.name!r}, which is incomplete or missing")
    raise CheckpointError(
        f"{str(p)!r} is neither a checkpoint (no {STATE_FILE}) nor a run directory "
        f"(no checkpoints/{LATEST_FILE})"
    )


class _LegacyOptimizer:
    """The optimizer tensors of a ``training_state.pt`` checkpoint, readable like a shard."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.tensors: dict[str, torch.Tensor] = {"since_fired": state["since_fired"]}
        for name, entry in state["optimizer"].items():
            for key, val in entry.items():
                self.tensors[f"{name}.{key}"] = torch.as_tensor(val)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __enter__(self) -> _LegacyOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def read(self, name: str, features: slice | None = None, out: torch.Tensor | None = None):
        t = self.tensors[name]
        fd = feature_dim(name)
        if features is not None and fd is not None and t.dim() > 0:
            t = t.narrow(fd, features.start, features.stop - features.start)
        return t if out is None else out.copy_(t)


class Checkpoint:
    """A checkpoint opened for resuming: small state read now, tensors read by slice later."""

    def __init__(self, path: str | Path) -> None:
        self.path = resolve_checkpoint(path)
        required = [DATA_STATE_FILE, CONFIG_FILE, "cfg.json"]
        for f in required:
            if not (self.path / f).is_file():
                raise CheckpointError(f"checkpoint {str(self.path)!r} lacks {f}")
        self.data_state: dict[str, Any] = json.loads((self.path / DATA_STATE_FILE).read_text())
        self.train_config: dict[str, Any] = json.loads((self.path / CONFIG_FILE).read_text())
        self.legacy = not (self.path / STATE_FILE).is_file()
        if self.legacy:
            raw = torch.load(self.path / LEGACY_STATE_FILE, map_location="cpu", weights_only=True)
            from clt_lens.training import rng

            self.state = {k: v for k, v in raw.items() if k not in ("optimizer", "since_fired")}
            self._legacy_rank = {"rng": rng.from_legacy(raw["rng"]), "density_hint": None}
            self._legacy_optimizer = _LegacyOptimizer(raw)
        else:
            self.state = json.loads((self.path / STATE_FILE).read_text())
        self.world = self.state.get("world", {"data_size": 1, "feature_size": 1})
        self.sharded = is_sharded(self.path)
        n_shards = self.world["feature_size"] if self.sharded else 1
        stems = [WEIGHTS_STEM] + ([] if self.legacy else [OPTIMIZER_STEM])
        for k in range(n_shards):  # every file, before any work
            for stem in stems:
                if not (self.path / file_name(stem, k, n_shards)).is_file():
                    raise CheckpointError(
                        f"checkpoint {str(self.path)!r} lacks {file_name(stem, k, n_shards)}"
                    )

    def weights(self) -> TensorReader:
        """The weights, by slice (close the reader, or use it in ``with``)."""
        return TensorReader(self.path, WEIGHTS_STEM)

    def optimizer(self) -> Any:
        """Adam moments and feature-health counters, by slice (a ``with`` reader)."""
        if self.legacy:
            return self._legacy_optimizer
        return TensorReader(self.path, OPTIMIZER_STEM)

    def rank_state(self, rank: int, same_layout: bool) -> dict[str, Any]:
        """This rank's RNG states and decode hint (rank 0's when the layout changed)."""
        if self.legacy:
            return self._legacy_rank
        f = rank_file(self.path, rank if same_layout else 0)
        if not f.is_file():
            raise CheckpointError(f"checkpoint {str(self.path)!r} lacks {RANKS_DIR}/{f.name}")
        return json.loads(f.read_text())


def tensor_files(ckpt: Path, shard: int, n_shards: int) -> tuple[Path, Path]:
    return ckpt / file_name(WEIGHTS_STEM, shard, n_shards), ckpt / file_name(
        OPTIMIZER_STEM, shard, n_shards
    )
