"""zstd framing and byte planes: how a shard's arrays become compressed blobs and back.

A multi-byte array is regrouped by significance (all lowest bytes, then the next ...) before
zstd, so mostly-constant high bytes compress as runs. Compressors are per thread (zstd contexts
are not thread-safe).
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

from clt_lens.errors import InputError

_local = threading.local()


def _compressor(level: int, codes: bool = False) -> zstandard.ZstdCompressor:
    """A zstd compressor (one per thread, level and kind: they are not thread-safe).

    ``codes``: the data are quantisation codes, near-memoryless symbols. zstd's default match
    finder then finds short spurious matches that cost more than they save (at ~4 bits/symbol
    level 3 wrote 4.2 bits where the entropy is 3.9) and slow it down; requiring matches of 7+
    bytes leaves runs (high byte planes) to the match finder and the rest to Huffman coding.
    """
    cache = _local.__dict__.setdefault("cctx", {})
    key = (level, codes)
    if key not in cache:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, write_content_size=True, **({"min_match": 7} if codes else {}))
        cache[key] = zstandard.ZstdCompressor(compression_params=params)
    return cache[key]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "dctx"):
        _local.dctx = zstandard.ZstdDecompressor()
    return _local.dctx


def _decompress_exact(frame: memoryview, size: int) -> np.ndarray:
    """Decompress one zstd frame of exactly ``size`` bytes into a fresh writable buffer."""
    out = np.empty(size, np.uint8)
    got = 0
    with _decompressor().stream_reader(frame, read_across_frames=False) as reader:
        while got < size:
            n = reader.readinto(out[got:])
            if n == 0:
                break
            got += n
        extra = reader.read(1)
    if got != size or extra:
        raise InputError(f"decompressed to {'more than ' if extra else ''}{got} bytes where "
                         f"{size} were expected")
    return out


def to_byteplanes(arr: np.ndarray) -> np.ndarray:
    k = arr.dtype.itemsize
    return np.ascontiguousarray(arr.reshape(-1).view(np.uint8).reshape(-1, k).T)


def from_byteplanes(planes: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    k = np.dtype(dtype).itemsize
    flat = np.ascontiguousarray(planes.reshape(k, -1).T)
    return flat.view(dtype).reshape(shape)


# numpy has no bfloat16: bf16 payloads travel as uint16 bit patterns.
_NP_DTYPES = {"float32", "float16", "uint16", "int8", "uint8", "uint32", "int32", "int64"}
