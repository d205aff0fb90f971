"""Feature statistics of a CLT in one streaming pass over held-out tokens.

``compute_feature_stats`` runs the model once over N held-out tokens, encodes the CLT's input
activations and, for every feature of every (chosen) source layer, gathers firing frequency,
mean and maximum activation, a histogram of nonzero activations, the top-k contexts, contexts
sampled in activation-quantile bins and contexts where the feature never fires. Per-feature
memory is fixed (``heaps.py``); nothing of size [N, L*F] is ever stored. Decoder norms per
target layer and direct logit effects come from the weights. The result is a features
directory (``format.py``).

Examples are per *sequence*: a sequence offers each feature its maximum activation (and a
window around it), so the top-k contexts are k different sequences and a quantile bin holds
sequences whose maximum lies in the bin. Bins split ``[lo, max_act]`` into ``n_quantiles``
equal intervals, with ``lo`` the feature's JumpReLU threshold (0 without one): since the
maximum is only known at the end, each bin is a reservoir sample under the bins of the
running maximum, and examples are re-binned when it grows. The per-batch work is vectorised
over all features: the activation tensor is never built (the firing mask ``pre > theta`` comes
straight from the CLT's pre-activations), one sparse extraction of the firing entries feeds
counts, sums, histograms and per-sequence maxima, and the pools merge [features, candidates]
rows with a sort.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from clt_lens.clt.activations import get_activation
from clt_lens.clt.loading import check_compatible, load_clt, resolve_checkpoint_dir
from clt_lens.config import ConfigError, config_to_dict
from clt_lens.errors import InputError
from clt_lens.features.format import (
    DEFAULT_SOURCESET,
    FORMAT_VERSION,
    MANIFEST_FILE,
    layer_file_name,
)
from clt_lens.features.heaps import DoublingHistogram, ExamplePool
from clt_lens.fsutil import atomic_write_text

# Floats of one stats chunk ([sequences, positions, features]); bounds memory for wide CLTs.
CHUNK_ELEMENTS = 1 << 24
OUT_OF_RANGE_TOKEN = "<|outofrange|>"


@dataclass
class FeaturesConfig:
    """Settings of ``clt-lens features`` (every field is also a ``--key value`` override)."""

    checkpoint: str = ""
    # load_model name or folder; None = the checkpoint's metadata.model_name, else "embedded"
    model: str | None = None
    dataset: str = "embedded"
    split: str = "heldout"
    n_tokens: int = 100_000
    batch_size: int = 32  # sequences per forward pass
    context_size: int | None = None  # None: the checkpoint's, else the model's n_ctx
    top_k: int = 20
    n_quantiles: int = 5
    examples_per_quantile: int = 5
    n_negative: int = 10
    window: int = 32  # tokens per example context
    hist_bins: int = 64  # power of two; the written histogram keeps 1/2..1 of them
    n_logits: int = 10
    logits_hist_bins: int = 40
    layers: list[int] | None = None  # source layers to describe; None = all
    sourceset: str = DEFAULT_SOURCESET
    text_column: str = "text"
    seed: int = 0
    device: str | None = None  # None: the model's device
    out: str | None = None
    dashboard: list[str] = field(default_factory=list)  # "LAYER:F1,F2" -> dashboard HTML
    dashboard_sequences: int = 64
    neuronpedia: bool = False

    def validate(self) -> None:
        for name in ("n_tokens", "batch_size", "top_k", "window", "n_logits", "logits_hist_bins",
                     "examples_per_quantile", "dashboard_sequences"):
            if getattr(self, name) < 1:
                raise ConfigError(f"features config: {name} must be >= 1, got "
                                  f"{getattr(self, name)}")
        for name in ("n_quantiles", "n_negative"):
            if getattr(self, name) < 0:
                raise ConfigError(f"features config: {name} must be >= 0, got "
                                  f"{getattr(self, name)}")
        if self.hist_bins < 2 or self.hist_bins & (self.hist_bins - 1):
            raise ConfigError(f"features config: hist_bins must be a power of two >= 2, got "
                              f"{self.hist_bins}")
        if self.context_size is not None and self.context_size < 2:
            raise ConfigError(f"features config: context_size must be >= 2, got "
                              f"{self.context_size}")
        if not self.sourceset or "/" in self.sourceset:
            raise ConfigError(f"features config: sourceset {self.sourceset!r} must be a non-empty "
                              "name without '/'")


# ----------------------------------------------------------------------------------------------
# Inputs


def _is_clt(obj: Any) -> bool:
    from clt_lens.clt.model import CrossLayerTranscoder

    return isinstance(obj, CrossLayerTranscoder)


def _check_layers(layers: list[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    out = sorted(set(int(x) for x in layers))
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad or not out:
        raise InputError(f"layers {layers}: source layers must be in [0, {n_layers - 1}]")
    return out


def vocab_strings(tokenizer: Any, d_vocab: int) -> list[str]:
    """Readable string of each token id (decoded one at a time)."""
    n = min(len(tokenizer), d_vocab) if tokenizer is not None else 0
    strings = tokenizer.batch_decode([[i] for i in range(n)]) if n else []
    return strings + [OUT_OF_RANGE_TOKEN] * (d_vocab - n)


# ----------------------------------------------------------------------------------------------
# The streaming accumulator


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


# ----------------------------------------------------------------------------------------------
# Entry point


def _resolve_model(model: Any, clt: Any, device: str | None) -> tuple[Any, str]:
    if model is None:
        model = getattr(clt.cfg.metadata, "model_name", None) or "embedded"
    if isinstance(model, str | Path):
        from clt_lens.models import load_model

        name = str(model)
        return load_model(name, device=device or "cpu"), name
    name = getattr(clt.cfg.metadata, "model_name", None) or getattr(
        model.cfg, "model_name", "unknown"
    )
    return model, str(name)


def _tokenizer_path(model: Any, out_dir: Path) -> str:
    tok = model.tokenizer
    if tok is None:
        raise InputError("the model has no tokenizer: feature contexts need token strings")
    name = getattr(tok, "name_or_path", "") or ""
    if name and Path(name).is_dir():
        return str(Path(name).resolve())
    target = out_dir / "tokenizer"
    tok.save_pretrained(str(target))
    return str(target.resolve())


def compute_feature_stats(
    clt_or_checkpoint: Any,
    *,
    model: Any = None,
    dataset: str = "embedded",
    split: str = "heldout",
    n_tokens: int = 100_000,
    batch_size: int = 32,
    top_k: int = 20,
    n_quantiles: int = 5,
    out_dir: str | Path,
    device: str | None = None,
    tokens: Tensor | None = None,
    layers: list[int] | None = None,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Write the features directory of a CLT (see ``clt_lens.features.format``); returns it.

    ``clt_or_checkpoint``: a CrossLayerTranscoder or its SAELens folder. ``model``: a
    HookedTransformer, a ``load_model`` name, or None (the checkpoint's ``model_name``, else
    "embedded"). ``tokens`` [n_seq, ctx] (BOS first) replaces ``dataset``/``split``.
    ``options``: any other ``FeaturesConfig`` field (window, n_negative, ...).
    """
    known = {f.name for f in dataclasses.fields(FeaturesConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"compute_feature_stats: unknown option(s) {unknown}")
    cfg = FeaturesConfig(
        checkpoint="" if not isinstance(clt_or_checkpoint, str | Path) else str(clt_or_checkpoint),
        model=model if isinstance(model, str) or model is None else None,
        dataset=dataset, split=split, n_tokens=n_tokens, batch_size=batch_size, top_k=top_k,
        n_quantiles=n_quantiles, layers=layers, device=device, out=str(out_dir), **options,
    )
    cfg.validate()
    return run_features(cfg, clt=clt_or_checkpoint, model=model, tokens=tokens, progress=progress)


@torch.no_grad()
def run_features(
    cfg: FeaturesConfig,
    *,
    clt: Any = None,
    model: Any = None,
    tokens: Tensor | None = None,
    progress: bool = True,
) -> Path:
    """``compute_feature_stats`` from a ``FeaturesConfig`` (the CLI's entry point)."""
    from clt_lens.activations import HookSpec, collect_activations

    if cfg.out is None:
        raise ConfigError("features config: out (the output directory) is required")
    out_dir = Path(cfg.out).expanduser()

    # --- resolve and check every input before any heavy work --------------------------------
    checkpoint: Path | None = None
    if clt is None or isinstance(clt, str | Path):
        if not str(clt or cfg.checkpoint):
            raise ConfigError("features config: checkpoint is required")
        checkpoint = resolve_checkpoint_dir(clt or cfg.checkpoint)
        clt = load_clt(checkpoint, device="cpu")
    elif not _is_clt(clt):
        raise InputError(
            f"expected a CrossLayerTranscoder or a checkpoint folder, got {type(clt).__name__}"
        )
    layers = _check_layers(cfg.layers, clt.cfg.n_layers)
    model, model_name = _resolve_model(model if model is not None else cfg.model, clt, cfg.device)
    device = next(model.parameters()).device
    if cfg.device:
        want = torch.device(cfg.device)
        if want.type != device.type or want.index not in (None, device.index):
            raise InputError(f"the model is on {device} but device={want} was asked for")
    if checkpoint is not None:
        clt = clt.to(device)
    elif clt.W_enc.device != device:
        raise InputError(f"the CLT is on {clt.W_enc.device} but the model is on {device}")
    clt.eval()
    check_compatible(clt, model)
    n_layers, n_feat = clt.cfg.n_layers, clt.cfg.d_sae
    hooks = HookSpec(clt.cfg.input_hook, clt.cfg.output_hook)
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise InputError("the model has no tokenizer: feature contexts need token strings")
    bos = tokenizer.bos_token_id

    ctx = cfg.context_size or getattr(clt.cfg.metadata, "context_size", None) or model.cfg.n_ctx
    if tokens is None:
        from clt_lens.data import load_tokens

        n_seq = math.ceil(cfg.n_tokens / (ctx - 1)) + 1
        tokens = load_tokens(
            cfg.dataset, tokenizer=tokenizer, context_size=ctx, split=cfg.split,
            max_tokens=n_seq * ctx, seed=cfg.seed, shuffle=True, text_column=cfg.text_column,
        )
        dataset_name = cfg.dataset
    else:
        dataset_name = cfg.dataset if cfg.dataset != "embedded" else "tokens"
    if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise InputError(f"tokens must be an integer tensor [n_seq, ctx], got "
                         f"{tuple(tokens.shape)} {tokens.dtype}")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise InputError(f"sequences of {tokens.shape[1]} tokens exceed the model's "
                         f"n_ctx={model.cfg.n_ctx}")
    tokens = tokens.to(torch.long).cpu()
    offset = 1 if bos is not None and bool((tokens[:, 0] == bos).all()) else 0
    seq_len = tokens.shape[1] - offset
    if seq_len < 1:
        raise InputError("sequences hold no token besides BOS")
    n_seq = min(tokens.shape[0], math.ceil(cfg.n_tokens / seq_len))
    tokens = tokens[:n_seq]
    if int(tokens.max()) >= model.cfg.d_vocab:
        raise InputError(f"token id {int(tokens.max())} >= the model's d_vocab={model.cfg.d_vocab}")
    out_dir.mkdir(parents=True, exist_ok=True)

    # --- the pass ----------------------------------------------------------------------------
    folded = clt.folded_weights()
    encode, theta_sel = preactivation_fn(clt, layers)
    n_g = len(layers) * n_feat
    acc = FeatureAccumulator(
        n_g, seq_len, theta_sel.reshape(-1).float(), top_k=cfg.top_k,
        n_quantiles=cfg.n_quantiles, examples_per_quantile=cfg.examples_per_quantile,
        n_negative=cfg.n_negative, window=cfg.window, hist_bins=cfg.hist_bins, seed=cfg.seed,
        device=device,
    )
    chunk = max(1, CHUNK_ELEMENTS // (seq_len * n_g))
    t0 = time.perf_counter()
    bar = tqdm(total=n_seq * seq_len, unit="tok", desc="feature stats", disable=not progress)
    for lo_s in range(0, n_seq, cfg.batch_size):
        toks = tokens[lo_s : lo_s + cfg.batch_size].to(device)
        b = toks.shape[0]
        x, _ = collect_activations(model, toks, hooks, exclude_bos=offset == 1, bos_token_id=bos)
        if x.shape[0] != b * seq_len:
            raise InputError("every sequence must start with BOS, or none (got a mix)")
        for c in range(0, b, chunk):
            xc = x[c * seq_len : (c + chunk) * seq_len]
            pre = encode(xc)
            acc.update(pre.view(len(layers), -1, seq_len, n_feat), theta_sel, lo_s + c)
        bar.update(b * seq_len)
    bar.close()
    pass_seconds = time.perf_counter() - t0

    # --- write -------------------------------------------------------------------------------
    from clt_lens.features.records import ExampleTokens, dumps_lines, layer_records

    vocab = vocab_strings(tokenizer, model.cfg.d_vocab)
    example_tokens = ExampleTokens(tokens[:, offset:], vocab, acc.window)
    w_u = model.W_U.detach()
    for block, layer in enumerate(layers):
        records = layer_records(acc, block, layer, n_layers, folded["W_dec"][layer], w_u,
                                example_tokens, cfg)
        atomic_write_text(out_dir / layer_file_name(layer), dumps_lines(records))
    write_seconds = time.perf_counter() - t0 - pass_seconds

    if checkpoint is None:
        # The manifest must name a checkpoint folder: save the in-memory CLT beside the stats.
        checkpoint = (out_dir / "checkpoint").resolve()
        clt.save_model(checkpoint)
    from clt_lens.models import model_id

    manifest = {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "model_id": model_id(model),
        "checkpoint": str(checkpoint),
        "n_layers": n_layers,
        "d_sae": n_feat,
        "n_tokens": acc.n_tokens,
        "context_size": int(tokens.shape[1]),
        "input_hook": clt.cfg.input_hook,
        "output_hook": clt.cfg.output_hook,
        "dataset": dataset_name,
        "split": cfg.split,
        "top_k": cfg.top_k,
        "n_quantiles": cfg.n_quantiles,
        "sourceset": cfg.sourceset,
        "tokenizer": _tokenizer_path(model, out_dir),
        "layers": layers,
        "n_sequences": n_seq,
        "window": acc.window,
        "examples_per_quantile": cfg.examples_per_quantile,
        "n_negative": cfg.n_negative,
        "activation": clt.cfg.activation,
        "timing": {
            "pass_seconds": round(pass_seconds, 3),
            "tokens_per_second": round(acc.n_tokens / max(pass_seconds, 1e-9), 1),
            "write_seconds": round(write_seconds, 3),
        },
        "config": config_to_dict(cfg),
    }
    atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return out_dir
