"""The cache manifest (``manifest.json``): what a cache holds and every shard's checksums.

Its fields are described in ``format.py``'s docstring.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clt_lens.activations import HookSpec
from clt_lens.cache.codecs import TENSORS, chunk_bounds, codec_from_config
from clt_lens.cache.errors import CacheError
from clt_lens.cache.shard import FORMAT_VERSION, sha256_hex, shard_header_bytes
from clt_lens.cache.storage import Store, as_store
from clt_lens.errors import InputError

MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "clt_lens.activation_cache"


def config_hash(obj: Any) -> str:
    """Short stable hash of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]




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
