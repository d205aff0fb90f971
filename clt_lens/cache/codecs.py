"""Codecs: how float32 activations ``[N, L, d]`` become stored codes, and back.

A codec encodes a shard's token-aligned ``x`` and ``y`` together (``encode_pair``) into

- *parameters* shared by the whole shard (quantisation steps, offsets, prediction
  coefficients, scales), small arrays named ``x/step``, ``y/scales`` ...;
- *codes* per (tensor, layer): one array ``[N, d]`` cut into token chunks by the shard writer,
  so that a reader can decode any chunk on its own;
- per-tensor metadata, including the measured quantisation error (FVU) of every layer and of
  the worst channel of every layer.

Decoding (``Codec.decoder(params).decode_chunk(codes, out_x, out_y)``) is written in torch and
runs on whatever device the tensors are on: the reader can move the compact codes to a GPU
and dequantise there. The encoder measures its error by running that same decoder on the
codes it wrote, so the FVU recorded in a shard is the FVU a reader gets (on the CPU: bit for
bit).

Codecs (the same one for x and y):

- ``fp32`` / ``fp16`` / ``bf16``: the values cast (fp16 refuses values beyond its range).
- ``int8``: symmetric absmax quantisation with one scale per (layer, channel) over the shard.
- ``errbound`` (default): uniform quantisation whose steps come from an error budget
  ``target_fvu``. With ``allocation="channel"`` (default) every channel gets its own step and
  its quantisation FVU (sum of squared errors / sum of squared deviations from the channel's
  mean, over the shard) is at most ``target_fvu``: a channel 300x larger than the others does
  not take the others' precision. ``allocation="layer"`` bounds each layer's FVU with one step
  per layer (fewest bits for a layer budget, but small channels can be lost to noise next to
  massive ones). Either bound also holds for the whole cache (the shard sums add up). Steps
  lie on a 2^(1/32) grid so that rounding noise in the statistics almost never changes the
  bytes written. With ``predict`` (default) each (tensor, layer) is coded as the residual from
  a per-channel linear prediction out of already decoded neighbours (x_l from x_{l-1} and
  y_{l-1}; y_l from x_l and y_{l-1}); it is closed loop, so errors do not accumulate, and the
  bound is unchanged. Codes are signed 8-bit integers; the rare values beyond +-127 (heavy
  tails) are *escapes*, stored apart with their positions. A layer with too many escapes
  (tight targets) is stored as 16- or 32-bit zigzag codes instead.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clt_lens.cache.codec_base import (
    TENSORS,
    Codec,
    Decoder,
    EncodedPair,
    add_layer_meta,
    chunk_bounds,
    measure,
    new_meta,
    reconstruct_and_measure,
    split_chunk,
    to_tensor,
)
from clt_lens.cache.errbound import ESCAPE, ErrorBoundedCodec
from clt_lens.cache.errors import CacheError

# ----------------------------------------------------------------------------------------------
# Float codecs


class FloatCodec(Codec):
    name = "fp32"
    lossless = True
    storage = torch.float32

    def encode_tensor(self, tname: str, t: Tensor) -> tuple[dict, dict]:
        if self.storage == torch.float16:
            amax = float(t.abs().max()) if t.numel() else 0.0
            if not math.isfinite(amax) or amax > 65504.0:
                raise CacheError(
                    f"codec fp16 cannot hold activations with |value| up to {amax:.4g} "
                    "(fp16 max 65504); use bf16, fp32, int8 or errbound"
                )
        codes = {}
        for layer in range(t.shape[1]):
            c = t[:, layer, :].to(self.storage).contiguous()
            if self.storage == torch.bfloat16:  # numpy has no bfloat16: store the bits
                codes[f"{tname}/{layer}"] = c.view(torch.int16).cpu().numpy().view(np.uint16)
            else:
                codes[f"{tname}/{layer}"] = c.cpu().numpy()
        return {}, codes

    def decoder(self, params: dict[str, Tensor]) -> Decoder:
        return _FloatDecoder(params, self.storage)


class _FloatDecoder(Decoder):
    def __init__(self, params: dict[str, Tensor], storage: torch.dtype) -> None:
        super().__init__(params)
        self.storage = storage

    def decode_layer(self, tname, layer, arrays, outs) -> None:
        q = arrays[f"{tname}/{layer}"]
        if self.storage == torch.bfloat16:
            q = q.view(torch.bfloat16)
        outs[tname][:, layer].copy_(q)


class Fp16Codec(FloatCodec):
    name = "fp16"
    lossless = False
    storage = torch.float16


class Bf16Codec(FloatCodec):
    name = "bf16"
    lossless = False
    storage = torch.bfloat16


# ----------------------------------------------------------------------------------------------
# int8 absmax


class Int8Codec(Codec):
    """Symmetric absmax int8 with one scale per (layer, channel) over the shard."""

    name = "int8"

    def encode_tensor(self, tname: str, t: Tensor) -> tuple[dict, dict]:
        n, n_layers, d = t.shape
        scales = torch.empty(n_layers, d, dtype=torch.float32, device=t.device)
        codes = {}
        for layer in range(n_layers):
            v = t[:, layer, :]
            amax = v.abs().amax(0) if n else torch.zeros(d, device=t.device)
            scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
            scales[layer] = scale
            q = torch.round(v / scale).clamp_(-127, 127).to(torch.int8)
            codes[f"{tname}/{layer}"] = q.contiguous().cpu().numpy()
        return {f"{tname}/scales": scales.cpu().numpy()}, codes

    def encode_pair(self, x: Tensor, y: Tensor, chunk_tokens: int) -> EncodedPair:
        enc = super().encode_pair(x, y, chunk_tokens)
        enc.quantised = True
        return enc

    def decoder(self, params: dict[str, Tensor]) -> Decoder:
        return _Int8Decoder(params)


class _Int8Decoder(Decoder):
    def decode_layer(self, tname, layer, arrays, outs) -> None:
        torch.mul(arrays[f"{tname}/{layer}"], self.params[f"{tname}/scales"][layer],
                  out=outs[tname][:, layer])


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


__all__ = [
    "CODECS", "DEFAULT_CODEC", "ESCAPE", "TENSORS", "Bf16Codec", "Codec", "Decoder",
    "EncodedPair", "ErrorBoundedCodec", "FloatCodec", "Fp16Codec", "Int8Codec",
    "add_layer_meta", "chunk_bounds", "codec_from_config", "make_codec", "measure", "new_meta",
    "reconstruct_and_measure", "split_chunk", "to_tensor",
]
