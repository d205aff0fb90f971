"""Finding and loading a CLT: the one place that turns a path into a ``CrossLayerTranscoder``
and checks that it fits a model.

A path may be a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``, or feature shards
with ``shards.json``), a training run (its ``final/``, else the checkpoint named by
``checkpoints/LATEST``) or a run's ``checkpoints/`` folder. Cheap checks come first:
``read_clt_config`` reads ``cfg.json`` only, so sizes and hooks can be validated before any
weights are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader

from clt_lens import models
from clt_lens.activations import HookSpec, valid_hook_names, validate_hooks
from clt_lens.clt.model import CrossLayerTranscoder
from clt_lens.clt.storage import SHARD_INDEX, is_sharded, sharded_disk_loader
from clt_lens.errors import CLTLensError, InputError, MissingFileError
from clt_lens.models import model_id


class CheckpointError(CLTLensError, ValueError):
    """A path is not a CLT checkpoint, or a CLT does not fit the model it is used with."""


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) that ``path`` names.

    ``path`` may be that folder, a training run (its ``final/`` folder, else the checkpoint named
    by ``checkpoints/LATEST``), or a run's ``checkpoints/`` folder.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingFileError(f"CLT checkpoint {str(p)!r} does not exist (expected a SAELens "
                               "folder with cfg.json, or a training run directory)")
    candidates = [p, p / "final"]
    for latest in (p / "checkpoints" / "LATEST", p / "LATEST"):
        if latest.is_file():
            candidates.append(latest.parent / latest.read_text().strip())
    for c in candidates:
        if (c / "cfg.json").is_file():
            if (c / SHARD_INDEX).is_file():  # feature-sharded: read through TensorReader
                return c.resolve()
            if not (c / "sae_weights.safetensors").is_file():
                raise CheckpointError(f"CLT checkpoint {str(c)!r} has cfg.json but no "
                                      "sae_weights.safetensors")
            return c.resolve()
    raise CheckpointError(
        f"{str(p)!r} is not a CLT checkpoint: expected cfg.json + sae_weights.safetensors in it, "
        "in its final/ folder, or in the checkpoint named by checkpoints/LATEST"
    )


def read_clt_config(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``cfg.json`` as a dict (no weights read); checks it is a CLT."""
    cfg_file = resolve_checkpoint_dir(path) / "cfg.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("architecture") != "clt":
        arch = cfg.get("architecture") if isinstance(cfg, dict) else None
        raise CheckpointError(f"{cfg_file}: architecture is {arch!r}, expected 'clt'")
    for key in ("d_in", "d_sae", "n_layers"):
        if not isinstance(cfg.get(key), int):
            raise CheckpointError(f"{cfg_file}: missing integer {key!r}")
    return cfg


def training_dataset(path: Any) -> str | None:
    """The dataset the CLT at ``path`` was trained on, from its run's ``train_config.json`` (in
    the folder, its ``final/`` or its parent); None for an in-memory CLT or without the file."""
    if not isinstance(path, (str, Path)):
        return None
    for cand in (
        Path(path) / "train_config.json",
        Path(path) / "final" / "train_config.json",
        Path(path).parent / "train_config.json",
    ):
        if cand.is_file():
            saved = json.loads(cand.read_text())  # a "source" section, or flat (older runs)
            return saved.get("source", {}).get("dataset", saved.get("dataset"))
    return None


def load_clt(clt_or_path: Any, *, device: str | torch.device = "cpu") -> Any:
    """A ``CrossLayerTranscoder``: returned as is, or loaded from a checkpoint path.

    "clt" is registered with SAELens by ``clt_lens.clt``'s ``__init__``, which Python runs
    before this module.
    """
    if isinstance(clt_or_path, CrossLayerTranscoder):
        return clt_or_path
    if not isinstance(clt_or_path, str | Path):
        raise CheckpointError(
            "expected a CrossLayerTranscoder or a checkpoint path, got "
            f"{type(clt_or_path).__name__}"
        )
    read_clt_config(clt_or_path)
    ckpt = resolve_checkpoint_dir(clt_or_path)
    converter = sharded_disk_loader if is_sharded(ckpt) else sae_lens_disk_loader
    clt = SAE.load_from_disk(str(ckpt), device=str(device), converter=converter)
    if not isinstance(clt, CrossLayerTranscoder):
        raise CheckpointError(f"{clt_or_path} did not load as a CrossLayerTranscoder")
    return clt.eval()


def clt_summary(clt_or_path: Any) -> dict[str, Any]:
    """Sizes, hooks and activation of a CLT object or checkpoint, read without loading weights."""
    if isinstance(clt_or_path, CrossLayerTranscoder):
        cfg = clt_or_path.cfg
        return {
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_in,
            "d_sae": cfg.d_sae,
            "activation": cfg.activation,
            "cross_layer": cfg.cross_layer,
            "skip": cfg.skip,
            "input_hook": cfg.input_hook,
            "output_hook": cfg.output_hook,
            "model_name": cfg.metadata.model_name,
            "source": None,
        }
    raw = read_clt_config(clt_or_path)
    meta = raw.get("metadata") or {}
    return {
        "n_layers": raw["n_layers"],
        "d_model": raw["d_in"],
        "d_sae": raw["d_sae"],
        "activation": raw.get("activation", "jumprelu"),
        "cross_layer": raw.get("cross_layer", True),
        "skip": raw.get("skip", False),
        "input_hook": meta.get("hook_name") or "ln2.hook_normalized",
        "output_hook": meta.get("hook_name_out") or "hook_mlp_out",
        "model_name": meta.get("model_name"),
        "source": str(resolve_checkpoint_dir(clt_or_path)),
    }


def model_for(clt: Any, model: Any = None, device: str | torch.device | None = None
              ) -> tuple[Any, str]:  # fmt: skip
    """The model to run ``clt`` with, and its name: ``model`` as given (a HookedTransformer),
    loaded by ``load_model`` name or folder, or, when None, the model the CLT was trained on
    (``metadata.model_name``; the embedded model for a CLT that does not say)."""
    trained_on = getattr(getattr(getattr(clt, "cfg", None), "metadata", None), "model_name", None)
    if model is None:
        model = trained_on or "embedded"
    if isinstance(model, str | Path):
        # through the module, so a test (or a notebook) can swap models.load_model
        return models.load_model(str(model), device=device or "cpu"), str(model)
    if not hasattr(model, "run_with_hooks") or not hasattr(model, "cfg"):
        raise InputError(f"model must be a load_model name or folder or a HookedTransformer, got "
                         f"{type(model).__name__}")
    return model, str(trained_on or getattr(model.cfg, "model_name", "unknown"))


def check_fits(model: Any, n_layers: int, d_model: int, what: str = "the CLT", *,
               hooks: tuple[str, str] | None = None, extra_hooks: tuple[str, ...] = (),
               error: type[Exception] = CheckpointError) -> None:  # fmt: skip
    """Raise ``error`` unless transcoders of ``n_layers`` x ``d_model`` reading and writing
    ``hooks`` (block-relative) fit ``model``; ``extra_hooks`` are hook names that exist only
    once the model is wrapped (circuit-tracer's ``mlp.hook_in``). The one shape check behind
    loading (:func:`check_compatible`), splicing, attribution and circuit-tracer sets."""
    L, d = model.cfg.n_layers, model.cfg.d_model
    if n_layers != L or d_model != d:
        raise error(
            f"{what} (n_layers={n_layers}, d_in={d_model}) does not fit the model "
            f"(n_layers={L}, d_model={d}): they must match, one transcoder per MLP"
        )
    valid = valid_hook_names(model) if hooks else []
    for role, name in zip(("input hook", "output hook"), hooks or ()):
        if name in extra_hooks:
            continue
        if name.startswith("blocks."):
            raise error(f"{what}'s {role} {name!r} must be block-relative (no 'blocks.{{l}}.')")
        if name not in valid:
            raise error(f"{what}'s {role} {name!r} is not a hook of the model's blocks; "
                        f"valid block-relative names: {list(valid) + list(extra_hooks)}")


def check_compatible(clt: Any, model: Any, model_name: str | None = None) -> None:
    """Raise ``CheckpointError`` unless ``clt`` was made for ``model``: layers, width, hook
    names, the model's content id recorded at training and, if given, the model's name."""
    check_fits(model, clt.cfg.n_layers, clt.cfg.d_in, "the checkpoint")
    validate_hooks(model, HookSpec(clt.cfg.input_hook, clt.cfg.output_hook))
    meta = getattr(clt.cfg, "metadata", None)
    want = getattr(meta, "model_id", None)
    if want:
        have = model_id(model)
        if have != want:
            raise CheckpointError(
                f"the CLT was trained on model {want} but the given model is {have}: pass the "
                "model the checkpoint was trained on (--model)"
            )
    trained_on = getattr(meta, "model_name", None)
    if model_name is not None and trained_on not in (None, "", model_name):
        raise CheckpointError(f"the CLT was trained on model {trained_on!r}, not {model_name!r}; "
                              f"pass model={trained_on!r}")
