"""The order a ``CacheReader`` visits tokens in: one epoch's chunks and shuffle windows for one
rank, a pure function of the shard chunk sizes and the reader's settings (steps 1-3 of
``reader.py``'s docstring). That purity is what makes a reader's saved position exact.
"""

from __future__ import annotations

import torch


def seed_for(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochPlan:
    """One epoch's plan for one rank: chunks, windows and their token ranges."""

    def __init__(self, chunk_sizes: list[list[int]], epoch: int, *, shuffle: bool, seed: int,
                 partition: bool, rank: int, world_size: int, group_shards: int,
                 buffer_tokens: int) -> None:
        """``chunk_sizes[k]``: token counts of shard k's chunks (from the manifest)."""
        n = len(chunk_sizes)
        if shuffle:
            g = torch.Generator().manual_seed(seed_for(seed, epoch))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if partition:
            order = order[rank :: world_size]
        # units: (shard, chunk index, first token within the shard, tokens)
        units: list[tuple[int, int, int, int]] = []
        group = group_shards if shuffle else 1
        for g0 in range(0, len(order), group):
            per_shard = []
            for k in order[g0 : g0 + group]:
                sizes = chunk_sizes[k]
                starts = [0]
                for s in sizes[:-1]:
                    starts.append(starts[-1] + s)
                per_shard.append([(k, j, starts[j], sizes[j]) for j in range(len(sizes))])
            depth = max((len(c) for c in per_shard), default=0)
            for j in range(depth):  # round robin over the group's shards
                units.extend(c[j] for c in per_shard if j < len(c))
        self.units = units
        self.windows: list[list[int]] = []
        cur: list[int] = []
        have = 0
        for i, u in enumerate(units):
            cur.append(i)
            have += u[3]
            if have >= buffer_tokens:
                self.windows.append(cur)
                cur, have = [], 0
        if cur:
            self.windows.append(cur)
        self.starts = [0]
        for w in self.windows:
            self.starts.append(self.starts[-1] + sum(units[i][3] for i in w))
        self.n_tokens = self.starts[-1]

    def window_at(self, offset: int) -> int:
        """Index of the window holding epoch position ``offset`` (< n_tokens)."""
        lo, hi = 0, len(self.windows) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo
