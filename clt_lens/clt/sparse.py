"""Decoding (and encoder gradients) from the kept positions of the activations only.

A ``Support`` lists the positions of an activation tensor laid out as [L, B, F] that carry a
value or need a gradient, in (layer, token, feature) order, with the CSR index arrays of every
layer's [B, F] block and of its transpose [F, B]. Values may be zero at kept positions (a
JumpReLU feature just below its threshold still needs dL/da for the threshold's
pseudo-derivative); they cost a multiply and keep the pattern fixed between forward and
backward.

Decoding is ``out[:, j] = sum_{i <= j} z_i @ W_dec[i][:, j - i]``. Both decoders below are
custom autograd functions that write into one output buffer: slicing parameters or outputs
under autograd would make it zero-fill a full-size gradient buffer per slice.
- ``sparse_decode``: forward a gather-and-sum of decoder rows per token (``embedding_bag``
  over the CSR index arrays); grad of the values with ``torch.sparse.sampled_addmm`` on the
  transposed pattern (feature-major: each decoder row read once); grad of W_dec with the
  transposed CSR.
  The ``*_with_norms`` variants also return the decoder norms [L, F] and fold their gradient
  into the decoder's, saving passes over every decoder weight.
  On the CPU, ``cpu_kernels`` (a small C library built at first use) does the same work in
  one pass per decoder row, forward and backward; torch's ops remain the reference and the
  fallback (CUDA, half-precision decoders, no compiler). Inside ``grad_squares.recording()``
  the kernel's backward also records each dL/dW_dec's sum of squares for the clipping norm.
- ``dense_decode``: the same with dense matmuls, for dense activations.
``encoder_grad_gather`` takes pre-activations at the support and gives the encoder sparse
gradients (W_enc, b_enc and, if needed, the input); on the CPU the C kernels write W_enc's
gradient and build a threshold rule's support (``Support.above``) too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from clt_lens.clt import cpu_kernels, grad_squares

# torch warns once per process that CSR support is "beta"; these kernels are tested here.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


# decode from a separate support of the nonzeros when they are fewer than this fraction
_SUBSET_BELOW = 0.9


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _spmm(sparse: Tensor, dense: Tensor) -> Tensor:
    """CSR @ dense into a fresh buffer; torch.sparse.mm zero-fills, multiplies, then copies."""
    out = torch.empty(sparse.shape[0], dense.shape[1], dtype=dense.dtype, device=dense.device)
    return torch.addmm(out, sparse, dense, beta=0, out=out)


def _rows_decode(support: Support, values: Tensor, layer: int, w2d: Tensor) -> Tensor:
    """Layer ``layer``'s [B, F] block @ ``w2d`` [F, n]: per token, the weighted sum of the
    decoder rows of its kept features. ``embedding_bag`` does exactly that gather-and-sum; on
    CPU it beats the CSR ``addmm`` by 5-30% (memory-bound either way: one decoder row read per
    entry), and it needs no CSR tensor."""
    a, b = support.layer_ptr[layer], support.layer_ptr[layer + 1]
    return torch.nn.functional.embedding_bag(
        support.cols[a:b], w2d, support.crow[layer][:-1], mode="sum",
        per_sample_weights=values[a:b],
    )


def _row_pointers(counts: Tensor) -> tuple[Tensor, list[int]]:
    """From entries per (layer, token) [L, B]: each layer's CSR row pointers [L, B + 1] and
    where each layer's entries start and end (``layer_ptr``, L + 1 offsets)."""
    n_layers, batch = counts.shape
    crow = torch.zeros(n_layers, batch + 1, dtype=torch.int64, device=counts.device)
    crow[:, 1:] = counts.cumsum(1)
    layer_ptr = [0]
    for c in crow[:, -1].tolist():
        layer_ptr.append(layer_ptr[-1] + int(c))
    return crow, layer_ptr


@dataclass
class Support:
    """Kept positions of a [L, B, F] activation tensor, in (l, b, f) order.

    ``flat`` indexes the flattened [L, B, F] tensor; ``layer_ptr[l]:layer_ptr[l+1]`` are layer
    l's entries; ``crow[l]`` / ``cols`` give layer l's [B, F] CSR (cols sliced by layer_ptr).
    ``lf`` indexes the flattened [L, F] (per-feature parameters).
    """

    n_layers: int
    batch: int
    n_features: int
    flat: Tensor
    rows: Tensor
    cols: Tensor
    lf: Tensor
    layer_ptr: list[int]
    crow: Tensor  # [L, B + 1]
    _transposed: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)
    _parent: tuple[Support, Tensor] | None = field(default=None, repr=False)

    @property
    def nnz(self) -> int:
        return int(self.flat.numel())

    @property
    def density(self) -> float:
        total = self.n_layers * self.batch * self.n_features
        return self.nnz / total if total else 0.0

    @classmethod
    def from_flat(cls, flat: Tensor, n_layers: int, batch: int, n_features: int) -> Support:
        """Build from sorted flat indices into [L, B, F]."""
        flat = flat.to(torch.int64)
        per_layer = batch * n_features
        layer = torch.div(flat, per_layer, rounding_mode="floor")
        rem = flat - layer * per_layer
        rows = torch.div(rem, n_features, rounding_mode="floor")
        cols = rem - rows * n_features
        counts = torch.bincount(layer * batch + rows, minlength=n_layers * batch)
        crow, layer_ptr = _row_pointers(counts.view(n_layers, batch))
        return cls(
            n_layers=n_layers,
            batch=batch,
            n_features=n_features,
            flat=flat,
            rows=rows,
            cols=cols,
            lf=layer * n_features + cols,
            layer_ptr=layer_ptr,
            crow=crow,
        )

    @classmethod
    def from_mask(cls, mask_lbf: Tensor) -> Support:
        """Positions where a boolean [L, B, F] tensor is True."""
        n_layers, batch, n_features = mask_lbf.shape
        flat = mask_lbf.reshape(-1).nonzero().squeeze(1)
        return cls.from_flat(flat, n_layers, batch, n_features)

    @classmethod
    def above(cls, pre_lbf: Tensor, cut_lf: Tensor) -> tuple[Support, Tensor]:
        """Positions where ``pre_lbf`` [L, B, F] > ``cut_lf`` [L, F] (a per-feature cut), and
        the values of ``pre_lbf`` there."""
        n_layers, batch, n_features = pre_lbf.shape
        cut_lf = cut_lf.to(pre_lbf.dtype).contiguous()
        if not cpu_kernels.applies(pre_lbf, cut_lf):
            support = cls.from_mask(pre_lbf > cut_lf.unsqueeze(1))
            return support, pre_lbf.reshape(-1)[support.flat]
        counts, flat, rows, cols, lf, values = cpu_kernels.support_above(pre_lbf, cut_lf)
        crow, layer_ptr = _row_pointers(counts)
        support = cls(n_layers=n_layers, batch=batch, n_features=n_features, flat=flat,
                      rows=rows, cols=cols, lf=lf, layer_ptr=layer_ptr, crow=crow)  # fmt: skip
        return support, values

    @classmethod
    def from_layer_indices(cls, idx: Tensor, batch: int, n_features: int) -> Support:
        """From per-layer flat indices into [B*F] ([L, n] sorted, as batch top-k gives)."""
        n_layers = idx.shape[0]
        offsets = torch.arange(n_layers, device=idx.device).unsqueeze(1) * (batch * n_features)
        return cls.from_flat((idx + offsets).reshape(-1), n_layers, batch, n_features)

    @classmethod
    def from_row_indices(cls, idx: Tensor, n_features: int) -> Support:
        """From per-row feature indices [L, B, k] (each row sorted), as top-k gives."""
        n_layers, batch, k = idx.shape
        base = torch.arange(n_layers * batch, device=idx.device).view(n_layers, batch, 1)
        return cls.from_flat((base * n_features + idx).reshape(-1), n_layers, batch, n_features)

    def subset(self, keep: Tensor) -> Support:
        """The positions where the bool ``keep`` (one per entry) is True, in the same order."""
        sub = Support.from_flat(self.flat[keep], self.n_layers, self.batch, self.n_features)
        sub._parent = (self, keep)  # its transposed order comes from ours, without a sort
        return sub

    def layer_csr(self, values: Tensor, layer: int) -> Tensor:
        """Layer ``layer``'s [B, F] block as a CSR tensor with the given values."""
        a, b = self.layer_ptr[layer], self.layer_ptr[layer + 1]
        return _csr(self.crow[layer], self.cols[a:b], values[a:b], (self.batch, self.n_features))

    def transposed(self) -> tuple[Tensor, Tensor, Tensor]:
        """(perm, crow_t [L, F+1], cols_t): entries sorted by (l, f, b) for the [F, B] CSRs."""
        if self._transposed is None:
            if self._parent is not None:  # the parent's order, restricted to our entries
                parent, keep = self._parent
                parent_perm = parent.transposed()[0]
                position = torch.cumsum(keep, 0) - 1  # parent entry -> our entry
                perm = position[parent_perm[keep[parent_perm]]]
            else:
                # (l, f, b) keys are unique; int32 sorts about twice as fast when they fit
                key = self.lf * self.batch + self.rows
                if self.n_layers * self.n_features * self.batch < 2**31:
                    key = key.to(torch.int32)
                perm = torch.sort(key).indices
            counts = torch.bincount(self.lf, minlength=self.n_layers * self.n_features)
            crow_t = torch.zeros(
                self.n_layers, self.n_features + 1, dtype=torch.int64, device=self.flat.device
            )
            crow_t[:, 1:] = counts.view(self.n_layers, self.n_features).cumsum(1)
            self._transposed = (perm, crow_t, self.rows.index_select(0, perm))
        return self._transposed

    def layer_csr_t(self, values_t: Tensor, layer: int) -> Tensor:
        """Layer ``layer``'s transposed [F, B] CSR; ``values_t`` are values[perm]."""
        _, crow_t, cols_t = self.transposed()
        a, b = self.layer_ptr[layer], self.layer_ptr[layer + 1]
        return _csr(crow_t[layer], cols_t[a:b], values_t[a:b], (self.n_features, self.batch))


def _target_span(source: int, n_targets: int) -> slice:
    return slice(source, source + n_targets)


def _decoder_norms(w_dec: tuple[Tensor, ...]) -> Tensor:
    return torch.stack([w.reshape(w.shape[0], -1).norm(dim=1) for w in w_dec])


def _norm_grad_scale(norm: Tensor, grad_norm: Tensor) -> Tensor:
    """dL/dnorm / norm: the norms' gradient is this times w (zero-norm features get none)."""
    return torch.where(norm > 0, grad_norm / norm.clamp(min=torch.finfo(norm.dtype).tiny), 0)


def _add_norm_grad_(grad_w: Tensor, w: Tensor, norm: Tensor, grad_norm: Tensor) -> None:
    """grad_w += dL/dnorm * w / norm, in place."""
    scale = _norm_grad_scale(norm, grad_norm)
    grad_w.addcmul_(w, scale.view(-1, *([1] * (w.dim() - 1))))


def _to_support_order(
    grad_values_t: Tensor | None, support: Support, dtype: torch.dtype
) -> Tensor | None:
    """dL/da computed in the transposed (feature-major) order, back in the support's order."""
    if grad_values_t is None:
        return None
    perm = support.transposed()[0]
    return torch.empty_like(grad_values_t).index_copy_(0, perm, grad_values_t).to(dtype)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, support: Support, with_norms: bool, values: Tensor, *w_dec: Tensor
    ) -> tuple[Tensor, Tensor]:
        n_layers, batch = support.n_layers, support.batch
        d = w_dec[0].shape[-1]
        ctx.values_dtype = values.dtype
        values = values.to(w_dec[0].dtype)  # autocast may hand us half-precision values
        ctx.kernels = cpu_kernels.applies(values, *w_dec)
        if ctx.kernels:  # one pass over each decoder row, in the support's transposed order
            values_t = values.index_select(0, support.transposed()[0])
            out, norms = cpu_kernels.decode_forward(support, values_t, w_dec, with_norms)
            norms = values.new_zeros(0) if norms is None else norms
            ctx.support = support
            ctx.save_for_backward(values_t, norms, *w_dec)
            ctx.mark_non_differentiable(*([] if with_norms else [norms]))
            return out, norms
        # zeros at kept positions (JumpReLU's kernel window) need dL/da but add nothing to the
        # output or to dL/dW_dec: decode and the decoder gradient use the nonzeros only
        nonzero = values != 0
        n_nonzero = int(nonzero.sum())
        if n_nonzero < _SUBSET_BELOW * support.nnz:
            active, active_values = support.subset(nonzero), values[nonzero]
        else:
            active, active_values = support, values
        out = values.new_zeros(batch, n_layers, d)
        for i, w in enumerate(w_dec):
            if active.layer_ptr[i + 1] == active.layer_ptr[i]:
                continue
            n_t = w.shape[1]
            part = _rows_decode(active, active_values, i, w.reshape(w.shape[0], n_t * d))
            out[:, _target_span(i, n_t)] += part.view(batch, n_t, d)
        norms = _decoder_norms(w_dec) if with_norms else values.new_zeros(0)
        ctx.support, ctx.active = support, active
        ctx.save_for_backward(values, active_values, norms, *w_dec)
        ctx.mark_non_differentiable(*([] if with_norms else [norms]))
        return out, norms

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor, grad_norms: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        if ctx.kernels:
            return _SparseDecode._kernel_backward(ctx, grad_out, grad_norms)
        support: Support = ctx.support
        active: Support = ctx.active
        values, active_values, norms, *w_dec = ctx.saved_tensors
        need_values = ctx.needs_input_grad[2]
        need_w = ctx.needs_input_grad[3:]
        batch, d = support.batch, grad_out.shape[-1]
        grads_w: list[Tensor | None] = [None] * len(w_dec)
        values_t = active_values[active.transposed()[0]] if any(need_w) else None
        grad_values_t = pattern_t = None
        if need_values:
            # dL/da at (b, f) is g[b] . W_dec[f]; in (l, f, b) order each decoder row is read
            # once for all its tokens (about 2x faster than row-major order on CPU)
            perm = support.transposed()[0]
            pattern_t = values[perm]  # beta=0: only the pattern matters
            grad_values_t = torch.empty_like(values)
        for i, w in enumerate(w_dec):
            a, b = support.layer_ptr[i], support.layer_ptr[i + 1]
            n_t, n_features = w.shape[1], w.shape[0]
            g = grad_out[:, _target_span(i, n_t)].reshape(batch, n_t * d)
            if a < b and grad_values_t is not None:
                sampled = torch.sparse.sampled_addmm(
                    support.layer_csr_t(pattern_t, i), w.reshape(n_features, n_t * d), g.t(),
                    beta=0.0,
                )
                grad_values_t[a:b] = sampled.values()
            if need_w[i] and active.layer_ptr[i] < active.layer_ptr[i + 1]:
                gw = _spmm(active.layer_csr_t(values_t, i), g)
                grads_w[i] = gw.view_as(w)
            if need_w[i]:
                if grads_w[i] is None:
                    grads_w[i] = torch.zeros_like(w)
                if grad_norms is not None and norms.numel():
                    _add_norm_grad_(grads_w[i], w, norms[i], grad_norms[i])
        grad_values = _to_support_order(grad_values_t, support, ctx.values_dtype)
        return (None, None, grad_values, *grads_w)

    @staticmethod
    def _kernel_backward(
        ctx: Any, grad_out: Tensor, grad_norms: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        support: Support = ctx.support
        values_t, norms, *w_dec = ctx.saved_tensors
        scale = None
        if grad_norms is not None and norms.numel():
            scale = _norm_grad_scale(norms, grad_norms)
        squares = grad_squares.current()
        need_w = ctx.needs_input_grad[3:]
        row_squares = None
        if squares is not None and any(need_w):
            row_squares = values_t.new_empty(support.n_layers, support.n_features)
        grad_values_t, grads_w = cpu_kernels.decode_backward(
            support, values_t, w_dec, grad_out, scale, ctx.needs_input_grad[2], need_w,
            row_squares,
        )
        if squares is not None and row_squares is not None:
            for gw, sq in zip(grads_w, row_squares):
                if gw is not None:
                    squares.record(gw, sq)
        grad_values = _to_support_order(grad_values_t, support, ctx.values_dtype)
        return (None, None, grad_values, *grads_w)


class _DenseDecode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, with_norms: bool, acts_lbf: Tensor, *w_dec: Tensor
    ) -> tuple[Tensor, Tensor]:
        n_layers, batch, _ = acts_lbf.shape
        d = w_dec[0].shape[-1]
        ctx.acts_dtype = acts_lbf.dtype
        acts_lbf = acts_lbf.to(w_dec[0].dtype)  # autocast may hand us half-precision acts
        out = acts_lbf.new_zeros(batch, n_layers, d)
        for i, w in enumerate(w_dec):
            n_t = w.shape[1]
            part = acts_lbf[i] @ w.reshape(w.shape[0], n_t * d)
            out[:, _target_span(i, n_t)] += part.view(batch, n_t, d)
        norms = _decoder_norms(w_dec) if with_norms else acts_lbf.new_zeros(0)
        ctx.save_for_backward(acts_lbf, norms, *w_dec)
        ctx.mark_non_differentiable(*([] if with_norms else [norms]))
        return out, norms

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor, grad_norms: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        acts_lbf, norms, *w_dec = ctx.saved_tensors
        batch, d = acts_lbf.shape[1], grad_out.shape[-1]
        grad_acts = torch.empty_like(acts_lbf) if ctx.needs_input_grad[1] else None
        grads_w: list[Tensor | None] = [None] * len(w_dec)
        for i, w in enumerate(w_dec):
            n_t, n_features = w.shape[1], w.shape[0]
            g = grad_out[:, _target_span(i, n_t)].reshape(batch, n_t * d)
            if grad_acts is not None:
                torch.mm(g, w.reshape(n_features, n_t * d).t(), out=grad_acts[i])
            if ctx.needs_input_grad[2 + i]:
                grads_w[i] = (acts_lbf[i].t() @ g).view_as(w)
                if grad_norms is not None and norms.numel():
                    _add_norm_grad_(grads_w[i], w, norms[i], grad_norms[i])
        if grad_acts is not None:
            grad_acts = grad_acts.to(ctx.acts_dtype)
        return (None, grad_acts, *grads_w)


class _EncoderGradGather(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, support: Support, pre_s: Tensor, x_lbd: Tensor, w_enc: Tensor, b_enc: Tensor
    ) -> Tensor:
        if pre_s.shape != (support.nnz,):
            raise ValueError(f"encoder_grad_gather: pre-activations of shape "
                             f"{tuple(pre_s.shape)} for a support of {support.nnz} entries")
        ctx.support = support
        ctx.save_for_backward(x_lbd, w_enc)
        return pre_s + b_enc.reshape(-1).index_select(0, support.lf).to(pre_s.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        support: Support = ctx.support
        x_lbd, w_enc = ctx.saved_tensors
        _, need_x, need_w, need_b = ctx.needs_input_grad[1:]
        grad = grad.to(w_enc.dtype)
        if not need_x and cpu_kernels.applies(grad, x_lbd, w_enc):
            grad_w, grad_b = cpu_kernels.encoder_grad(
                support, grad.index_select(0, support.transposed()[0]), x_lbd, need_w, need_b
            )
            return None, None, None, grad_w, grad_b
        grad_x = torch.zeros_like(x_lbd) if need_x else None
        grad_w = torch.empty_like(w_enc) if need_w else None
        grad_b = None
        if need_b:
            grad_b = grad.new_zeros(support.n_layers * support.n_features)
            grad_b.index_add_(0, support.lf, grad)
            grad_b = grad_b.view(support.n_layers, support.n_features)
        grad_t = grad.index_select(0, support.transposed()[0]) if need_w else None
        for layer in range(support.n_layers):
            if support.layer_ptr[layer + 1] == support.layer_ptr[layer]:
                if need_w:
                    grad_w[layer].zero_()
                continue
            if need_w:
                # dL/dW_enc[l] = x_l^T @ G_l = (G_l^T @ x_l)^T with G_l^T as a [F, B] CSR
                gw = _spmm(support.layer_csr_t(grad_t, layer), x_lbd[layer])
                grad_w[layer].copy_(gw.t())
            if need_x:
                grad_x[layer] = _spmm(support.layer_csr(grad, layer), w_enc[layer].t())
        return None, None, grad_x, grad_w, grad_b


def sparse_decode(support: Support, values: Tensor, w_dec: list[Tensor]) -> Tensor:
    """Sum over sources of the decoded kept values: [B, L, d] (no bias, no skip)."""
    return _SparseDecode.apply(support, False, values, *w_dec)[0]


def dense_decode(acts_lbf: Tensor, w_dec: list[Tensor]) -> Tensor:
    """Sum over sources of the decoded activations [L, B, F]: [B, L, d] (no bias, no skip)."""
    return _DenseDecode.apply(False, acts_lbf, *w_dec)[0]


def sparse_decode_with_norms(
    support: Support, values: Tensor, w_dec: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """``sparse_decode`` plus the decoder norms [L, F] (differentiable).

    Fusing the norms' backward into the decoder's saves two passes and an allocation over
    every decoder weight per step.
    """
    return _SparseDecode.apply(support, True, values, *w_dec)  # type: ignore[return-value]


def dense_decode_with_norms(acts_lbf: Tensor, w_dec: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``dense_decode`` plus the decoder norms [L, F] (differentiable)."""
    return _DenseDecode.apply(True, acts_lbf, *w_dec)  # type: ignore[return-value]


def encoder_grad_gather(
    support: Support, pre_s: Tensor, x_lbd: Tensor, w_enc: Tensor, b_enc: Tensor
) -> Tensor:
    """Pre-activations at the support, with sparse encoder gradients.

    ``pre_s`` holds ``bmm(x_lbd, w_enc)`` at the support's positions (in its order), computed
    without autograd and *without* the bias, which is added here. Only the kept positions'
    gradients flow back, which is exact when the loss depends on pre-activations only there.
    """
    return _EncoderGradGather.apply(support, pre_s, x_lbd, w_enc, b_enc)  # type: ignore[return-value]
