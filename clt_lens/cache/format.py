"""On-disk format of an activation cache: codecs, shard files and the manifest.

A cache is a directory::

    manifest.json            written last, atomically, by the merge step (see below)
    shard-00000.clts ...     self-contained shards, one per fixed range of token sequences
    cache_config.json        the generation config (lets jobs check they agree, and resume)
    jobs/job-0-of-1.json     per-job progress records (shards finished, with checksums)

**Shard file** (``.clts``)::

    8 bytes   magic b"CLTSHARD"
    8 bytes   little-endian uint64 H = length of the header
    H bytes   UTF-8 JSON header
    ...       payload: the blobs the header lists, back to back

The header holds ``format_version``, ``n_tokens``, ``n_layers``, ``d_model``, the ``codec`` (name
and parameters), per-tensor codec metadata (``tensors.x`` / ``tensors.y``: e.g. the measured
quantisation FVU per layer), provenance (``info``: shard index, sequence range) and ``blobs``:
a list of ``{name, dtype, shape, filter, zstd, offset, nbytes}``. A blob is a numpy array in C
order; ``filter="byteplanes"`` means its bytes were regrouped by byte significance (all lowest
bytes, then the next ...) before compression, which lets zstd see the mostly-constant high bytes
as runs; ``zstd`` says whether the blob is one zstd frame. Offsets count from the payload start.
Per-layer data are separate blobs (``x/0`` .. ``x/{L-1}``, same for ``y``) so layers decode
independently. A reader needs nothing but the file to decode it.

**Codecs** (the same one for x and y; ``zstd_level`` 0 = no zstd, otherwise the zstd level):

- ``fp32`` / ``fp16`` / ``bf16``: the values cast (fp16 refuses values beyond its range).
- ``int8``: symmetric absmax quantisation with one scale per (layer, channel) over the shard;
  error per value at most scale/2.
- ``errbound``: uniform quantisation whose step is chosen from an error budget ``target_fvu``:
  each layer's quantisation FVU (sum of squared errors / sum of squared deviations from the
  channel means, over the shard) is at most ``target_fvu``, which bounds the whole cache too.
  Values are stored as integers ``q = round((v - mean_c) / step_c)``, zigzag-mapped to unsigned,
  in the narrowest of 8/16/32 bits that holds the layer. ``allocation="layer"`` uses one step per
  layer (for a fixed squared-error budget equal steps need the fewest bits); ``"channel"`` scales
  steps with each channel's standard deviation. Steps lie on a 2^(1/32) grid so that rounding noise
  in the statistics almost never changes the bytes written. With ``predict`` (the default) each
  layer is coded as the residual from a per-channel linear prediction out of already decoded
  neighbours (x_l from x_{l-1} and y_{l-1}; y_l from x_l and y_{l-1}; coding order x_0, y_0,
  x_1, ...): the error bound is unchanged and correlated layers cost fewer bits (on the
  embedded model 3.4x smaller than fp16 instead of 3.0x). Quantisation codes are compressed
  with zstd matches of 7+ bytes only (see ``_compressor``).

**Manifest** (``manifest.json``): ``format_version``, ``kind``, model id and name, cache config
hash, hook spec and full hook names, ``n_layers``, ``d_model``, ``context_size``, dataset, split,
seed, codec, total tokens, worst per-layer quantisation FVU over the shards, and ``shards``: one
entry per shard with file name, token count, byte size, sha256 and sequence range.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import zstandard
from torch import Tensor

from clt_lens.activations import HookSpec
from clt_lens.errors import CLTLensError, InputError
from clt_lens.fsutil import fsync_dir

FORMAT_VERSION = 1
SHARD_MAGIC = b"CLTSHARD"
SHARD_SUFFIX = ".clts"
MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "clt_lens.activation_cache"


class CacheError(CLTLensError, ValueError):
    """A cache (or one of its files) is missing, corrupt, too new, or not the one expected."""


class CacheMismatchError(CacheError):
    """The cache was built for another model / hooks / shape than the caller expects."""


# ----------------------------------------------------------------------------------------------
# Files


def atomic_write_bytes(path: str | Path, data: bytes | list[bytes]) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename, so readers never see half."""
    path = Path(path)
    # A per-process temp name: concurrent jobs may write the same file (config, manifest).
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in data if isinstance(data, list) else [data]:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress_oserror():
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


class _suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: Any, value: Any, tb: Any) -> bool:
        return tp is not None and issubclass(tp, OSError)


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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


# ----------------------------------------------------------------------------------------------
# Codecs

# numpy has no bfloat16: bf16 payloads travel as uint16 bit patterns.
_NP_DTYPES = {"float32", "float16", "uint16", "int8", "uint8", "uint32", "int32"}


@dataclass
class Encoded:
    """One tensor encoded by a codec: JSON metadata and named arrays (per layer, plus params)."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    compress: set[str] = field(default_factory=set)  # array names worth zstd-compressing
    codes: bool = False  # compressed arrays hold quantisation codes (see _compressor)


def layer_fvu(ref: Tensor, approx: Tensor) -> float:
    """FVU of one layer's ``[N, d]`` block: sum sq. error / sum sq. deviation from channel means."""
    if ref.shape[0] == 0:
        return 0.0
    err = approx - ref
    dev = ref - ref.mean(0)
    e = float((err * err).sum())  # float32 cascade sums: ~1e-7 relative, and no float64 copies
    v = float((dev * dev).sum())
    if v == 0.0:
        return 0.0 if e == 0.0 else math.inf
    return e / v


class Codec(ABC):
    """Encodes a float32 tensor ``[N, L, d]`` into arrays and back."""

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

    @abstractmethod
    def encode(self, t: Tensor) -> Encoded: ...

    @abstractmethod
    def decode_layer(self, meta: dict[str, Any], get: Callable[[str], np.ndarray], layer: int,
                     out: np.ndarray) -> None:
        """Write layer ``layer``'s float32 values into the (strided) numpy view ``out [N, d]``.

        Decoders use numpy, which runs on the calling thread only: the reader decodes in a
        background thread, and torch ops there would compete for the trainer's thread pool.
        """

    def encode_pair(self, x: Tensor, y: Tensor) -> dict[str, Encoded]:
        """Encode token-aligned x and y (codecs that code one from the other override this)."""
        return {"x": self.encode(x), "y": self.encode(y)}

    def decode_pair(self, metas: dict[str, dict[str, Any]],
                    get: Callable[[str], np.ndarray], out_x: Tensor, out_y: Tensor) -> None:
        """Fill ``out_x``/``out_y``; ``get("x/0")`` etc. returns a stored array."""
        for tname, out in (("x", out_x), ("y", out_y)):
            self.decode(metas[tname], lambda a, t=tname: get(f"{t}/{a}"), out)

    def decode(self, meta: dict[str, Any], get: Callable[[str], np.ndarray], out: Tensor) -> None:
        """Write the whole tensor into the CPU float32 tensor ``out [N, L, d]``."""
        arr = out.numpy()
        for layer in range(out.shape[1]):
            self.decode_layer(meta, get, layer, arr[:, layer, :])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


class FloatCodec(Codec):
    name = "fp32"
    lossless = True
    storage = torch.float32

    def encode(self, t: Tensor) -> Encoded:
        n, n_layers, d = t.shape
        arrays, fvu = {}, []
        if self.storage == torch.float16:
            amax = float(t.abs().max()) if t.numel() else 0.0
            if not math.isfinite(amax) or amax > 65504.0:
                raise CacheError(
                    f"codec fp16 cannot hold activations with |value| up to {amax:.4g} "
                    "(fp16 max 65504); use bf16, fp32, int8 or errbound"
                )
        for layer in range(n_layers):
            v = t[:, layer, :]
            c = v.to(self.storage).contiguous()
            if self.storage == torch.bfloat16:
                arr = c.view(torch.int16).numpy().view(np.uint16)
            else:
                arr = c.numpy()
            arrays[str(layer)] = arr
            if not self.lossless:
                fvu.append(layer_fvu(v, c.float()))
        meta = {} if self.lossless else {"fvu": fvu}
        return Encoded(meta, arrays, compress=set(arrays))

    def decode_layer(self, meta: dict[str, Any], get: Callable[[str], np.ndarray], layer: int,
                     out: np.ndarray) -> None:
        arr = get(str(layer))
        if self.storage == torch.bfloat16:  # bf16 bits are the top half of a float32
            np.left_shift(arr.astype(np.uint32), 16, out=out.view(np.uint32))
        else:
            out[...] = arr


class Fp16Codec(FloatCodec):
    name = "fp16"
    lossless = False
    storage = torch.float16


class Bf16Codec(FloatCodec):
    name = "bf16"
    lossless = False
    storage = torch.bfloat16


class Int8Codec(Codec):
    """Symmetric absmax int8 with one scale per (layer, channel) over the shard."""

    name = "int8"

    def encode(self, t: Tensor) -> Encoded:
        n, n_layers, d = t.shape
        arrays: dict[str, np.ndarray] = {}
        scales = torch.empty(n_layers, d, dtype=torch.float32)
        fvu = []
        for layer in range(n_layers):
            v = t[:, layer, :]
            amax = v.abs().amax(0) if n else torch.zeros(d)
            scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
            q = torch.round(v / scale).clamp_(-127, 127).to(torch.int8)
            scales[layer] = scale
            arrays[str(layer)] = q.contiguous().numpy()
            fvu.append(layer_fvu(v, q.float() * scale))
        arrays["scales"] = scales.numpy()
        return Encoded({"fvu": fvu}, arrays, compress={str(i) for i in range(n_layers)},
                       codes=True)

    def decode_layer(self, meta: dict[str, Any], get: Callable[[str], np.ndarray], layer: int,
                     out: np.ndarray) -> None:
        np.multiply(get(str(layer)), get("scales")[layer], out=out, dtype=np.float32)


_GRID = 32  # steps are 2^(k / _GRID)


class ErrorBoundedCodec(Codec):
    """Uniform quantisation with steps chosen so each layer's FVU stays <= ``target_fvu``.

    With ``predict=True`` each (tensor, layer) is coded as the residual from a per-channel
    linear prediction ``bias + sum_k coef_k * source_k`` out of already decoded slices (see
    ``_sources``). It is closed loop (the sources are the decoded values, so errors do not
    accumulate) and the step, hence the error bound, is unchanged; the residual has less spread
    than the value when the slices are correlated, so it takes fewer bits.
    """

    name = "errbound"

    def __init__(self, zstd_level: int = 3, target_fvu: float = 1e-3,
                 allocation: str = "layer", predict: bool = True) -> None:
        super().__init__(zstd_level)
        if not (isinstance(target_fvu, (int, float)) and 0 < target_fvu < 1):
            raise CacheError(f"codec errbound: target_fvu must be in (0, 1), got {target_fvu!r}")
        if allocation not in ("layer", "channel"):
            raise CacheError(
                f"codec errbound: allocation must be 'layer' or 'channel', got {allocation!r}"
            )
        if not isinstance(predict, bool):
            raise CacheError(f"codec errbound: predict must be true or false, got {predict!r}")
        self.target_fvu = float(target_fvu)
        self.allocation = allocation
        self.predict = predict

    def params(self) -> dict[str, Any]:
        return {"zstd_level": self.zstd_level, "target_fvu": self.target_fvu,
                "allocation": self.allocation, "predict": self.predict}

    def _steps(self, var: Tensor, n: int, r_of: Callable[[Tensor], Tensor]
               ) -> tuple[Tensor, Tensor, float]:
        """Pick steps for one layer. ``var``: per-channel variance (the FVU denominator);
        ``r_of(step)``: what gets quantised, in step units. -> codes (float), step [d], FVU."""
        d = var.shape[0]
        total = float(var.sum())
        mean_var = total / d
        if self.allocation == "layer":
            rel_k = torch.zeros(d, dtype=torch.float64)
        else:
            # Zero-variance channels take the mean step; their codes are all 0 anyway.
            var_c = torch.where(var > 0, var, torch.full_like(var, mean_var))
            rel_k = torch.round(0.5 * torch.log2(var_c / mean_var) * _GRID)
        k = math.floor(0.5 * math.log2(12 * self.target_fvu * mean_var) * _GRID)
        # Small margin so float32 rounding in the decoder cannot push the FVU over the target.
        limit = self.target_fvu * 0.999
        # Search the largest grid step meeting the limit: jump by the FVU ~ step^2 estimate
        # until the answer is bracketed, then bisect (residuals far below the step, e.g. from a
        # good prediction, break the estimate).
        best: tuple[int, Tensor, Tensor, float] | None = None
        bad: int | None = None
        fvu = math.inf
        for _ in range(16):
            step = torch.exp2((rel_k + k) / _GRID).float()
            r = r_of(step)
            q = torch.round(r)
            e = q - r  # error in units of the step
            fvu = float(((e * e).sum(0).double() * step.double() ** 2).sum()) / (total * n)
            if fvu <= limit:
                best = (k, q, step, fvu)
                if not bool(q.any()):  # all codes 0: a larger step changes nothing
                    break
            else:
                bad = k
            if best is not None and bad is not None:
                if bad - best[0] <= 1:
                    break
                k = (best[0] + bad) // 2
            elif best is not None:
                up = math.floor(_GRID * 0.5 * math.log2(limit / max(fvu, 1e-300)))
                if up <= 0:  # the estimate says this is the largest step that fits
                    break
                k += up
            else:
                k -= max(1, math.ceil(_GRID * 0.5 * math.log2(fvu / limit)))
        if best is None:
            raise CacheError(
                f"codec errbound could not reach target_fvu={self.target_fvu} (last FVU {fvu:.3g})"
            )
        return best[1], best[2], best[3]

    def _sources(self, tname: str, layer: int, dec: dict[str, Any]) -> list[Any]:
        """Decoded slices that predict (tname, layer): x_l <- x_{l-1}, y_{l-1}; y_l <- x_l, y_{l-1}.

        Coding order is x_0, y_0, x_1, y_1 ..., so every source is decoded before it is used.
        """
        if not self.predict:
            return []
        if tname == "x":
            return [] if layer == 0 else [dec["x"][:, layer - 1], dec["y"][:, layer - 1]]
        return [dec["x"][:, layer]] + ([dec["y"][:, layer - 1]] if layer > 0 else [])

    @staticmethod
    def _fit(c: Tensor, mean: Tensor, srcs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-channel least squares of the centred values ``c`` on up to two sources.

        -> (coef [2, d], bias [d]). Float32 sums suffice: any coefficients give a valid code
        (the decoder applies the stored ones), a poorer fit only costs bits.
        """
        n, d = c.shape
        coef = torch.zeros(_N_SOURCES, d)
        if not srcs or n < 2:
            return coef, mean
        means = [s.mean(0) for s in srcs]
        cs = [s - m for s, m in zip(srcs, means)]
        k = len(srcs)
        # Column-wise dot products (vecdot: one fused pass each; einsum here is 20x slower).
        g = torch.empty(d, k, k, dtype=torch.float64)
        r = torch.empty(d, k, dtype=torch.float64)
        for i in range(k):
            r[:, i] = torch.linalg.vecdot(cs[i], c, dim=0)
            for j in range(i, k):
                g[:, i, j] = g[:, j, i] = torch.linalg.vecdot(cs[i], cs[j], dim=0)
        ridge = 1e-6 * g.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)
        g = g + torch.eye(k, dtype=torch.float64) * ridge[:, None, None]
        sol = torch.linalg.solve(g, r.unsqueeze(-1)).squeeze(-1)  # [d, k]
        sol = torch.where(torch.isfinite(sol), sol, torch.zeros_like(sol))
        coef[:k] = sol.T.float()
        bias = mean.clone()
        for j, m in enumerate(means):
            bias -= coef[j] * m
        return coef, bias

    @staticmethod
    def _predict(bias: Tensor, coef: Tensor, srcs: list[Tensor], n: int) -> Tensor:
        pred = bias.expand(n, -1).clone()
        for k, s in enumerate(srcs):
            pred.addcmul_(s, coef[k])
        return pred

    @staticmethod
    def _reconstruct(q: np.ndarray, step: np.ndarray, bias: np.ndarray, coef: np.ndarray | None,
                     srcs: list[np.ndarray], out: np.ndarray) -> None:
        """out = q * step + bias + sum_k src_k * coef_k, in float32, in this order (q: float32
        holding the integer codes, exact below 2^24).

        Encoder (for the sources of later layers) and decoder both call this, so their
        reconstructions agree bit for bit.
        """
        np.multiply(q, step, out=out)
        out += bias
        for k, src in enumerate(srcs):
            assert coef is not None
            out += src * coef[k]

    def encode(self, t: Tensor) -> Encoded:
        raise NotImplementedError("errbound encodes x and y together: use encode_pair")

    def encode_pair(self, x: Tensor, y: Tensor) -> dict[str, Encoded]:
        n, n_layers, d = x.shape
        tensors = {"x": x, "y": y}
        dec = {k: torch.empty(n, n_layers, d) for k in tensors} if self.predict else {}
        dec_np = {k: v.numpy() for k, v in dec.items()}
        out: dict[str, Encoded] = {}
        params = {k: {"step": torch.ones(n_layers, d), "bias": torch.zeros(n_layers, d),
                      "coef": torch.zeros(n_layers, _N_SOURCES, d)} for k in tensors}
        metas: dict[str, dict[str, list]] = {k: {"fvu": [], "bits": []} for k in tensors}
        arrays: dict[str, dict[str, np.ndarray]] = {k: {} for k in tensors}
        for layer in range(n_layers):
            for tname, t in tensors.items():
                v = t[:, layer, :]
                mean = v.mean(0) if n else torch.zeros(d)
                c = v - mean
                var = (c * c).sum(0).double() / max(n, 1)
                srcs = self._sources(tname, layer, dec)
                coef, bias = self._fit(c, mean, srcs)
                pred = self._predict(bias, coef, srcs, n)
                if n == 0 or float(var.sum()) == 0.0:
                    q, step, f = torch.zeros(n, d), torch.ones(d), 0.0
                else:
                    resid = v - pred
                    q, step, f = self._steps(var, n, lambda s, resid=resid: resid / s)
                if q.numel() and q.abs().max() >= 2**30:
                    raise CacheError("codec errbound: quantised values overflow 31 bits; "
                                     "raise target_fvu")
                qi = q.to(torch.int32)
                if self.predict:  # the decoder's reconstruction, for the layers that follow
                    self._reconstruct(
                        q.numpy(), step.numpy(), bias.numpy(), coef.numpy(),
                        self._sources(tname, layer, dec_np), dec_np[tname][:, layer, :])
                p = params[tname]
                p["step"][layer], p["bias"][layer], p["coef"][layer] = step, bias, coef
                qn = qi.numpy()
                z = ((qn << 1) ^ (qn >> 31)).view(np.uint32)  # zigzag: small |q| -> small codes
                top = int(z.max()) if z.size else 0
                width = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32
                arrays[tname][str(layer)] = z.astype(width)
                metas[tname]["fvu"].append(f)
                metas[tname]["bits"].append(np.dtype(width).itemsize * 8)
        for tname in tensors:
            p = params[tname]
            arrays[tname]["step"] = p["step"].numpy()
            arrays[tname]["bias"] = p["bias"].numpy()
            if self.predict:
                arrays[tname]["coef"] = p["coef"].numpy()
            out[tname] = Encoded(metas[tname], arrays[tname],
                                 compress={str(i) for i in range(n_layers)}, codes=True)
        return out

    def decode_pair(self, metas: dict[str, dict[str, Any]],
                    get: Callable[[str], np.ndarray], out_x: Tensor, out_y: Tensor) -> None:
        n_layers = out_x.shape[1]
        outs = {"x": out_x.numpy(), "y": out_y.numpy()}
        names = ("step", "bias", "coef") if self.predict else ("step", "bias")
        par = {t: {a: get(f"{t}/{a}") for a in names} for t in outs}
        for layer in range(n_layers):
            for tname, out in outs.items():
                p = par[tname]
                q = _unzigzag(get(f"{tname}/{layer}"))
                self._reconstruct(q, p["step"][layer], p["bias"][layer],
                                  p["coef"][layer] if self.predict else None,
                                  self._sources(tname, layer, outs), out[:, layer, :])

    def decode_layer(self, meta: dict[str, Any], get: Callable[[str], np.ndarray], layer: int,
                     out: np.ndarray) -> None:
        raise NotImplementedError("errbound decodes x and y together: use decode_pair")


_N_SOURCES = 2  # prediction sources per (tensor, layer)
_UNZIGZAG: dict[str, np.ndarray] = {}


def _unzigzag(z: np.ndarray) -> np.ndarray:
    """Zigzag codes -> float32 integers; a table lookup (one pass) for 8- and 16-bit codes."""
    if z.dtype.itemsize <= 2:
        key = str(z.dtype)
        if key not in _UNZIGZAG:
            c = np.arange(2 ** (8 * z.dtype.itemsize), dtype=np.int64)
            _UNZIGZAG[key] = ((c >> 1) ^ -(c & 1)).astype(np.float32)
        return np.take(_UNZIGZAG[key], z)
    c = z.astype(np.int64)
    return ((c >> 1) ^ -(c & 1)).astype(np.float32)


CODECS: dict[str, type[Codec]] = {
    c.name: c for c in (FloatCodec, Fp16Codec, Bf16Codec, Int8Codec, ErrorBoundedCodec)
}
DEFAULT_CODEC = "errbound"


def make_codec(name: str, **params: Any) -> Codec:
    """Codec by name; ``params`` are its keyword arguments (``zstd_level``, ``target_fvu`` ...)."""
    if name not in CODECS:
        raise CacheError(f"unknown codec {name!r}; codecs: {sorted(CODECS)}")
    try:
        return CODECS[name](**params)
    except TypeError as e:
        raise CacheError(f"codec {name!r}: bad parameters {params}: {e}") from None


def codec_from_config(cfg: dict[str, Any]) -> Codec:
    cfg = dict(cfg)
    return make_codec(cfg.pop("name", ""), **cfg)


# ----------------------------------------------------------------------------------------------
# Shards


def encode_shard(x: Tensor, y: Tensor, codec: Codec, info: dict[str, Any] | None = None
                 ) -> list[bytes]:
    """Encode token-aligned ``x``, ``y`` ``[N, L, d]`` into shard file bytes (a list of chunks)."""
    if x.shape != y.shape or x.ndim != 3:
        raise CacheError(f"x and y must both be [N, L, d]; got {tuple(x.shape)}, {tuple(y.shape)}")
    x = x.detach().to("cpu", torch.float32)
    y = y.detach().to("cpu", torch.float32)
    blobs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = 0
    tensors: dict[str, Any] = {}
    encoded = codec.encode_pair(x, y)
    for tname in ("x", "y"):
        enc = encoded[tname]
        tensors[tname] = enc.meta
        for aname, arr in enc.arrays.items():
            arr = np.ascontiguousarray(arr)
            use_zstd = codec.zstd_level > 0 and aname in enc.compress
            filt = "byteplanes" if use_zstd and arr.dtype.itemsize > 1 else "none"
            raw = to_byteplanes(arr) if filt == "byteplanes" else arr
            if use_zstd:
                data = _compressor(codec.zstd_level, enc.codes).compress(raw.data)
            else:
                data = raw.tobytes()
            blobs.append({
                "name": f"{tname}/{aname}", "dtype": str(arr.dtype), "shape": list(arr.shape),
                "filter": filt, "zstd": use_zstd, "offset": offset, "nbytes": len(data),
            })
            chunks.append(data)
            offset += len(data)
    header = {
        "format_version": FORMAT_VERSION,
        "n_tokens": int(x.shape[0]),
        "n_layers": int(x.shape[1]),
        "d_model": int(x.shape[2]),
        "codec": codec.config(),
        "tensors": tensors,
        "info": info or {},
        "blobs": blobs,
    }
    hbytes = json.dumps(header, sort_keys=True).encode()
    return [SHARD_MAGIC, len(hbytes).to_bytes(8, "little"), hbytes, *chunks]


@dataclass
class ShardView:
    """A parsed shard: header plus lazy access to its blobs (decoding checks every field)."""

    header: dict[str, Any]
    payload: memoryview
    source: str

    @property
    def n_tokens(self) -> int:
        return int(self.header["n_tokens"])

    def codec(self) -> Codec:
        try:
            return codec_from_config(self.header["codec"])
        except CacheError as e:
            raise CacheError(f"shard {self.source}: {e}") from None

    def array(self, name: str) -> np.ndarray:
        blob = self._blobs.get(name)
        if blob is None:
            raise CacheError(f"shard {self.source}: blob {name!r} missing from its header")
        try:
            dtype = np.dtype(blob["dtype"])
            shape = tuple(int(s) for s in blob["shape"])
            lo, nb = int(blob["offset"]), int(blob["nbytes"])
            if str(dtype) not in _NP_DTYPES or lo < 0 or lo + nb > len(self.payload):
                raise InputError("bad dtype or out-of-range offset")
            raw: Any = self.payload[lo : lo + nb]
            size = int(np.prod(shape)) * dtype.itemsize
            if blob["zstd"]:
                raw = _decompress_exact(raw, size)
            elif len(raw) != size:
                raise InputError(f"{len(raw)} bytes where {size} were expected")
            if blob["filter"] not in ("none", "byteplanes"):
                raise InputError(f"unknown filter {blob['filter']!r}")
            if blob["filter"] == "byteplanes":
                return from_byteplanes(np.frombuffer(raw, np.uint8), dtype, shape)
            return np.frombuffer(raw, dtype).reshape(shape)
        except (ValueError, KeyError, TypeError, zstandard.ZstdError) as e:
            raise CacheError(f"shard {self.source}: blob {name!r} is corrupt ({e})") from None

    def __post_init__(self) -> None:
        self._blobs = {b["name"]: b for b in self.header.get("blobs", [])}

    def decode(self, out_x: Tensor | None = None, out_y: Tensor | None = None
               ) -> tuple[Tensor, Tensor]:
        """Float32 ``(x, y)`` ``[N, L, d]``, into ``out_x``/``out_y`` when given."""
        n, n_layers, d = self.n_tokens, int(self.header["n_layers"]), int(self.header["d_model"])
        codec = self.codec()
        outs = []
        for out in (out_x, out_y):
            if out is None:
                out = torch.empty(n, n_layers, d, dtype=torch.float32)
            elif tuple(out.shape) != (n, n_layers, d):
                raise CacheError(f"shard {self.source}: output buffer has the wrong shape")
            outs.append(out)
        try:
            codec.decode_pair(self.header["tensors"], self.array, outs[0], outs[1])
        except (KeyError, IndexError, RuntimeError) as e:  # a header that lies about its arrays
            raise CacheError(f"shard {self.source}: cannot decode ({type(e).__name__}: {e})"
                             ) from None
        return outs[0], outs[1]


def parse_shard(data: bytes | bytearray | memoryview, source: str) -> ShardView:
    """Parse a shard's framing and header (errors name ``source``)."""
    # A writable buffer lets uncompressed blobs become tensors without a copy or a warning.
    mv = memoryview(bytearray(data) if isinstance(data, bytes) else data)
    if len(mv) < 16 or bytes(mv[:8]) != SHARD_MAGIC:
        raise CacheError(f"shard {source}: not a clt_lens shard (bad magic or too short)")
    hlen = int.from_bytes(mv[8:16], "little")
    if 16 + hlen > len(mv):
        raise CacheError(f"shard {source}: truncated (header claims {hlen} bytes)")
    try:
        header = json.loads(bytes(mv[16 : 16 + hlen]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"shard {source}: header is not valid JSON ({e})") from None
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CacheError(
            f"shard {source}: format_version {version!r} is newer than this clt_lens reads "
            f"({FORMAT_VERSION}); upgrade clt_lens"
        )
    payload = mv[16 + hlen :]
    end = max((int(b["offset"]) + int(b["nbytes"]) for b in header.get("blobs", [])), default=0)
    if end != len(payload):
        raise CacheError(
            f"shard {source}: payload is {len(payload)} bytes but the header describes {end}"
            " (truncated or padded file)"
        )
    return ShardView(header, payload, source)


def read_shard_file(path: str | Path, *, nbytes: int | None = None,
                    sha256: str | None = None) -> ShardView:
    """Read a shard, checking its size and sha256 against the manifest's values when given."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            n = f.readinto(data)
            del data[n:]
    except FileNotFoundError:
        raise CacheError(f"shard {path} is missing") from None
    if nbytes is not None and len(data) != nbytes:
        raise CacheError(
            f"shard {path}: {len(data)} bytes on disk, manifest says {nbytes} (truncated or "
            "overwritten)"
        )
    if sha256 is not None:
        got = sha256_hex(data)
        if got != sha256:
            raise CacheError(f"shard {path}: sha256 {got[:16]}... does not match the manifest's "
                             f"{sha256[:16]}... (corrupt file)")
    return parse_shard(data, str(path))


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

    def max_fvu(self, tensor: str) -> list[float] | None:
        """Worst per-layer quantisation FVU over the shards for ``tensor`` in {"x", "y"}."""
        rows = [getattr(s, f"fvu_{tensor}") for s in self.shards]
        if not rows or any(r is None for r in rows):
            return None
        return [max(r[i] for r in rows) for i in range(self.n_layers)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hooks"] = self.hooks.to_dict()
        d["hook_names"] = {
            "input": self.hooks.input_names(self.n_layers),
            "output": self.hooks.output_names(self.n_layers),
        }
        d["n_tokens"] = self.n_tokens
        d["quant_fvu"] = {"x": self.max_fvu("x"), "y": self.max_fvu("y")}
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
            d.pop("hook_names", None)
            d.pop("n_tokens", None)
            d.pop("quant_fvu", None)
            d["hooks"] = HookSpec.from_dict(d["hooks"])
            d["shards"] = [ShardEntry(**s) for s in d["shards"]]
            for s in d["shards"]:
                if not isinstance(s.file, str) or Path(s.file).name != s.file or \
                        s.file.startswith("."):
                    raise InputError(f"shard file {s.file!r} is not a plain file name")
            return cls(**d)
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{source}: malformed manifest ({type(e).__name__}: {e})") from None


def read_manifest(cache_dir: str | Path) -> CacheManifest:
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        hint = ""
        if (Path(cache_dir) / "jobs").is_dir():
            hint = (" (generation jobs left records in jobs/: finish them, then run "
                    f"'clt-lens cache --merge {cache_dir}')")
        elif not Path(cache_dir).is_dir():
            hint = " (the directory does not exist)"
        raise CacheError(f"cache manifest {path} is missing{hint}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"cache manifest {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CacheError(f"cache manifest {path} must hold a JSON object")
    return CacheManifest.from_dict(data, str(path))


def write_manifest(cache_dir: str | Path, manifest: CacheManifest) -> None:
    atomic_write_json(Path(cache_dir) / MANIFEST_NAME, manifest.to_dict())
