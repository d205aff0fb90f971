"""What a model is: ``model_id`` (a stable id for caches and checkpoints) and ``model_family``
(its family key, from a model, a config, or a name/path without loading weights).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from transformer_lens import HookedTransformer, HookedTransformerConfig

from clt_lens.models.families import ARCH_TO_FAMILY
from clt_lens.models.loading import EMBEDDED_MODELS
from clt_lens.models.official import family_of_official, official_name

# Config fields that change how a model is run or where it lives, not what it computes: they stay
# out of model_id so an id survives moving to another device, machine path or hook setting.
_RUNTIME_FIELDS = frozenset(
    {
        "device",
        "n_devices",
        "dtype",
        "tokenizer_name",
        "model_name",
        "tokenizer_prepends_bos",
        "default_padding_side",
        "use_attn_result",
        "use_split_qkv_input",
        "use_hook_mlp_in",
        "use_attn_in",
        "use_hook_tokens",
        "ungroup_grouped_query_attention",
        "use_attn_scale_cache",
        "init_weights",
        "load_in_4bit",
        "n_params",
    }
)


def cfg_of(model_or_cfg: Any) -> Any:
    return model_or_cfg.cfg if isinstance(model_or_cfg, HookedTransformer) else model_or_cfg


def model_id(model: HookedTransformer | HookedTransformerConfig) -> str:
    """``"<model_name>@<12 hex>"``: a stable id for caches and checkpoints.

    The hash covers the sorted config minus runtime-only fields (device, dtype, hook switches,
    tokenizer path), plus a digest of the weight files when the model came from a local folder.
    """
    cfg = cfg_of(model)
    items = {k: v for k, v in cfg.to_dict().items() if k not in _RUNTIME_FIELDS}
    weights = getattr(model, "clt_lens_weights_sha256", None)
    if weights is not None:
        items["weights_sha256"] = weights
    blob = json.dumps(items, sort_keys=True, default=repr)
    return f"{cfg.model_name}@{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def model_family(model_or_cfg: Any) -> str:
    """The family key (``"gpt2"``, ``"llama"``, ``"gemma2"`` ...) of a model, its TransformerLens
    config, a config dict, a Hugging Face config, or a ``load_model`` name/path (read without
    loading weights: ``config.json`` of a folder, the name of an official model);
    ``"unknown"`` when it is none we know."""
    if isinstance(model_or_cfg, str | Path):
        return _family_of_name(str(model_or_cfg))
    cfg = cfg_of(model_or_cfg)
    if isinstance(cfg, dict):
        arch = cfg.get("original_architecture")
        model_type = cfg.get("model_type")
    else:
        arch = getattr(cfg, "original_architecture", None)
        model_type = getattr(cfg, "model_type", None)
    if arch in ARCH_TO_FAMILY:
        return ARCH_TO_FAMILY[arch]
    if isinstance(model_type, str) and model_type:
        return model_type
    if arch is None and getattr(cfg, "architectures", None):
        return ARCH_TO_FAMILY.get(cfg.architectures[0], "unknown")
    return "unknown"



def _family_of_name(name: str) -> str:
    if name in EMBEDDED_MODELS:
        return "gpt2"  # the embedded models are GPT2LMHeadModel folders
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return "unknown"
        return model_type if isinstance(model_type, str) and model_type else "unknown"
    official = official_name(name)
    return family_of_official(official) if official is not None else "unknown"
