"""Official TransformerLens model names: resolving a name or alias, and guessing its family
from the name alone, so a family is checked before any download.
"""

from __future__ import annotations

import re

from transformer_lens import loading_from_pretrained as lfp


def official_name(name: str) -> str | None:
    lowered = name.lower()
    for official in lfp.OFFICIAL_MODEL_NAMES:
        aliases = lfp.MODEL_ALIASES.get(official, [])
        if lowered == official.lower() or lowered in (a.lower() for a in aliases):
            return official
    return None


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
NOT_DECODERS = {
    "bert": "BERT encoder (TransformerLens HookedEncoder)",
    "t5": "T5 encoder-decoder (TransformerLens HookedEncoderDecoder)",
    "speech": "speech encoder",
}


def family_of_official(official: str) -> str:
    for pattern, family in _OFFICIAL_FAMILY_PATTERNS:
        if pattern.match(official):
            return family
    return "unknown"
