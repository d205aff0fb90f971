"""Build circuit-tracer's ReplacementModel offline from a loaded HookedTransformer.

``ReplacementModel.from_pretrained*`` wants an official model name and the hub. Instead the
replacement model is built from the base model's config, and the base model's own weights are
loaded into it: circuit-tracer wraps each MLP as ``mlp.old_mlp`` and the unembedding as
``unembed.old_unembed``, so those keys are renamed. The result must give the base model's logits;
that is checked on a probe input before returning.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch

from clt_lens.circuits.errors import CircuitsError
from clt_lens.clt.loading import check_fits

# hook points circuit-tracer's ReplacementMLP adds to every block (not in the bare model)
REPLACEMENT_MLP_HOOKS = ("mlp.hook_in", "mlp.hook_out")

# Normalisations with a ``hook_scale`` circuit-tracer can freeze.
_NORMALIZATIONS = ("LN", "LNPre", "RMS", "RMSPre")
_MLP_KEY = re.compile(r"^(blocks\.\d+\.mlp)\.(.+)$")
_UNEMBED_KEY = re.compile(r"^unembed\.(.+)$")


def tokenizer_dir(model: Any) -> str | None:
    """A local folder ``AutoTokenizer.from_pretrained`` can load the model's tokenizer from."""
    for name in (getattr(model.cfg, "tokenizer_name", None),
                 getattr(getattr(model, "tokenizer", None), "name_or_path", None)):
        if name and Path(name).expanduser().is_dir():
            return str(Path(name).expanduser().resolve())
    return None


def check_family(model: Any) -> None:
    """CircuitsError unless circuit-tracer attribution through the model's family is verified."""
    from clt_lens.models import UnsupportedFamilyError, check_attribution_support

    try:
        check_attribution_support(model)
    except UnsupportedFamilyError as e:
        raise CircuitsError(str(e)) from None


def check_transcoders_fit(model: Any, transcoders: Any) -> None:
    """Raise CircuitsError unless ``transcoders`` (circuit-tracer objects) fit ``model``."""
    d_model = getattr(transcoders, "d_model", None)
    if d_model is None:  # TranscoderSet
        d_model = transcoders[0].d_model
    check_fits(model, transcoders.n_layers, d_model, "the transcoders",
               hooks=(transcoders.feature_input_hook, transcoders.feature_output_hook),
               extra_hooks=REPLACEMENT_MLP_HOOKS, error=CircuitsError)


def build_replacement_model(model: Any, transcoders: Any, *, check_logits: bool = True) -> Any:
    """circuit-tracer ``ReplacementModel`` wrapping ``model`` (a HookedTransformer) and
    ``transcoders`` (a circuit-tracer ``CrossLayerTranscoder`` or ``TranscoderSet``).

    ``model`` must be unprocessed (no LayerNorm folding or weight centring: ``load_model`` gives
    that) and have a LayerNorm/RMSNorm. Its weights are copied; ``model`` itself is not changed.
    The transcoders are moved to the model's device and dtype.
    """
    from circuit_tracer import ReplacementModel
    from transformer_lens import HookedTransformer

    if not isinstance(model, HookedTransformer):
        raise CircuitsError(f"model must be a transformer_lens.HookedTransformer, got "
                            f"{type(model).__name__}")
    cfg = model.cfg
    check_family(model)
    if cfg.normalization_type not in _NORMALIZATIONS:
        raise CircuitsError(
            f"model normalization_type={cfg.normalization_type!r}: circuit-tracer freezes "
            f"LayerNorm scales and needs one of {list(_NORMALIZATIONS)}"
        )
    check_transcoders_fit(model, transcoders)
    if model.tokenizer is None:
        raise CircuitsError("the model has no tokenizer; attribution needs one")

    rm_cfg = copy.deepcopy(cfg)
    # circuit-tracer's create_graph_files reloads the tokenizer by this name: keep it local.
    local_tok = tokenizer_dir(model)
    if local_tok is not None:
        rm_cfg.tokenizer_name = local_tok
    rm = ReplacementModel.from_config(rm_cfg, transcoders, tokenizer=model.tokenizer)
    state = {_remap(k): v for k, v in model.state_dict().items()}
    result = rm.load_state_dict(state, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not k.startswith("transcoders.")]
    if unexpected or missing:
        raise CircuitsError(
            "the base model's weights do not fit circuit-tracer's ReplacementModel "
            f"(unexpected {unexpected[:5]}, missing {missing[:5]}); is this a TransformerLens "
            "HookedTransformer of a supported architecture?"
        )
    rm.eval()
    if check_logits:
        _check_same_logits(model, rm)
    return rm


def _remap(key: str) -> str:
    m = _MLP_KEY.match(key)
    if m:
        return f"{m.group(1)}.old_mlp.{m.group(2)}"
    m = _UNEMBED_KEY.match(key)
    if m:
        return f"unembed.old_unembed.{m.group(1)}"
    return key


@torch.no_grad()
def _check_same_logits(model: Any, rm: Any, n_tokens: int = 16) -> None:
    n = min(n_tokens, model.cfg.n_ctx)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, n), generator=gen).to(model.cfg.device)
    ref = model(tokens)
    got = rm(tokens)
    err = (ref - got).abs().max().item()
    scale = ref.abs().max().item() + 1e-6
    tol = 1e-4 if model.cfg.dtype in (torch.float32, torch.float64) else 2e-2
    if not err <= tol * scale:
        raise CircuitsError(
            f"the replacement model's logits differ from the base model's by {err:.3g} "
            f"(scale {scale:.3g}): its weights did not load as expected"
        )
