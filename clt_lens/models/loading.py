"""``load_model``: a name or path -> an unprocessed ``HookedTransformer`` (the accepted inputs
are listed in ``clt_lens.models``'s docstring). Local folders load offline, safetensors only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from clt_lens.models.errors import ModelLoadError, UnsupportedFamilyError
from clt_lens.models.families import FAMILIES, SUPPORTED
from clt_lens.models.official import NOT_DECODERS, family_of_official, official_name

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "assets" / "embedded"
EMBEDDED_NAME = "embedded"
# Bundled models by name: the default 4-layer one and an 8-layer one for benchmarks and tutorials
# where depth matters (same tokenizer and corpus; scripts/build_embedded_model.py builds both).
EMBEDDED_MODELS = {
    EMBEDDED_NAME: EMBEDDED_DIR,
    "embedded-deep": EMBEDDED_DIR.parent / "embedded-deep",
}


def _accepted() -> str:
    return (
        f"accepted: {' or '.join(map(repr, EMBEDDED_MODELS))}, a local Hugging Face model "
        f"folder (config.json + *.safetensors) with model_type in {sorted(FAMILIES)}, or an "
        "official TransformerLens "
        "model name such as 'gpt2' or 'pythia-70m' "
        "(transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)"
    )



def load_model(
    name_or_path: str | Path = EMBEDDED_NAME,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """Load ``name_or_path`` (see the module docstring) as an unprocessed ``HookedTransformer``."""
    if not isinstance(name_or_path, str | Path) or not str(name_or_path).strip():
        raise ModelLoadError(f"model name or path must be a non-empty string, got "
                             f"{name_or_path!r}; {_accepted()}")
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        folder = EMBEDDED_MODELS[name]
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"the bundled model {name!r} is missing from {str(folder)!r}; "
                                 "rebuild it with scripts/build_embedded_model.py")
        return _load_local(folder, device=device, dtype=dtype, model_name=name)
    path = Path(name).expanduser()
    if path.exists():
        return _load_local(path, device=device, dtype=dtype)
    official = official_name(name)
    if official is not None:
        return _load_official(official, name, device=device, dtype=dtype)
    if _looks_like_path(name):
        raise ModelLoadError(f"model folder {name!r} does not exist; {_accepted()}")
    raise ModelLoadError(f"unknown model {name!r}: not a local folder and not an official "
                         f"TransformerLens model name; {_accepted()}")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(("/", "\\")) or "\\" in name


def _load_official(
    official: str, name: str, *, device: str | torch.device, dtype: torch.dtype
) -> HookedTransformer:
    family = family_of_official(official)
    if family in NOT_DECODERS:
        raise UnsupportedFamilyError(
            f"model {name!r} ({official}) is a {NOT_DECODERS[family]}, not a decoder-only "
            "language model: a CLT reads the MLPs of a HookedTransformer. Supported families: "
            f"{sorted(SUPPORTED)} (other decoder-only TransformerLens models load, but need "
            "explicit input_hook/output_hook)"
        )
    try:
        return HookedTransformer.from_pretrained_no_processing(official, device=device, dtype=dtype)
    except OSError as e:  # the hub is unreachable and the model is not in the local HF cache
        raise ModelLoadError(
            f"could not fetch official model {name!r} ({official}) from the Hugging Face hub "
            f"or its local cache: {e}. Offline, save it as a local folder and pass the path."
        ) from e


def _read_config_json(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"model folder {str(path)!r} has no config.json; {_accepted()}")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ModelLoadError(f"{cfg_file} has no 'model_type' key; {_accepted()}")
    return raw


def _check_weights(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = (
        f" It has {pickled}: pickled weights are not loaded (unpickling can run code); "
        "re-save with save_pretrained(..., safe_serialization=True)."
        if pickled
        else ""
    )
    raise ModelLoadError(f"model folder {str(path)!r} has no *.safetensors weights.{hint}")


def _weights_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _load_local(
    path: Path,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    model_name: str | None = None,
) -> HookedTransformer:
    # transformers' model classes take seconds to import: only a local folder needs them.
    from transformers import AutoConfig, AutoModelForCausalLM

    path = path.resolve()
    if not path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is a file; a model must be a folder. {_accepted()}")
    raw = _read_config_json(path)
    family = FAMILIES.get(raw["model_type"])
    if family is None:
        raise ModelLoadError(
            f"model folder {str(path)!r} has model_type {raw['model_type']!r}, which is not "
            f"supported; supported model_type values: {sorted(FAMILIES)}"
        )
    _check_weights(path)
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
        cfg_kwargs = family.build_cfg(hf_config)
    except ModelLoadError:
        raise
    except Exception as e:  # a config.json transformers cannot read or that lacks a needed key
        raise ModelLoadError(f"cannot read {path / 'config.json'} as a {family.name} config: "
                             f"{type(e).__name__}: {e}") from e
    tokenizer = _load_local_tokenizer(path)
    cfg_kwargs.update(
        original_architecture=family.architecture,
        model_name=model_name or path.name,
        # circuit-tracer and TransformerLens reload the tokenizer by this name: a local folder
        # keeps them offline.
        tokenizer_name=str(path) if tokenizer is not None else None,
        init_weights=False,
        device=str(device),
        dtype=dtype,
    )
    cfg_kwargs.setdefault("default_prepend_bos", True)
    cfg = HookedTransformerConfig(**cfg_kwargs)

    try:
        # Convert from fp32 so adjustments such as Gemma's "+1" on norm weights are exact;
        # load_state_dict casts to the requested dtype afterwards.
        hf_model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, use_safetensors=True, torch_dtype=torch.float32
        )
    except Exception as e:
        raise ModelLoadError(f"cannot load the weights in {str(path)!r}: "
                             f"{type(e).__name__}: {e}") from e
    hf_model.eval()
    with torch.no_grad():
        state_dict = family.convert(hf_model, cfg)
    del hf_model

    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.eval()
    # model_id folds this in: the config alone cannot tell two trainings of one architecture apart.
    model.clt_lens_weights_sha256 = _weights_fingerprint(path)
    return model


def _load_local_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer  # lazily, as in _load_local

    markers = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((path / m).exists() for m in markers):
        return None  # a model without a tokenizer still runs on token ids
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer in {str(path)!r}: "
                             f"{type(e).__name__}: {e}") from e
