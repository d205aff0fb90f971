"""Checkpoints: a SAELens folder plus the training state, written atomically.

Layout of a run directory::

    run/
      train_config.json        the TrainConfig of the run
      metrics.jsonl            one JSON object per logged step
      training_curves.png
      checkpoints/step_00000100/   cfg.json + sae_weights.safetensors   (SAE.load_from_disk)
                                   training_state.pt (optimizer, step, RNG, feature health)
                                   data_state.json   (data-source position)
                                   train_config.json
      checkpoints/LATEST       name of the newest complete checkpoint
      final -> the last checkpoint, copied as a plain SAELens folder

A checkpoint is built in a temporary sibling directory and renamed into place, and LATEST is
replaced atomically afterwards, so a crash at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from clt_lens.fsutil import atomic_write_text, fsync_dir

STATE_FILE = "training_state.pt"
DATA_STATE_FILE = "data_state.json"
CONFIG_FILE = "train_config.json"
LATEST_FILE = "LATEST"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or incompatible."""


def write_checkpoint(
    ckpt_root: Path,
    name: str,
    save_model: Any,
    training_state: dict[str, Any],
    data_state: dict[str, Any],
    train_config: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``name`` under ``ckpt_root`` atomically; return its path.

    ``save_model(dir)`` writes the SAELens folder (cfg.json + sae_weights.safetensors).
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / name
    tmp = ckpt_root / f".{name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(tmp)
    torch.save(training_state, tmp / STATE_FILE)
    (tmp / DATA_STATE_FILE).write_text(json.dumps(data_state))
    (tmp / CONFIG_FILE).write_text(json.dumps(train_config, indent=2, default=str))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        old = ckpt_root / f".{name}.old{os.getpid()}"
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


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir (uses checkpoints/LATEST) or a checkpoint dir -> the checkpoint dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"resume path {str(p)!r} does not exist")
    if (p / STATE_FILE).is_file():
        return p
    for root in (p / "checkpoints", p):
        latest = root / LATEST_FILE
        if latest.is_file():
            ck = root / latest.read_text().strip()
            if (ck / STATE_FILE).is_file():
                return ck
            raise CheckpointError(f"{latest} names {ck.name!r}, which is incomplete or missing")
    raise CheckpointError(
        f"{str(p)!r} is neither a checkpoint (no {STATE_FILE}) nor a run directory "
        f"(no checkpoints/{LATEST_FILE})"
    )


def read_checkpoint(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(training_state, data_state, train_config) of a checkpoint directory."""
    for f in (STATE_FILE, DATA_STATE_FILE, CONFIG_FILE, "cfg.json", "sae_weights.safetensors"):
        if not (ckpt / f).is_file():
            raise CheckpointError(f"checkpoint {str(ckpt)!r} lacks {f}")
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    data_state = json.loads((ckpt / DATA_STATE_FILE).read_text())
    cfg = json.loads((ckpt / CONFIG_FILE).read_text())
    return state, data_state, cfg
