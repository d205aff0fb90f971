"""Feature records (one JSON object per feature, ``format.py``) from the accumulator's tensors.

Everything per layer is pulled out of the tensors in bulk (one ``tolist`` per array, token
strings by indexing a numpy array of the vocabulary), so the Python loop over features only
assembles dicts. Activation values are written as the exact float32 numbers the CLT produced.
"""

from __future__ import annotations

import bisect
import json
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clt_lens.features.accumulator import FeatureAccumulator
from clt_lens.features.config import FeaturesConfig


class ExampleTokens:
    """Token ids and strings of example windows, from the stored held-out sequences."""

    def __init__(self, tokens: Tensor, vocab: list[str], window: int) -> None:
        self.tokens = tokens.cpu()  # [n_seq, seq_len] kept positions (BOS dropped)
        self.vocab = np.array(vocab, dtype=object)
        self.ar = torch.arange(window)

    def lists(self, seq: Tensor, start: Tensor) -> tuple[list, list]:
        """(ids, strings) nested lists shaped like ``seq`` + [window]."""
        ids = self.tokens[seq.cpu()[..., None], start.cpu()[..., None] + self.ar]
        return ids.tolist(), self.vocab[ids.numpy()].tolist()


# check_circular off: records are plain trees; non-ASCII tokens stay as UTF-8, not \u escapes
_ENCODER = json.JSONEncoder(check_circular=False, ensure_ascii=False, separators=(",", ":"))


def dumps_lines(records: list[dict[str, Any]]) -> str:
    """JSON lines, compact, "layer" and "index" first (readers match that prefix)."""
    return "".join(_ENCODER.encode(r) + "\n" for r in records)


def _example(ids: list[int], toks: list[str], acts: list[float], max_act: float,
             max_pos: int) -> dict[str, Any]:
    return {"token_ids": ids, "tokens": toks, "acts": acts, "max_act": max_act,
            "max_pos": max_pos}


def logit_effects(
    direction: Tensor, w_u: Tensor, vocab: np.ndarray, n: int, hist_bins: int
) -> list[tuple[list, list, dict]]:
    """Per row of ``direction`` [f, d]: top-n and bottom-n [token, value] of ``direction @ W_U``
    and a histogram of all its logit effects. ``vocab``: token strings, a numpy object array."""
    logits = direction.to(w_u) @ w_u  # [f, V]
    n = min(n, logits.shape[1])
    top = logits.topk(n, dim=1)
    bot = logits.topk(n, dim=1, largest=False)
    lo, hi = logits.amin(1, keepdim=True), logits.amax(1, keepdim=True)
    span = (hi - lo).clamp(min=1e-12)
    bins = ((logits - lo) / span * hist_bins).long().clamp_(0, hist_bins - 1)
    offs = torch.arange(logits.shape[0], device=logits.device)[:, None] * hist_bins
    counts = torch.bincount((bins + offs).view(-1), minlength=logits.shape[0] * hist_bins)
    counts_l = counts.view(-1, hist_bins).tolist()
    top_s, top_v = vocab[top.indices.cpu().numpy()].tolist(), top.values.tolist()
    bot_s, bot_v = vocab[bot.indices.cpu().numpy()].tolist(), bot.values.tolist()
    out = []
    for f, (lo_f, hi_f) in enumerate(zip(lo.squeeze(1).tolist(), hi.squeeze(1).tolist())):
        if hi_f > lo_f:
            step = (hi_f - lo_f) / hist_bins
            hist = {"edges": [lo_f + step * k for k in range(hist_bins)] + [hi_f],
                    "counts": counts_l[f]}
        else:  # a zero decoder: every logit effect is the same number
            hist = {"edges": [lo_f, lo_f + 1e-12], "counts": [sum(counts_l[f])]}
        out.append((
            [[s, v] for s, v in zip(top_s[f], top_v[f])],
            [[s, v] for s, v in zip(bot_s[f], bot_v[f])],
            hist,
        ))
    return out


def layer_records(
    acc: FeatureAccumulator,
    block: int,
    layer: int,
    n_layers: int,
    w_dec: Tensor,
    w_u: Tensor,
    tokens: ExampleTokens,
    cfg: FeaturesConfig,
) -> list[dict[str, Any]]:
    """The records of source layer ``layer``: features ``block * F .. (block + 1) * F - 1`` of
    the accumulator; ``w_dec`` [F, n_targets, d] is the layer's raw-space decoder."""
    n_features = w_dec.shape[0]
    sl = slice(block * n_features, (block + 1) * n_features)
    cpu = torch.device("cpu")
    counts = acc.counts[sl].tolist()
    sums = acc.sums[sl].tolist()
    n_tok = max(acc.n_tokens, 1)

    norms = w_dec.norm(dim=-1)
    dec_norms = torch.zeros(n_features, n_layers - layer, dtype=norms.dtype, device=norms.device)
    dec_norms[:, : norms.shape[1]] = norms  # a per-layer transcoder writes to its own layer only
    dec_norms_l = dec_norms.tolist()
    logits: list = []
    for lo_f in range(0, n_features, 256):
        direction = w_dec[lo_f : lo_f + 256].sum(1)  # total direct write to the residual stream
        logits += logit_effects(direction, w_u, tokens.vocab, cfg.n_logits, cfg.logits_hist_bins)
    hists = acc.hist.histograms(sl)

    def pool_lists(pool: Any) -> tuple[list, list, list, list, list, list]:
        ex = pool.ordered(sl)
        ids, toks = tokens.lists(ex["seq"], ex["start"])
        acts = ex["acts"].to(cpu).tolist() if "acts" in ex else None
        return (ex["filled"].tolist(), ex["value"].tolist(), ids, toks, acts,
                (ex["pos"] - ex["start"]).tolist())

    t_fill, t_val, t_ids, t_toks, t_acts, t_mpos = pool_lists(acc.top)
    max_act = acc.running_max[sl].to(torch.float64)  # 0 where the feature never fired
    q = acc.quant
    if q is not None:
        q_fill, q_val, q_ids, q_toks, q_acts, q_mpos = pool_lists(q)
        # Bins of the final maximum: [lo + (max - lo) j / n, ...], the last closing at max.
        lo = acc.lo[sl].to(torch.float64)
        j = torch.arange(acc.n_quantiles + 1, dtype=torch.float64, device=lo.device)
        edges_t = lo[:, None] + (max_act - lo)[:, None] * j / acc.n_quantiles
        edges_t[:, -1] = max_act
        contains = (acc.hist.counts_in(sl, edges_t) / n_tok).tolist()
        edges = edges_t.tolist()
    neg = acc.neg
    if neg is not None:
        n_fill, _, n_ids, n_toks, _, _ = pool_lists(neg)
    zeros = [0.0] * acc.window

    records = []
    for i in range(n_features):
        n_fired = int(counts[i])
        top_examples = [
            _example(t_ids[i][s], t_toks[i][s], t_acts[i][s], t_val[i][s], t_mpos[i][s])
            for s, filled in enumerate(t_fill[i]) if filled
        ]
        quantiles = []
        if q is not None and n_fired:
            e = edges[i]
            members: list[list[dict]] = [[] for _ in range(acc.n_quantiles)]
            for s, filled in enumerate(q_fill[i]):
                if filled:
                    # re-binned with these very edges, so each example lies in its [lo, hi]
                    val = q_val[i][s]
                    b = min(max(bisect.bisect_right(e, val) - 1, 0), acc.n_quantiles - 1)
                    members[b].append(
                        _example(q_ids[i][s], q_toks[i][s], q_acts[i][s], val, q_mpos[i][s]))
            for b in range(acc.n_quantiles - 1, -1, -1):  # highest interval first
                quantiles.append({
                    "name": f"Interval {b + 1}/{acc.n_quantiles}: {e[b]:.4g} - {e[b + 1]:.4g}",
                    "lo": e[b],
                    "hi": e[b + 1],
                    "contains": contains[i][b],
                    "examples": members[b],
                })
        negatives = []
        if neg is not None:
            negatives = [_example(n_ids[i][s], n_toks[i][s], list(zeros), 0.0, 0)
                         for s, filled in enumerate(n_fill[i]) if filled]
        edges_h, counts_h = hists[i]
        top_l, bot_l, lhist = logits[i]
        records.append({
            "layer": layer,
            "index": i,
            "frac_nonzero": n_fired / n_tok,
            "n_fired": n_fired,
            "max_act": top_examples[0]["max_act"] if top_examples else 0.0,
            "mean_act": sums[i] / n_fired if n_fired else 0.0,
            "hist": {"edges": edges_h, "counts": counts_h},
            "decoder_norms": dec_norms_l[i],
            "top_logits": top_l,
            "bottom_logits": bot_l,
            "logits_hist": lhist,
            "top_examples": top_examples,
            "quantile_examples": quantiles,
            "negative_examples": negatives,
        })
    return records
