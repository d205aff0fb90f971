"""What every codec shares: the ``Codec`` and ``Decoder`` interfaces, the encoded form of a
shard (``EncodedPair``), chunking, and error measurement. The codecs themselves: ``codecs.py``
(float and int8, the registry) and ``errbound.py`` (the default error-bounded codec).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from clt_lens.cache.errors import CacheError

TENSORS = ("x", "y")


@dataclass
class EncodedPair:
    """A shard's x and y encoded: shared parameters, per-layer codes, escapes and metadata."""

    params: dict[str, np.ndarray]
    codes: dict[str, np.ndarray]  # "x/0" -> [N, d]
    escapes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    compress: bool = True  # codes are worth zstd
    quantised: bool = False  # codes are quantisation symbols (see format._compressor)


def chunk_bounds(n: int, chunk_tokens: int) -> list[tuple[int, int]]:
    return [(lo, min(n, lo + chunk_tokens)) for lo in range(0, n, chunk_tokens)]


def to_tensor(arr: np.ndarray) -> Tensor:
    """A numpy array as a torch tensor without a copy (unsigned 16/32-bit as signed views)."""
    if arr.dtype == np.uint16:
        arr = arr.view(np.int16)
    elif arr.dtype == np.uint32:
        arr = arr.view(np.int32)
    return torch.from_numpy(arr)


def split_chunk(enc: EncodedPair, name: str, lo: int, hi: int) -> dict[str, np.ndarray]:
    """The stored arrays of one (tensor, layer) for tokens ``[lo, hi)``: codes, escapes."""
    codes = enc.codes[name]
    out = {name: np.ascontiguousarray(codes[lo:hi])}
    esc = enc.escapes.get(name)
    if esc is not None:
        d = codes.shape[1]
        idx, val = esc
        a, b = np.searchsorted(idx, [lo * d, hi * d])
        if b > a:  # [2, k]: positions within the chunk's [n, d] block, then the codes
            out[f"{name}/esc"] = np.stack([(idx[a:b] - lo * d).astype(np.int32), val[a:b]])
    return out


def measure(v: Tensor, approx: Tensor) -> tuple[float, Tensor]:
    """(layer FVU, per-channel FVU [d]) of ``approx`` against ``v`` ``[N, d]``, in float64.

    A channel without variance has FVU 0 if it is reproduced exactly, else inf.
    """
    n = v.shape[0]
    if n == 0:
        return 0.0, torch.zeros(v.shape[1], dtype=torch.float64)
    err = approx - v
    sse = torch.linalg.vecdot(err, err, dim=0).double()
    dev = v - v.mean(0)
    den = torch.linalg.vecdot(dev, dev, dim=0).double()
    safe = torch.where(den > 0, den, torch.ones_like(den))
    chan = torch.where(den > 0, sse / safe,
                       torch.where(sse > 0, torch.full_like(sse, math.inf), torch.zeros_like(sse)))
    total_den, total_sse = float(den.sum()), float(sse.sum())
    if total_den == 0.0:
        layer = 0.0 if total_sse == 0.0 else math.inf
    else:
        layer = total_sse / total_den
    return layer, chan


class Decoder(ABC):
    """Decodes chunks of one shard; holds that shard's parameters on the decoding device."""

    def __init__(self, params: dict[str, Tensor]) -> None:
        self.params = params

    @abstractmethod
    def decode_layer(self, tname: str, layer: int, arrays: dict[str, Tensor],
                     outs: dict[str, Tensor]) -> None:
        """Write tensor ``tname``'s layer into ``outs[tname][:, layer]``."""

    def decode_chunk(self, arrays: dict[str, Tensor], out_x: Tensor, out_y: Tensor) -> None:
        """Fill ``out_x``/``out_y`` ``[n, L, d]`` (any device) from a chunk's code tensors.

        Layers are decoded in coding order (x_0, y_0, x_1 ...), as prediction needs.
        """
        outs = {"x": out_x, "y": out_y}
        for layer in range(out_x.shape[1]):
            for tname in TENSORS:
                self.decode_layer(tname, layer, arrays, outs)


class Codec(ABC):
    """Encodes token-aligned float32 ``x``, ``y`` ``[N, L, d]``; see the module docstring."""

    name: ClassVar[str]
    lossless: ClassVar[bool] = False

    def __init__(self, zstd_level: int = 3) -> None:
        if not isinstance(zstd_level, int) or not 0 <= zstd_level <= 22:
            raise CacheError(
                f"zstd_level must be an integer in 0..22 (0 = off), got {zstd_level!r}"
            )
        self.zstd_level = zstd_level

    def params(self) -> dict[str, Any]:
        return {"zstd_level": self.zstd_level}

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **self.params()}

    def error_bound(self) -> dict[str, Any] | None:
        """What the codec guarantees about its error, for the manifest (None: no bound)."""
        return None

    @abstractmethod
    def encode_tensor(self, tname: str, t: Tensor) -> tuple[dict[str, np.ndarray],
                                                           dict[str, np.ndarray]]:
        """-> (parameters, codes {"{tname}/{layer}": [N, d]}) for one tensor."""

    @abstractmethod
    def decoder(self, params: dict[str, Tensor]) -> Decoder: ...

    def encode_pair(self, x: Tensor, y: Tensor, chunk_tokens: int) -> EncodedPair:
        params: dict[str, np.ndarray] = {}
        codes: dict[str, np.ndarray] = {}
        for tname, t in (("x", x), ("y", y)):
            p, c = self.encode_tensor(tname, t)
            params.update(p)
            codes.update(c)
        enc = EncodedPair(params, codes)
        enc.meta = reconstruct_and_measure(self, enc, {"x": x, "y": y}, chunk_tokens)
        return enc

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


def reconstruct_and_measure(codec: Codec, enc: EncodedPair, ref: dict[str, Tensor],
                            chunk_tokens: int) -> dict[str, dict[str, Any]]:
    """Decode ``enc`` chunk by chunk, as a reader will, and measure its error against ``ref``."""
    n, n_layers, d = ref["x"].shape
    dev = ref["x"].device
    dec = {t: torch.empty(n, n_layers, d, device=dev) for t in TENSORS}
    decoder = codec.decoder({k: to_tensor(v).to(dev) for k, v in enc.params.items()})
    for lo, hi in chunk_bounds(n, chunk_tokens):
        arrays: dict[str, Tensor] = {}
        for name in enc.codes:
            arrays.update({k: to_tensor(v).to(dev)
                           for k, v in split_chunk(enc, name, lo, hi).items()})
        decoder.decode_chunk(arrays, dec["x"][lo:hi], dec["y"][lo:hi])
    meta: dict[str, dict[str, Any]] = {}
    for tname in TENSORS:
        meta[tname] = new_meta()
        for layer in range(n_layers):
            add_layer_meta(meta[tname], *measure(ref[tname][:, layer], dec[tname][:, layer]))
    return meta


def new_meta() -> dict[str, list]:
    return {"fvu": [], "chan_fvu_max": [], "chan_fvu_argmax": []}


def add_layer_meta(meta: dict[str, list], layer_fvu: float, chan: Tensor) -> None:
    meta["fvu"].append(layer_fvu)
    if chan.numel():
        i = int(torch.argmax(torch.nan_to_num(chan, nan=math.inf)))
        meta["chan_fvu_max"].append(float(chan[i]))
        meta["chan_fvu_argmax"].append(i)
    else:
        meta["chan_fvu_max"].append(0.0)
        meta["chan_fvu_argmax"].append(0)
