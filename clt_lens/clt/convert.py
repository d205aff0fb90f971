"""Conversion of a trained TopK / BatchTopK CLT into a JumpReLU CLT.

TopK is not elementwise, so circuit-tracer and SAELens transcoders cannot run it. A JumpReLU
with thresholds chosen on a data sample reproduces its sparsity: per layer (default), the
threshold is set between the (k*N)-th and (k*N+1)-th largest pre-activation of the layer over
N sample tokens, so the sample's L0 matches exactly and held-out L0 stays close; per feature,
each feature's threshold makes it fire as often as it won a top-k slot on the sample (matches
feature densities too, but rare features get noisy thresholds).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from clt_lens.clt.activations import REGISTRY
from clt_lens.clt.model import CrossLayerTranscoder
from clt_lens.errors import InputError

# Smallest threshold written: log_threshold must be finite and the rule needs theta > 0.
_MIN_THRESHOLD = 1e-6


@torch.no_grad()
def convert_topk_to_jumprelu(
    clt: CrossLayerTranscoder,
    x_sample: Tensor,
    *,
    per_feature: bool = False,
    batch_size: int = 2048,
) -> CrossLayerTranscoder:
    """A JumpReLU copy of a (Batch)TopK ``clt`` whose per-layer L0 matches on ``x_sample``.

    ``x_sample`` are raw inputs [N, L, d]. All other weights are copied unchanged.
    """
    act = clt.act
    if not act.converts_to_jumprelu:
        names = "/".join(name for name, a in REGISTRY.items() if a.converts_to_jumprelu)
        raise InputError(f"convert_topk_to_jumprelu needs a {names} CLT, got '{act.name}'")
    clt.check_activations(x_sample, "x_sample")
    n_tokens = x_sample.shape[0]
    k = clt.cfg.k
    if per_feature:
        theta = _per_feature_thresholds(clt, x_sample, batch_size)
    else:
        theta = _per_layer_thresholds(clt, x_sample, k * n_tokens, batch_size)
    theta = theta.clamp(min=_MIN_THRESHOLD)

    new_cfg = dataclasses.replace(
        clt.cfg, activation="jumprelu", metadata=copy.deepcopy(clt.cfg.metadata)
    )
    new_cfg.device = str(clt.W_enc.device)
    new_cfg.metadata.converted_from = clt.cfg.activation
    new = CrossLayerTranscoder(new_cfg)
    state = {k_: v for k_, v in clt.state_dict().items() if k_ not in act.state_names}
    state["log_threshold"] = theta.log().to(clt.dtype)
    new.load_state_dict(state, strict=True)
    return new


def _chunks(x: Tensor, batch_size: int, desc: str) -> list[Tensor]:
    parts = list(x.split(batch_size))
    return list(tqdm(parts, desc=desc, disable=len(parts) < 8, leave=False))


def _per_layer_thresholds(
    clt: CrossLayerTranscoder, x: Tensor, n_keep: int, batch_size: int
) -> Tensor:
    """[L, F] (one value per layer): midpoint of the n_keep-th and next largest pre-act."""
    n_layers, n_features = clt.n_layers, clt.n_features
    n_keep = min(n_keep, x.shape[0] * n_features - 1)
    best = None  # [L, <= n_keep + 1] largest pre-activations seen so far
    for chunk in _chunks(x, batch_size, "topk->jumprelu thresholds"):
        pre = clt.preacts_lbf(clt.normalize_inputs(chunk.to(clt.W_enc.device)))
        pre = pre.reshape(n_layers, -1)
        pool = pre if best is None else torch.cat([best, pre], dim=1)
        best = pool.topk(min(n_keep + 1, pool.shape[1]), dim=1).values
    assert best is not None
    best = best.sort(dim=1, descending=True).values
    theta = 0.5 * (best[:, n_keep - 1] + best[:, n_keep])
    return theta.unsqueeze(1).expand(n_layers, n_features).contiguous()


def _per_feature_thresholds(
    clt: CrossLayerTranscoder, x: Tensor, batch_size: int
) -> Tensor:
    """[L, F]: each feature fires on the sample as often as it was in a token's top-k."""
    pres = [
        clt.preacts_lbf(clt.normalize_inputs(chunk.to(clt.W_enc.device)))
        for chunk in _chunks(x, batch_size, "topk->jumprelu thresholds")
    ]
    pre_all = torch.cat(pres, dim=1)  # [L, N, F]
    counts = clt.act.sample_win_counts(
        clt, pres, pre_all, lambda n_keep: _per_layer_thresholds(clt, x, n_keep, batch_size)
    )
    n_tokens = pre_all.shape[1]
    ordered = pre_all.sort(dim=1, descending=True).values  # [L, N, F]
    c = counts.clamp(max=n_tokens - 1)
    upper = ordered.gather(1, (c - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    lower = ordered.gather(1, c.unsqueeze(1)).squeeze(1)
    theta = 0.5 * (upper + lower)
    # a feature that never won keeps its largest sample pre-activation (never fires on it)
    never = counts == 0
    top = ordered[:, 0]
    theta = torch.where(never, torch.nextafter(top, torch.full_like(top, math.inf)), theta)
    return theta
