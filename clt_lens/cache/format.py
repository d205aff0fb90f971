"""On-disk format of an activation cache: shard files and the manifest (codecs: ``codecs.py``).

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

import hashlib
import json
import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from torch import Tensor

from clt_lens.activations import HookSpec
from clt_lens.cache.codecs import (
    CODECS,
    DEFAULT_CODEC,
    TENSORS,
    Codec,
    Decoder,
    chunk_bounds,
    codec_from_config,
    make_codec,
    split_chunk,
    to_tensor,
)
from clt_lens.cache.errors import CacheError, CacheMismatchError
from clt_lens.cache.storage import Store, as_store, is_url
from clt_lens.errors import InputError

FORMAT_VERSION = 2
SHARD_MAGIC = b"CLTSHARD"
SHARD_SUFFIX = ".clts"
MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "clt_lens.activation_cache"
CHUNK_LAYER_BYTES = 2**20  # float32 bytes of one (tensor, layer) slice of a chunk, by default


def auto_chunk_tokens(n_layers: int, d_model: int) -> int:
    """Default tokens per chunk: a power of two with ~1 MiB per (tensor, layer) slice, 128..4096.

    Decoding works a slice at a time (the codes, the slices it is predicted from, the output):
    slices that stay in the CPU's cache decoded 1.5x faster than 4x larger ones on this
    machine; much smaller chunks pay more per-chunk overhead (a range read, Python calls per
    layer). Demo shape (d=128): 2048 tokens; d=256: 1024; d=2304: 128.
    """
    del n_layers  # the slice, not the whole chunk, is what has to stay in cache
    return int(min(4096, max(128, 2 ** math.floor(math.log2(max(1, CHUNK_LAYER_BYTES
                                                                 // (4 * d_model)))))))


__all__ = [
    "CODECS", "DEFAULT_CODEC", "FORMAT_VERSION", "MANIFEST_NAME", "SHARD_MAGIC", "SHARD_SUFFIX",
    "CacheError", "CacheManifest", "CacheMismatchError", "Codec", "ShardEntry", "ShardView",
    "auto_chunk_tokens", "codec_from_config", "config_hash", "encode_shard", "from_byteplanes",
    "make_codec", "parse_header", "parse_shard", "read_manifest", "read_shard_file",
    "sha256_hex", "to_byteplanes", "write_manifest",
]


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def config_hash(obj: Any) -> str:
    """Short stable hash of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# zstd and byte planes

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


# ----------------------------------------------------------------------------------------------
# Writing shards


class _Payload:
    """Accumulates blobs and the byte regions (with sha256) they form."""

    def __init__(self, level: int, quantised: bool) -> None:
        self.level, self.quantised = level, quantised
        self.blobs: list[dict[str, Any]] = []
        self.chunks: list[bytes] = []
        self.offset = 0
        self._region: tuple[int, Any] | None = None

    def begin(self) -> None:
        self._region = (self.offset, hashlib.sha256())

    def end(self) -> dict[str, Any]:
        assert self._region is not None
        start, h = self._region
        self._region = None
        return {"offset": start, "nbytes": self.offset - start, "sha256": h.hexdigest()}

    def add(self, name: str, arr: np.ndarray, compress: bool) -> None:
        arr = np.ascontiguousarray(arr)
        use_zstd = compress and self.level > 0
        filt = "byteplanes" if use_zstd and arr.dtype.itemsize > 1 else "none"
        raw = to_byteplanes(arr) if filt == "byteplanes" else arr
        if use_zstd:
            data = _compressor(self.level, self.quantised).compress(raw.data)
        else:
            data = raw.tobytes()
        self.blobs.append({"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape),
                           "filter": filt, "zstd": use_zstd, "offset": self.offset,
                           "nbytes": len(data)})
        self.chunks.append(data)
        if self._region is not None:
            self._region[1].update(data)
        self.offset += len(data)


def encode_shard(x: Tensor, y: Tensor, codec: Codec, info: dict[str, Any] | None = None,
                 chunk_tokens: int | None = None) -> list[bytes]:
    """Encode token-aligned ``x``, ``y`` ``[N, L, d]`` into shard file bytes (a list of parts).

    ``chunk_tokens``: tokens per independently readable chunk (default ``auto_chunk_tokens``).
    """
    if x.shape != y.shape or x.ndim != 3:
        raise CacheError(f"x and y must both be [N, L, d]; got {tuple(x.shape)}, {tuple(y.shape)}")
    if chunk_tokens is None:
        chunk_tokens = auto_chunk_tokens(x.shape[1], x.shape[2])
    if not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise CacheError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    # Encoding runs where the activations are (a GPU during generation); codes come back.
    x = x.detach().to(torch.float32)
    y = y.detach().to(x.device, torch.float32)
    n, n_layers, _ = x.shape
    enc = codec.encode_pair(x, y, chunk_tokens)
    pay = _Payload(codec.zstd_level, enc.quantised)
    pay.begin()
    for name, arr in enc.params.items():
        pay.add(name, arr, compress=False)
    params = pay.end()
    chunks = []
    for k, (lo, hi) in enumerate(chunk_bounds(n, chunk_tokens)):
        pay.begin()
        for layer in range(n_layers):
            for tname in TENSORS:
                for name, arr in split_chunk(enc, f"{tname}/{layer}", lo, hi).items():
                    pay.add(f"c{k}/{name}", arr, compress=enc.compress)
        chunks.append({"start": lo, "n_tokens": hi - lo, **pay.end()})
    header = {
        "format_version": FORMAT_VERSION,
        "n_tokens": int(n),
        "n_layers": int(n_layers),
        "d_model": int(x.shape[2]),
        "codec": codec.config(),
        "tensors": enc.meta,
        "info": info or {},
        "chunk_tokens": chunk_tokens,
        "params": params,
        "chunks": chunks,
        "blobs": pay.blobs,
    }
    hbytes = json.dumps(header, sort_keys=True).encode()
    return [SHARD_MAGIC, len(hbytes).to_bytes(8, "little"), hbytes, *pay.chunks]


def shard_header_bytes(parts: list[bytes]) -> bytes:
    """The framing + header of a shard given as ``encode_shard`` parts."""
    return b"".join(parts[:3])


# ----------------------------------------------------------------------------------------------
# Reading shards


class ShardView:
    """A parsed shard header, with the payload when the whole file was read.

    Arrays come from byte regions: ``params()`` / ``chunk(k)`` take the region's bytes (a
    range read) or slice them from the payload, check their sha256 and decode the blobs.
    """

    def __init__(self, header: dict[str, Any], payload: memoryview | None, source: str,
                 header_nbytes: int) -> None:
        self.header, self.payload, self.source = header, payload, source
        self.header_nbytes = header_nbytes  # payload offset within the file
        self.version = int(header["format_version"])
        # Parsed once: a reader decodes many chunks of a cached header.
        self._blobs: dict[str, tuple] = {}
        for b in header.get("blobs", []):
            try:
                dtype = np.dtype(b["dtype"])
                shape = tuple(int(s) for s in b["shape"])
                if str(dtype) not in _NP_DTYPES or b["filter"] not in ("none", "byteplanes"):
                    raise InputError(f"bad dtype {b['dtype']!r} or filter {b['filter']!r}")
                size = int(np.prod(shape)) * dtype.itemsize
                self._blobs[str(b["name"])] = (dtype, shape, int(b["offset"]), int(b["nbytes"]),
                                               bool(b["zstd"]), b["filter"] == "byteplanes",
                                               size)
            except (ValueError, KeyError, TypeError) as e:
                raise CacheError(f"shard {source}: blob {b.get('name')!r} is malformed ({e})"
                                 ) from None
        # blobs by region: parameters, and each chunk's under their short names ("x/0" ...)
        self._param_blobs: list[tuple[str, tuple]] = []
        self._chunk_blobs: dict[int, list[tuple[str, tuple]]] = {}
        chunked = "chunks" in header
        for name, blob in self._blobs.items():
            parts = name.split("/")
            if chunked and parts[0][:1] == "c" and parts[0][1:].isdigit():
                self._chunk_blobs.setdefault(int(parts[0][1:]), []).append(
                    (name[len(parts[0]) + 1 :], blob))
            elif not chunked and len(parts) == 2 and parts[1].isdigit():
                self._chunk_blobs.setdefault(0, []).append((name, blob))
            else:
                self._param_blobs.append((name, blob))

    @property
    def n_tokens(self) -> int:
        return int(self.header["n_tokens"])

    @property
    def shape(self) -> tuple[int, int, int]:
        h = self.header
        return int(h["n_tokens"]), int(h["n_layers"]), int(h["d_model"])

    def codec(self) -> Codec:
        try:
            return codec_from_config(self.header["codec"])
        except CacheError as e:
            raise CacheError(f"shard {self.source}: {e}") from None

    @property
    def chunked(self) -> bool:
        return "chunks" in self.header

    @property
    def n_chunks(self) -> int:
        return len(self.header["chunks"]) if self.chunked else (1 if self.n_tokens else 0)

    def chunk_info(self, k: int) -> dict[str, Any]:
        """``{start, n_tokens, offset, nbytes, sha256}`` of chunk ``k`` (format 1: the shard)."""
        if self.chunked:
            return self.header["chunks"][k]
        return {"start": 0, "n_tokens": self.n_tokens, "offset": 0,
                "nbytes": self._payload_len(), "sha256": None}

    def params_info(self) -> dict[str, Any]:
        if self.chunked:
            return self.header["params"]
        return {"offset": 0, "nbytes": self._payload_len(), "sha256": None}

    def _payload_len(self) -> int:
        return max((b[2] + b[3] for b in self._blobs.values()), default=0)

    def _region(self, info: dict[str, Any], region: Any, what: str) -> memoryview:
        if region is None:
            if self.payload is None:
                raise CacheError(f"shard {self.source}: no bytes for {what}")
            lo = int(info["offset"])
            region = self.payload[lo : lo + int(info["nbytes"])]
        mv = memoryview(region)
        if len(mv) != int(info["nbytes"]):
            raise CacheError(f"shard {self.source}: {what} is {len(mv)} bytes, the header says "
                             f"{info['nbytes']} (truncated file)")
        want = info.get("sha256")
        if want is not None and sha256_hex(mv) != want:
            raise CacheError(f"shard {self.source}: sha256 of {what} does not match its header "
                             "(corrupt file)")
        return mv

    def params(self, region: Any = None) -> dict[str, np.ndarray]:
        """The shard's parameter arrays (``x/step`` ...); ``region``: the bytes of that range."""
        info = self.params_info()
        mv = self._region(info, region, "the parameter region")
        return {name: self._array(blob, mv, int(info["offset"]))
                for name, blob in self._param_blobs}

    def chunk(self, k: int, region: Any = None) -> dict[str, np.ndarray]:
        """Chunk ``k``'s stored arrays, named ``x/0``, ``x/0/esc`` ..."""
        info = self.chunk_info(k)
        mv = self._region(info, region, f"chunk {k}")
        return {name: self._array(blob, mv, int(info["offset"]))
                for name, blob in self._chunk_blobs.get(k, [])}

    def array(self, name: str) -> np.ndarray:
        """One blob by its stored name, from a whole-file view."""
        blob = self._blobs.get(name)
        if blob is None:
            raise CacheError(f"shard {self.source}: blob {name!r} missing from its header")
        if self.payload is None:
            raise CacheError(f"shard {self.source}: header-only view")
        return self._array(blob, self.payload, 0)

    def _array(self, blob: tuple, region: memoryview, base: int) -> np.ndarray:
        dtype, shape, off, nb, zstd, planes, size = blob
        lo = off - base
        try:
            if lo < 0 or lo + nb > len(region):
                raise InputError("out-of-range offset")
            raw: Any = region[lo : lo + nb]
            if zstd:
                raw = _decompress_exact(raw, size)
            elif len(raw) != size:
                raise InputError(f"{len(raw)} bytes where {size} were expected")
            if planes:
                return from_byteplanes(np.frombuffer(raw, np.uint8), dtype, shape)
            arr = np.frombuffer(raw, dtype).reshape(shape)
            return arr if arr.flags.writeable else arr.copy()
        except (ValueError, zstandard.ZstdError) as e:
            name = next((k for k, v in self._blobs.items() if v is blob), "?")
            raise CacheError(f"shard {self.source}: blob {name!r} is corrupt ({e})") from None

    def decoder(self, device: str | torch.device = "cpu", region: Any = None) -> Decoder:
        """The codec's decoder with this shard's parameters on ``device``."""
        params = {k: to_tensor(v).to(device) for k, v in self.params(region).items()}
        return self.codec().decoder(params)

    def decode_chunk_into(self, decoder: Decoder, arrays: dict[str, np.ndarray],
                          out_x: Tensor, out_y: Tensor) -> None:
        """Decode one chunk's arrays into ``out_x``/``out_y`` (on the decoder's device)."""
        device = out_x.device
        pin = device.type == "cuda"
        tensors = {}
        for name, arr in arrays.items():
            t = to_tensor(arr)
            if device.type != "cpu":
                t = (t.pin_memory() if pin else t).to(device, non_blocking=pin)
            tensors[name] = t
        try:
            decoder.decode_chunk(tensors, out_x, out_y)
        except (KeyError, IndexError, RuntimeError) as e:  # a header that lies about its arrays
            raise CacheError(f"shard {self.source}: cannot decode ({type(e).__name__}: {e})"
                             ) from None

    def decode(self, out_x: Tensor | None = None, out_y: Tensor | None = None
               ) -> tuple[Tensor, Tensor]:
        """Float32 ``(x, y)`` ``[N, L, d]`` of a whole-file view, into ``out_x``/``out_y``."""
        n, n_layers, d = self.shape
        outs = []
        for out in (out_x, out_y):
            if out is None:
                out = torch.empty(n, n_layers, d, dtype=torch.float32)
            elif tuple(out.shape) != (n, n_layers, d):
                raise CacheError(f"shard {self.source}: output buffer has the wrong shape")
            outs.append(out)
        if n == 0:
            return outs[0], outs[1]
        decoder = self.decoder(outs[0].device)
        for k in range(self.n_chunks):
            info = self.chunk_info(k)
            lo, m = int(info["start"]), int(info["n_tokens"])
            if lo < 0 or lo + m > n:
                raise CacheError(f"shard {self.source}: chunk {k} lies outside the shard")
            self.decode_chunk_into(decoder, self.chunk(k), outs[0][lo : lo + m],
                                   outs[1][lo : lo + m])
        return outs[0], outs[1]


def parse_header(data: bytes | bytearray | memoryview, source: str) -> tuple[dict[str, Any], int]:
    """Parse a shard's framing and JSON header from the file's first bytes.

    -> (header, header_nbytes = offset of the payload in the file).
    """
    mv = memoryview(data)
    if len(mv) < 16 or bytes(mv[:8]) != SHARD_MAGIC:
        raise CacheError(f"shard {source}: not a clt_lens shard (bad magic or too short)")
    hlen = int.from_bytes(mv[8:16], "little")
    if 16 + hlen > len(mv):
        raise CacheError(f"shard {source}: truncated (header claims {hlen} bytes)")
    try:
        header = json.loads(bytes(mv[16 : 16 + hlen]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"shard {source}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CacheError(f"shard {source}: header is not a JSON object")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CacheError(
            f"shard {source}: format_version {version!r} is newer than this clt_lens reads "
            f"({FORMAT_VERSION}); upgrade clt_lens"
        )
    for key in ("n_tokens", "n_layers", "d_model", "codec", "blobs"):
        if key not in header:
            raise CacheError(f"shard {source}: header lacks {key!r}")
    return header, 16 + hlen


def parse_shard(data: bytes | bytearray | memoryview, source: str) -> ShardView:
    """Parse a whole shard file's bytes (errors name ``source``)."""
    # A writable buffer lets uncompressed blobs become tensors without a copy or a warning.
    mv = memoryview(bytearray(data) if isinstance(data, bytes) else data)
    header, hn = parse_header(mv, source)
    view = ShardView(header, mv[hn:], source, hn)
    end = view._payload_len()
    if view.chunked:
        regions = [view.params_info(), *header["chunks"]]
        end = max([end, *(int(r["offset"]) + int(r["nbytes"]) for r in regions)])
    if end != len(view.payload):
        raise CacheError(
            f"shard {source}: payload is {len(view.payload)} bytes but the header describes "
            f"{end} (truncated or padded file)"
        )
    return view


def read_shard_file(path: str | Path, *, nbytes: int | None = None,
                    sha256: str | None = None, store: Store | None = None) -> ShardView:
    """Read a whole shard, checking its size and sha256 against the manifest's values if given.

    ``path`` is a file path, or a file name within ``store``.
    """
    if store is None:
        s = str(path)
        if is_url(s):
            parent, _, name = s.rpartition("/")
        else:
            parent, name = str(Path(s).parent), Path(s).name
        store = Store(parent)
    else:
        name = str(path)
    where = store.path(name)
    try:
        data = store.read(name)
    except FileNotFoundError:
        raise CacheError(f"shard {where} is missing") from None
    if nbytes is not None and len(data) != nbytes:
        raise CacheError(
            f"shard {where}: {len(data)} bytes on disk, manifest says {nbytes} (truncated or "
            "overwritten)"
        )
    if sha256 is not None:
        got = sha256_hex(data)
        if got != sha256:
            raise CacheError(f"shard {where}: sha256 {got[:16]}... does not match the manifest's "
                             f"{sha256[:16]}... (corrupt file)")
    return parse_shard(data, where)


# ----------------------------------------------------------------------------------------------
# Manifest


@dataclass
class ShardEntry:
    file: str
    n_tokens: int
    nbytes: int
    sha256: str
    seq_start: int = 0
    seq_end: int = 0
    fvu_x: list[float] | None = None  # per-layer quantisation FVU (lossy codecs)
    fvu_y: list[float] | None = None
    # format 2: per-layer worst channel FVU and which channel; chunking; the header's checksum
    chan_fvu_x: list[float] | None = None
    chan_fvu_y: list[float] | None = None
    chan_argmax_x: list[int] | None = None
    chan_argmax_y: list[int] | None = None
    chunk_tokens: int | None = None
    header_nbytes: int | None = None
    header_sha256: str | None = None

    def chunk_sizes(self) -> list[int]:
        """Token counts of the shard's chunks (format 1: the whole shard is one chunk)."""
        if not self.chunk_tokens:
            return [self.n_tokens] if self.n_tokens else []
        return [hi - lo for lo, hi in chunk_bounds(self.n_tokens, self.chunk_tokens)]


def shard_entry(file: str, parts: list[bytes], *, seq_start: int = 0, seq_end: int = 0
                ) -> ShardEntry:
    """The manifest entry of a shard given as ``encode_shard`` parts."""
    head = shard_header_bytes(parts)
    header = json.loads(parts[2])
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    t = header["tensors"]
    return ShardEntry(
        file=file, n_tokens=int(header["n_tokens"]), nbytes=sum(len(p) for p in parts),
        sha256=h.hexdigest(), seq_start=seq_start, seq_end=seq_end,
        fvu_x=t["x"].get("fvu"), fvu_y=t["y"].get("fvu"),
        chan_fvu_x=t["x"].get("chan_fvu_max"), chan_fvu_y=t["y"].get("chan_fvu_max"),
        chan_argmax_x=t["x"].get("chan_fvu_argmax"), chan_argmax_y=t["y"].get("chan_fvu_argmax"),
        chunk_tokens=int(header["chunk_tokens"]), header_nbytes=len(head),
        header_sha256=sha256_hex(head),
    )


@dataclass
class CacheManifest:
    model_id: str
    model_name: str
    hooks: HookSpec
    n_layers: int
    d_model: int
    context_size: int
    dataset: str
    split: str
    seed: int
    codec: dict[str, Any]
    shards: list[ShardEntry]
    config_hash: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    kind: str = MANIFEST_KIND

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def error_bound(self) -> dict[str, Any] | None:
        try:
            return codec_from_config(self.codec).error_bound()
        except CacheError:
            return None

    def max_fvu(self, tensor: str) -> list[float] | None:
        """Worst per-layer quantisation FVU over the shards for ``tensor`` in {"x", "y"}."""
        rows = [getattr(s, f"fvu_{tensor}") for s in self.shards]
        if not rows or any(r is None for r in rows):
            return None
        return [max(r[i] for r in rows) for i in range(self.n_layers)]

    def max_channel_fvu(self, tensor: str) -> list[tuple[float, int]] | None:
        """Per layer: (worst channel FVU over the shards, that channel), or None (format 1).

        An upper bound of the channel's FVU over the whole cache (shard sums add up).
        """
        rows = [(getattr(s, f"chan_fvu_{tensor}"), getattr(s, f"chan_argmax_{tensor}"))
                for s in self.shards]
        if not rows or any(v is None or i is None for v, i in rows):
            return None
        out = []
        for layer in range(self.n_layers):
            v, i = max(((v[layer], i[layer]) for v, i in rows), key=lambda p: p[0])
            out.append((float(v), int(i)))
        return out

    def worst_channel(self) -> dict[str, Any] | None:
        """The worst (tensor, layer, channel) quantisation FVU in the cache, or None."""
        best = None
        for t in TENSORS:
            rows = self.max_channel_fvu(t)
            if rows is None:
                return None
            for layer, (v, c) in enumerate(rows):
                if best is None or v > best["fvu"]:
                    best = {"tensor": t, "layer": layer, "channel": c, "fvu": v}
        return best

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hooks"] = self.hooks.to_dict()
        d["hook_names"] = {
            "input": self.hooks.input_names(self.n_layers),
            "output": self.hooks.output_names(self.n_layers),
        }
        d["n_tokens"] = self.n_tokens
        d["error_bound"] = self.error_bound()
        d["quant_fvu"] = {"x": self.max_fvu("x"), "y": self.max_fvu("y")}
        chan = {t: self.max_channel_fvu(t) for t in TENSORS}
        d["channel_fvu"] = {t: None if v is None else [r[0] for r in v] for t, v in chan.items()}
        d["worst_channel"] = self.worst_channel()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> CacheManifest:
        if d.get("kind") != MANIFEST_KIND:
            raise CacheError(f"{source}: not a clt_lens activation-cache manifest")
        version = d.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CacheError(
                f"{source}: format_version {version!r} is newer than this clt_lens reads "
                f"({FORMAT_VERSION}); upgrade clt_lens"
            )
        try:
            d = dict(d)
            for derived in ("hook_names", "n_tokens", "quant_fvu", "error_bound", "channel_fvu",
                            "worst_channel"):
                d.pop(derived, None)
            d["hooks"] = HookSpec.from_dict(d["hooks"])
            d["shards"] = [ShardEntry(**s) for s in d["shards"]]
            for s in d["shards"]:
                if not isinstance(s.file, str) or Path(s.file).name != s.file or \
                        s.file.startswith(".") or "/" in s.file:
                    raise InputError(f"shard file {s.file!r} is not a plain file name")
            return cls(**d)
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{source}: malformed manifest ({type(e).__name__}: {e})") from None


def read_manifest(cache_dir: str | Path | Store) -> CacheManifest:
    store = as_store(cache_dir)
    where = store.path(MANIFEST_NAME)
    try:
        raw = store.read(MANIFEST_NAME)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        hint = ""
        if store.sizes("jobs"):
            hint = (" (generation jobs left records in jobs/: finish them, then run "
                    f"'clt-lens cache --merge {store}')")
        elif not store.is_dir():
            hint = " (the directory does not exist)"
        raise CacheError(f"cache manifest {where} is missing{hint}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"cache manifest {where} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CacheError(f"cache manifest {where} must hold a JSON object")
    return CacheManifest.from_dict(data, where)


def write_manifest(cache_dir: str | Path | Store, manifest: CacheManifest) -> None:
    as_store(cache_dir).write_json(MANIFEST_NAME, manifest.to_dict())

