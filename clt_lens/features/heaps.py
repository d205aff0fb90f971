"""Bounded per-feature accumulators for the streaming statistics pass.

Every structure here holds a fixed amount of memory per feature, whatever the number of tokens
seen, and is updated for all features at once with tensor operations (no Python loop over
features):

- ``ExamplePool``: for each feature, up to ``per_group`` examples in each of ``n_groups`` groups,
  the ones with the lowest *score* per group. With one group and score = -activation it is a
  top-k heap; with groups = activation bins and score = a random priority it is a reservoir
  sample per bin (keeping the k lowest of i.i.d. uniform priorities is a uniform sample of
  everything offered); with one group and random scores it samples negative contexts.
  An example is a window of a held-out sequence (sequence index, window start, position of the
  qualifying token) and optionally the feature's activations over that window, copied while the
  batch is still in memory, so nothing needs a second pass over the data.
- ``DoublingHistogram``: a histogram of each feature's nonzero activations over ``[lo, lo + w)``
  with ``n_bins`` equal bins. The range starts just above the first batch's maximum and doubles
  (merging neighbouring bins pairwise, which is exact) whenever a larger value arrives, so the
  running maximum always lies in the upper half of the range and the final histogram has between
  ``n_bins / 2`` and ``n_bins`` occupied bins.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from clt_lens.errors import InputError

WindowFn = Callable[[Tensor, Tensor], Tensor]


class ExamplePool:
    """Per-feature examples kept by (group, score); see the module docstring."""

    def __init__(
        self,
        n_features: int,
        n_groups: int,
        per_group: int,
        *,
        window: int | None,
        device: torch.device | str = "cpu",
    ) -> None:
        if n_groups < 1 or per_group < 1:
            raise InputError(f"n_groups and per_group must be >= 1, got {n_groups}, {per_group}")
        self.n_features, self.n_groups, self.per_group = n_features, n_groups, per_group
        self.size = n_groups * per_group
        shape = (n_features, self.size)
        kw_long = {"dtype": torch.long, "device": device}
        self.group = torch.full(shape, n_groups, **kw_long)  # n_groups marks an empty slot
        self.score = torch.full(shape, math.inf, dtype=torch.float32, device=device)
        self.value = torch.zeros(shape, dtype=torch.float32, device=device)
        self.seq = torch.zeros(shape, **kw_long)
        self.start = torch.zeros(shape, **kw_long)
        self.pos = torch.zeros(shape, **kw_long)
        self.acts = (
            None
            if window is None
            else torch.zeros(n_features, self.size, window, dtype=torch.float32, device=device)
        )

    @property
    def filled(self) -> Tensor:
        """Bool [G, size]: slots holding an example."""
        return self.group < self.n_groups

    def regroup(self, group_fn: Callable[[Tensor], Tensor]) -> None:
        """Recompute the group of every stored example from its value (bins that moved)."""
        filled = self.filled
        self.group = torch.where(filled, group_fn(self.value), self.n_groups)

    def merge(
        self,
        group: Tensor,
        score: Tensor,
        value: Tensor,
        seq: Tensor,
        start: Tensor,
        pos: Tensor,
        windows: WindowFn | None = None,
    ) -> None:
        """Offer candidates ``[G, C]`` (group ``n_groups`` = not a candidate) and keep, per
        feature and group, the ``per_group`` lowest scores among old and new examples. With
        more than one group, scores must lie in [0, 1) (random priorities).

        Examples stay in their slots; a candidate that gets in takes a slot freed by an
        example that dropped out (or an empty one), so only newcomers are written.
        ``windows(feature_idx [M], cand_idx [M]) -> [M, window]`` returns the activations of
        the newcomers; it is called once per merge.
        """
        n_old = self.size
        keep = self._keep(torch.cat([self.group, group], 1),
                          torch.cat([self.score, score.to(self.score.dtype)], 1))
        freed = ~keep[:, :n_old]
        entrants = keep[:, n_old:]
        self.group.masked_fill_(freed, self.n_groups)
        self.score.masked_fill_(freed, math.inf)
        n_cand = entrants.shape[1]
        # Flat (1-D) indices throughout: much cheaper than indexing with pairs of tensors.
        e_flat = entrants.reshape(-1).nonzero().squeeze(1)
        if e_flat.numel() == 0:
            return
        ge, ce = e_flat // n_cand, e_flat % n_cand
        # The k-th newcomer of a row takes the k-th freed slot of that row (there are at least
        # as many freed slots as newcomers, since at most ``size`` examples are kept).
        ent_rank = (entrants.cumsum(1) - 1).reshape(-1).index_select(0, e_flat)
        f_flat = freed.reshape(-1).nonzero().squeeze(1)
        free_rank = (freed.cumsum(1) - 1).reshape(-1).index_select(0, f_flat)
        lookup = torch.empty(self.n_features * n_old, dtype=torch.long, device=f_flat.device)
        lookup.index_copy_(0, f_flat - f_flat % n_old + free_rank, f_flat % n_old)
        dst = ge * n_old + lookup.index_select(0, ge * n_old + ent_rank)  # flat slot index
        for name, cand in (("group", group), ("score", score), ("value", value), ("seq", seq),
                           ("start", start), ("pos", pos)):
            field = getattr(self, name)
            picked = cand.reshape(-1).index_select(0, e_flat).to(field.dtype)
            field.view(-1).index_copy_(0, dst, picked)
        if self.acts is not None:
            if windows is None:
                raise InputError("ExamplePool.merge needs windows= for a pool keeping acts")
            self.acts.view(-1, self.acts.shape[2]).index_copy_(0, dst, windows(ge, ce))

    def _keep(self, group: Tensor, score: Tensor) -> Tensor:
        """Bool like ``group``: the ``per_group`` lowest scores of each (row, group)."""
        valid = group < self.n_groups
        if self.n_groups == 1:
            k = min(self.per_group, score.shape[1])
            idx = score.masked_fill(~valid, math.inf).topk(k, dim=1, largest=False).indices
            return torch.zeros_like(valid).scatter_(1, idx, True) & valid
        # Several groups: scores are priorities in [0, 1), so group + score / 2 orders by
        # (group, score) in one sort.
        order = (group.to(torch.float64) + score.to(torch.float64) * 0.5).argsort(dim=1)
        sorted_group = group.gather(1, order).contiguous()
        first = torch.searchsorted(sorted_group, sorted_group)
        rank = torch.arange(sorted_group.shape[1], device=order.device) - first
        keep_sorted = (sorted_group < self.n_groups) & (rank < self.per_group)
        return torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)

    def ordered(self, rows: slice) -> dict[str, Tensor]:
        """The examples of features ``rows``, each row sorted by (group, score), empty slots
        last; ``filled`` marks real examples."""
        order = _lexsort(self.group[rows], self.score[rows])
        out = {name: getattr(self, name)[rows].gather(1, order)
               for name in ("group", "score", "value", "seq", "start", "pos")}
        if self.acts is not None:
            out["acts"] = self.acts[rows].gather(
                1, order[..., None].expand(-1, -1, self.acts.shape[2])
            )
        out["filled"] = out["group"] < self.n_groups
        return out


def _lexsort(group: Tensor, score: Tensor) -> Tensor:
    """Per row, the permutation sorting by group then score (two stable sorts; rows are short)."""
    o1 = score.argsort(dim=1, stable=True)
    o2 = group.gather(1, o1).argsort(dim=1, stable=True)
    return o1.gather(1, o2)


class DoublingHistogram:
    """Histograms of nonzero activations with a range that doubles on demand (module doc)."""

    def __init__(self, lo: Tensor, n_bins: int = 64) -> None:
        if n_bins < 2 or n_bins & (n_bins - 1):
            raise InputError(f"n_bins must be a power of two >= 2, got {n_bins}")
        self.n_bins = n_bins
        self.lo = lo.to(torch.float64)
        self.width = torch.zeros_like(self.lo)  # 0 = the feature has not fired yet
        self.counts = torch.zeros(lo.shape[0], n_bins, dtype=torch.long, device=lo.device)

    def update(self, feature: Tensor, value: Tensor, batch_max: Tensor) -> None:
        """Add nonzero activations ``value`` of features ``feature`` (both [M]).

        ``batch_max`` [G] is each feature's maximum over the batch (<= lo where it did not fire).
        """
        bmax = batch_max.to(torch.float64)
        fired = bmax > self.lo
        fresh = fired & (self.width == 0)
        # The first range ends just above the first maximum: bins are then as fine as they can
        # be while the maximum stays in the upper half. Ranges are half-open, so merging bins
        # pairwise when the range doubles is exact.
        self.width = torch.where(fresh, (bmax - self.lo) * (1 + 2.0**-20) + 1e-30, self.width)
        over = fired & (bmax >= self.lo + self.width)
        if bool(over.any()):
            idx = over.nonzero().squeeze(1)
            ratio = (bmax[idx] - self.lo[idx]) / self.width[idx]
            k = torch.floor(torch.log2(ratio)).long().clamp(min=0) + 1
            # log2 rounding: make sure the doubled range really holds the new maximum
            short = self.lo[idx] + self.width[idx] * torch.pow(2.0, k.double()) <= bmax[idx]
            k = k + short.long()
            for kk in k.unique().tolist():
                rows = idx[k == kk]
                self._double(rows, int(kk))
        if value.numel() == 0:
            return
        v64 = value.to(torch.float64)
        pos = (v64 - self.lo[feature]) * (self.n_bins / self.width)[feature]
        bins = pos.long().clamp_(0, self.n_bins - 1)
        # Rounding can put a value that sits on an edge (e.g. an earlier maximum after the range
        # doubled) one bin off: near an edge, compare with the edges exactly as histograms()
        # writes them.
        near = ((pos - pos.round()).abs() < 1e-6).nonzero().squeeze(1)
        if near.numel():
            f, v, b = feature[near], v64[near], bins[near]
            lo, width = self.lo[f], self.width[f]
            b = b - ((v < lo + width * b / self.n_bins) & (b > 0)).long()
            b = b + ((v >= lo + width * (b + 1) / self.n_bins) & (b < self.n_bins - 1)).long()
            bins[near] = b
        flat = feature * self.n_bins + bins
        self.counts.view(-1).add_(
            torch.bincount(flat, minlength=self.counts.numel()).view(-1)
        )

    def _double(self, rows: Tensor, k: int) -> None:
        """Widen the range of features ``rows`` by 2**k, merging groups of 2**k bins."""
        c = self.counts[rows]
        group = 1 << k
        merged = torch.zeros_like(c)
        if group >= self.n_bins:
            merged[:, 0] = c.sum(1)
        else:
            m = self.n_bins // group
            merged[:, :m] = c.view(len(rows), m, group).sum(-1)
        self.counts[rows] = merged
        self.width[rows] = self.width[rows] * group

    def histograms(self, rows: slice) -> list[tuple[list[float], list[int]]]:
        """Per feature of ``rows``: (edges [B+1], counts [B]) up to the last occupied bin;
        ([], []) for a feature that never fired."""
        out = []
        counts = self.counts[rows].tolist()
        for c, lo, width in zip(counts, self.lo[rows].tolist(), self.width[rows].tolist()):
            used = next((k + 1 for k in range(self.n_bins - 1, -1, -1) if c[k]), 0)
            if used == 0 or width == 0.0:
                out.append(([], []))
                continue
            # the same expression as the bin test in update(): edges and counts agree exactly
            out.append(([lo + width * k / self.n_bins for k in range(used + 1)], c[:used]))
        return out

    def counts_in(self, rows: slice, edges: Tensor) -> Tensor:
        """Estimated number of values in each interval ``[edges[:, q], edges[:, q + 1]]``
        [R, Q] for the features of ``rows`` (bins partly inside count pro rata)."""
        counts = self.counts[rows].to(torch.float64)
        width = self.width[rows]
        step = torch.where(width > 0, width / self.n_bins, torch.ones_like(width))[:, None]
        left = self.lo[rows][:, None] + step * torch.arange(
            self.n_bins, dtype=torch.float64, device=counts.device
        )
        right = left + step
        edges = edges.to(torch.float64)
        out = []
        for q in range(edges.shape[1] - 1):
            overlap = (
                torch.minimum(right, edges[:, q + 1 : q + 2])
                - torch.maximum(left, edges[:, q : q + 1])
            ).clamp(min=0)
            out.append((counts * overlap / step).sum(1))
        return torch.stack(out, 1) if out else counts[:, :0]
