"""Per-layer SAELens transcoder views of a CLT (``CrossLayerTranscoder.layer_transcoder``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from sae_lens import JumpReLUTranscoder, Transcoder
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import (
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    TranscoderConfig,
)

from clt_lens.errors import InputError

if TYPE_CHECKING:  # annotations only: the model imports this module
    from clt_lens.clt.model import CrossLayerTranscoder


def layer_transcoder(clt: CrossLayerTranscoder, layer: int) -> Transcoder:
    """SAELens transcoder for source layer ``layer`` of ``clt``, on raw activations.

    Its ``encode`` equals ``clt.encode(x)[:, layer]`` (folded weights, same threshold rule).
    It carries the source layer's decoder into its *own* layer, ``W_dec[layer][:, 0, :]``, with
    ``hook_name`` = the input hook and ``hook_name_out`` = the output hook of that layer, plus
    that layer's ``b_dec`` and skip. So its ``forward`` is the layer's own-layer contribution,
    not the CLT's reconstruction of that layer's output, which also sums the decoders of
    earlier sources (the alternative, as circuit-tracer's SAELens loader does, is a transcoder
    whose decoder sums a feature's decoders over targets: right for activations only).

    JumpReLU and BatchTopK (its running threshold) give a ``JumpReLUTranscoder``, ReLU a
    ``Transcoder`` (Skip variants when the CLT has a skip). TopK has no per-feature rule: use
    ``clt_lens.clt.convert_topk_to_jumprelu`` first.
    """
    clt._check_layer(layer)
    act = clt.act
    if not act.elementwise:
        hint = (
            "; convert it with clt_lens.clt.convert_topk_to_jumprelu(clt, x_sample) first"
            if act.converts_to_jumprelu else ""
        )
        raise InputError(
            f"a {act.label} CLT has no per-layer transcoder view (its activation is not "
            f"elementwise){hint}"
        )
    folded = clt.folded_weights()
    has_threshold = folded["threshold"] is not None
    skip = clt.cfg.skip
    cfg_cls, tc_cls = {
        (False, False): (TranscoderConfig, Transcoder),
        (False, True): (SkipTranscoderConfig, SkipTranscoder),
        (True, False): (JumpReLUTranscoderConfig, JumpReLUTranscoder),
        (True, True): (JumpReLUSkipTranscoderConfig, JumpReLUSkipTranscoder),
    }[(has_threshold, skip)]
    md = clt.cfg.metadata
    metadata = SAEMetadata(
        model_name=md.model_name,
        hook_name=clt.cfg.input_hook_name(layer),
        hook_name_out=clt.cfg.output_hook_name(layer),
        context_size=md.context_size,
        prepend_bos=md.prepend_bos,
        clt_source_layer=layer,
        clt_decoder="own-layer",
    )
    tc_cfg = cfg_cls(
        d_in=clt.d_model,
        d_sae=clt.n_features,
        d_out=clt.d_model,
        dtype=clt.cfg.dtype,
        device=str(clt.W_enc.device),
        apply_b_dec_to_input=False,
        metadata=metadata,
    )
    tc = tc_cls(tc_cfg)
    with torch.no_grad():
        tc.W_enc.copy_(folded["W_enc"][layer])
        tc.b_enc.copy_(folded["b_enc"][layer])
        tc.W_dec.copy_(folded["W_dec"][layer][:, 0, :])
        tc.b_dec.copy_(folded["b_dec"][layer])
        if has_threshold:
            tc.threshold.copy_(folded["threshold"][layer])
        if skip:
            # SAELens applies x @ W_skip.T; ours is x @ W_skip[layer]
            tc.W_skip.copy_(folded["W_skip"][layer].t())
    return tc
