"""SAELens glue: registration of architecture "clt" (inference and training classes).

``layer_transcoder`` (per-layer SAELens transcoder views) lives in ``transcoder_view`` and is
re-exported here.
"""

from __future__ import annotations

from typing import Any

import torch
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import (
    TrainCoefficientConfig,
    TrainingSAE,
    TrainStepInput,
    TrainStepOutput,
)
from torch import Tensor

from clt_lens.clt.config import CLTConfig, CLTTrainingConfig
from clt_lens.clt.model import CrossLayerTranscoder
from clt_lens.clt.transcoder_view import layer_transcoder
from clt_lens.errors import InputError

__all__ = ["ARCHITECTURE", "TrainingCrossLayerTranscoder", "layer_transcoder", "register"]

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
