"""The streaming accumulator of ``compute_feature_stats`` (the algorithm: ``stats.py``'s
docstring) and ``preactivation_fn``, which feeds it the CLT's pre-activations."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from clt_lens.clt.activations import get_activation
from clt_lens.errors import InputError
from clt_lens.features.heaps import DoublingHistogram, ExamplePool


def _flatnonzero(mask: Tensor) -> Tensor:
    # numpy's nonzero is several times faster than torch's on CPU
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().squeeze(1)


class FeatureAccumulator:
    """Streaming statistics of ``n_features`` features over sequences of ``seq_len`` tokens.

    Call ``update(pre [layers, b, seq_len, F], theta [layers, F], first_seq)`` for consecutive
    chunks of sequences (``preactivation_fn`` gives ``pre`` and ``theta``); afterwards the
    attributes hold the results, turned into records by ``records.layer_records``.
    """

    def __init__(
        self,
        n_features: int,
        seq_len: int,
        lo: Tensor,
        *,
        top_k: int,
        n_quantiles: int,
        examples_per_quantile: int,
        n_negative: int,
        window: int,
        hist_bins: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.n_features, self.seq_len = n_features, seq_len
        self.window = min(window, seq_len)
        # the qualifying token sits three quarters into its window: more context before it
        self.before = (3 * self.window) // 4
        self.lo = lo.to(device=device, dtype=torch.float32)
        self.n_quantiles = n_quantiles
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.counts = torch.zeros(n_features, dtype=torch.long, device=device)
        self.sums = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.running_max = torch.zeros(n_features, dtype=torch.float32, device=device)
        self.n_tokens = 0
        self.n_seqs = 0
        self.hist = DoublingHistogram(self.lo, hist_bins)
        self.top = ExamplePool(n_features, 1, top_k, window=self.window, device=device)
        self.quant = (
            ExamplePool(n_features, n_quantiles, examples_per_quantile, window=self.window,
                        device=device)
            if n_quantiles > 0 else None
        )
        self.neg = (
            ExamplePool(n_features, 1, n_negative, window=None, device=device)
            if n_negative > 0 else None
        )
        self._n_neg_windows = max(1, n_negative)
        self._arange_w = torch.arange(self.window, device=device)

    def quantile_bin(self, values: Tensor) -> Tensor:
        """Bin index [G, *] of ``values`` [G, *] under the running maximum."""
        span = (self.running_max - self.lo).clamp(min=1e-30)[:, None]
        q = ((values - self.lo[:, None]) / span * self.n_quantiles).floor().long()
        return q.clamp_(0, self.n_quantiles - 1)

    @torch.no_grad()
    def update(self, pre: Tensor, theta: Tensor, first_seq: int) -> None:
        """Add ``b`` sequences, given layer-major pre-activations ``pre`` [Ls, b, seq_len, F]
        and the rule ``act = pre * (pre > theta)`` with ``theta`` [Ls, F] (feature ``g`` of the
        accumulator is ``l * F + i``). Dense activations are the case ``theta = 0``."""
        n_l, b, t, n_f = pre.shape
        g_all = n_l * n_f
        if t != self.seq_len or g_all != self.n_features:
            raise InputError(
                f"pre must be [layers, batch, {self.seq_len}, F] with layers * F = "
                f"{self.n_features}, got {tuple(pre.shape)}"
            )
        pre = pre.contiguous()
        flat = pre.view(-1)
        # The firing mask is the activation rule itself: no activation tensor is materialised.
        fired_mask = (pre > theta[:, None, None, :]).view(-1)
        # One sparse extraction of the firing entries feeds every per-token statistic.
        nz = _flatnonzero(fired_mask).to(pre.device)
        v = flat[nz]
        per_layer = b * t * n_f
        layer = nz // per_layer
        rem = nz - layer * per_layer
        row = rem // n_f  # token index within the chunk
        g = layer * n_f + (rem - row * n_f)
        seq_local = row // t
        pos = row - seq_local * t
        self.counts += torch.bincount(g, minlength=g_all)
        self.sums += torch.bincount(g, weights=v.double(), minlength=g_all)
        key = seq_local * g_all + g
        seq_max = torch.zeros(b * g_all, dtype=v.dtype, device=pre.device)
        seq_max.scatter_reduce_(0, key, v, reduce="amax", include_self=True)
        is_max = v == seq_max[key]
        seq_arg = torch.zeros(b * g_all, dtype=torch.long, device=pre.device)
        seq_arg[key[is_max]] = pos[is_max]
        seq_max, seq_arg = seq_max.view(b, g_all), seq_arg.view(b, g_all)
        batch_max = seq_max.amax(0)
        self.hist.update(g, v, batch_max)
        self.running_max = torch.maximum(self.running_max, batch_max)

        # Candidates: each sequence offers each feature its maximum, as [G, b] rows.
        cmax = seq_max.t()
        cpos = seq_arg.t()
        cstart = (cpos - self.before).clamp(0, t - self.window)
        cseq = (first_seq + torch.arange(b, device=pre.device)).expand(g_all, b)
        fired = cmax > 0
        none_group = torch.ones_like(cpos)
        cstart_flat = cstart.reshape(-1)
        step = self._arange_w * n_f  # flat distance between consecutive tokens of a feature

        def windows(fi: Tensor, ci: Tensor) -> Tensor:
            starts = cstart_flat.index_select(0, fi * b + ci)
            fl = fi // n_f
            first = fl * per_layer + (ci * t + starts) * n_f + (fi - fl * n_f)
            idx = first[:, None] + step
            # act = pre * fired; + 0.0 turns the -0.0 of silent negative units into 0.0
            return flat.take(idx) * fired_mask.take(idx) + 0.0

        self.top.merge(
            torch.where(fired, 0, none_group), -cmax, cmax, cseq, cstart, cpos, windows
        )
        if self.quant is not None:
            self.quant.regroup(self.quantile_bin)
            prio = torch.rand(cmax.shape, generator=self.gen, device=pre.device)
            self.quant.merge(
                torch.where(fired, self.quantile_bin(cmax), self.n_quantiles),
                prio, cmax, cseq, cstart, cpos, windows,
            )
        if self.neg is not None:
            self._offer_negatives(flat, fired_mask, (n_l, b, t, n_f), first_seq)
        self.n_tokens += b * t
        self.n_seqs += b

    def _offer_negatives(
        self, flat: Tensor, fired_mask: Tensor, shape: tuple[int, int, int, int], first_seq: int
    ) -> None:
        """Offer random windows (shared by all features) where a feature is silent."""
        n_l, b, t, n_f = shape
        g_all = n_l * n_f
        r = min(self._n_neg_windows, b)
        dev = flat.device
        seqs = torch.randperm(b, generator=self.gen, device=dev)[:r]
        starts = torch.randint(0, t - self.window + 1, (r,), generator=self.gen, device=dev)
        rows = ((seqs * t + starts)[:, None] + self._arange_w).reshape(-1)  # [r * window]
        fired = fired_mask.view(n_l, b * t, n_f).index_select(1, rows)  # [Ls, r * W, F]
        any_fired = fired.view(n_l, r, -1, n_f).any(2)  # [Ls, r, F]
        silent = ~any_fired.permute(0, 2, 1).reshape(g_all, r)
        prio = torch.rand(g_all, r, generator=self.gen, device=dev)
        zeros = torch.zeros(g_all, r, dtype=torch.long, device=dev)
        self.neg.merge(  # type: ignore[union-attr]
            torch.where(silent, zeros, zeros + 1), prio, zeros.float(),
            (first_seq + seqs).expand(g_all, r), starts.expand(g_all, r), zeros,
        )


def preactivation_fn(clt: Any, layers: list[int]) -> tuple[Any, Tensor]:
    """(fn, theta): ``fn(x_raw [N, L, d]) -> pre [len(layers), N, F]`` and ``theta`` [Ls, F]
    with ``act = pre * (pre > theta)`` equal to ``clt.encode(x)[:, layers]``.

    JumpReLU, ReLU and BatchTopK use the CLT's own encoder arithmetic (``normalize_inputs``,
    ``preacts_lbf``, ``inference_threshold``), so values are bit-identical to ``encode`` and the
    statistics read the firing mask without building the activation tensor. TopK (not
    elementwise) goes through ``encode`` with theta = 0.
    """
    n_layers = clt.cfg.n_layers
    sel = None if layers == list(range(n_layers)) else torch.tensor(layers, device=clt.W_enc.device)
    fast = get_activation(clt.cfg.activation).elementwise and all(
        hasattr(clt, name) for name in ("normalize_inputs", "preacts_lbf", "inference_threshold")
    )
    if not fast:
        def dense(x: Tensor) -> Tensor:
            acts = clt.encode(x).transpose(0, 1)
            return (acts if sel is None else acts.index_select(0, sel)).contiguous()

        return dense, torch.zeros(len(layers), clt.cfg.d_sae, device=clt.W_enc.device)
    theta = clt.inference_threshold()  # BatchTopK's is clamped at 0, as in encode
    if theta is None:
        theta = torch.zeros(n_layers, clt.cfg.d_sae, device=clt.W_enc.device)
    theta = theta.detach()
    if sel is not None:
        theta = theta.index_select(0, sel)

    def fn(x: Tensor) -> Tensor:
        pre = clt.preacts_lbf(clt.normalize_inputs(x))
        return pre if sel is None else pre.index_select(0, sel)

    return fn, theta
