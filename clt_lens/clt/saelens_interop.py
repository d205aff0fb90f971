"""SAELens glue: registration of architecture "clt" and per-layer transcoder views."""

from __future__ import annotations

from typing import Any

import torch
from sae_lens import JumpReLUTranscoder, Transcoder
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import (
    SAEMetadata,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.saes.transcoder import (
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    TranscoderConfig,
)
from torch import Tensor

from clt_lens.clt.config import CLTConfig, CLTTrainingConfig
from clt_lens.clt.model import CrossLayerTranscoder
from clt_lens.errors import InputError

ARCHITECTURE = "clt"


class TrainingCrossLayerTranscoder(CrossLayerTranscoder, TrainingSAE):  # type: ignore[misc]
    """The CLT under SAELens's training registry (``TrainingSAE.load_from_disk`` returns it).

    Same parameters and behaviour as CrossLayerTranscoder. SAELens's ``training_forward_pass``
    carries one tensor, so it takes ``sae_in = torch.stack([x_raw, y_raw], 1)`` [B, 2, L, d];
    clt_lens's own trainer calls ``training_forward`` directly. SAELens's SAETrainer is not
    supported (its feature statistics are sized d_sae, not n_layers * d_sae).
    """

    cfg: CLTTrainingConfig  # type: ignore[assignment]

    def __init__(self, cfg: CLTTrainingConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {
            "sparsity": self.cfg.sparsity_coeff,
            "preact": self.cfg.preact_coeff,
            "auxk": self.cfg.auxk_coeff,
        }

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_activations(x)
        pre = self.preacts_lbf(self.normalize_inputs(x))
        return self.activate(pre).transpose(0, 1), pre.transpose(0, 1)

    def encode(self, x: Tensor) -> Tensor:
        return CrossLayerTranscoder.encode(self, x)

    def decode(self, feature_acts: Tensor, x_raw: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return CrossLayerTranscoder.decode(self, feature_acts, x_raw)

    def calculate_aux_loss(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        raise NotImplementedError("CLT auxiliary losses are computed by training_forward")

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        sae_in = step_input.sae_in
        if sae_in.dim() != 4 or sae_in.shape[1] != 2:
            raise InputError(
                "TrainingCrossLayerTranscoder expects sae_in = stack([x_raw, y_raw], 1) "
                f"[B, 2, L, d], got {tuple(sae_in.shape)}"
            )
        coeffs = step_input.coefficients
        dead = step_input.dead_neuron_mask
        out = self.training_forward(
            sae_in[:, 0],
            sae_in[:, 1],
            sparsity_coeff=coeffs.get("sparsity"),
            preact_coeff=coeffs.get("preact"),
            auxk_coeff=coeffs.get("auxk"),
            dead_mask=dead.view(self.n_layers, self.n_features) if dead is not None else None,
        )
        acts = out.feature_acts
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=self(sae_in[:, 0]).detach(),
            feature_acts=acts.reshape(acts.shape[0], -1),
            hidden_pre=acts,
            loss=out.loss,
            losses=out.losses,
            metrics={"fvu": out.fvu_per_layer.mean(), "l0": out.l0_per_layer.sum()},
        )

    @torch.no_grad()
    def log_histograms(self) -> dict[str, Any]:
        return {"weights/W_dec_norms": self.decoder_norms().flatten().float().cpu().numpy()}


def register() -> None:
    """Register architecture "clt" with SAELens (inference and training); idempotent.

    A re-imported clt_lens replaces its own earlier registration; a foreign class already
    registered under "clt" is an error.
    """
    for registry, entry in (
        (SAE_CLASS_REGISTRY, (CrossLayerTranscoder, CLTConfig)),
        (SAE_TRAINING_CLASS_REGISTRY, (TrainingCrossLayerTranscoder, CLTTrainingConfig)),
    ):
        current = registry.get(ARCHITECTURE)
        if current is not None and current[0].__module__ != entry[0].__module__:
            raise InputError(
                f"SAELens architecture '{ARCHITECTURE}' is already registered by "
                f"{current[0].__module__}.{current[0].__qualname__}"
            )
        registry[ARCHITECTURE] = entry  # type: ignore[assignment]


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
    act = clt.cfg.activation
    if act == "topk":
        raise InputError(
            "a TopK CLT has no per-layer transcoder view (top-k is not elementwise); convert it "
            "with clt_lens.clt.convert_topk_to_jumprelu(clt, x_sample) first"
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
