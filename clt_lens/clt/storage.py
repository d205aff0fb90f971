"""CLT tensors on disk: one SAELens file, or feature shards read a slice at a time.

A one-process checkpoint keeps every tensor in one file (``sae_weights.safetensors``, what
``SAE.load_from_disk`` reads). A feature-sharded run writes one file per feature slice
(``sae_weights.f{k:03d}-of-{K:03d}.safetensors``: shard k holds features ``[k F/K, (k+1) F/K)``
of every tensor with a feature axis, and shard 0 also holds the replicated tensors) plus
``shards.json``, the index: the full shape and feature axis of every tensor. Optimizer state
follows the same scheme under the stem ``optimizer``.

:class:`TensorReader` reads either layout by tensor name, whole or as a feature slice, reading
only the bytes asked for (``pread`` into buffers it owns: no mapping of the files).
:func:`write_safetensors_streaming` writes a safetensors file tensor by tensor (or chunk by
chunk), so consolidating a sharded checkpoint never holds more than one chunk in memory.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens.loading.pretrained_sae_loaders import get_sae_lens_config_from_disk
from torch import Tensor

from clt_lens.config import ConfigError
from clt_lens.errors import InputError
from clt_lens.fsutil import atomic_open, atomic_write_text

WEIGHTS_STEM = "sae_weights"
OPTIMIZER_STEM = "optimizer"
SHARD_INDEX = "shards.json"
SHARD_FORMAT = "clt-lens-feature-shards"

# Parameters and buffers split along the feature axis, with that axis; the rest is replicated.
_FEATURE_DIMS = {"W_enc": 2, "b_enc": 1, "log_threshold": 1, "since_fired": 1}
_DEC = re.compile(r"^W_dec\.(\d+)$")


class ShardError(ConfigError):
    """A sharded checkpoint is incomplete, inconsistent or cannot be split as asked."""


def feature_dim(name: str) -> int | None:
    """Feature axis of a CLT tensor (``W_dec.3``, ``W_enc.exp_avg``...), None if replicated."""
    base = name
    for suffix in (".exp_avg_sq", ".exp_avg"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    if base in _FEATURE_DIMS:
        return _FEATURE_DIMS[base]
    if _DEC.match(base):
        return 0
    return None


def file_name(stem: str, shard: int, n_shards: int) -> str:
    if n_shards == 1:
        return f"{stem}.safetensors"
    return f"{stem}.f{shard:03d}-of-{n_shards:03d}.safetensors"


def feature_slice(n_features: int, shard: int, n_shards: int) -> slice:
    """Features of shard ``shard`` of ``n_shards`` (``n_features`` must divide evenly)."""
    if n_features % n_shards:
        raise ShardError(
            f"{n_features} features per layer do not split evenly over {n_shards} feature "
            f"shards; choose d_sae as a multiple of {n_shards}"
        )
    per = n_features // n_shards
    return slice(shard * per, (shard + 1) * per)


def is_sharded(ckpt: str | Path) -> bool:
    return (Path(ckpt) / SHARD_INDEX).is_file()


# ---- writing -------------------------------------------------------------------------------
_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}


@dataclass
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors_streaming(
    path: str | Path,
    specs: list[TensorSpec],
    chunks: Callable[[TensorSpec], Iterable[Tensor]],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a safetensors file whose tensors come as row-major chunks, one chunk in memory.

    ``chunks(spec)`` yields tensors whose bytes, concatenated, are the tensor ``spec`` in
    row-major order (e.g. ``W_enc[l]`` for each l). The file is written to a temporary sibling,
    fsynced and renamed, so a reader never sees a partial file.
    """
    path = Path(path)
    header: dict[str, Any] = {}
    offset = 0
    for spec in specs:
        if spec.dtype not in _DTYPES:
            raise InputError(f"{spec.name}: dtype {spec.dtype} cannot be written")
        header[spec.name] = {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}  # fmt: skip
        offset += spec.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for spec in specs:
            written = 0
            for chunk in chunks(spec):
                if chunk.dtype != spec.dtype:
                    raise InputError(f"{spec.name}: chunk dtype {chunk.dtype} != {spec.dtype}")
                data = chunk.detach().to("cpu").contiguous()
                if data.dtype == torch.bfloat16:  # numpy has no bf16: write its bit pattern
                    data = data.view(torch.int16)
                f.write(memoryview(data.numpy()).cast("B"))
                written += data.numel() * data.element_size()
            if written != spec.nbytes:
                raise InputError(f"{spec.name}: wrote {written} bytes, expected {spec.nbytes}")
    return path


def save_tensors(path: str | Path, tensors: dict[str, Tensor]) -> Path:
    """Write ``tensors`` (any device) to a safetensors file, one tensor in host memory at a time."""
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    return write_safetensors_streaming(path, specs, lambda s: [tensors[s.name]])


# ---- reading -------------------------------------------------------------------------------
_READ_CHUNK = 64 * 2**20  # bytes read per pread while slicing a tensor


class _SafetensorsFile:
    """One safetensors file read with ``pread`` into buffers we own.

    Not mmap: pages of a mapped file count toward the resident set while mapped, so reading a
    rank's slice through a mapping would show (and, under a cgroup limit, cost) the whole file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # closed by close(), or when garbage-collected
        self.fd = self._file.fileno()
        try:
            n = int.from_bytes(os.pread(self.fd, 8, 0), "little")
            header = json.loads(os.pread(self.fd, n, 8))
        except (ValueError, OSError) as e:
            self._file.close()
            raise ShardError(f"{path} is not a readable safetensors file: {e}") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries = {name: (_TORCH_DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"][0])
                        for name, e in header.items()}  # fmt: skip

    def close(self) -> None:
        self._file.close()

    def _pread_into(self, out: Tensor, offset: int) -> None:
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], self.base + offset + done)
            if n <= 0:
                raise ShardError(f"{self.path} is truncated")
            done += n

    def read(self, name: str, dim: int | None = None, lo: int = 0, hi: int | None = None,
             out: Tensor | None = None) -> Tensor:  # fmt: skip
        """The tensor, or indices [lo, hi) of dimension ``dim``, into ``out`` if given."""
        dtype, shape, offset = self.entries[name]
        esize = torch.empty((), dtype=dtype).element_size()
        if dim is None:
            dim, lo, hi = 0, 0, (shape[0] if shape else 1)
        hi = shape[dim] if hi is None else hi
        outer = math.prod(shape[:dim])
        inner = math.prod(shape[dim + 1 :])
        want = (*shape[:dim], hi - lo, *shape[dim + 1 :]) if shape else ()
        if out is None:
            out = torch.empty(want, dtype=dtype)
        elif tuple(out.shape) != want or out.dtype != dtype or not out.is_contiguous():
            raise ShardError(f"{self.path}: {name} slice is {want} {dtype}, the buffer is "
                             f"{tuple(out.shape)} {out.dtype}")  # fmt: skip
        if not shape or (lo == 0 and hi == shape[dim]) or outer == 1:
            start = offset + lo * inner * esize
            self._pread_into(out, start)
            return out
        # rows of the [outer, shape[dim], inner] view, a few at a time, keeping [lo, hi)
        row = shape[dim] * inner * esize
        step = max(1, _READ_CHUNK // row)
        dest = out.view(outer, hi - lo, inner)
        for r0 in range(0, outer, step):
            r1 = min(outer, r0 + step)
            tmp = torch.empty(r1 - r0, shape[dim], inner, dtype=dtype)
            self._pread_into(tmp, offset + r0 * row)
            dest[r0:r1].copy_(tmp[:, lo:hi])
        return out


class TensorReader:
    """Tensors of a checkpoint by name, whole or as a feature slice, in either layout.

    ``stem`` is ``sae_weights`` (the CLT) or ``optimizer`` (Adam moments, feature health).
    Only the bytes asked for are read (``pread``, no mapping); close it, or use it in a
    ``with`` block, to release the file handles.
    """

    def __init__(self, ckpt: str | Path, stem: str = WEIGHTS_STEM) -> None:
        self.dir = Path(ckpt)
        self.stem = stem
        index_path = self.dir / SHARD_INDEX
        if index_path.is_file():
            index = json.loads(index_path.read_text())
            if index.get("format") != SHARD_FORMAT:
                raise ShardError(f"{index_path} is not a clt-lens shard index")
            self.n_shards = int(index["feature_shards"])
            self.n_features = int(index["n_features"])
        else:
            self.n_shards, self.n_features = 1, None
        self.files = [self.dir / file_name(stem, k, self.n_shards) for k in range(self.n_shards)]
        for f in self.files:
            if not f.is_file():
                raise ShardError(
                    f"checkpoint {str(self.dir)!r} lacks {f.name}"
                    + (f" (one of its {self.n_shards} feature shards)" if self.n_shards > 1 else "")
                )
        self._files = [_SafetensorsFile(f) for f in self.files]

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def names(self) -> list[str]:
        return list(self._files[0].entries)

    def __contains__(self, name: str) -> bool:
        return name in self._files[0].entries

    def _check(self, name: str, shard: int = 0) -> None:
        if name not in self._files[shard].entries:
            raise ShardError(f"{self.files[shard]} has no tensor {name!r}")

    def shape(self, name: str) -> tuple[int, ...]:
        """Full (unsharded) shape."""
        self._check(name)
        shape = list(self._files[0].entries[name][1])
        fd = feature_dim(name)
        if fd is not None:
            shape[fd] *= self.n_shards
        return tuple(shape)

    def dtype(self, name: str) -> torch.dtype:
        self._check(name)
        return self._files[0].entries[name][0]

    def read(self, name: str, features: slice | None = None, out: Tensor | None = None) -> Tensor:
        """Tensor ``name``, whole or restricted to ``features`` along its feature axis, read into
        ``out`` (a contiguous CPU tensor of the right shape) when given."""
        self._check(name)
        fd = feature_dim(name)
        if fd is None or (features is None and self.n_shards == 1):
            return self._files[0].read(name, out=out)
        total = self.shape(name)[fd]
        lo, hi = (0, total) if features is None else (features.start, features.stop)
        if not 0 <= lo <= hi <= total:
            raise ShardError(f"{name}: features [{lo}, {hi}) outside [0, {total})")
        shape = list(self.shape(name))
        shape[fd] = hi - lo
        if out is None:
            out = torch.empty(shape, dtype=self.dtype(name))
        per = total // self.n_shards
        for k in range(lo // per, -(-hi // per) if hi > lo else lo // per):
            a, b = max(lo, k * per), min(hi, (k + 1) * per)
            self._check(name, k)
            dest = out.narrow(fd, a - lo, b - a)
            if dest.is_contiguous():
                self._files[k].read(name, fd, a - k * per, b - k * per, out=dest)
            else:
                dest.copy_(self._files[k].read(name, fd, a - k * per, b - k * per))
        return out

    def read_index(self, name: str, i: int) -> Tensor:
        """``tensor[i]`` along dim 0 (e.g. one layer of ``W_enc`` [L, d, F]), from every shard."""
        self._check(name)
        fd = feature_dim(name)
        if fd == 0:
            raise ShardError(f"{name}: dim 0 is the feature axis; use read(name, slice)")
        files = self._files if fd is not None else self._files[:1]
        parts = [f.read(name, 0, i, i + 1)[0] for f in files]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=fd - 1)

    def chunks(self, name: str, rows: int = 1) -> Iterator[Tensor]:
        """The whole tensor in row-major chunks of at most ``rows`` indices of dim 0, each read
        on its own: what :func:`write_safetensors_streaming` consumes."""
        self._check(name)
        fd = feature_dim(name)
        if fd is None or fd == 0:
            # replicated tensors live in shard 0; a feature-major tensor is a run of rows per shard
            for f in self._files if fd == 0 else self._files[:1]:
                shape = f.entries[name][1]
                if not shape or shape[0] == 0:
                    yield f.read(name)
                    continue
                for start in range(0, shape[0], rows):
                    yield f.read(name, 0, start, min(shape[0], start + rows))
            return
        shape = list(self.shape(name))
        per = shape[fd] // self.n_shards
        for start in range(0, shape[0], rows):
            stop = min(shape[0], start + rows)
            out = torch.empty([stop - start, *shape[1:]], dtype=self.dtype(name))
            for k, f in enumerate(self._files):  # each shard's columns, one shard at a time
                out.narrow(fd, k * per, per).copy_(f.read(name, 0, start, stop))
            yield out


def write_shard_index(ckpt: Path, n_shards: int, n_features: int) -> None:

    atomic_write_text(
        ckpt / SHARD_INDEX,
        json.dumps({"format": SHARD_FORMAT, "version": 1, "feature_shards": n_shards,
                    "n_features": n_features}, indent=2),  # fmt: skip
    )


def sharded_disk_loader(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A SAELens ``converter`` for checkpoints in either layout:
    ``SAE.load_from_disk(path, converter=sharded_disk_loader)`` assembles a feature-sharded
    checkpoint in one process (the whole CLT in memory; ``clt-lens consolidate`` avoids that)."""
    cfg = get_sae_lens_config_from_disk(path, device, cfg_overrides)
    with TensorReader(path, WEIGHTS_STEM) as reader:
        return cfg, {n: reader.read(n).to(device) for n in reader.names()}
