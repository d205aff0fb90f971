"""CLT tensors on disk: one SAELens file, or feature shards read a slice at a time.

A one-process checkpoint keeps every tensor in one file (``sae_weights.safetensors``, what
``SAE.load_from_disk`` reads). A feature-sharded run writes one file per feature slice
(``sae_weights.f{k:03d}-of-{K:03d}.safetensors``: shard k holds features ``[k F/K, (k+1) F/K)``
of every tensor with a feature axis, and shard 0 also holds the replicated tensors) plus
``shards.json``, the index: the full shape and feature axis of every tensor. Optimizer state
follows the same scheme under the stem ``optimizer``.

:class:`TensorReader` reads either layout by tensor name, whole or as a feature slice, using
``safe_open(...).get_slice`` so only the bytes asked for are read.
:func:`write_safetensors_streaming` writes a safetensors file tensor by tensor (or chunk by
chunk), so consolidating a sharded checkpoint never holds more than one chunk in memory.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from clt_lens.config import ConfigError

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
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be written")
        header[spec.name] = {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}  # fmt: skip
        offset += spec.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for spec in specs:
            written = 0
            for chunk in chunks(spec):
                if chunk.dtype != spec.dtype:
                    raise ValueError(f"{spec.name}: chunk dtype {chunk.dtype} != {spec.dtype}")
                data = chunk.detach().to("cpu").contiguous()
                if data.dtype == torch.bfloat16:  # numpy has no bf16: write its bit pattern
                    data = data.view(torch.int16)
                f.write(memoryview(data.numpy()).cast("B"))
                written += data.numel() * data.element_size()
            if written != spec.nbytes:
                raise ValueError(f"{spec.name}: wrote {written} bytes, expected {spec.nbytes}")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_tensors(path: str | Path, tensors: dict[str, Tensor]) -> Path:
    """Write ``tensors`` (any device) to a safetensors file, one tensor in host memory at a time."""
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    return write_safetensors_streaming(path, specs, lambda s: [tensors[s.name]])


# ---- reading -------------------------------------------------------------------------------
class TensorReader:
    """Tensors of a checkpoint by name, whole or as a feature slice, in either layout.

    ``stem`` is ``sae_weights`` (the CLT) or ``optimizer`` (Adam moments, feature health).
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
        self._handles = [safe_open(str(f), framework="pt", device="cpu") for f in self.files]
        self._keys = [set(h.keys()) for h in self._handles]

    def names(self) -> list[str]:
        return list(self._handles[0].keys())

    def __contains__(self, name: str) -> bool:
        return name in self._keys[0]

    def shape(self, name: str) -> tuple[int, ...]:
        """Full (unsharded) shape."""
        self._check(name)
        shape = list(self._handles[0].get_slice(name).get_shape())
        fd = feature_dim(name)
        if fd is not None:
            shape[fd] *= self.n_shards
        return tuple(shape)

    def dtype(self, name: str) -> torch.dtype:
        self._check(name)
        return _TORCH_DTYPES[self._handles[0].get_slice(name).get_dtype()]

    def _check(self, name: str) -> None:
        if name not in self._keys[0]:
            raise ShardError(f"{self.files[0]} has no tensor {name!r}")

    def read(self, name: str, features: slice | None = None) -> Tensor:
        """Tensor ``name``, whole or restricted to ``features`` along its feature axis."""
        self._check(name)
        fd = feature_dim(name)
        if fd is None or (features is None and self.n_shards == 1):
            return self._handles[0].get_tensor(name)
        total = self.shape(name)[fd]
        lo, hi = (0, total) if features is None else (features.start, features.stop)
        if not 0 <= lo <= hi <= total:
            raise ShardError(f"{name}: features [{lo}, {hi}) outside [0, {total})")
        per = total // self.n_shards
        parts = []
        for k in range(lo // per, -(-hi // per) if hi > lo else lo // per):
            a, b = max(lo, k * per) - k * per, min(hi, (k + 1) * per) - k * per
            if name not in self._keys[k]:
                raise ShardError(f"{self.files[k]} has no tensor {name!r}")
            sl = self._handles[k].get_slice(name)
            index = tuple(slice(None) if d != fd else slice(a, b) for d in range(fd + 1))
            parts.append(sl[index])  # a strided view of the file's bytes
        if not parts:
            shape = list(self.shape(name))
            shape[fd] = 0
            return torch.empty(shape, dtype=self._handles[0].get_slice(name).get_dtype_torch())
        # contiguous: a strided slice handed to e.g. a fused optimizer would be read row-major
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=fd)

    def read_index(self, name: str, i: int) -> Tensor:
        """``tensor[i]`` along dim 0 (e.g. one layer of ``W_enc`` [L, d, F]), from every shard."""
        self._check(name)
        fd = feature_dim(name)
        if fd == 0:
            raise ShardError(f"{name}: dim 0 is the feature axis; use read(name, slice)")
        if fd is None:
            return self._handles[0].get_slice(name)[i : i + 1][0]
        parts = [h.get_slice(name)[i : i + 1][0] for h in self._handles]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=fd - 1)

    def chunks(self, name: str, rows: int = 1) -> Iterator[Tensor]:
        """The whole tensor in row-major chunks of at most ``rows`` indices of dim 0, each read
        on its own: what :func:`write_safetensors_streaming` consumes."""
        self._check(name)
        fd = feature_dim(name)
        # replicated tensors live in shard 0; a feature-major tensor is a run of rows per shard
        handles = self._handles if fd == 0 else self._handles[:1]
        if fd is None or fd == 0:
            for h in handles:
                sl = h.get_slice(name)
                n0 = sl.get_shape()[0] if sl.get_shape() else 0
                if n0 == 0:
                    yield h.get_tensor(name)
                    continue
                for start in range(0, n0, rows):
                    yield sl[start : start + rows]
            return
        n0 = self.shape(name)[0]
        for start in range(0, n0, rows):
            parts = [h.get_slice(name)[start : start + rows] for h in self._handles]
            yield parts[0] if len(parts) == 1 else torch.cat(parts, dim=fd)


def write_shard_index(ckpt: Path, n_shards: int, n_features: int) -> None:
    from clt_lens.fsutil import atomic_write_text

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
    from sae_lens.loading.pretrained_sae_loaders import get_sae_lens_config_from_disk

    cfg = get_sae_lens_config_from_disk(path, device, cfg_overrides)
    reader = TensorReader(path, WEIGHTS_STEM)
    return cfg, {n: reader.read(n).to(device) for n in reader.names()}
