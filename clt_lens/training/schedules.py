"""Learning-rate and sparsity-coefficient schedules: pure functions of the step."""

from __future__ import annotations

import math

from clt_lens.training.config import TrainConfig


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier on cfg.lr at ``step`` (0-based): linear warm-up, then hold, then decay."""
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_decay == "constant":
        return 1.0
    start = max(int(cfg.lr_decay_start * cfg.n_steps), cfg.lr_warmup_steps)
    if step < start:
        return 1.0
    span = max(cfg.n_steps - start, 1)
    t = min((step - start) / span, 1.0)
    end = cfg.lr_end_factor
    if cfg.lr_decay == "linear":
        return 1.0 + (end - 1.0) * t
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def sparsity_coeff(cfg: TrainConfig, step: int) -> float:
    """Sparsity coefficient at ``step``: linear warm-up from 0 to cfg.clt.sparsity_coeff."""
    if cfg.sparsity_warmup_steps and step < cfg.sparsity_warmup_steps:
        return cfg.clt.sparsity_coeff * (step + 1) / cfg.sparsity_warmup_steps
    return cfg.clt.sparsity_coeff
