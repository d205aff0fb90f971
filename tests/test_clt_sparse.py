"""Sparse decoding and the JumpReLU estimator: gradchecks and sparse == dense."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clt_lens.clt import CLTConfig, CrossLayerTranscoder, cpu_kernels
from clt_lens.clt.activation_fns import jumprelu
from clt_lens.clt.sparse import (
    Support,
    dense_decode,
    dense_decode_with_norms,
    encoder_grad_gather,
    sparse_decode,
    sparse_decode_with_norms,
)

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning")

L, B, F, D = 3, 7, 11, 5


@pytest.fixture(autouse=True, params=["cpu_kernels", "torch_ops"])
def decode_backend(request):
    """Every test here runs on both CPU decode paths: the C kernels and torch's sparse ops."""
    old = cpu_kernels.set_enabled(request.param == "cpu_kernels")
    yield request.param
    cpu_kernels.set_enabled(old)


def naive_decode(acts_lbf: torch.Tensor, w_dec: list[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros(acts_lbf.shape[1], len(w_dec), w_dec[0].shape[-1], dtype=acts_lbf.dtype,
                      device=acts_lbf.device)  # fmt: skip
    outs = [out[:, j] for j in range(len(w_dec))]
    for i, w in enumerate(w_dec):
        for t in range(w.shape[1]):
            outs[i + t] = outs[i + t] + acts_lbf[i] @ w[:, t]
    return torch.stack(outs, 1)


def random_case(cross_layer: bool, density: float = 0.3, seed: int = 0, n_feat: int = F,
                device: str = "cpu"):  # fmt: skip
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU, so every device sees the same
    mask = torch.rand(L, B, n_feat, generator=g) < density
    mask[1] = False  # a source layer with nothing active
    acts = torch.randn(L, B, n_feat, generator=g, dtype=torch.float64) * mask
    w_dec = [
        torch.randn(n_feat, (L - i) if cross_layer else 1, D, generator=g, dtype=torch.float64)
        for i in range(L)
    ]
    return mask.to(device), acts.to(device), [w.to(device) for w in w_dec]


def test_support_structure():
    mask, acts, _ = random_case(True)
    s = Support.from_mask(mask)
    assert s.nnz == int(mask.sum())
    values = acts.reshape(-1)[s.flat]
    for layer in range(L):
        torch.testing.assert_close(s.layer_csr(values, layer).to_dense(), acts[layer])
        perm = s.transposed()[0]
        torch.testing.assert_close(s.layer_csr_t(values[perm], layer).to_dense(), acts[layer].t())
    idx = torch.stack([torch.randperm(F)[:4].sort().values for _ in range(L * B)]).view(L, B, 4)
    rows = Support.from_row_indices(idx, F)
    dense = torch.zeros(L, B, F, dtype=torch.bool).scatter(-1, idx, True)
    assert torch.equal(rows.flat, Support.from_mask(dense).flat)


@pytest.mark.parametrize("cross_layer", [True, False])
def test_decoders_match_naive_and_gradcheck(cross_layer, device):
    mask, acts, w_dec = random_case(cross_layer, n_feat=4, device=device)
    support = Support.from_mask(mask)
    values = acts.reshape(-1)[support.flat].clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in w_dec]
    ref = naive_decode(acts, w_dec)
    torch.testing.assert_close(sparse_decode(support, values, ws), ref)
    torch.testing.assert_close(dense_decode(acts, w_dec), ref)

    def sparse_fn(v, *w):
        out, norms = sparse_decode_with_norms(support, v, list(w))
        return out, norms

    def dense_fn(a, *w):
        return dense_decode_with_norms(a, list(w))

    assert torch.autograd.gradcheck(sparse_fn, (values, *ws), fast_mode=True)
    acts_leaf = acts.clone().requires_grad_()
    assert torch.autograd.gradcheck(dense_fn, (acts_leaf, *ws), fast_mode=True)


@pytest.mark.parametrize("zero_fraction", [0.0, 0.5])
def test_sparse_decode_gradients_equal_dense_on_the_support(zero_fraction, device):
    """Kept positions may hold zeros (JumpReLU's kernel window); they still get dL/da."""
    mask, acts, w_dec = random_case(True, density=0.4, seed=3, device=device)
    support = Support.from_mask(mask)
    acts = acts * (
        torch.rand(acts.shape, generator=torch.Generator().manual_seed(4)) >= zero_fraction
    ).to(device)
    g = torch.randn(B, L, D, dtype=torch.float64).to(device)
    ws_s = [w.clone().requires_grad_() for w in w_dec]
    ws_d = [w.clone().requires_grad_() for w in w_dec]
    values = acts.reshape(-1)[support.flat].clone().requires_grad_()
    acts_d = acts.clone().requires_grad_()
    out_s, n_s = sparse_decode_with_norms(support, values, ws_s)
    out_d, n_d = dense_decode_with_norms(acts_d, ws_d)
    coef = torch.randn(L, F, dtype=torch.float64).to(device)
    ((out_s * g).sum() + (n_s * coef).sum()).backward()
    ((out_d * g).sum() + (n_d * coef).sum()).backward()
    for a, b in zip(ws_s, ws_d):
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(values.grad, acts_d.grad.reshape(-1)[support.flat])


def test_encoder_grad_gather_gradcheck(device):
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(*shape, dtype=torch.float64, generator=g).to(device).requires_grad_()
               for shape in ((L, B, D), (L, D, F), (L, F)))  # fmt: skip
    with torch.no_grad():
        pre = torch.baddbmm(b.unsqueeze(1), x, w)
    support = Support.from_mask(pre > 0.5)

    def fn(x_, w_, b_):
        # the function recomputes pre so gradcheck's perturbations are seen; the bias is
        # added by encoder_grad_gather itself, at the kept positions only
        pre_ = torch.bmm(x_, w_).detach()
        return encoder_grad_gather(support, pre_.reshape(-1)[support.flat], x_, w_, b_)

    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)
    torch.testing.assert_close(fn(x, w, b), pre.reshape(-1)[support.flat])


# ---- the JumpReLU estimator ------------------------------------------------------------------
def test_jumprelu_gradcheck_away_from_the_threshold():
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(6, 9, dtype=torch.float64, generator=g)
    theta = torch.rand(9, dtype=torch.float64, generator=g) * 0.5
    # keep finite differences from crossing the jump
    pre = torch.where((pre - theta).abs() < 1e-3, pre + 1e-2, pre).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: jumprelu(p, theta, 0.2, False), (pre,))


@pytest.mark.parametrize("ste_to_input", [False, True])
def test_threshold_gradient_is_the_rectangle_pseudo_derivative(ste_to_input):
    g = torch.Generator().manual_seed(0)
    eps = 0.3
    pre = torch.randn(50, 8, dtype=torch.float64, generator=g).requires_grad_()
    log_theta = (torch.rand(8, dtype=torch.float64, generator=g) * 0.4 + 0.1).log()
    log_theta.requires_grad_()
    up = torch.randn(50, 8, dtype=torch.float64, generator=g)
    a = jumprelu(pre, log_theta.exp(), eps, ste_to_input)
    (a * up).sum().backward()
    with torch.no_grad():
        theta = log_theta.exp()
        in_window = ((pre - theta).abs() < eps / 2).double()
        assert in_window.sum() > 10
        d_theta = -(theta / eps * in_window * up).sum(0)
        torch.testing.assert_close(log_theta.grad, d_theta * theta)  # chain rule through exp
        d_pre = up * (pre > theta)
        if ste_to_input:
            d_pre = d_pre + theta / eps * in_window * up
        torch.testing.assert_close(pre.grad, d_pre)
        torch.testing.assert_close(a, pre * (pre > theta))


# ---- the whole training step: sparse == dense ---------------------------------------------------
def _step(clt: CrossLayerTranscoder, mode: str, x, y, dead):
    clt.cfg = dataclasses.replace(clt.cfg, decode=mode)
    clt.zero_grad(set_to_none=True)
    out = clt.training_forward(x, y, dead_mask=dead, sparsity_coeff=0.05, preact_coeff=0.01)
    out.loss.backward()
    assert out.decode_mode == mode
    grads = {n: p.grad.clone() for n, p in clt.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize(
    "variant",
    [
        dict(activation="jumprelu", jumprelu_bandwidth=0.2),
        dict(activation="jumprelu", jumprelu_bandwidth=0.2, jumprelu_ste_to_input=True),
        dict(activation="jumprelu", cross_layer=False, sparsity_penalty="l1"),
        dict(activation="relu", skip=True),
        dict(activation="topk", k=5),
        dict(activation="batchtopk", k=5, cross_layer=False),
    ],
    ids=lambda v: "-".join(map(str, v.values())),
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sparse_step_equals_dense_step(variant, dtype, device):
    torch.manual_seed(0)
    n_layers, d, n_feat, batch = 3, 24, 96, 64
    clt = CrossLayerTranscoder(
        CLTConfig(d_in=d, d_sae=n_feat, n_layers=n_layers, dtype=dtype, device=device, **variant)
    )
    tdt = getattr(torch, dtype)
    x = (torch.randn(batch, n_layers, d, dtype=tdt) * 2).to(device)
    y = torch.randn(batch, n_layers, d, dtype=tdt).to(device)
    clt.estimate_normalization(x, y)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.1)
        if clt.cfg.activation == "jumprelu":
            clt.log_threshold.copy_(torch.empty_like(clt.log_threshold).uniform_(0.1, 0.4).log())
    dead = (torch.rand(n_layers, n_feat) < 0.2).to(device)
    state = {k: v.clone() for k, v in clt.state_dict().items()}
    out_d, g_d = _step(clt, "dense", x, y, dead)
    clt.load_state_dict(state)
    out_s, g_s = _step(clt, "sparse", x, y, dead)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    assert g_d.keys() == g_s.keys()
    for name in g_d:
        err = (g_d[name] - g_s[name]).norm() / g_d[name].norm().clamp(min=1e-30)
        assert err < tol["rtol"] * 10, (name, float(err))
    for key in out_d.losses:
        torch.testing.assert_close(out_s.losses[key], out_d.losses[key], **tol)
    torch.testing.assert_close(out_s.mse_per_layer, out_d.mse_per_layer, **tol)
    torch.testing.assert_close(out_s.l0_per_layer, out_d.l0_per_layer)
    assert torch.equal(out_s.fired, out_d.fired)
    torch.testing.assert_close(out_s.feature_acts, out_d.feature_acts, **tol)
    if clt.cfg.activation == "jumprelu":
        # positions below the threshold but inside the kernel window are in the support,
        # and they move the threshold
        theta = clt.threshold.detach()
        pre = clt.preacts_lbf(clt.normalize_inputs(x)).detach()
        window_only = (pre <= theta.unsqueeze(1)) & (pre > theta.unsqueeze(1) - 0.1)
        assert window_only.sum() > 0
        assert out_s.support_density > float(out_s.l0_per_layer.sum()) / (n_layers * n_feat)
        assert g_s["log_threshold"].abs().sum() > 0
