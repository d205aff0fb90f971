"""Load a language model as a TransformerLens ``HookedTransformer`` in the form CLTs train on.

circuit-tracer needs transcoders trained on the *unprocessed* model: no LayerNorm folding, no
centring of writing weights or of the unembedding, no value-bias folding. Every path here keeps
the weights as the checkpoint has them.

Accepted ``name_or_path``:

- ``"embedded"``: the 4-layer GPT-2-style model packaged in ``clt_lens/assets/embedded``.
- ``"embedded-deep"``: an 8-layer one in ``clt_lens/assets/embedded-deep`` (same tokenizer and
  training text), for comparisons where depth matters (CLT against per-layer transcoders).
- a local Hugging Face model folder (``config.json`` + ``*.safetensors`` weights, tokenizer files
  optional) whose ``model_type`` is in ``FAMILIES``. Loaded fully offline: the
  ``HookedTransformerConfig`` is built here from ``config.json`` (TransformerLens's own loader
  asks the hub for it) and the weights go through TransformerLens's converter for that family.
- an official TransformerLens model name (``"gpt2"``, ``"pythia-70m"``, ...), loaded with
  ``HookedTransformer.from_pretrained_no_processing`` (needs the hub or its local cache).

Only safetensors weights are read from local folders: ``pytorch_model.bin`` is a pickle, and
unpickling a file from elsewhere can run code.

``SUPPORTED`` lists the families whose whole path (load -> collect -> train -> circuit-tracer
export -> attribution) is verified, with their default CLT hooks; ``default_hooks`` /
``resolve_hooks`` turn a hook setting of ``"auto"`` into those names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained import weight_conversions as wc

from clt_lens.activations import HookSpec
from clt_lens.errors import CLTLensError

EMBEDDED_DIR = Path(__file__).resolve().parent / "assets" / "embedded"
EMBEDDED_NAME = "embedded"
# Bundled models by name: the default 4-layer one and an 8-layer one for benchmarks and tutorials
# where depth matters (same tokenizer and corpus; scripts/build_embedded_model.py builds both).
EMBEDDED_MODELS = {
    EMBEDDED_NAME: EMBEDDED_DIR,
    "embedded-deep": EMBEDDED_DIR.parent / "embedded-deep",
}

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

# A context that long makes TransformerLens allocate an n_ctx x n_ctx mask per layer; long-context
# families are capped as TransformerLens itself does.
_MAX_CTX = 2048


class ModelLoadError(CLTLensError, ValueError):
    """The model could not be loaded; the message names the input and what is accepted."""


class UnsupportedFamilyError(ModelLoadError):
    """The model's family has no verified default hooks, or circuit-tracer cannot attribute
    through it; the message names the family and the supported ones."""


# ----------------------------------------------------------------------------------------------
# Per-family table: HF model_type -> (TransformerLens architecture, config builder, converter)


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """How one Hugging Face ``model_type`` maps onto TransformerLens."""

    name: str
    architecture: str  # TransformerLens ``original_architecture``
    build_cfg: Callable[[Any], dict[str, Any]]  # HF PretrainedConfig -> HookedTransformerConfig kw
    convert: Callable[[torch.nn.Module, HookedTransformerConfig], dict[str, torch.Tensor]]


def _rope_theta(hf: Any, default: float = 10000.0) -> float:
    theta = getattr(hf, "rope_theta", None)
    if theta is None:
        theta = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", default)
    return float(theta)


def _head_dim(hf: Any) -> int:
    head_dim = getattr(hf, "head_dim", None)
    return int(head_dim) if head_dim else hf.hidden_size // hf.num_attention_heads


def _check_plain_rope(hf: Any) -> None:
    scaling = getattr(hf, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ModelLoadError(
            f"rope_scaling {scaling} is not supported for local {hf.model_type} folders; "
            "only plain rotary embeddings are"
        )


def _gpt2_cfg(hf: Any) -> dict[str, Any]:
    return {
        "d_model": hf.n_embd,
        "d_head": hf.n_embd // hf.n_head,
        "n_heads": hf.n_head,
        "d_mlp": hf.n_inner or 4 * hf.n_embd,
        "n_layers": hf.n_layer,
        "n_ctx": hf.n_positions,
        "eps": hf.layer_norm_epsilon,
        "d_vocab": hf.vocab_size,
        "act_fn": hf.activation_function,
        "use_attn_scale": hf.scale_attn_weights,
        "use_local_attn": False,
        "scale_attn_by_inverse_layer_idx": hf.scale_attn_by_inverse_layer_idx,
        "normalization_type": "LN",
    }


def _llama_cfg(hf: Any) -> dict[str, Any]:
    _check_plain_rope(hf)
    head_dim = _head_dim(hf)
    return {
        "d_model": hf.hidden_size,
        "d_head": head_dim,
        "n_heads": hf.num_attention_heads,
        "n_key_value_heads": (
            hf.num_key_value_heads
            if hf.num_key_value_heads != hf.num_attention_heads
            else None
        ),
        "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers,
        "n_ctx": min(hf.max_position_embeddings, _MAX_CTX),
        "eps": hf.rms_norm_eps,
        "d_vocab": hf.vocab_size,
        "act_fn": hf.hidden_act,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_dim": head_dim,
        "rotary_base": _rope_theta(hf),
        "final_rms": True,
        "gated_mlp": True,
    }


def _qwen2_cfg(hf: Any) -> dict[str, Any]:
    cfg = _llama_cfg(hf)
    # convert_qwen2_weights reshapes K/V by n_key_value_heads, so it must always be set.
    cfg["n_key_value_heads"] = hf.num_key_value_heads
    cfg["default_prepend_bos"] = False
    return cfg


def _qwen3_cfg(hf: Any) -> dict[str, Any]:
    cfg = _llama_cfg(hf)
    cfg["use_qk_norm"] = True
    cfg["default_prepend_bos"] = False
    return cfg


def _gemma2_cfg(hf: Any) -> dict[str, Any]:
    _check_plain_rope(hf)
    layer_types = getattr(hf, "layer_types", None) or [
        "sliding_attention" if i % 2 == 0 else "full_attention"
        for i in range(hf.num_hidden_layers)
    ]
    return {
        "d_model": hf.hidden_size,
        "d_head": hf.head_dim,
        "n_heads": hf.num_attention_heads,
        "n_key_value_heads": hf.num_key_value_heads,
        "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers,
        "n_ctx": min(hf.max_position_embeddings, _MAX_CTX),
        "eps": hf.rms_norm_eps,
        "d_vocab": hf.vocab_size,
        "act_fn": hf.hidden_activation,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_dim": hf.head_dim,
        "rotary_base": _rope_theta(hf),
        "use_attn_scale": True,
        "attn_scale": math.sqrt(hf.query_pre_attn_scalar),
        "use_local_attn": True,
        "window_size": hf.sliding_window,
        "attn_types": ["local" if t == "sliding_attention" else "global" for t in layer_types],
        "attn_scores_soft_cap": hf.attn_logit_softcapping or -1.0,
        "output_logits_soft_cap": hf.final_logit_softcapping or -1.0,
        "gated_mlp": True,
        "final_rms": True,
        "use_normalization_before_and_after": True,
    }


def _neox_cfg(hf: Any) -> dict[str, Any]:
    _check_plain_rope(hf)
    d_head = hf.hidden_size // hf.num_attention_heads
    rotary_pct = getattr(hf, "rotary_pct", None)
    if rotary_pct is None:
        rotary_pct = (getattr(hf, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    return {
        "d_model": hf.hidden_size,
        "d_head": d_head,
        "n_heads": hf.num_attention_heads,
        "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers,
        "n_ctx": min(hf.max_position_embeddings, _MAX_CTX),
        "eps": hf.layer_norm_eps,
        "d_vocab": hf.vocab_size,
        "act_fn": hf.hidden_act,
        "use_attn_scale": True,
        "use_local_attn": False,
        "scale_attn_by_inverse_layer_idx": False,
        "parallel_attn_mlp": hf.use_parallel_residual,
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_dim": round(rotary_pct * d_head),
        "rotary_base": _rope_theta(hf),
        "normalization_type": "LN",
        "default_prepend_bos": False,
    }


FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily("gpt2", "GPT2LMHeadModel", _gpt2_cfg, wc.convert_gpt2_weights),
        ModelFamily("llama", "LlamaForCausalLM", _llama_cfg, wc.convert_llama_weights),
        ModelFamily("qwen2", "Qwen2ForCausalLM", _qwen2_cfg, wc.convert_qwen2_weights),
        ModelFamily("qwen3", "Qwen3ForCausalLM", _qwen3_cfg, wc.convert_qwen3_weights),
        ModelFamily("gemma2", "Gemma2ForCausalLM", _gemma2_cfg, wc.convert_gemma_weights),
        ModelFamily("gpt_neox", "GPTNeoXForCausalLM", _neox_cfg, wc.convert_neox_weights),
    )
}

# TransformerLens architectures of other families, so model_family names official models too.
_OTHER_ARCHITECTURES = {
    "GPTNeoForCausalLM": "gpt_neo",
    "GPTJForCausalLM": "gptj",
    "OPTForCausalLM": "opt",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "GemmaForCausalLM": "gemma",
    "Gemma3ForCausalLM": "gemma3",
    "PhiForCausalLM": "phi",
    "Phi3ForCausalLM": "phi3",
    "BloomForCausalLM": "bloom",
    "OlmoForCausalLM": "olmo",
    "Olmo2ForCausalLM": "olmo2",
}
_ARCH_TO_FAMILY = {f.architecture: f.name for f in FAMILIES.values()} | _OTHER_ARCHITECTURES


def _accepted() -> str:
    return (
        f"accepted: {' or '.join(map(repr, EMBEDDED_MODELS))}, a local Hugging Face model "
        f"folder (config.json + *.safetensors) with model_type in {sorted(FAMILIES)}, or an "
        "official TransformerLens "
        "model name such as 'gpt2' or 'pythia-70m' "
        "(transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)"
    )


# ----------------------------------------------------------------------------------------------
# Loading


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
    official = _official_name(name)
    if official is not None:
        return _load_official(official, name, device=device, dtype=dtype)
    if _looks_like_path(name):
        raise ModelLoadError(f"model folder {name!r} does not exist; {_accepted()}")
    raise ModelLoadError(f"unknown model {name!r}: not a local folder and not an official "
                         f"TransformerLens model name; {_accepted()}")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(("/", "\\")) or "\\" in name


def _official_name(name: str) -> str | None:
    from transformer_lens import loading_from_pretrained as lfp

    lowered = name.lower()
    for official in lfp.OFFICIAL_MODEL_NAMES:
        aliases = lfp.MODEL_ALIASES.get(official, [])
        if lowered == official.lower() or lowered in (a.lower() for a in aliases):
            return official
    return None


def _load_official(
    official: str, name: str, *, device: str | torch.device, dtype: torch.dtype
) -> HookedTransformer:
    family = _family_of_official(official)
    if family in _NOT_DECODERS:
        raise UnsupportedFamilyError(
            f"model {name!r} ({official}) is a {_NOT_DECODERS[family]}, not a decoder-only "
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
    from transformers import AutoTokenizer

    markers = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((path / m).exists() for m in markers):
        return None  # a model without a tokenizer still runs on token ids
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer in {str(path)!r}: "
                             f"{type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Identity


def _cfg_of(model_or_cfg: Any) -> Any:
    return model_or_cfg.cfg if isinstance(model_or_cfg, HookedTransformer) else model_or_cfg


def model_id(model: HookedTransformer | HookedTransformerConfig) -> str:
    """``"<model_name>@<12 hex>"``: a stable id for caches and checkpoints.

    The hash covers the sorted config minus runtime-only fields (device, dtype, hook switches,
    tokenizer path), plus a digest of the weight files when the model came from a local folder.
    """
    cfg = _cfg_of(model)
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
    cfg = _cfg_of(model_or_cfg)
    if isinstance(cfg, dict):
        arch = cfg.get("original_architecture")
        model_type = cfg.get("model_type")
    else:
        arch = getattr(cfg, "original_architecture", None)
        model_type = getattr(cfg, "model_type", None)
    if arch in _ARCH_TO_FAMILY:
        return _ARCH_TO_FAMILY[arch]
    if isinstance(model_type, str) and model_type:
        return model_type
    if arch is None and getattr(cfg, "architectures", None):
        return _ARCH_TO_FAMILY.get(cfg.architectures[0], "unknown")
    return "unknown"


# Official TransformerLens names -> family, so a name is checked before any download. Names
# matching none are classified once the model is loaded (from its original_architecture).
_OFFICIAL_FAMILY_PATTERNS = (
    (re.compile(r"(gpt2|distilgpt2)(-|$)|stanford-crfm/"), "gpt2"),
    (re.compile(r"EleutherAI/(pythia|gpt-neox)-"), "gpt_neox"),
    (re.compile(r"google/gemma-2-"), "gemma2"),
    (re.compile(r"meta-llama/|llama-\d|codellama/"), "llama"),
    (re.compile(r"Qwen/Qwen(1\.5|2|2\.5)-"), "qwen2"),  # Qwen1.5 is Qwen2ForCausalLM
    (re.compile(r"Qwen/Qwen3-"), "qwen3"),
    # families TransformerLens runs that are not verified here: named so that "auto" hooks
    # fail before a download
    (re.compile(r"mistralai/Mistral"), "mistral"),
    (re.compile(r"mistralai/Mixtral"), "mixtral"),
    (re.compile(r"google/(gemma-3|medgemma)"), "gemma3"),
    (re.compile(r"google/gemma-\d+b"), "gemma"),
    (re.compile(r"microsoft/(phi-[12]|phi-1_5)"), "phi"),
    (re.compile(r"microsoft/(Phi-3|phi-4)"), "phi3"),
    (re.compile(r"allenai/OLMo-2|allenai/Olmo-3"), "olmo2"),
    (re.compile(r"allenai/OLMo-"), "olmo"),
    (re.compile(r"bigscience/bloom"), "bloom"),
    (re.compile(r"facebook/opt-"), "opt"),
    (re.compile(r"EleutherAI/gpt-neo-|roneneldan/TinyStories"), "gpt_neo"),
    (re.compile(r"EleutherAI/gpt-j"), "gptj"),
    (re.compile(r"google-bert/"), "bert"),
    (re.compile(r"google-t5/"), "t5"),
    (re.compile(r"facebook/(hubert|wav2vec2)"), "speech"),
)
# Official names TransformerLens lists that are not decoder-only language models.
_NOT_DECODERS = {
    "bert": "BERT encoder (TransformerLens HookedEncoder)",
    "t5": "T5 encoder-decoder (TransformerLens HookedEncoderDecoder)",
    "speech": "speech encoder",
}


def _family_of_official(official: str) -> str:
    for pattern, family in _OFFICIAL_FAMILY_PATTERNS:
        if pattern.match(official):
            return family
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
    official = _official_name(name)
    return _family_of_official(official) if official is not None else "unknown"


# ----------------------------------------------------------------------------------------------
# Supported families and their default CLT hooks

AUTO_HOOK = "auto"  # a TrainConfig/CacheConfig hook set to this takes the family default


@dataclasses.dataclass(frozen=True)
class FamilySupport:
    """A family whose whole path (load, collect, train, export, attribute) is verified."""

    family: str
    input_hook: str  # block-relative TransformerLens hook the CLT reads
    output_hook: str  # block-relative hook whose activation the CLT reconstructs
    attribution: bool  # circuit-tracer 0.5.0 builds correct attribution graphs through it
    note: str

    @property
    def hooks(self) -> HookSpec:
        return HookSpec(self.input_hook, self.output_hook)


# Every family here reads ln2.hook_normalized and writes hook_mlp_out. Both are real hook points
# of a plain HookedTransformer, so splicing and evaluation hook them directly, and they are the
# names circuit-tracer's TransformerLens backend resolves on its ReplacementModel. The notes say
# what the two hooks are in each block layout.
SUPPORTED: dict[str, FamilySupport] = {
    f.family: f
    for f in (
        FamilySupport(
            "gpt2", "ln2.hook_normalized", "hook_mlp_out", True,
            "LayerNorm; input is the centred, scaled residual before ln2's w/b",
        ),
        FamilySupport(
            "llama", "ln2.hook_normalized", "hook_mlp_out", True,
            "RMSNorm; input is resid_mid / rms before ln2's weight (the MLP reads it times "
            "ln2.w, a fixed per-dimension scale the encoder absorbs)",
        ),
        FamilySupport(
            "qwen2", "ln2.hook_normalized", "hook_mlp_out", True,
            "as llama (RMSNorm, gated MLP)",
        ),
        FamilySupport(
            "qwen3", "ln2.hook_normalized", "hook_mlp_out", True,
            "as llama; the q/k norms only shape attention patterns",
        ),
        FamilySupport(
            "gemma2", "ln2.hook_normalized", "hook_mlp_out", True,
            "RMSNorm before and after the MLP; hook_mlp_out is after ln2_post, i.e. what the MLP "
            "adds to the residual stream (mlp.hook_out would be before ln2_post); the hooks of "
            "Gemma Scope and of circuit-tracer's Gemma-2 mapping",
        ),
        FamilySupport(
            "gpt_neox", "ln2.hook_normalized", "hook_mlp_out", True,
            "LayerNorm; parallel attention + MLP: ln2 reads resid_pre (there is no "
            "hook_resid_mid), hook_mlp_out is added to resid_post beside the attention output",
        ),
    )
}


def _family_key(model_or_family: Any) -> str:
    if isinstance(model_or_family, str) and model_or_family in SUPPORTED:
        return model_or_family
    return model_family(model_or_family)


def _custom_cfg(model_or_cfg: Any) -> HookedTransformerConfig | None:
    """The config of a HookedTransformer built straight from a config (no original_architecture:
    TransformerLens's standard block), else None."""
    cfg = _cfg_of(model_or_cfg)
    if isinstance(cfg, HookedTransformerConfig) and cfg.original_architecture is None:
        return cfg
    return None


def _block_problem(cfg: HookedTransformerConfig) -> str | None:
    """Why the standard hooks do not fit a custom model's blocks, or None if they do."""
    if cfg.attn_only:
        return "has no MLPs (attn_only=True), so there is nothing for a CLT to replace"
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
        return (f"has normalization_type={cfg.normalization_type!r}, so there is no "
                "ln2.hook_normalized to read")
    return None


def _unsupported(family: str, what: str) -> UnsupportedFamilyError:
    return UnsupportedFamilyError(
        f"model family {family!r} {what}; supported families: {sorted(SUPPORTED)}. A model of "
        "another family can still be trained on with explicit input_hook and output_hook "
        "(block-relative TransformerLens names such as 'ln2.hook_normalized', 'hook_mlp_out')"
    )


def default_hooks(model_or_family: Any) -> HookSpec:
    """The CLT hooks for a family key, a model, its config, or a ``load_model`` name/path.

    Raises ``UnsupportedFamilyError`` (naming the family and the supported ones) for a family
    without verified defaults. A HookedTransformer built from a bare config (TransformerLens's
    standard pre-norm block) gets the standard hooks if it has MLPs and a norm before them.
    """
    family = _family_key(model_or_family)
    if family in SUPPORTED:
        return SUPPORTED[family].hooks
    custom = _custom_cfg(model_or_family) if family == "unknown" else None
    if custom is None:
        if family == "unknown" and isinstance(model_or_family, str | Path):
            family = f"unknown (model {str(model_or_family)!r})"
        raise _unsupported(family, "has no verified default CLT hooks")
    problem = _block_problem(custom)
    if problem is not None:
        raise _unsupported(f"custom ({custom.model_name})", problem)
    return HookSpec()


def resolve_hooks(
    model_or_name: Any, input_hook: str = AUTO_HOOK, output_hook: str = AUTO_HOOK
) -> HookSpec:
    """``HookSpec(input_hook, output_hook)`` with each ``"auto"`` replaced by the family default
    (``default_hooks``); explicit names are kept as given and not checked against the family."""
    if input_hook != AUTO_HOOK and output_hook != AUTO_HOOK:
        return HookSpec(input_hook, output_hook)
    auto = default_hooks(model_or_name)
    return HookSpec(
        auto.input_hook if input_hook == AUTO_HOOK else input_hook,
        auto.output_hook if output_hook == AUTO_HOOK else output_hook,
    )


def check_attribution_support(model: Any) -> str:
    """The family of ``model`` if circuit-tracer attribution through it is verified; otherwise
    ``UnsupportedFamilyError`` naming the family and the supported ones."""
    family = model_family(model)
    if family in SUPPORTED and SUPPORTED[family].attribution:
        return family
    custom = _custom_cfg(model) if family == "unknown" else None
    if custom is not None and _block_problem(custom) is None:
        return "custom"
    cfg = _cfg_of(model)
    name = getattr(cfg, "model_name", None) or str(model)
    verified = sorted(f for f, s in SUPPORTED.items() if s.attribution)
    raise UnsupportedFamilyError(
        f"model {name!r} is of family {family!r}: circuit-tracer attribution is verified only "
        f"for the families {verified} (and HookedTransformers built from a standard config)"
    )


__all__ = [
    "AUTO_HOOK",
    "EMBEDDED_DIR",
    "EMBEDDED_MODELS",
    "FAMILIES",
    "SUPPORTED",
    "FamilySupport",
    "ModelFamily",
    "ModelLoadError",
    "UnsupportedFamilyError",
    "check_attribution_support",
    "default_hooks",
    "load_model",
    "model_family",
    "model_id",
    "resolve_hooks",
]
