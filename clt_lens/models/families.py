"""The model families: one ``ModelFamily`` per Hugging Face ``model_type``, holding everything
clt_lens knows about it: how its config and weights map onto TransformerLens, its default CLT
hooks, and whether circuit-tracer attribution through it is verified.

Every family here has its whole path (load -> collect -> train -> circuit-tracer export ->
attribution) verified by ``tests/test_families.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained import weight_conversions as wc

from clt_lens.activations import HookSpec
from clt_lens.models import hf_config


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """How one Hugging Face ``model_type`` maps onto TransformerLens, and its CLT defaults."""

    name: str
    architecture: str  # TransformerLens ``original_architecture``
    build_cfg: Callable[[Any], dict[str, Any]]  # HF PretrainedConfig -> HookedTransformerConfig kw
    convert: Callable[[torch.nn.Module, HookedTransformerConfig], dict[str, torch.Tensor]]
    input_hook: str  # block-relative TransformerLens hook the CLT reads
    output_hook: str  # block-relative hook whose activation the CLT reconstructs
    attribution: bool  # circuit-tracer 0.5.0 builds correct attribution graphs through it
    note: str  # what the two hooks are in this family's block layout

    @property
    def family(self) -> str:
        """The family key (``name``; the name ``FamilySupport`` gave it)."""
        return self.name

    @property
    def hooks(self) -> HookSpec:
        return HookSpec(self.input_hook, self.output_hook)


# Every family here reads ln2.hook_normalized and writes hook_mlp_out. Both are real hook points
# of a plain HookedTransformer, so splicing and evaluation hook them directly, and they are the
# names circuit-tracer's TransformerLens backend resolves on its ReplacementModel.
_IN, _OUT = "ln2.hook_normalized", "hook_mlp_out"

FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily(
            "gpt2", "GPT2LMHeadModel", hf_config.gpt2, wc.convert_gpt2_weights, _IN, _OUT, True,
            "LayerNorm; input is the centred, scaled residual before ln2's w/b",
        ),
        ModelFamily(
            "llama", "LlamaForCausalLM", hf_config.llama, wc.convert_llama_weights, _IN, _OUT,
            True,
            "RMSNorm; input is resid_mid / rms before ln2's weight (the MLP reads it times "
            "ln2.w, a fixed per-dimension scale the encoder absorbs)",
        ),
        ModelFamily(
            "qwen2", "Qwen2ForCausalLM", hf_config.qwen2, wc.convert_qwen2_weights, _IN, _OUT,
            True, "as llama (RMSNorm, gated MLP)",
        ),
        ModelFamily(
            "qwen3", "Qwen3ForCausalLM", hf_config.qwen3, wc.convert_qwen3_weights, _IN, _OUT,
            True, "as llama; the q/k norms only shape attention patterns",
        ),
        ModelFamily(
            "gemma2", "Gemma2ForCausalLM", hf_config.gemma2, wc.convert_gemma_weights, _IN,
            _OUT, True,
            "RMSNorm before and after the MLP; hook_mlp_out is after ln2_post, i.e. what the MLP "
            "adds to the residual stream (mlp.hook_out would be before ln2_post); the hooks of "
            "Gemma Scope and of circuit-tracer's Gemma-2 mapping",
        ),
        ModelFamily(
            "gpt_neox", "GPTNeoXForCausalLM", hf_config.gpt_neox, wc.convert_neox_weights, _IN,
            _OUT, True,
            "LayerNorm; parallel attention + MLP: ln2 reads resid_pre (there is no "
            "hook_resid_mid), hook_mlp_out is added to resid_post beside the attention output",
        ),
    )
}
# The families whose whole path is verified, with their default hooks: all of FAMILIES (a name
# kept from when hook defaults lived in a table of their own).
SUPPORTED = FAMILIES
FamilySupport = ModelFamily

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
ARCH_TO_FAMILY = {f.architecture: f.name for f in FAMILIES.values()} | _OTHER_ARCHITECTURES
