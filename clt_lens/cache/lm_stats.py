"""Activations with the statistics of real language models, for tests and benchmarks.

The embedded model is small and well behaved: its channels have similar spreads, its tails are
light and its BOS position looks like any other token. Real models (GPT-2, Llama, Gemma) are
not: a few residual-stream channels carry "massive activations" tens to hundreds of times the
others, values are heavy-tailed, and the BOS position (an attention sink) has an outsized norm.
A codec or a reader judged on the embedded model alone would be judged on the easy case.

``inject_lm_outliers`` gives real activations those features; ``lm_like_activations`` runs the
embedded model (or any HookedTransformer) over its dataset and injects them:

- massive channels: ``n_massive`` channel indices, the same in every layer and in x and y
  (massive activations live in fixed residual-stream dimensions), scaled by factors spread
  log-uniformly over ``massive_scale`` (default 30x to 300x);
- heavy tails: every token's vector scaled by a log-normal factor (sigma 0.5, within 1/4..4:
  token norms vary), and a fraction ``spike_rate`` of the entries of ordinary channels
  multiplied by 10x to 50x;
- BOS: positions holding BOS, when kept (``include_bos``), scaled ``bos_scale`` (10x) as a
  whole, massive channels included.

The result stays within fp16's range, as real models' activations do (their largest massive
activations are a few thousand).

All of it is drawn from ``seed``, so the data are reproducible.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from clt_lens.activations import HookSpec, collect_activations
from clt_lens.errors import InputError


def inject_lm_outliers(
    x: Tensor,
    y: Tensor,
    is_bos: Tensor | None = None,
    *,
    n_massive: int = 3,
    massive_scale: tuple[float, float] = (30.0, 300.0),
    token_sigma: float = 0.5,
    spike_rate: float = 1e-3,
    bos_scale: float = 10.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Copies of ``x``, ``y`` ``[N, L, d]`` with massive channels, heavy tails and loud BOS rows."""
    if x.shape != y.shape or x.ndim != 3:
        raise InputError(f"x and y must both be [N, L, d]; got {tuple(x.shape)}, {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    n, n_layers, d = x.shape
    x, y = x.clone(), y.clone()
    chans = torch.randperm(d, generator=g)[:n_massive]
    lo, hi = math.log(massive_scale[0]), math.log(massive_scale[1])
    steps = torch.linspace(0, 1, max(n_massive, 2))[:n_massive]
    factors = torch.exp(lo + (hi - lo) * steps)
    token = torch.exp(token_sigma * torch.randn(n, 1, 1, generator=g)).clamp(0.25, 4.0)
    bos = is_bos if is_bos is not None else torch.zeros(n, dtype=torch.bool)
    token[bos] = 1.0
    ordinary = torch.ones(d, dtype=torch.bool)
    ordinary[chans] = False
    for t in (x, y):
        t[:, :, chans] *= factors
        t *= token
        spikes = torch.rand(t.shape, generator=g) < spike_rate
        spikes &= ordinary & ~bos[:, None, None]
        t[spikes] *= 10 + 40 * torch.rand(int(spikes.sum()), generator=g)
        if bool(bos.any()):
            t[bos] *= bos_scale
    return x, y


def massive_channels(d_model: int, n_massive: int = 3, seed: int = 0) -> list[int]:
    """The channel indices ``inject_lm_outliers`` scales, for the same ``d_model`` and seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(d_model, generator=g)[:n_massive].tolist()


def lm_like_activations(
    n_tokens: int,
    *,
    model: Any = None,
    outliers: bool = True,
    include_bos: bool = False,
    hooks: HookSpec | None = None,
    dataset: str = "embedded",
    split: str = "train",
    context_size: int | None = None,
    seed: int = 0,
    **inject: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """``n_tokens`` real activations of ``model`` (default: the embedded model) on ``dataset``.

    -> ``(x, y, is_bos)``, with ``inject_lm_outliers`` applied when ``outliers`` (its keyword
    arguments pass through). ``include_bos`` keeps the BOS positions, as a cache generated
    with ``exclude_bos: false`` would.
    """
    from clt_lens.data import iter_token_batches

    if model is None:
        from clt_lens.models import load_model

        model = load_model("embedded")
    hooks = hooks or HookSpec()
    ctx = context_size or int(model.cfg.n_ctx)
    per_seq = ctx if include_bos else ctx - 1
    n_seq = math.ceil(n_tokens / per_seq)
    batches = iter_token_batches(dataset, tokenizer=model.tokenizer, context_size=ctx,
                                 batch_size=min(64, n_seq), split=split, seed=seed,
                                 max_tokens=n_seq * ctx)
    toks = torch.cat(list(batches))[:n_seq]
    if toks.shape[0] < n_seq:
        raise InputError(f"dataset {dataset!r} has only {toks.shape[0]} sequences of {ctx} "
                         f"tokens; {n_seq} needed for {n_tokens} tokens")
    xs, ys = [], []
    with torch.no_grad():
        for chunk in toks.split(32):
            x, y = collect_activations(model, chunk, hooks, exclude_bos=not include_bos)
            xs.append(x)
            ys.append(y)
    x, y = torch.cat(xs)[:n_tokens], torch.cat(ys)[:n_tokens]
    bos_id = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    is_bos = torch.zeros(toks.shape, dtype=torch.bool)
    if include_bos and bos_id is not None:
        is_bos[:, 0] = toks[:, 0] == bos_id
    is_bos = is_bos.reshape(-1)[:n_tokens] if include_bos else \
        torch.zeros(n_tokens, dtype=torch.bool)
    if outliers:
        x, y = inject_lm_outliers(x, y, is_bos, seed=seed, **inject)
    return x, y, is_bos


def reshape_activations(x: Tensor, n_layers: int, d_model: int) -> Tensor:
    """Real activations ``[N, L, d]`` laid out as ``[N', n_layers, d_model]`` (benchmarks at
    shapes the embedded model lacks): layer l of the result takes layer ``l % L``; its channels
    are those of ``d_model // d`` consecutive tokens side by side (``d_model`` a multiple of d).
    Per-channel statistics stay real; cross-layer correlation holds within each run of L."""
    n, layers, d = x.shape
    if d_model % d:
        raise InputError(f"d_model {d_model} must be a multiple of {d}")
    k = d_model // d
    m = n // k
    src = x[: m * k].reshape(m, k, layers, d)
    idx = torch.arange(n_layers) % layers
    return src[:, :, idx, :].permute(0, 2, 1, 3).reshape(m, n_layers, d_model).contiguous()
