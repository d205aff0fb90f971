"""On-disk format of an activation cache, and its public names in one import.

The code lives in ``shard.py`` (shard files), ``manifest.py`` (the manifest), ``byteplanes.py``
(zstd and byte planes) and ``codecs.py`` (how activations become codes); this module
describes the layout they write and re-exports their public names.

A cache is a directory (local, or any fsspec URL: see ``storage.py``)::

    manifest.json            written last, atomically, by the merge step
    shard-00000.clts ...     self-contained shards, one per fixed range of token sequences
    cache_config.json        the generation config (lets jobs check they agree, and resume)
    jobs/job-0-of-1.json     per-job progress records (shards finished, with checksums)

**Shard file** (``.clts``), format version 2::

    8 bytes   magic b"CLTSHARD"
    8 bytes   little-endian uint64 H = length of the header
    H bytes   UTF-8 JSON header
    ...       payload: the parameter region, then one region per token chunk

The header holds ``format_version``, ``n_tokens``, ``n_layers``, ``d_model``, the ``codec``
(name and parameters), per-tensor codec metadata (``tensors.x`` / ``tensors.y``: the measured
quantisation FVU of every layer and of every layer's worst channel), provenance (``info``),
``chunk_tokens``, ``params`` and ``chunks`` (the byte range and sha256 of the parameter region
and of each chunk's region; a chunk also gives its first token and token count) and ``blobs``:
``{name, dtype, shape, filter, zstd, offset, nbytes}`` for every stored array. A blob is a numpy
array in C order; ``filter="byteplanes"`` means its bytes were regrouped by significance (all
lowest bytes, then the next ...) before compression, so zstd sees mostly-constant high bytes
as runs; ``zstd`` says whether the blob is one zstd frame. Offsets count from the payload
start. Parameters (``x/step``, ``y/scales`` ...) are shared by the shard; codes are stored per
chunk, tensor and layer (``c{k}/x/{layer}``, and ``c{k}/x/{layer}/esc`` for escapes), so a
reader can fetch and decode one chunk of ``chunk_tokens`` tokens (a range read) without the
rest of the shard, and checks that chunk's sha256. The manifest holds the sha256 of the header
(and of the whole file), so every byte a reader uses is verified.

Format version 1 (written before chunks existed) has no ``params``/``chunks``; its blobs are
``x/{layer}`` (zigzag codes) and ``x/step`` ...: it reads as a single chunk whose integrity
comes from the whole file's sha256.

**Manifest** (``manifest.json``): ``format_version``, ``kind``, model id and name, cache config
hash, hook spec and full hook names, ``n_layers``, ``d_model``, ``context_size``, dataset, split,
seed, codec, ``error_bound`` (what the codec guarantees), total tokens, the worst per-layer and
per-channel quantisation FVU over the shards, and ``shards``: one entry per shard with file
name, token count, byte size, sha256, header size and sha256, chunk size and sequence range.
"""

from __future__ import annotations

from clt_lens.cache.byteplanes import from_byteplanes, to_byteplanes
from clt_lens.cache.codecs import CODECS, DEFAULT_CODEC, Codec, codec_from_config, make_codec
from clt_lens.cache.errors import CacheError, CacheMismatchError
from clt_lens.cache.manifest import (
    MANIFEST_KIND,
    MANIFEST_NAME,
    CacheManifest,
    ShardEntry,
    config_hash,
    read_manifest,
    shard_entry,
    write_manifest,
)
from clt_lens.cache.shard import (
    CHUNK_LAYER_BYTES,
    FORMAT_VERSION,
    SHARD_MAGIC,
    SHARD_SUFFIX,
    ShardView,
    auto_chunk_tokens,
    encode_shard,
    parse_header,
    parse_shard,
    read_shard_file,
    sha256_hex,
    shard_header_bytes,
)

__all__ = [
    "CHUNK_LAYER_BYTES", "CODECS", "DEFAULT_CODEC", "FORMAT_VERSION", "MANIFEST_KIND",
    "MANIFEST_NAME", "SHARD_MAGIC", "SHARD_SUFFIX", "CacheError", "CacheManifest",
    "CacheMismatchError", "Codec", "ShardEntry", "ShardView", "auto_chunk_tokens",
    "codec_from_config", "config_hash", "encode_shard", "from_byteplanes", "make_codec",
    "parse_header", "parse_shard", "read_manifest", "read_shard_file", "sha256_hex",
    "shard_entry", "shard_header_bytes", "to_byteplanes", "write_manifest",
]
