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

``FAMILIES`` (also ``SUPPORTED``) holds one ``ModelFamily`` per family whose whole path (load ->
collect -> train -> circuit-tracer export -> attribution) is verified: its config builder,
weight converter and default CLT hooks; ``default_hooks`` / ``resolve_hooks`` turn a hook
setting of ``"auto"`` into those names.

Modules: ``loading`` (``load_model``), ``families`` (the family table), ``hf_config`` (config.json
-> TransformerLens config, per family), ``official`` (official TransformerLens names),
``identity`` (``model_id``, ``model_family``), ``hooks`` (default hooks), ``errors``.
"""

from __future__ import annotations

from clt_lens.models.errors import ModelLoadError, UnsupportedFamilyError
from clt_lens.models.families import FAMILIES, SUPPORTED, FamilySupport, ModelFamily
from clt_lens.models.hooks import (
    AUTO_HOOK,
    check_attribution_support,
    default_hooks,
    resolve_hooks,
)
from clt_lens.models.identity import model_family, model_id
from clt_lens.models.loading import EMBEDDED_DIR, EMBEDDED_MODELS, EMBEDDED_NAME, load_model

__all__ = [
    "AUTO_HOOK",
    "EMBEDDED_DIR",
    "EMBEDDED_MODELS",
    "EMBEDDED_NAME",
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
