"""Activation functions of the CLT and the selection of the positions they keep.

JumpReLU ``a = pre * 1[pre > theta]`` is trained with a straight-through pseudo-derivative:
the threshold receives ``-(theta / eps) * K((pre - theta) / eps) * dL/da`` with the rectangle
kernel ``K(u) = 1[-1/2 < u < 1/2]`` of bandwidth ``eps`` (Rajamanoharan et al. 2024). The same
autograd function serves dense tensors (threshold broadcast) and the sparse path (thresholds
gathered per kept position), because every operation is elementwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# Positions this far (in bandwidth units) below the kernel window still count as support, so
# rounding in ``pre > theta - eps/2`` can never drop a position the kernel would keep.
_WINDOW_MARGIN = 1e-4


class JumpReLUFunction(torch.autograd.Function):
    """``pre * (pre > threshold)`` with the rectangle-kernel pseudo-derivative.

    ``threshold`` may broadcast against ``pre``; its gradient is summed back to its shape.
    With ``ste_to_input`` the pseudo-derivative also reaches ``pre`` (Anthropic's variant).
    """

    @staticmethod
    def forward(
        ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool
    ) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        ctx.ste_to_input = ste_to_input
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_thr = None
        need_pseudo = ctx.needs_input_grad[1] or (ctx.ste_to_input and ctx.needs_input_grad[0])
        pseudo = None
        if need_pseudo:
            u = (pre - threshold) / eps
            pseudo = ((u > -0.5) & (u < 0.5)) * (threshold / eps) * grad_out
        if ctx.needs_input_grad[0]:
            grad_pre = grad_out * (pre > threshold)
            if ctx.ste_to_input:
                grad_pre = grad_pre + pseudo
        if ctx.needs_input_grad[1]:
            grad_thr = (-pseudo).sum_to_size(threshold.shape)
        return grad_pre, grad_thr, None, None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool) -> Tensor:
    return JumpReLUFunction.apply(pre, threshold, bandwidth, ste_to_input)  # type: ignore[return-value]


def jumprelu_support_threshold(threshold: Tensor, bandwidth: float) -> Tensor:
    """Lower bound of the positions whose dL/da matters while training a JumpReLU.

    dL/da is used where the feature is active (pre > theta) and, for the threshold's
    pseudo-derivative, inside the kernel window below it: pre > theta - eps/2.
    """
    return threshold - 0.5 * bandwidth * (1.0 + _WINDOW_MARGIN)


def topk_indices(pre: Tensor, k: int) -> Tensor:
    """Indices of the k largest pre-activations along the last dim, sorted ascending."""
    return pre.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def batch_topk_flat_indices(pre_lbf: Tensor, k: int) -> Tensor:
    """Per layer, flat indices into [B*F] of the k*B largest pre-activations (sorted).

    ``pre_lbf`` is [L, B, F]; returns [L, min(k*B, B*F)] positions in row-major order.
    """
    n_layers, batch, n_features = pre_lbf.shape
    n_keep = min(k * batch, batch * n_features)
    flat = pre_lbf.reshape(n_layers, batch * n_features)
    return flat.topk(n_keep, dim=-1, sorted=False).indices.sort(dim=-1).values
