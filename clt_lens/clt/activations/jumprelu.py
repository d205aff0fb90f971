"""JumpReLU: ``a = pre * 1[pre > theta]`` with a trainable per-feature threshold.

The threshold is stored as ``log_threshold`` [L, F] and trained through the rectangle-kernel
pseudo-derivative (``clt_lens.clt.activation_fns.jumprelu``); the sparse training path keeps
the positions inside the kernel window below the threshold too, where dL/da still reaches it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from clt_lens.clt.activation_fns import jumprelu, jumprelu_support_threshold
from clt_lens.clt.activations.base import Activation, threshold_rule
from clt_lens.clt.comm import FeatureComm
from clt_lens.clt.sparse import Support

if TYPE_CHECKING:  # annotations only: the model imports this package
    from clt_lens.clt.config import CLTConfig
    from clt_lens.clt.model import CrossLayerTranscoder


class JumpReLU(Activation):
    name = "jumprelu"
    label = "JumpReLU"
    state_names = ("log_threshold",)
    circuit_tracer_activation = "jumprelu"
    has_firing_level = True

    def create_state(self, clt: CrossLayerTranscoder, kw: dict[str, Any]) -> None:
        cfg = clt.cfg
        clt.log_threshold = nn.Parameter(
            torch.full((cfg.n_layers, cfg.d_sae), math.log(cfg.jumprelu_init_threshold), **kw)
        )

    def reset_state_(self, clt: CrossLayerTranscoder) -> None:
        clt.log_threshold.fill_(math.log(clt.cfg.jumprelu_init_threshold))

    def threshold(self, clt: CrossLayerTranscoder) -> Tensor:
        return clt.log_threshold.exp()

    def inference_threshold(self, clt: CrossLayerTranscoder) -> Tensor:
        return self.threshold(clt)

    def export_threshold(self, weights: Any, cfg: CLTConfig, layer: int) -> Tensor:
        return weights.layer("log_threshold", layer).exp()

    def activate(self, clt: CrossLayerTranscoder, pre: Tensor, layer: int | None) -> Tensor:
        return threshold_rule(pre, self.inference_threshold(clt), layer)

    def training_support(
        self,
        clt: CrossLayerTranscoder,
        pre_nobias: Tensor,
        bias: Tensor,
        theta: Tensor | None,
        comm: FeatureComm,
    ) -> tuple[Support, Tensor]:
        assert theta is not None
        lower = jumprelu_support_threshold(theta.detach(), clt.cfg.jumprelu_bandwidth)
        lower, bias = lower.to(bias.dtype), bias.squeeze(1)
        # the bias moves into the test (saving a pass over [L, B, F]); a few ulps of slack keep
        # the support a superset of the positions the kernel keeps once rounded as pre + b
        slack = 4 * torch.finfo(bias.dtype).eps * (lower.abs() + bias.abs())
        return Support.above(pre_nobias, lower - bias - slack)

    def activate_support(
        self, clt: CrossLayerTranscoder, pre_s: Tensor, theta: Tensor | None, support: Support
    ) -> Tensor:
        assert theta is not None
        cfg = clt.cfg
        theta_s = theta.reshape(-1)[support.lf]
        return jumprelu(pre_s, theta_s, cfg.jumprelu_bandwidth, cfg.jumprelu_ste_to_input)

    def activate_dense(
        self, clt: CrossLayerTranscoder, pre: Tensor, theta: Tensor | None, comm: FeatureComm
    ) -> Tensor:
        assert theta is not None
        cfg = clt.cfg
        return jumprelu(pre, theta.unsqueeze(1), cfg.jumprelu_bandwidth, cfg.jumprelu_ste_to_input)

    def uses_auxk(self, cfg: CLTConfig) -> bool:
        return cfg.auxk_jumprelu

    def rescale_features_(self, clt: CrossLayerTranscoder, norms: Tensor) -> None:
        clt.log_threshold.add_(norms.log())

    def set_firing_level_(self, clt: CrossLayerTranscoder, level: Tensor) -> None:
        # a JumpReLU threshold must stay positive (it is stored as a log)
        clt.log_threshold.copy_(level.clamp(min=1e-3).log())
