"""Reconstruction and sparsity metrics, accumulated over batches so any token count fits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from clt_lens.errors import InputError
from clt_lens.evals.running import ReconstructionSums

DENSE_THRESHOLD = 0.10  # a feature firing on more than 10% of tokens counts as dense


@dataclass
class LayerStats:
    """Running sums per layer (:class:`ReconstructionSums`) and firing counts per feature."""

    n_layers: int
    d_sae: int
    d_model: int
    n_tokens: int = 0
    sums: ReconstructionSums = field(init=False)
    fire_counts: torch.Tensor = field(init=False)  # per (layer, feature)

    def __post_init__(self) -> None:
        self.sums = ReconstructionSums.zeros(self.n_layers, self.d_model)
        self.fire_counts = torch.zeros(self.n_layers, self.d_sae, dtype=torch.long)

    def update(self, y: torch.Tensor, y_hat: torch.Tensor, acts: torch.Tensor) -> None:
        """y, y_hat: [B, L, d] raw activations; acts: [B, L, F] feature activations."""
        if y.shape != y_hat.shape or y.shape[1:] != (self.n_layers, self.d_model):
            raise InputError(
                f"expected y and y_hat of shape [B, {self.n_layers}, {self.d_model}], got "
                f"{tuple(y.shape)} and {tuple(y_hat.shape)}"
            )
        self.sums.add_batch(y.cpu(), y_hat.cpu(), acts)
        self.fire_counts += (acts.detach() != 0).sum(0).cpu()
        self.n_tokens += y.shape[0]

    def summary(self) -> dict[str, list[float]]:
        n = max(self.n_tokens, 1)
        fvu = self.sums.fvu().tolist()
        freq = self.fire_counts.double() / n
        return {
            "mse": self.sums.mse().tolist(),
            "fvu": fvu,
            "explained_variance": [1 - f for f in fvu],
            "l0": self.sums.l0().tolist(),
            "dead_fraction": (self.fire_counts == 0).double().mean(-1).tolist(),
            "dense_fraction": (freq > DENSE_THRESHOLD).double().mean(-1).tolist(),
        }

    def density_histogram(self, bins: int = 50) -> dict[str, list[float]]:
        """Histogram of log10 firing frequency over all features (dead ones counted apart)."""
        freq = self.fire_counts.double().flatten() / max(self.n_tokens, 1)
        alive = freq[freq > 0]
        lo = -float(torch.log10(torch.tensor(float(max(self.n_tokens, 1)))))
        edges = torch.linspace(lo, 0.0, bins + 1, dtype=torch.float64)
        counts = (
            torch.histogram(alive.log10(), bins=edges)[0] if alive.numel() else torch.zeros(bins)
        )
        return {
            "log10_freq_edges": edges.tolist(),
            "counts": counts.long().tolist(),
            "dead": int((freq == 0).sum()),
        }


class CEStats:
    """Next-token cross-entropies, KL and top-1 agreement summed over positions."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, float] = {}

    def add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value.double().sum())

    def summary(self) -> dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}


def token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position next-token cross-entropy [B, T-1] in nats."""
    logp = logits[:, :-1].double().log_softmax(-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def kl_div(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position [B, T-1], p the original model."""
    lp = logits_p[:, :-1].double().log_softmax(-1)
    lq = logits_q[:, :-1].double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def ce_recovered(ce_orig: float, ce_repl: float, ce_zero: float) -> float:
    """Fraction of the zero-ablation CE increase that the replacement recovers."""
    denom = ce_zero - ce_orig
    return float("nan") if denom == 0 else (ce_zero - ce_repl) / denom
