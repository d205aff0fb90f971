"""ReLU: ``a = relu(pre)``; no extra state (the base class's behaviour)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from clt_lens.clt.activations.base import Activation

if TYPE_CHECKING:  # annotations only: the model imports this package
    from clt_lens.clt.model import CrossLayerTranscoder


class ReLU(Activation):
    name = "relu"
    label = "ReLU"
    circuit_tracer_activation = "relu"
    has_firing_level = True

    def set_firing_level_(self, clt: CrossLayerTranscoder, level: Tensor) -> None:
        # relu fires above 0: shift the bias instead (a negative level would mean "always on")
        clt.b_enc.sub_(level.clamp(min=0))
