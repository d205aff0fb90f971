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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from clt_lens.activations import collect_activations
from clt_lens.clt.loading import (
    check_compatible,
    load_clt,
    model_for,
    resolve_checkpoint_dir,
    training_dataset,
)
from clt_lens.clt.model import CrossLayerTranscoder
from clt_lens.config import ConfigError, config_to_dict
from clt_lens.data import load_tokens
from clt_lens.errors import InputError
from clt_lens.features.accumulator import FeatureAccumulator, preactivation_fn
from clt_lens.features.config import FeaturesConfig
from clt_lens.features.format import FORMAT_VERSION, MANIFEST_FILE, layer_file_name
from clt_lens.features.records import ExampleTokens, dumps_lines, layer_records
from clt_lens.fsutil import atomic_write_text
from clt_lens.models import model_id
from clt_lens.source_config import SOURCE_FIELDS, CheckpointSourceConfig, flatten

# Floats of one stats chunk ([sequences, positions, features]); bounds memory for wide CLTs.
CHUNK_ELEMENTS = 1 << 24
OUT_OF_RANGE_TOKEN = "<|outofrange|>"

# FeaturesConfig and FeatureAccumulator live in config.py and accumulator.py; importing them from
# here keeps working.
__all__ = ["CHUNK_ELEMENTS", "FeatureAccumulator", "FeaturesConfig", "OUT_OF_RANGE_TOKEN",
           "compute_feature_stats", "preactivation_fn", "run_features", "vocab_strings"]


# ----------------------------------------------------------------------------------------------
# Inputs


def _is_clt(obj: Any) -> bool:
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
# Entry point


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
    dataset: str | None = None,
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
    "embedded"). ``dataset``: None = the CLT's training dataset if its run's
    ``train_config.json`` is found, else "embedded". ``tokens`` [n_seq, ctx] (BOS first)
    replaces ``dataset``/``split``. ``options``: any other ``FeaturesConfig`` field (window,
    n_negative, ...) or ``source`` field (context_size, input_hook, output_hook).
    """
    known = {f.name for f in dataclasses.fields(FeaturesConfig)} - {"source"}
    unknown = sorted(set(options) - known - set(SOURCE_FIELDS))
    if unknown:
        raise ConfigError(f"compute_feature_stats: unknown option(s) {unknown}")
    source = CheckpointSourceConfig(
        model=model if isinstance(model, str) or model is None else None, dataset=dataset,
        split=split, **{k: options.pop(k) for k in SOURCE_FIELDS if k in options},
    )
    cfg = FeaturesConfig(
        checkpoint="" if not isinstance(clt_or_checkpoint, str | Path) else str(clt_or_checkpoint),
        source=source, n_tokens=n_tokens, batch_size=batch_size, top_k=top_k,
        n_quantiles=n_quantiles, layers=layers, device=device, out_dir=str(out_dir), **options,
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
    if cfg.out_dir is None:
        raise ConfigError("features config: out_dir (the output directory) is required")
    out_dir = Path(cfg.out_dir).expanduser()

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
    src = cfg.source
    hooks = src.trained_hooks(clt.cfg.input_hook, clt.cfg.output_hook)  # before the model loads
    dataset = src.dataset or training_dataset(checkpoint) or "embedded"
    model, model_name = model_for(clt, model if model is not None else src.model, cfg.device)
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
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise InputError("the model has no tokenizer: feature contexts need token strings")
    bos = tokenizer.bos_token_id

    ctx = src.context_size or getattr(clt.cfg.metadata, "context_size", None) or model.cfg.n_ctx
    if tokens is None:
        n_seq = math.ceil(cfg.n_tokens / (ctx - 1)) + 1
        tokens = load_tokens(
            dataset, tokenizer=tokenizer, context_size=ctx, split=src.split,
            max_tokens=n_seq * ctx, seed=cfg.seed, shuffle=True, text_column=cfg.text_column,
        )
        dataset_name = dataset
    else:
        dataset_name = src.dataset or "tokens"
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
        "split": src.split,
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
        "config": flatten(config_to_dict(cfg)),  # flat, as before the source section
    }
    atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return out_dir
