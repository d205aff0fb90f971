"""Compressed, sharded activation caches: generate (model -> shards), merge, read, inspect.

- ``codecs``: how activations become codes and back, the codec registry; ``codec_base``
  (the interfaces every codec shares), ``errbound`` (the error-bounded default codec).
- ``format``: the shard file layout and the manifest (described in its docstring; it re-exports
  ``shard`` (encode, parse, decode a shard file), ``manifest`` (``manifest.json``) and
  ``byteplanes`` (zstd and byte planes)).
- ``storage``: local directories and fsspec URLs (``s3://``, ``gs://``, ``memory://`` ...).
- ``generate``: ``CacheConfig`` and ``generate_cache`` (one job of a possibly split run).
- ``writer``: atomic shard writes, per-job progress records, ``merge_cache``, ``write_cache``.
- ``reader``: ``CacheReader`` (shuffle, rank partitions, threaded and on-device decoding,
  prefetch, exact resume); ``order`` (its token order), ``prefetch`` (its background thread).
- ``lm_stats``: activations with the statistics of real language models (massive channels,
  heavy tails, BOS), for tests and benchmarks.
"""

from __future__ import annotations

from pathlib import Path

from clt_lens.cache.codecs import CODECS, DEFAULT_CODEC, make_codec
from clt_lens.cache.errors import CacheError, CacheMismatchError
from clt_lens.cache.generate import CacheConfig, generate_cache
from clt_lens.cache.manifest import CacheManifest, read_manifest
from clt_lens.cache.reader import CacheReader, check_expected
from clt_lens.cache.shard import FORMAT_VERSION
from clt_lens.cache.storage import Store
from clt_lens.cache.writer import merge_cache, write_cache


def inspect(path: str | Path) -> str:
    """A human-readable summary of the cache at ``path`` (manifest only; shards not read)."""
    store = Store(path)
    m = read_manifest(store)
    n, L, d = m.n_tokens, m.n_layers, m.d_model
    fp32 = n * L * d * 4 * 2
    per_tok = m.nbytes / max(n, 1)
    chunks = sorted({s.chunk_tokens for s in m.shards if s.chunk_tokens})
    lines = [
        f"cache       {store}",
        f"model       {m.model_id}  ({m.model_name})",
        f"hooks       in: blocks.*.{m.hooks.input_hook}   out: blocks.*.{m.hooks.output_hook}",
        f"shape       L={L} layers, d={d}, context {m.context_size}",
        f"data        {m.dataset} [{m.split}], seed {m.seed}",
        f"tokens      {n:,} in {len(m.shards)} shards"
        + (f" (chunks of {chunks[0]:,} tokens)" if len(chunks) == 1 else ""),
        f"codec       {m.codec}",
        f"size        {m.nbytes / 2**20:,.1f} MiB = {per_tok:,.1f} B/token (x and y); "
        f"{fp32 / max(m.nbytes, 1):.2f}x smaller than fp32, "
        f"{fp32 / 2 / max(m.nbytes, 1):.2f}x than fp16",
    ]
    bound = m.error_bound()
    if bound is not None:
        lines.append(f"bound       {bound['quantity']} <= {bound['max']:g} (every shard, x and y)")
    for t in ("x", "y"):
        fvu = m.max_fvu(t)
        if fvu is not None:
            lines.append(f"layer FVU {t} " + " ".join(f"{v:.2e}" for v in fvu)
                         + "  (worst shard, per layer)")
    for t in ("x", "y"):
        chan = m.max_channel_fvu(t)
        if chan is not None:
            lines.append(f"chan. FVU {t} " + " ".join(f"{v:.2e}" for v, _ in chan)
                         + "  (worst channel of each layer)")
    worst = m.worst_channel()
    if worst is not None:
        lines.append(f"worst       channel {worst['channel']} of {worst['tensor']} layer "
                     f"{worst['layer']}: FVU {worst['fvu']:.3e}")
    elif m.max_fvu("x") is not None:
        lines.append("worst       per-channel errors not recorded (format-1 cache)")
    lines.append(f"format      version {m.format_version}, config hash {m.config_hash}")
    return "\n".join(lines)


__all__ = [
    "CODECS", "DEFAULT_CODEC", "FORMAT_VERSION", "CacheConfig", "CacheError", "CacheManifest",
    "CacheMismatchError", "CacheReader", "Store", "check_expected", "generate_cache", "inspect",
    "make_codec", "merge_cache", "read_manifest", "write_cache",
]
