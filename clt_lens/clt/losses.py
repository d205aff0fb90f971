"""The CLT's training step: reconstruction, sparsity, pre-activation and auxiliary-k losses.

All losses live in normalised space. With ``e_j = y_j - y_hat_j`` and ``w[l, f]`` a feature's
decoder norm over all its target layers:
- mse = sum_j mean_tokens ||e_j||^2 (per layer in ``mse_per_layer``);
- sparsity = coeff * mean_tokens sum_{l,f} tanh(c * a * w)  (or a * w for "l1");
- preact = coeff * mean_tokens sum_{dead (l,f)} relu(theta - pre) * w  (theta = 0 unless
  JumpReLU; Anthropic's pre-activation loss, on the dead features given by the trainer);
- auxk (TopK/BatchTopK; JumpReLU with ``auxk_jumprelu``) = coeff * scale * sum_j mean_tokens
  ||e_j - e_hat_j||^2, e_hat decoded (no bias) from each layer's top-``auxk`` dead
  pre-activations (Gao et al. 2024), scale = min(#dead / (auxk * L), 1).

The sparse path works on the *support*: the positions whose dL/da is needed (active features,
plus JumpReLU positions in the kernel window just below the threshold). It gathers the
pre-activations there with sparse encoder gradients, applies the activation and penalties to
those values only, and decodes them with sparse kernels. The dense path does the same on full
[L, B, F] tensors; both give the same losses and parameter gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from clt_lens.clt.comm import FeatureComm, kth_largest
from clt_lens.clt.sparse import (
    Support,
    dense_decode_with_norms,
    encoder_grad_gather,
    sparse_decode,
    sparse_decode_with_norms,
)
from clt_lens.errors import InputError

if TYPE_CHECKING:  # annotations only: the model imports this module
    from clt_lens.clt.model import CrossLayerTranscoder

# Maps a partial reconstruction [B, L, d] to the full one (e.g. an all-reduce over feature shards).
ReduceFn = Callable[[Tensor], Tensor]


class _SquaredError(torch.autograd.Function):
    """Per layer, the mean over tokens of ||err||^2 for err [B, L, d], and its gradient in one
    pass (autograd's pow, sum and mean take three more passes over [B, L, d] backward)."""

    @staticmethod
    def forward(ctx, err: Tensor) -> Tensor:
        ctx.save_for_backward(err)
        return err.pow(2).sum(-1).mean(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (err,) = ctx.saved_tensors
        return err * (grad * (2.0 / err.shape[0])).to(err.dtype).unsqueeze(-1)


@dataclass
class CLTStepOutput:
    """What the trainer needs from one step. Everything but ``loss``/``losses`` is detached."""

    loss: Tensor
    losses: dict[str, Tensor]
    mse_per_layer: Tensor  # [L], mean over tokens of the squared error (normalised space)
    fvu_per_layer: Tensor  # [L], fraction of variance unexplained over this batch
    l0_per_layer: Tensor  # [L], mean active features per token
    fired: Tensor  # bool [L, F], fired at least once in this batch
    decode_mode: str  # "sparse" or "dense"
    support_density: float  # fraction of [B, L, F] decoded / differentiated
    _acts_fn: Callable[[], Tensor] = field(repr=False, default=None)  # type: ignore[assignment]
    _acts: Tensor | None = field(repr=False, default=None)

    @property
    def feature_acts(self) -> Tensor:
        """Detached feature activations [B, L, F] (materialised on first access)."""
        if self._acts is None:
            self._acts = self._acts_fn()
        return self._acts


def training_forward(
    clt: CrossLayerTranscoder,
    x_raw: Tensor,
    y_raw: Tensor,
    *,
    sparsity_coeff: float | None = None,
    preact_coeff: float | None = None,
    auxk_coeff: float | None = None,
    dead_mask: Tensor | None = None,
    reduce_fn: ReduceFn | None = None,
    comm: FeatureComm | None = None,
) -> CLTStepOutput:
    """Losses of one batch. ``x_raw``/``y_raw`` [B, L, d] raw; coefficients default to the config.

    ``dead_mask`` [L, F] bool marks dead features (for the pre-activation and auxiliary-k
    losses; None disables both). ``reduce_fn`` maps the partial reconstruction [B, L, d]
    (sum over sources of the decoded features, before b_dec and skip) to the full one: a
    feature-sharded trainer passes an autograd-aware all-reduce.

    ``comm`` connects a CLT that holds a slice of the features to the holders of the others
    (see ``clt_lens.clt.comm``): partial reconstructions are summed through it (unless
    ``reduce_fn`` is given), and TopK, BatchTopK and aux-k select their global top-k through it,
    so a sharded step equals a one-process step.
    """
    cfg = clt.cfg
    clt.check_activations(x_raw, "x_raw")
    clt.check_activations(y_raw, "y_raw")
    if x_raw.shape[0] != y_raw.shape[0]:
        raise InputError(f"x_raw has {x_raw.shape[0]} rows but y_raw has {y_raw.shape[0]}")
    shape_lf = (clt.n_layers, clt.n_features)
    if dead_mask is not None and tuple(dead_mask.shape) != shape_lf:
        raise InputError(
            f"dead_mask must be [n_layers, d_sae] = {list(shape_lf)}, got {tuple(dead_mask.shape)}"
        )
    sparsity_coeff = cfg.sparsity_coeff if sparsity_coeff is None else sparsity_coeff
    preact_coeff = cfg.preact_coeff if preact_coeff is None else preact_coeff
    auxk_coeff = cfg.auxk_coeff if auxk_coeff is None else auxk_coeff

    comm = comm or FeatureComm()
    if reduce_fn is None and comm.size > 1:
        reduce_fn = comm.sum_partials
    batch = x_raw.shape[0]
    x_lbd = clt.normalize_inputs(x_raw)
    y_n = clt.normalize_outputs(y_raw)
    theta = clt.threshold

    use_sparse = _choose_sparse(clt, batch, comm)
    step = (_sparse_step if use_sparse else _dense_step)(clt, x_lbd, theta, comm)
    clt._density_hint = step.density
    w_norm = step.w_norm
    partial = reduce_fn(step.partial) if reduce_fn is not None else step.partial
    y_hat = clt.finish_decode(partial, x_lbd)
    err = y_hat - y_n
    mse_per_layer = _SquaredError.apply(err)
    mse = mse_per_layer.sum()

    losses = {"mse": mse, "sparsity": sparsity_coeff * step.penalty / batch}
    zero = mse.new_zeros(())
    dead_pre = None
    has_dead = dead_mask is not None and bool(dead_mask.any())
    act = clt.act
    wants_auxk = act.uses_auxk(cfg) and auxk_coeff > 0 and dead_mask is not None
    if has_dead and (preact_coeff > 0 or wants_auxk):
        dead_pre = _dead_preacts(clt, x_lbd, dead_mask)
    if dead_pre is not None and preact_coeff > 0:
        losses["preact"] = preact_coeff * _preact_penalty(clt, dead_pre, theta, w_norm) / batch
    else:
        losses["preact"] = zero
    # with reduce_fn (a collective) every rank must decode, even without local dead features
    if wants_auxk and (has_dead or reduce_fn is not None):
        residual = (y_n - y_hat).detach()
        dead_pre = dead_pre if dead_pre is not None else [None] * clt.n_layers
        losses["auxk"] = auxk_coeff * _auxk_loss(clt, dead_pre, residual, batch, reduce_fn, comm)
    else:
        losses["auxk"] = zero
    loss = losses["mse"] + losses["sparsity"] + losses["preact"] + losses["auxk"]

    with torch.no_grad():
        centred = y_n - y_n.mean(0, keepdim=True)  # (torch's var over dim 0 is 3x slower)
        # the numerator is the MSE's own sum: one pass fewer over [B, L, d]
        fvu = mse_per_layer.detach() * batch / centred.pow(2).sum(dim=(0, 2)).clamp(min=1e-12)
        if act.running_threshold and clt.training:
            act.update_running_threshold_(clt, comm.all_reduce_(step.min_positive, "min"))

    return CLTStepOutput(
        loss=loss,
        losses=losses,
        mse_per_layer=mse_per_layer.detach(),
        fvu_per_layer=fvu,
        l0_per_layer=step.l0,
        fired=step.fired,
        decode_mode="sparse" if use_sparse else "dense",
        support_density=step.density,
        _acts_fn=step.acts_fn,
    )


@dataclass
class _Decoded:
    """What the sparse and dense paths hand to the shared loss code."""

    partial: Tensor  # [B, L, d] sum over sources of the decoded features
    w_norm: Tensor  # [L, F] decoder norms (differentiable)
    penalty: Tensor  # unweighted sparsity penalty summed over tokens
    l0: Tensor  # [L]
    fired: Tensor  # bool [L, F]
    density: float  # support density (dense path: active density)
    acts_fn: Callable[[], Tensor]  # -> detached [B, L, F]
    min_positive: Tensor | None  # [L] smallest positive activation (running thresholds only)


def _sparse_step(
    clt: CrossLayerTranscoder, x_lbd: Tensor, theta: Tensor | None, comm: FeatureComm
) -> _Decoded:
    cfg, act = clt.cfg, clt.act
    n_layers, batch, n_feat = clt.n_layers, x_lbd.shape[1], clt.n_features
    with torch.no_grad():
        # without the bias: JumpReLU moves it into the support test, saving a pass over [L,B,F]
        pre_nobias = torch.bmm(x_lbd, clt.W_enc)
        bias = clt.b_enc.detach().to(pre_nobias.dtype).unsqueeze(1)
        support, pre_s_nobias = act.training_support(clt, pre_nobias, bias, theta, comm)
        del pre_nobias
    pre_s = encoder_grad_gather(support, pre_s_nobias, x_lbd, clt.W_enc, clt.b_enc)
    acts_s = act.activate_support(clt, pre_s, theta, support)
    partial, w_norm = sparse_decode_with_norms(support, acts_s, list(clt.W_dec))
    penalty = _penalty(cfg, acts_s, w_norm.reshape(-1)[support.lf])
    acts_detached = acts_s.detach()
    with torch.no_grad():
        active = acts_detached > 0
        layer_of = torch.div(support.lf, n_feat, rounding_mode="floor")
        l0 = torch.bincount(layer_of[active], minlength=n_layers).to(x_lbd.dtype) / batch
        fired = torch.zeros(n_layers * n_feat, dtype=torch.bool, device=x_lbd.device)
        fired[support.lf[active]] = True
        min_positive = None
        if act.running_threshold:
            positive = torch.where(active, acts_detached, torch.inf)
            min_positive = torch.full(
                (n_layers,), torch.inf, dtype=positive.dtype, device=positive.device
            ).scatter_reduce(0, layer_of, positive, "amin")

    def acts_fn() -> Tensor:
        dense = acts_detached.new_zeros(n_layers * batch * n_feat)
        dense[support.flat] = acts_detached
        return dense.view(n_layers, batch, n_feat).transpose(0, 1).contiguous()

    return _Decoded(
        partial, w_norm, penalty, l0, fired.view(n_layers, n_feat), support.density, acts_fn,
        min_positive,
    )  # fmt: skip


def _dense_step(
    clt: CrossLayerTranscoder, x_lbd: Tensor, theta: Tensor | None, comm: FeatureComm
) -> _Decoded:
    cfg, act = clt.cfg, clt.act
    batch = x_lbd.shape[1]
    pre = clt.preacts_lbf(x_lbd)
    acts = act.activate_dense(clt, pre, theta, comm)
    partial, w_norm = dense_decode_with_norms(acts, list(clt.W_dec))
    penalty = _penalty(cfg, acts, w_norm.unsqueeze(1))
    acts_detached = acts.detach()
    with torch.no_grad():
        active = acts_detached > 0
        l0 = active.sum(dim=(1, 2)).to(x_lbd.dtype) / batch
        min_positive = None
        if act.running_threshold:
            min_positive = torch.where(active, acts_detached, torch.inf).amin(dim=(1, 2))
    density = float(l0.sum()) / (clt.n_layers * clt.n_features)
    return _Decoded(
        partial, w_norm, penalty, l0, active.any(dim=1), density,
        lambda: acts_detached.transpose(0, 1).contiguous(), min_positive,
    )  # fmt: skip


def _choose_sparse(clt: CrossLayerTranscoder, batch: int, comm: FeatureComm) -> bool:
    """(Batch)TopK know their density; threshold rules use the previous step's."""
    density = clt.act.known_density(clt.cfg, comm.size)
    if density is None:
        density = clt._density_hint
    return clt.use_sparse(batch * clt.n_layers * clt.n_features, density)


def _penalty(cfg: object, acts: Tensor, w_norm: Tensor) -> Tensor:
    """Unweighted sparsity penalty summed over tokens (caller divides by the batch)."""
    scaled = acts * w_norm
    if cfg.sparsity_penalty == "tanh":  # type: ignore[attr-defined]
        return torch.tanh(cfg.tanh_scale * scaled).sum()  # type: ignore[attr-defined]
    return scaled.sum()


def _dead_preacts(
    clt: CrossLayerTranscoder, x_lbd: Tensor, dead_mask: Tensor
) -> list[tuple[Tensor, Tensor] | None]:
    """Per layer: (dead feature indices, their pre-activations [B, n_dead]) or None.

    Only the dead columns of the encoder are multiplied, so the cost scales with the number
    of dead features rather than with F.
    """
    out: list[tuple[Tensor, Tensor] | None] = []
    w_layers = clt.W_enc.unbind(0)
    b_layers = clt.b_enc.unbind(0)
    for layer in range(clt.n_layers):
        idx = dead_mask[layer].nonzero().squeeze(1).to(x_lbd.device)
        if idx.numel() == 0:
            out.append(None)
            continue
        pre = torch.addmm(
            b_layers[layer].index_select(0, idx), x_lbd[layer], w_layers[layer].index_select(1, idx)
        )
        out.append((idx, pre))
    return out


def _preact_penalty(
    clt: CrossLayerTranscoder,
    dead_pre: list[tuple[Tensor, Tensor] | None],
    theta: Tensor | None,
    w_norm: Tensor,
) -> Tensor:
    total = w_norm.new_zeros(())
    theta_layers = theta.unbind(0) if theta is not None else None
    w_layers = w_norm.unbind(0)
    for layer, entry in enumerate(dead_pre):
        if entry is None:
            continue
        idx, pre = entry
        gap = -pre if theta_layers is None else theta_layers[layer].index_select(0, idx) - pre
        total = total + (gap.relu() * w_layers[layer].index_select(0, idx)).sum()
    return total


def _auxk_loss(
    clt: CrossLayerTranscoder,
    dead_pre: list[tuple[Tensor, Tensor] | None],
    residual: Tensor,
    batch: int,
    reduce_fn: ReduceFn | None,
    comm: FeatureComm,
) -> Tensor:
    k_aux = clt.cfg.auxk_per_layer
    flat_parts, value_parts = [], []
    n_features = clt.n_features
    n_dead = sum(entry[0].numel() for entry in dead_pre if entry is not None)
    tau = None
    if comm.size > 1:  # the k_aux-th largest dead pre-activation per token over all slices
        padded = residual.new_full((clt.n_layers, batch, k_aux), -torch.inf)
        for layer, entry in enumerate(dead_pre):
            if entry is not None:
                pre = entry[1].detach()
                top = pre.topk(min(k_aux, pre.shape[-1]), dim=-1, sorted=False).values
                padded[layer, :, : top.shape[-1]] = top
        tau = kth_largest(padded, k_aux, comm)  # [L, B]
        n_dead = int(comm.all_reduce_(residual.new_tensor(float(n_dead)), "sum"))
    for layer, entry in enumerate(dead_pre):
        if entry is None:
            continue
        idx, pre = entry
        rows = torch.arange(batch, device=pre.device).unsqueeze(1)
        if tau is None:
            top = pre.topk(min(k_aux, idx.numel()), dim=-1, sorted=False)
            feat = idx[top.indices]  # [B, k] feature ids
            order = feat.argsort(dim=-1)
            feat = feat.gather(-1, order)
            vals = top.values.gather(-1, order).relu()
            flat_parts.append(((layer * batch + rows) * n_features + feat).reshape(-1))
            value_parts.append(vals.reshape(-1))
            continue
        keep = pre.detach() >= tau[layer].unsqueeze(1)  # [B, n_dead]; idx is sorted
        r, c = keep.nonzero(as_tuple=True)
        flat_parts.append((layer * batch + r) * n_features + idx[c])
        value_parts.append(pre[r, c].relu())
    if flat_parts:
        support = Support.from_flat(torch.cat(flat_parts), clt.n_layers, batch, n_features)
        e_hat = sparse_decode(support, torch.cat(value_parts), list(clt.W_dec))
    else:
        e_hat = torch.zeros_like(residual)
    if reduce_fn is not None:
        e_hat = reduce_fn(e_hat)
    scale = min(n_dead / (k_aux * clt.n_layers), 1.0)
    return scale * (e_hat - residual).pow(2).sum(-1).mean(0).sum()
