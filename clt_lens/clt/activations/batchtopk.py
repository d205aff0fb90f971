"""BatchTopK: while training, per layer the k * B largest pre-activations of the batch (relu'd);
at inference, ``pre * (pre > theta_l)`` with a running per-layer threshold (buffer
``topk_threshold`` [L], an EMA of each step's smallest kept activation), so encoding never
depends on the rest of the batch and exports as a JumpReLU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from clt_lens.clt.activation_fns import batch_topk_flat_indices
from clt_lens.clt.activations.base import threshold_rule
from clt_lens.clt.activations.topk import TopK
from clt_lens.clt.comm import FeatureComm, kth_largest
from clt_lens.clt.sparse import Support

if TYPE_CHECKING:  # annotations only: the model imports this package
    from clt_lens.clt.config import CLTConfig
    from clt_lens.clt.model import CrossLayerTranscoder


class BatchTopK(TopK):
    name = "batchtopk"
    label = "BatchTopK"
    state_names = ("topk_threshold",)
    elementwise = True
    circuit_tracer_activation = "jumprelu"
    running_threshold = True

    def create_state(self, clt: CrossLayerTranscoder, kw: dict[str, Any]) -> None:
        clt.register_buffer("topk_threshold", torch.zeros(clt.cfg.n_layers, **kw))

    def inference_threshold(self, clt: CrossLayerTranscoder) -> Tensor:
        # a zero running threshold (untrained) still means ReLU, not "pass negatives"
        theta = clt.topk_threshold.clamp(min=0)
        return theta.unsqueeze(1).expand(clt.n_layers, clt.n_features)

    def export_threshold(self, weights: Any, cfg: CLTConfig, layer: int) -> Tensor:
        return weights.whole("topk_threshold")[layer].clamp(min=0).expand(cfg.d_sae)

    def activate(self, clt: CrossLayerTranscoder, pre: Tensor, layer: int | None) -> Tensor:
        return threshold_rule(pre, self.inference_threshold(clt), layer)

    def global_mask(self, clt: CrossLayerTranscoder, pre: Tensor, comm: FeatureComm) -> Tensor:
        n_layers, batch, n_features = pre.shape
        flat = pre.reshape(n_layers, batch * n_features)
        return pre >= kth_largest(flat, clt.cfg.k * batch, comm).view(n_layers, 1, 1)

    def local_support(self, clt: CrossLayerTranscoder, pre: Tensor) -> Support:
        _, batch, n_features = pre.shape
        idx = batch_topk_flat_indices(pre, clt.cfg.k)
        return Support.from_layer_indices(idx, batch, n_features)

    def local_dense(self, clt: CrossLayerTranscoder, pre: Tensor) -> Tensor:
        n_layers, batch, n_features = pre.shape
        idx = batch_topk_flat_indices(pre.detach(), clt.cfg.k)
        flat = pre.reshape(n_layers, batch * n_features)
        out = torch.zeros_like(flat).scatter(-1, idx, flat.gather(-1, idx).relu())
        return out.view(n_layers, batch, n_features)

    def update_running_threshold_(self, clt: CrossLayerTranscoder, min_positive: Tensor) -> None:
        """EMA of each layer's smallest positive kept activation; a layer's first observation
        replaces the initial zero, so the estimate needs no warm-up."""
        buf = clt.topk_threshold
        seen = torch.isfinite(min_positive)
        new = min_positive.to(buf.dtype)
        lr = clt.cfg.topk_threshold_lr
        ema = torch.where(buf > 0, (1 - lr) * buf + lr * new, new)
        buf.copy_(torch.where(seen, ema, buf))

    def sample_win_counts(
        self,
        clt: CrossLayerTranscoder,
        pres: list[Tensor],
        pre_all: Tensor,
        layer_thresholds: Callable[[int], Tensor],
    ) -> Tensor:
        # the whole sample as one batch: k * N winners per layer
        layer_theta = layer_thresholds(clt.cfg.k * pre_all.shape[1])
        return (pre_all > layer_theta.unsqueeze(1)).sum(dim=1)
