"""Shard files (``.clts``): encode activations into one, parse and decode one.

The byte layout is described in ``format.py``'s docstring. A shard holds a parameter region
and one region per token chunk, each with its own sha256, so a reader can range-read and
verify one chunk at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from torch import Tensor

from clt_lens.cache.byteplanes import (
    _NP_DTYPES,
    _compressor,
    _decompress_exact,
    from_byteplanes,
    to_byteplanes,
)
from clt_lens.cache.codecs import (
    TENSORS,
    Codec,
    Decoder,
    chunk_bounds,
    codec_from_config,
    split_chunk,
    to_tensor,
)
from clt_lens.cache.errors import CacheError
from clt_lens.cache.storage import Store, is_url
from clt_lens.errors import InputError

FORMAT_VERSION = 2
SHARD_MAGIC = b"CLTSHARD"
SHARD_SUFFIX = ".clts"
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


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()



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
