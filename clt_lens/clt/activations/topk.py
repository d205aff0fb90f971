"""TopK: per token and layer, the k largest pre-activations (relu'd); the rest are zero.

Not elementwise, so neither SAELens transcoders nor circuit-tracer run it: convert it with
``clt_lens.clt.convert_topk_to_jumprelu``. Under feature sharding the k-th largest value over
all slices is found through the ``FeatureComm``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from clt_lens.clt.activation_fns import topk_indices
from clt_lens.clt.activations.base import Activation, topk_scatter
from clt_lens.clt.comm import FeatureComm, kth_largest
from clt_lens.clt.sparse import Support
from clt_lens.config import ConfigError

if TYPE_CHECKING:  # annotations only: the model imports this package
    from clt_lens.clt.config import CLTConfig
    from clt_lens.clt.model import CrossLayerTranscoder


class TopK(Activation):
    name = "topk"
    label = "TopK"
    elementwise = False
    rescalable = False
    converts_to_jumprelu = True

    def validate(self, cfg: CLTConfig) -> None:
        if not 1 <= cfg.k <= cfg.d_sae:
            raise ConfigError(
                f"{cfg._label}.k must be in [1, d_sae={cfg.d_sae}] for activation "
                f"'{cfg.activation}', got {cfg.k}"
            )

    def activate(self, clt: CrossLayerTranscoder, pre: Tensor, layer: int | None) -> Tensor:
        return topk_scatter(pre, topk_indices(pre, clt.cfg.k))

    def known_density(self, cfg: CLTConfig, n_slices: int) -> float:
        return cfg.k / (cfg.d_sae * n_slices)

    def global_mask(self, clt: CrossLayerTranscoder, pre: Tensor, comm: FeatureComm) -> Tensor:
        """Where a feature slice's pre-activations [L, B, F/R] are in the top k over all R
        slices; equal to one process's selection up to ties at the k-th value."""
        return pre >= kth_largest(pre, clt.cfg.k, comm).unsqueeze(-1)

    def training_support(
        self,
        clt: CrossLayerTranscoder,
        pre_nobias: Tensor,
        bias: Tensor,
        theta: Tensor | None,
        comm: FeatureComm,
    ) -> tuple[Support, Tensor]:
        pre = pre_nobias + bias
        if comm.size > 1:
            support = Support.from_mask(self.global_mask(clt, pre, comm))
        else:
            support = self.local_support(clt, pre)
        return support, pre_nobias.reshape(-1)[support.flat]

    def local_support(self, clt: CrossLayerTranscoder, pre: Tensor) -> Support:
        return Support.from_row_indices(topk_indices(pre, clt.cfg.k), pre.shape[-1])

    def activate_dense(
        self, clt: CrossLayerTranscoder, pre: Tensor, theta: Tensor | None, comm: FeatureComm
    ) -> Tensor:
        if comm.size > 1:
            return (pre * self.global_mask(clt, pre.detach(), comm)).relu()
        return self.local_dense(clt, pre)

    def local_dense(self, clt: CrossLayerTranscoder, pre: Tensor) -> Tensor:
        return topk_scatter(pre, topk_indices(pre.detach(), clt.cfg.k))

    def uses_auxk(self, cfg: CLTConfig) -> bool:
        return True

    def sample_win_counts(
        self,
        clt: CrossLayerTranscoder,
        pres: list[Tensor],
        pre_all: Tensor,
        layer_thresholds: Callable[[int], Tensor],
    ) -> Tensor:
        counts = torch.zeros(clt.n_layers, clt.n_features, dtype=torch.int64, device=pre_all.device)
        for pre in pres:
            idx = topk_indices(pre, clt.cfg.k)
            sel = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, idx, True) & (pre > 0)
            counts += sel.sum(dim=1)
        return counts
