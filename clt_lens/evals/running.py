"""ReconstructionSums: the running per-layer sums behind FVU and L0, in one place.

Training steps (over micro-batches and data-parallel ranks), the trainer's held-out check and
``clt-lens eval`` all report FVU (or explained variance) and L0 per layer from these sums, so
their numbers are computed the same way: FVU = SSE / SST with SST from the target's running
sum and sum of squares (exact for any split of the tokens into batches or ranks), L0 = active
(token, feature) pairs / tokens. Sums are float64 on the data's device; ``packed()`` and
``from_packed()`` let ranks all-reduce all of them in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ReconstructionSums:
    sse: Tensor  # [L] squared error summed over tokens and d
    y_sum: Tensor  # [L, d] target summed over tokens
    y_sq: Tensor  # [L] squared target summed over tokens and d
    active: Tensor  # [L] active (token, feature) pairs
    n: Tensor  # [] tokens

    @classmethod
    def zeros(cls, n_layers: int, d_model: int, device: str | torch.device = "cpu"
              ) -> ReconstructionSums:  # fmt: skip
        def z(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        return cls(z(n_layers), z(n_layers, d_model), z(n_layers), z(n_layers), z())

    @torch.no_grad()
    def add(self, target: Tensor, sse: Tensor, active: Tensor) -> None:
        """One batch: ``target`` [B, L, d], its per-layer squared error ``sse`` [L] and active
        pairs ``active`` [L], both summed over the batch's tokens."""
        t = target.detach().to(self.y_sum.device, torch.float64)
        self.sse += sse.detach().to(self.sse.device, torch.float64)
        self.y_sum += t.sum(0)
        self.y_sq += t.pow(2).sum(dim=(0, 2))
        self.active += active.detach().to(self.active.device, torch.float64)
        self.n += t.shape[0]

    @torch.no_grad()
    def add_batch(self, target: Tensor, prediction: Tensor, acts: Tensor) -> None:
        """One batch from its target and prediction [B, L, d] and feature activations
        [B, L, F]."""
        err = (prediction.detach().double() - target.detach().double()).pow(2).sum(dim=(0, 2))
        self.add(target, err, (acts.detach() != 0).sum(dim=(0, 2)))

    def packed(self) -> Tensor:
        """Every sum in one flat tensor (for one all-reduce)."""
        return torch.cat([self.sse, self.y_sum.flatten(), self.y_sq, self.active, self.n[None]])

    @classmethod
    def from_packed(cls, flat: Tensor, n_layers: int, d_model: int) -> ReconstructionSums:
        L, d = n_layers, d_model
        return cls(flat[:L], flat[L : L + L * d].view(L, d), flat[L + L * d : 2 * L + L * d],
                   flat[2 * L + L * d : 3 * L + L * d], flat[-1])  # fmt: skip

    def sst(self) -> Tensor:
        n = self.n.clamp_min(1)
        return self.y_sq - self.y_sum.pow(2).sum(-1) / n

    def fvu(self) -> Tensor:
        """Fraction of variance unexplained per layer [L]."""
        return self.sse / self.sst().clamp_min(1e-30)

    def explained_variance(self) -> Tensor:
        return 1 - self.fvu()

    def l0(self) -> Tensor:
        """Mean active features per token per layer [L]."""
        return self.active / self.n.clamp_min(1)

    def mse(self) -> Tensor:
        """Mean squared error per coordinate per layer [L]."""
        return self.sse / (self.n.clamp_min(1) * self.y_sum.shape[-1])
