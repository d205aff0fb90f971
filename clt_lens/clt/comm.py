"""What a feature-sharded CLT needs from the other holders of its features.

A CLT whose F features per layer are split over the ranks of a *feature group* computes its
encoder, activations and decoder on its own slice. Three things cross the slices: the partial
reconstructions are summed, a global top-k (TopK, BatchTopK, aux-k) needs the k-th largest
value over all slices, and a few statistics are reduced. ``FeatureComm`` is the one-process
version (every operation is the identity); the trainer's process grid supplies one backed by
``torch.distributed`` (:class:`clt_lens.training.parallel.Parallel`).
"""

from __future__ import annotations

import torch
from torch import Tensor


class FeatureComm:
    """One process holding every feature: no communication."""

    size: int = 1

    def sum_partials(self, t: Tensor) -> Tensor:
        """Sum over the group, differentiable (identity backward: every rank has the same loss)."""
        return t

    def gather(self, t: Tensor) -> Tensor:
        """Every rank's ``t`` (same shape everywhere), stacked on a new leading dim. No grad."""
        return t.unsqueeze(0)

    def all_reduce_(self, t: Tensor, op: str = "sum") -> Tensor:
        """In-place sum / min / max over the group. No grad."""
        return t


def kth_largest(local: Tensor, k: int, comm: FeatureComm) -> Tensor:
    """The k-th largest value along the last dim of the concatenation of every rank's ``local``.

    ``local`` is [..., n] (n may differ between ranks); the result is [...], -inf where the
    group holds fewer than k values. Each rank sends only its own top k, which contain every
    value of the global top k.
    """
    n = local.shape[-1]
    top = local.topk(min(k, n), dim=-1, sorted=False).values if n else local
    if top.shape[-1] < k:  # pad so every rank sends the same shape
        pad = top.new_full((*top.shape[:-1], k - top.shape[-1]), -torch.inf)
        top = torch.cat([top, pad], dim=-1)
    every = comm.gather(top.contiguous())  # [R, ..., k]
    every = every.movedim(0, -2).flatten(-2)  # [..., R * k]
    return every.topk(k, dim=-1, sorted=False).values.amin(dim=-1)
