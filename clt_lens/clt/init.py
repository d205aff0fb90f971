"""Seeded initialisation of a CLT, or of one feature slice of it, independent of the world size.

Random numbers are drawn per *feature block* (``INIT_BLOCK`` consecutive features of one tensor)
from a generator seeded by (seed, tensor name, block index). A rank that holds features
``[start, start + n)`` of a CLT with ``total`` features draws only the blocks it overlaps, so its
slice equals the same slice of a one-process initialisation with the same seed, and no rank ever
draws (or allocates) the whole tensor.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from clt_lens.errors import InputError

INIT_BLOCK = 256  # features per random stream; fixed, so streams do not depend on the world size


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@torch.no_grad()
def uniform_feature_slice_(
    t: Tensor, bound: float, *, seed: int, name: str, feature_dim: int, start: int
) -> Tensor:
    """Fill ``t`` (a slice starting at global feature ``start`` along ``feature_dim``) with
    U(-bound, bound) drawn from the per-block streams of tensor ``name``."""
    n = t.shape[feature_dim]
    first, last = start // INIT_BLOCK, (start + n - 1) // INIT_BLOCK if n else -1
    gen = torch.Generator(device=t.device)
    for block in range(first, last + 1):
        b0 = block * INIT_BLOCK
        lo, hi = max(start, b0), min(start + n, b0 + INIT_BLOCK)
        shape = list(t.shape)
        shape[feature_dim] = INIT_BLOCK
        gen.manual_seed(_block_seed(seed, name, block))
        full_block = torch.empty(shape, dtype=t.dtype, device=t.device)
        full_block.uniform_(-bound, bound, generator=gen)
        t.narrow(feature_dim, lo - start, hi - lo).copy_(
            full_block.narrow(feature_dim, lo - b0, hi - lo)
        )
    return t


@torch.no_grad()
def init_clt_(clt, *, seed: int, feature_start: int = 0, total_features: int | None = None):
    """Initialise ``clt`` (which may hold a feature slice) with Anthropic's CLT recipe.

    ``W_enc ~ U(+-1/sqrt(F))`` and ``W_dec ~ U(+-1/sqrt(T d))`` with F the *total* features per
    layer and T the number of layers a target receives from; biases zero, JumpReLU thresholds at
    ``jumprelu_init_threshold``. ``clt`` holds features ``[feature_start, feature_start +
    clt.cfg.d_sae)`` of a CLT with ``total_features`` (default: its own ``d_sae``).
    """
    cfg = clt.cfg
    total = total_features if total_features is not None else cfg.d_sae
    if feature_start < 0 or feature_start + cfg.d_sae > total:
        raise InputError(
            f"feature slice [{feature_start}, {feature_start + cfg.d_sae}) is outside "
            f"[0, {total})"
        )
    enc_bound = 1.0 / math.sqrt(total)
    dec_bound = 1.0 / math.sqrt((cfg.n_layers if cfg.cross_layer else 1) * cfg.d_in)
    uniform_feature_slice_(
        clt.W_enc, enc_bound, seed=seed, name="W_enc", feature_dim=2, start=feature_start
    )
    for i, w in enumerate(clt.W_dec):
        uniform_feature_slice_(w, dec_bound, seed=seed, name=f"W_dec.{i}", feature_dim=0,
                               start=feature_start)  # fmt: skip
    clt.b_enc.zero_()
    clt.b_dec.zero_()
    if cfg.skip:
        clt.W_skip.zero_()
    clt.act.reset_state_(clt)
    return clt
