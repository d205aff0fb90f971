"""The ``errbound`` codec (the default): quantisation steps from an error budget, per channel
or per layer, with closed-loop linear prediction from already decoded neighbours and rare
escapes (see ``codecs.py``'s docstring for what it guarantees).
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
    split_chunk,
    to_tensor,
)
from clt_lens.cache.errors import CacheError

ESCAPE = -128  # int8 code meaning "the value is in the escape list"
_GRID = 32  # errbound steps are 2^(k / _GRID)
_N_SOURCES = 2  # prediction sources per (tensor, layer)


# ----------------------------------------------------------------------------------------------
# errbound


class ErrorBoundedCodec(Codec):
    """Uniform quantisation with steps chosen from an error budget (see the module docstring)."""

    name = "errbound"

    def __init__(self, zstd_level: int = 3, target_fvu: float = 1e-3,
                 allocation: str = "channel", predict: bool = True) -> None:
        super().__init__(zstd_level)
        if not (isinstance(target_fvu, (int, float)) and 0 < target_fvu < 1):
            raise CacheError(f"codec errbound: target_fvu must be in (0, 1), got {target_fvu!r}")
        if allocation not in ("layer", "channel"):
            raise CacheError(
                f"codec errbound: allocation must be 'channel' or 'layer', got {allocation!r}"
            )
        if not isinstance(predict, bool):
            raise CacheError(f"codec errbound: predict must be true or false, got {predict!r}")
        self.target_fvu = float(target_fvu)
        self.allocation = allocation
        self.predict = predict

    def params(self) -> dict[str, Any]:
        return {"zstd_level": self.zstd_level, "target_fvu": self.target_fvu,
                "allocation": self.allocation, "predict": self.predict}

    def error_bound(self) -> dict[str, Any]:
        what = "channel" if self.allocation == "channel" else "layer"
        return {
            "quantity": f"{what}_fvu", "max": self.target_fvu,
            "definition": (
                f"for every shard, tensor (x, y) and {what}: sum of squared quantisation "
                f"errors / sum of squared deviations from the {what}'s mean(s) <= max; "
                "the same then holds over the whole cache"
            ),
        }

    def encode_tensor(self, tname: str, t: Tensor) -> tuple[dict, dict]:
        raise NotImplementedError("errbound encodes x and y together: use encode_pair")

    def decoder(self, params: dict[str, Tensor]) -> Decoder:
        return _ErrBoundDecoder(params, self.predict)

    # -- steps -------------------------------------------------------------------------------

    def _channel_steps(self, resid: Tensor, var: Tensor, n: int, k0: Tensor | None = None
                       ) -> Tensor:
        """Largest grid exponent k per channel whose FVU meets the target (int64 [d]).

        Searched for all channels at once: jump by the FVU ~ step^2 estimate until each
        channel's answer is bracketed, then bisect (a residual far below the step, e.g. from
        a good prediction, breaks the estimate). ``var``: per-channel variance (float64).
        """
        limit = self.target_fvu * 0.999  # float32 rounding in the decoder must not cross it
        d = var.shape[0]
        live = var > 0
        den = torch.where(live, var * n, torch.ones_like(var))
        if k0 is None:
            k = torch.floor(0.5 * torch.log2(12 * limit * var.clamp_min(1e-300)) * _GRID)
            k = k.to(torch.int64)
        else:
            k = k0.clone()
        lo_none, hi_none = -(2**62), 2**62
        ok_k = torch.full((d,), lo_none, dtype=torch.int64, device=k.device)
        bad_k = torch.full((d,), hi_none, dtype=torch.int64, device=k.device)
        done = ~live
        rmax = resid.abs().amax(0) if resid.shape[0] else torch.zeros_like(var).float()
        for _ in range(40):
            step = torch.exp2(k.double() / _GRID).float()
            r = resid / step
            e = r - torch.round(r)
            fvu = torch.linalg.vecdot(e, e, dim=0).double() * step.double() ** 2 / den
            ok = fvu <= limit
            upd = ~done
            ok_k = torch.where(ok & upd, torch.maximum(ok_k, k), ok_k)
            bad_k = torch.where(~ok & upd, torch.minimum(bad_k, k), bad_k)
            zero = ok & (rmax < 0.5 * step)  # all codes 0: a larger step changes nothing
            have_ok, have_bad = ok_k > lo_none, bad_k < hi_none
            done = done | zero | (have_ok & have_bad & (bad_k - ok_k <= 1))
            if bool(done.all()):
                break
            ratio = (limit / fvu.clamp_min(1e-300)).clamp_max(2.0 ** 60)
            up = torch.floor(_GRID * 0.5 * torch.log2(ratio)).clamp(1, 8 * _GRID).to(torch.int64)
            down = torch.ceil(_GRID * 0.5 * torch.log2(1 / ratio)).clamp(1, 8 * _GRID)
            nxt = torch.where(have_ok & have_bad, (ok_k + bad_k) // 2,
                              torch.where(have_ok, k + up, k - down.to(torch.int64)))
            k = torch.where(done, k, nxt)
        if bool((live & (ok_k == lo_none)).any()):
            raise CacheError(f"codec errbound could not reach target_fvu={self.target_fvu} on "
                             "every channel")
        return torch.where(live, ok_k, torch.zeros_like(ok_k))

    def _layer_step(self, resid: Tensor, var: Tensor, n: int) -> int:
        """Largest grid exponent k of one step for the layer meeting the target."""
        limit = self.target_fvu * 0.999
        total = float(var.sum()) * n
        k = math.floor(0.5 * math.log2(12 * self.target_fvu * float(var.mean())) * _GRID)
        best: int | None = None
        bad: int | None = None
        fvu = math.inf
        for _ in range(40):
            step = 2.0 ** (k / _GRID)
            r = resid / step
            q = torch.round(r)
            e = q - r
            fvu = float((e * e).sum(0).double().sum()) * step**2 / total
            if fvu <= limit:
                best = k
                if not bool((q != 0).any()):
                    break
            else:
                bad = k
            if best is not None and bad is not None:
                if bad - best <= 1:
                    break
                k = (best + bad) // 2
            elif best is not None:
                k += max(1, math.floor(_GRID * 0.5 * math.log2(limit / max(fvu, 1e-300))))
            else:
                k -= max(1, math.ceil(_GRID * 0.5 * math.log2(fvu / limit)))
        if best is None:
            raise CacheError(
                f"codec errbound could not reach target_fvu={self.target_fvu} (last FVU {fvu:.3g})"
            )
        return best

    # -- prediction --------------------------------------------------------------------------

    def _sources(self, tname: str, layer: int, dec: dict[str, Tensor]) -> list[Tensor]:
        """Decoded slices that predict (tname, layer): x_l <- x_{l-1}, y_{l-1}; y_l <- x_l, y_{l-1}.

        Coding order is x_0, y_0, x_1, y_1 ..., so every source is decoded before it is used.
        """
        return _sources(tname, layer, dec) if self.predict else []

    @staticmethod
    def _fit(c: Tensor, mean: Tensor, srcs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-channel least squares of the centred values ``c`` on up to two sources.

        -> (coef [2, d], bias [d]). Float32 sums suffice: any coefficients give a valid code
        (the decoder applies the stored ones), a poorer fit only costs bits.
        """
        n, d = c.shape
        coef = torch.zeros(_N_SOURCES, d, device=c.device)
        if not srcs or n < 2:
            return coef, mean.clone()
        means = [s.mean(0) for s in srcs]
        cs = [s - m for s, m in zip(srcs, means)]
        k = len(srcs)
        # Column-wise dot products (vecdot: one fused pass each; einsum here is 20x slower).
        g = torch.empty(d, k, k, dtype=torch.float64, device=c.device)
        r = torch.empty(d, k, dtype=torch.float64, device=c.device)
        for i in range(k):
            r[:, i] = torch.linalg.vecdot(cs[i], c, dim=0)
            for j in range(i, k):
                g[:, i, j] = g[:, j, i] = torch.linalg.vecdot(cs[i], cs[j], dim=0)
        ridge = 1e-6 * g.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)
        g = g + torch.eye(k, dtype=torch.float64, device=c.device) * ridge[:, None, None]
        sol = torch.linalg.solve(g, r.unsqueeze(-1)).squeeze(-1)  # [d, k]
        sol = torch.where(torch.isfinite(sol), sol, torch.zeros_like(sol))
        coef[:k] = sol.T.float()
        bias = mean.clone()
        for j, m in enumerate(means):
            bias -= coef[j] * m
        return coef, bias

    # -- encoding ----------------------------------------------------------------------------

    def encode_pair(self, x: Tensor, y: Tensor, chunk_tokens: int) -> EncodedPair:
        n, n_layers, d = x.shape
        dev = x.device  # encodes where the activations are (a GPU during generation)
        tensors = {"x": x, "y": y}
        dec = {k: torch.empty(n, n_layers, d, device=dev) for k in TENSORS}
        step = {k: torch.ones(n_layers, d, device=dev) for k in TENSORS}
        bias = {k: torch.zeros(n_layers, d, device=dev) for k in TENSORS}
        coef = {k: torch.zeros(n_layers, _N_SOURCES, d, device=dev) for k in TENSORS}
        enc = EncodedPair({}, {}, quantised=True)
        meta = {k: {**new_meta(), "bits": [], "escapes": []} for k in TENSORS}
        bounds = chunk_bounds(n, chunk_tokens)
        for layer in range(n_layers):
            for tname in TENSORS:
                name = f"{tname}/{layer}"
                v = tensors[tname][:, layer, :]
                mean = v.mean(0) if n else torch.zeros(d, device=dev)
                c = v - mean
                var = (c * c).sum(0).double() / max(n, 1)
                live = var > 0
                srcs = self._sources(tname, layer, dec)
                cf, b = self._fit(c, mean, srcs)
                if n:  # a constant channel is reproduced exactly: no slope, its value as bias
                    cf[:, ~live] = 0.0
                    b = torch.where(live, b, v[0])
                pred = b.expand(n, d).clone()
                for j, s in enumerate(srcs):
                    pred.addcmul_(s, cf[j])
                resid = v - pred
                bias[tname][layer], coef[tname][layer] = b, cf
                if self.allocation == "channel":
                    k = self._channel_steps(resid, var, n) if n else \
                        torch.zeros(d, dtype=torch.int64, device=dev)
                else:
                    k0 = self._layer_step(resid, var, n) if n and bool(live.any()) else 0
                    k = torch.full((d,), k0, dtype=torch.int64, device=dev)
                # Quantise, decode as a reader will, measure; where float32 rounding pushed a
                # channel (or the layer) over the bound, take the next finer step and redo.
                for _attempt in range(8):
                    st = torch.exp2(k.double() / _GRID).float()
                    q = torch.round(resid / st) if n else torch.zeros(0, d, device=dev)
                    if q.numel() and float(q.abs().max()) >= 2**30:
                        raise CacheError("codec errbound: quantised values overflow 31 bits; "
                                         "raise target_fvu")
                    step[tname][layer] = st
                    codes, esc, bits = _store_codes(q.to(torch.int32))
                    enc.codes[name] = codes
                    if esc is not None:
                        enc.escapes[name] = esc
                    else:
                        enc.escapes.pop(name, None)
                    dcd = _ErrBoundDecoder({f"{tname}/step": step[tname],
                                            f"{tname}/bias": bias[tname],
                                            f"{tname}/coef": coef[tname]}, self.predict)
                    for lo, hi in bounds:
                        arrays = {kk: to_tensor(vv).to(dev)
                                  for kk, vv in split_chunk(enc, name, lo, hi).items()}
                        dcd.decode_layer(tname, layer, arrays,
                                         {t: dec[t][lo:hi] for t in TENSORS})
                    lf, chan = measure(v, dec[tname][:, layer])
                    # (a hair inside the bound: these float32 sums may be 1e-6 off)
                    if self.allocation == "channel":
                        over = chan > self.target_fvu * 0.9999
                    else:
                        over = live if lf > self.target_fvu * 0.9999 else torch.zeros_like(live)
                    if not bool(over.any()):
                        break
                    k = torch.where(over, k - 1, k)
                else:
                    raise CacheError(f"codec errbound could not meet target_fvu="
                                     f"{self.target_fvu} on {name} (float32 rounding)")
                add_layer_meta(meta[tname], lf, chan)
                meta[tname]["bits"].append(bits)
                meta[tname]["escapes"].append(0 if esc is None else int(esc[0].size))
        for tname in TENSORS:
            enc.params[f"{tname}/step"] = step[tname].cpu().numpy()
            enc.params[f"{tname}/bias"] = bias[tname].cpu().numpy()
            if self.predict:
                enc.params[f"{tname}/coef"] = coef[tname].cpu().numpy()
        enc.meta = meta
        return enc


def _sources(tname: str, layer: int, dec: dict[str, Tensor]) -> list[Tensor]:
    if tname == "x":
        return [] if layer == 0 else [dec["x"][:, layer - 1], dec["y"][:, layer - 1]]
    return [dec["x"][:, layer]] + ([dec["y"][:, layer - 1]] if layer > 0 else [])


def _store_codes(q: Tensor) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None, int]:
    """Integer codes [N, d] -> (stored array, escapes or None, bits per code).

    Signed 8-bit with escapes while they are rare (< 1 in 256 values), else zigzag-mapped
    unsigned 16/32-bit (small magnitudes -> small codes, so the high byte plane is ~all zero).
    """
    big = (q > 127) | (q < -127)
    n_big = int(big.sum())
    if n_big * 256 <= q.numel():
        codes = torch.where(big, torch.full_like(q, ESCAPE), q).to(torch.int8)
        esc = None
        if n_big:
            idx = big.reshape(-1).nonzero().squeeze(1)
            esc = (idx.cpu().numpy().astype(np.int64),
                   q.reshape(-1)[idx].cpu().numpy().astype(np.int32))
        return codes.cpu().numpy(), esc, 8
    z = ((q << 1) ^ (q >> 31)).cpu().numpy().view(np.uint32)
    top = int(z.max()) if z.size else 0
    width = np.uint16 if top < 2**16 else np.uint32
    return z.astype(width), None, np.dtype(width).itemsize * 8


def _zigzag_decode(z: Tensor) -> Tensor:
    """Zigzag codes (uint8, or uint16/uint32 seen as int16/int32) -> float32 integers."""
    if z.dtype == torch.uint8:
        zi = z.to(torch.int32)
    elif z.dtype == torch.int16:
        zi = z.to(torch.int32) & 0xFFFF
    else:
        zi = z.to(torch.int64) & 0xFFFFFFFF
    return ((zi >> 1) ^ -(zi & 1)).to(torch.float32)


class _ErrBoundDecoder(Decoder):
    """out = q * step + bias (+ sum_k coef_k * source_k), in float32, in this order."""

    def __init__(self, params: dict[str, Tensor], predict: bool) -> None:
        super().__init__(params)
        self.predict = predict

    def decode_layer(self, tname, layer, arrays, outs) -> None:
        name = f"{tname}/{layer}"
        q = arrays[name]
        out = outs[tname][:, layer]
        step = self.params[f"{tname}/step"][layer]
        bias = self.params[f"{tname}/bias"][layer]
        if q.dtype == torch.int8:
            torch.addcmul(bias, q, step, out=out)  # int8 -> float32 inside the kernel
            esc = arrays.get(f"{name}/esc")
            if esc is not None and esc.numel():
                d = q.shape[1]
                idx = esc[0].long()
                cols = idx % d
                out[idx // d, cols] = torch.addcmul(bias[cols], esc[1].to(torch.float32),
                                                    step[cols])
        else:  # zigzag codes: wide layers, and every layer of format-1 caches
            torch.addcmul(bias, _zigzag_decode(q), step, out=out)
        if self.predict:
            c = self.params[f"{tname}/coef"][layer]
            for k, src in enumerate(_sources(tname, layer, outs)):
                out.addcmul_(src, c[k])
