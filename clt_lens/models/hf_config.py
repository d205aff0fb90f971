"""Per-family builders: a Hugging Face config (``config.json``) -> ``HookedTransformerConfig``
keyword arguments, so local folders load offline (TransformerLens's own loader asks the hub).
"""

from __future__ import annotations

import math
from typing import Any

from clt_lens.models.errors import ModelLoadError

# A context that long makes TransformerLens allocate an n_ctx x n_ctx mask per layer; long-context
# families are capped as TransformerLens itself does.
_MAX_CTX = 2048


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


def gpt2(hf: Any) -> dict[str, Any]:
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


def llama(hf: Any) -> dict[str, Any]:
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


def qwen2(hf: Any) -> dict[str, Any]:
    cfg = llama(hf)
    # convert_qwen2_weights reshapes K/V by n_key_value_heads, so it must always be set.
    cfg["n_key_value_heads"] = hf.num_key_value_heads
    cfg["default_prepend_bos"] = False
    return cfg


def qwen3(hf: Any) -> dict[str, Any]:
    cfg = llama(hf)
    cfg["use_qk_norm"] = True
    cfg["default_prepend_bos"] = False
    return cfg


def gemma2(hf: Any) -> dict[str, Any]:
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


def gpt_neox(hf: Any) -> dict[str, Any]:
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
