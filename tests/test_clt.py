"""CrossLayerTranscoder: config, save/load, reference forward, losses, folding, conversion."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata, TrainingSAE

import clt_lens.clt as clt_pkg
from clt_lens.clt import (
    CLTConfig,
    CrossLayerTranscoder,
    TrainingCrossLayerTranscoder,
    convert_topk_to_jumprelu,
)
from clt_lens.config import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning")

L, D, F = 3, 16, 48


def make_clt(seed: int = 0, dtype: str = "float32", device: str = "cpu",
             **kw) -> CrossLayerTranscoder:  # fmt: skip
    """A CLT with non-trivial scales, biases, skip and thresholds (so every term matters)."""
    torch.manual_seed(seed)
    fields = dict(d_in=D, d_sae=F, n_layers=L, dtype=dtype)
    fields.update(kw)
    fields.setdefault("metadata", SAEMetadata(model_name="tiny", context_size=16))
    clt = CrossLayerTranscoder(CLTConfig(**fields))
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.2)
        clt.b_dec.normal_(0, 0.5)
        clt.input_scale.copy_(torch.linspace(0.5, 2.0, L))
        clt.output_scale.copy_(torch.linspace(1.5, 0.7, L))
        if clt.cfg.skip:
            clt.W_skip.normal_(0, 0.1)
        if clt.cfg.activation == "jumprelu":
            clt.log_threshold.copy_(torch.empty(L, F).uniform_(0.02, 0.3).log())
        if clt.cfg.activation == "batchtopk":
            clt.topk_threshold.copy_(torch.tensor([0.1, 0.2, 0.15]))
    return clt.to(device)  # built on the CPU: the same numbers on every device


def acts_data(n: int = 40, seed: int = 1, dtype=torch.float32, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, D, generator=g, dtype=dtype) * torch.tensor([1.0, 3.0, 0.5]).view(
        1, L, 1
    ).to(dtype)
    return x.to(device)


def reference_forward(clt: CrossLayerTranscoder, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Independent loop implementation: per layer encode, per (source, target) decode."""
    cfg = clt.cfg
    acts = []
    for layer in range(L):
        xn = x[:, layer] * clt.input_scale[layer]
        pre = xn @ clt.W_enc[layer] + clt.b_enc[layer]
        if cfg.activation == "relu":
            a = torch.relu(pre)
        elif cfg.activation == "jumprelu":
            a = torch.where(pre > clt.log_threshold[layer].exp(), pre, torch.zeros_like(pre))
        elif cfg.activation == "batchtopk":
            a = torch.where(pre > clt.topk_threshold[layer], pre, torch.zeros_like(pre))
        else:
            a = torch.zeros_like(pre)
            for b in range(pre.shape[0]):
                top = sorted(range(F), key=lambda f: -float(pre[b, f]))[: cfg.k]
                for f in top:
                    a[b, f] = max(float(pre[b, f]), 0.0)
        acts.append(a)
    outs = []
    for j in range(L):
        y = clt.b_dec[j].expand(x.shape[0], D).clone()
        for i in range(j + 1):
            if cfg.cross_layer:
                y = y + acts[i] @ clt.W_dec[i][:, j - i, :]
            elif i == j:
                y = y + acts[i] @ clt.W_dec[i][:, 0, :]
        if cfg.skip:
            y = y + (x[:, j] * clt.input_scale[j]) @ clt.W_skip[j]
        outs.append(y / clt.output_scale[j])
    return torch.stack(acts, 1), torch.stack(outs, 1)


# ---- config and input checks ---------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, word",
    [
        ({"activation": "gelu"}, "activation"),
        ({"sparsity_penalty": "l0"}, "sparsity_penalty"),
        ({"n_layers": 0}, "n_layers"),
        ({"d_sae": -3}, "d_sae"),
        ({"d_in": 0}, "d_in"),
        ({"activation": "topk", "k": F + 1}, "k"),
        ({"activation": "batchtopk", "k": 0}, "k"),
        ({"decode": "fast"}, "decode"),
        ({"jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth"),
        ({"sparsity_coeff": -1.0}, "sparsity_coeff"),
        ({"metadata": SAEMetadata(hook_name="blocks.0.ln2.hook_normalized")}, "hook_name"),
    ],
)
def test_config_rejects_bad_values(kw, word):
    fields = dict(d_in=D, d_sae=F, n_layers=L)
    fields.update(kw)
    with pytest.raises(ConfigError, match=word):
        CLTConfig(**fields)


def test_config_defaults_and_hook_names():
    cfg = CLTConfig(d_in=D, d_sae=F, n_layers=L)
    assert cfg.input_hook == "ln2.hook_normalized" and cfg.output_hook == "hook_mlp_out"
    assert cfg.input_hook_name(2) == "blocks.2.ln2.hook_normalized"
    assert cfg.output_hook_name(0) == "blocks.0.hook_mlp_out"
    assert cfg.apply_b_dec_to_input is False and cfg.architecture() == "clt"


def test_shape_errors_are_clear():
    clt = make_clt()
    with pytest.raises(ValueError, match="n_layers=3, d_model=16"):
        clt.encode(torch.randn(4, L + 1, D))
    with pytest.raises(ValueError, match="d_model=16"):
        clt.encode(torch.randn(4, L, D + 1))
    with pytest.raises(ValueError, match="x_raw"):
        clt.training_forward(torch.randn(4, L, 3), torch.randn(4, L, D))
    with pytest.raises(ValueError, match="dead_mask"):
        clt.training_forward(
            torch.randn(4, L, D), torch.randn(4, L, D), dead_mask=torch.zeros(L, F + 1).bool()
        )
    with pytest.raises(ValueError, match="feature_acts"):
        clt.decode(torch.randn(4, L, F - 1))
    skip = make_clt(skip=True)
    with pytest.raises(ValueError, match="skip"):
        skip.decode(skip.encode(torch.randn(4, L, D)))


# ---- parameters, save/load ------------------------------------------------------------------
def test_parameter_layout():
    clt = make_clt(skip=True)
    assert clt.W_enc.shape == (L, D, F) and clt.b_enc.shape == (L, F)
    assert [tuple(w.shape) for w in clt.W_dec] == [(F, L - i, D) for i in range(L)]
    assert clt.b_dec.shape == (L, D) and clt.W_skip.shape == (L, D, D)
    assert clt.log_threshold.shape == (L, F) and clt.input_scale.shape == (L,)
    plt = make_clt(cross_layer=False)
    assert [tuple(w.shape) for w in plt.W_dec] == [(F, 1, D)] * L


VARIANTS = [
    dict(activation="jumprelu"),
    dict(activation="jumprelu", skip=True, cross_layer=False),
    dict(activation="relu", skip=True),
    dict(activation="topk", k=5),
    dict(activation="batchtopk", k=5, cross_layer=False),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_save_load_round_trip_is_exact(tmp_path, variant):
    clt = make_clt(**variant)
    clt.save_model(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"cfg.json", "sae_weights.safetensors"}
    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is CrossLayerTranscoder
    assert loaded.cfg.to_dict() == clt.cfg.to_dict()
    a, b = clt.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    x = acts_data()
    assert torch.equal(loaded(x), clt(x))
    assert loaded.cfg.metadata.model_name == "tiny" and loaded.cfg.metadata.context_size == 16
    assert loaded.cfg.metadata.hook_name_out == "hook_mlp_out"


def test_training_registry_and_idempotent_register(tmp_path):
    clt_pkg.register()
    clt_pkg.register()
    clt = make_clt(activation="batchtopk", k=4)
    clt.save_model(tmp_path)
    tr = TrainingSAE.load_from_disk(tmp_path)
    assert type(tr) is TrainingCrossLayerTranscoder
    for key, value in clt.state_dict().items():
        assert torch.equal(tr.state_dict()[key], value)
    x, y = acts_data(), acts_data(seed=2)
    from sae_lens.saes.sae import TrainStepInput

    step = tr.training_forward_pass(
        TrainStepInput(
            sae_in=torch.stack([x, y], 1),
            coefficients=tr.get_coefficients(),
            dead_neuron_mask=None,
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    assert torch.isfinite(step.loss) and step.feature_acts.shape == (x.shape[0], L * F)


def test_register_refuses_a_foreign_class():
    from sae_lens.registry import SAE_CLASS_REGISTRY

    saved = SAE_CLASS_REGISTRY["clt"]
    try:
        SAE_CLASS_REGISTRY["clt"] = (SAE, CLTConfig)
        with pytest.raises(ValueError, match="already registered"):
            clt_pkg.register()
    finally:
        SAE_CLASS_REGISTRY["clt"] = saved


# ---- forward against an independent reference -----------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_forward_matches_loop_reference(variant, device):
    clt = make_clt(dtype="float64", device=device, **variant)
    x = acts_data(12, dtype=torch.float64, device=device)
    with torch.no_grad():
        ref_acts, ref_out = reference_forward(clt, x)
        torch.testing.assert_close(clt.encode(x), ref_acts)
        torch.testing.assert_close(clt(x), ref_out)
        for layer in range(L):
            torch.testing.assert_close(clt.encode_layer(x[:, layer], layer), ref_acts[:, layer])
            by_src = [ref_acts[:, i] for i in range(layer + 1)]
            torch.testing.assert_close(
                clt.decode_layer(by_src, layer, x[:, layer]), ref_out[:, layer]
            )


def test_plt_equals_independent_transcoders():
    """cross_layer=False: layer l's output depends on layer l's input only, through its own
    transcoder; built by hand per layer with single-layer tensors."""
    clt = make_clt(dtype="float64", cross_layer=False, skip=True)
    x = acts_data(20, dtype=torch.float64)
    y = acts_data(20, seed=5, dtype=torch.float64)
    out = clt.training_forward(x, y, sparsity_coeff=0.0)
    out.loss.backward()
    total = 0.0
    for layer in range(L):
        w_enc = clt.W_enc[layer].detach().clone().requires_grad_()
        w_dec = clt.W_dec[layer][:, 0, :].detach().clone().requires_grad_()
        s_in, s_out = clt.input_scale[layer], clt.output_scale[layer]
        pre = (x[:, layer] * s_in) @ w_enc + clt.b_enc[layer].detach()
        theta = clt.log_threshold[layer].detach().exp()
        a = pre * (pre > theta)
        y_hat = (
            a @ w_dec
            + clt.b_dec[layer].detach()
            + (x[:, layer] * s_in) @ clt.W_skip[layer].detach()
        )
        mse = (y_hat - y[:, layer] * s_out).pow(2).sum(-1).mean()
        mse.backward()
        total += float(mse.detach())
        torch.testing.assert_close(out.mse_per_layer[layer], mse.detach())
        torch.testing.assert_close(clt.W_enc.grad[layer], w_enc.grad)
        torch.testing.assert_close(clt.W_dec[layer].grad[:, 0, :], w_dec.grad)
        # the output of layer l ignores every other layer's input
        x2 = x.clone()
        x2[:, [m for m in range(L) if m != layer]] += 3.0
        with torch.no_grad():
            torch.testing.assert_close(clt(x2)[:, layer], clt(x)[:, layer])
    assert math.isclose(float(out.losses["mse"].detach()), total, rel_tol=1e-10)


# ---- losses ---------------------------------------------------------------------------------
@pytest.mark.parametrize("penalty", ["tanh", "l1"])
def test_loss_terms_match_hand_computation(penalty, device):
    clt = make_clt(dtype="float64", sparsity_penalty=penalty, tanh_scale=3.0, skip=True,
                   device=device)  # fmt: skip
    x = acts_data(30, dtype=torch.float64, device=device)
    y = acts_data(30, seed=3, dtype=torch.float64, device=device)
    dead = torch.zeros(L, F, dtype=torch.bool, device=device)
    dead[:, ::5] = True
    out = clt.training_forward(x, y, sparsity_coeff=0.1, preact_coeff=0.01, dead_mask=dead)
    with torch.no_grad():
        acts, y_hat = reference_forward(clt, x)
        y_n = y * clt.output_scale.view(1, L, 1)
        err = (y_hat - y) * clt.output_scale.view(1, L, 1)
        mse_l = err.pow(2).sum(-1).mean(0)
        wn = torch.stack([w.flatten(1).norm(dim=1) for w in clt.W_dec])  # [L, F]
        scaled = acts * wn
        pen = torch.tanh(3.0 * scaled) if penalty == "tanh" else scaled
        pre = torch.stack(
            [(x[:, i] * clt.input_scale[i]) @ clt.W_enc[i] + clt.b_enc[i] for i in range(L)], 1
        )
        theta = clt.log_threshold.exp()
        preact = ((theta - pre).relu() * wn * dead).sum((1, 2)).mean()
        fvu = err.pow(2).sum((0, 2)) / (y_n - y_n.mean(0)).pow(2).sum((0, 2))
    torch.testing.assert_close(out.mse_per_layer, mse_l)
    torch.testing.assert_close(out.losses["mse"], mse_l.sum())
    torch.testing.assert_close(out.losses["sparsity"], 0.1 * pen.sum((1, 2)).mean())
    torch.testing.assert_close(out.losses["preact"], 0.01 * preact)
    torch.testing.assert_close(out.losses["auxk"], torch.zeros((), dtype=torch.float64,
                                                               device=device))  # fmt: skip
    torch.testing.assert_close(out.fvu_per_layer, fvu)
    torch.testing.assert_close(out.l0_per_layer, (acts > 0).sum(-1).double().mean(0))
    assert torch.equal(out.fired, (acts > 0).any(0))
    torch.testing.assert_close(out.feature_acts, acts)
    total = sum(out.losses.values())
    torch.testing.assert_close(out.loss, total)


@pytest.mark.parametrize("decode", ["sparse", "dense"])
def test_reconstruction_gradient_matches_autograd_of_the_reference(decode, device):
    """The MSE's own backward (one pass) against autograd through the loop reference."""
    clt = make_clt(dtype="float64", activation="relu", skip=True, decode=decode, device=device)
    x = acts_data(30, dtype=torch.float64, device=device)
    y = acts_data(30, seed=3, dtype=torch.float64, device=device)
    out = clt.training_forward(x, y, sparsity_coeff=0.0, preact_coeff=0.0)
    assert out.decode_mode == decode
    out.losses["mse"].backward()
    got = {n: p.grad.clone() for n, p in clt.named_parameters() if p.grad is not None}
    clt.zero_grad(set_to_none=True)
    _, y_hat = reference_forward(clt, x)
    err = (y_hat - y) * clt.output_scale.view(1, L, 1)
    err.pow(2).sum(-1).mean(0).sum().backward()
    want = {n: p.grad for n, p in clt.named_parameters() if p.grad is not None}
    assert {"W_enc", "b_enc", "b_dec", "W_skip"} <= set(want) and set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_auxk_loss_matches_hand_computation():
    clt = make_clt(dtype="float64", activation="topk", k=4, auxk=3)
    x, y = acts_data(10, dtype=torch.float64), acts_data(10, seed=4, dtype=torch.float64)
    dead = torch.zeros(L, F, dtype=torch.bool)
    dead[0, :10] = True
    dead[2, 20:25] = True
    out = clt.training_forward(x, y, auxk_coeff=0.5, preact_coeff=0.0, dead_mask=dead)
    with torch.no_grad():
        _, y_hat = reference_forward(clt, x)
        resid = (y - y_hat) * clt.output_scale.view(1, L, 1)
        e_hat = torch.zeros_like(resid)
        for i in range(L):
            idx = dead[i].nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            pre = (x[:, i] * clt.input_scale[i]) @ clt.W_enc[i][:, idx] + clt.b_enc[i][idx]
            top = pre.topk(min(3, idx.numel()), dim=-1)
            z = torch.zeros(x.shape[0], F, dtype=torch.float64)
            z.scatter_(1, idx[top.indices], top.values.relu())
            for j in range(i, L):
                e_hat[:, j] += z @ clt.W_dec[i][:, j - i, :]
        scale = min(15 / (3 * L), 1.0)
        expected = 0.5 * scale * (e_hat - resid).pow(2).sum(-1).mean(0).sum()
    torch.testing.assert_close(out.losses["auxk"], expected)
    out.loss.backward()
    assert clt.W_enc.grad[0][:, :10].abs().sum() > 0  # dead features get gradient


def test_reduce_fn_sees_the_partial_reconstruction():
    clt = make_clt(skip=True)
    x, y = acts_data(), acts_data(seed=2)
    seen = []

    def reduce_fn(t):
        seen.append(t.shape)
        return 2 * t

    base = clt.training_forward(x, y)
    doubled = clt.training_forward(x, y, reduce_fn=reduce_fn)
    assert seen == [(x.shape[0], L, D)]
    with torch.no_grad():
        acts = clt.encode(x)
        partial = clt.decode_partial(acts.transpose(0, 1).contiguous())
        y_hat = clt.finish_decode(2 * partial, clt.normalize_inputs(x))
        mse = (y_hat - clt.normalize_outputs(y)).pow(2).sum(-1).mean(0).sum()
    torch.testing.assert_close(doubled.losses["mse"], mse)
    assert not torch.isclose(doubled.losses["mse"], base.losses["mse"])


def test_training_reduces_the_loss(device):
    torch.manual_seed(0)
    clt = make_clt(activation="jumprelu", jumprelu_init_threshold=0.01, device=device)
    with torch.no_grad():
        clt.log_threshold.fill_(math.log(0.01))
    x = acts_data(128, device=device)
    y = torch.tanh(x @ torch.randn(D, D).to(device) * 0.3)  # a learnable map, layer by layer
    clt.estimate_normalization(x, y)
    opt = torch.optim.Adam(clt.parameters(), lr=1e-2)
    first = None
    for _ in range(25):
        out = clt.training_forward(x, y, sparsity_coeff=1e-4)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else float(out.loss.detach())
    assert float(out.loss.detach()) < 0.5 * first


# ---- normalisation and folding ----------------------------------------------------------------
def test_estimate_normalization_gives_mean_squared_norm_d():
    clt = make_clt()
    x, y = acts_data(500), acts_data(500, seed=9) * 7
    s_in, s_out = clt.estimate_normalization(x, y)
    x_n = clt.normalize_inputs(x).transpose(0, 1)
    y_n = clt.normalize_outputs(y)
    torch.testing.assert_close(x_n.pow(2).sum(-1).mean(0), torch.full((L,), float(D)))
    torch.testing.assert_close(y_n.pow(2).sum(-1).mean(0), torch.full((L,), float(D)))
    assert s_out[0] < s_in[0]
    with pytest.raises(ValueError, match="non-zero"):
        clt.estimate_normalization(torch.zeros(3, L, D), y[:3])


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_folded_weights_reproduce_the_model_on_raw_activations(variant, device):
    clt = make_clt(device=device, **variant)
    x = acts_data(25, device=device)
    w = clt.folded_weights()
    pre = torch.einsum("bld,ldf->blf", x, w["W_enc"]) + w["b_enc"]
    if variant["activation"] == "topk":
        assert w["threshold"] is None
        a = clt.activate(pre.transpose(0, 1)).transpose(0, 1)
    elif w["threshold"] is None:
        a = pre.relu()
    else:
        a = pre * (pre > w["threshold"])
    y = w["b_dec"].expand(x.shape[0], L, D).clone()
    for i, wd in enumerate(w["W_dec"]):
        for t in range(wd.shape[1]):
            y[:, i + t] += a[:, i] @ wd[:, t]
    if w["W_skip"] is not None:
        y += torch.einsum("bld,lde->ble", x, w["W_skip"])
    with torch.no_grad():
        torch.testing.assert_close(a, clt.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y, clt(x), atol=1e-5, rtol=1e-5)


def test_fold_w_dec_norm_keeps_outputs():
    clt = make_clt(activation="jumprelu", skip=True)
    x = acts_data()
    with torch.no_grad():
        before = clt(x)
        clt.fold_W_dec_norm()
        torch.testing.assert_close(clt(x), before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clt.decoder_norms(), torch.ones(L, F))


# ---- BatchTopK and the conversion to JumpReLU --------------------------------------------------
def test_batchtopk_keeps_k_per_token_and_a_running_threshold():
    clt = make_clt(activation="batchtopk", k=6)
    with torch.no_grad():
        clt.topk_threshold.zero_()
    x, y = acts_data(64), acts_data(64, seed=2)
    out = clt.training_forward(x, y)
    torch.testing.assert_close(out.l0_per_layer, torch.full((L,), 6.0), atol=0.1, rtol=0)
    acts = out.feature_acts
    smallest = torch.where(acts > 0, acts, torch.inf).amin(dim=(0, 2))
    torch.testing.assert_close(clt.topk_threshold, smallest)  # first step: no warm-up
    clt.training_forward(x * 1.1, y)
    lr = clt.cfg.topk_threshold_lr
    assert torch.all(clt.topk_threshold != smallest)
    assert torch.all((clt.topk_threshold - smallest).abs() < lr * smallest.abs() * 1.0 + 1e-3)
    # inference does not depend on the rest of the batch
    with torch.no_grad():
        torch.testing.assert_close(clt.encode(x[:7]), clt.encode(x)[:7])


@pytest.mark.parametrize(
    "activation, per_feature", [("batchtopk", False), ("topk", False), ("topk", True)]
)
def test_topk_to_jumprelu_keeps_l0_on_held_out_data(activation, per_feature):
    torch.manual_seed(0)
    n_feat, k = 64, 6
    clt = CrossLayerTranscoder(
        CLTConfig(d_in=D, d_sae=n_feat, n_layers=L, activation=activation, k=k)
    )
    mix = torch.randn(L, D, D) / math.sqrt(D)
    sample = torch.einsum("nld,lde->nle", torch.randn(8000, L, D), mix)
    held_out = torch.einsum("nld,lde->nle", torch.randn(3000, L, D), mix)
    clt.estimate_normalization(sample, sample)
    jr = convert_topk_to_jumprelu(clt, sample, per_feature=per_feature)
    assert jr.cfg.activation == "jumprelu" and jr.cfg.metadata.converted_from == activation
    with torch.no_grad():
        l0 = (jr.encode(held_out) > 0).float().sum(-1).mean(0)
        pre = clt.preacts_lbf(clt.normalize_inputs(held_out))
        if activation == "topk":
            topk_l0 = (clt.activate(pre) > 0).float().sum(-1).mean(1)
        else:  # the training rule: k * N winners per layer over the whole held-out batch
            kept = pre.reshape(L, -1).topk(k * held_out.shape[0], dim=1).values
            topk_l0 = (kept > 0).float().sum(1) / held_out.shape[0]
    assert torch.all((l0 - topk_l0).abs() <= 0.1 * topk_l0), (l0, topk_l0)
    assert torch.all((l0 - k).abs() <= 0.1 * k), l0
    # every other weight is unchanged
    for name in ("W_enc", "b_enc", "b_dec", "input_scale", "output_scale", "W_dec.0"):
        assert torch.equal(jr.state_dict()[name], clt.state_dict()[name])


def test_conversion_rejects_non_topk():
    with pytest.raises(ValueError, match="topk"):
        convert_topk_to_jumprelu(make_clt(activation="relu"), acts_data())


def test_decode_modes_choose(monkeypatch):
    x, y = acts_data(), acts_data(seed=2)
    clt = make_clt(activation="topk", k=2, sparse_max_density=0.1)
    assert clt.training_forward(x, y).decode_mode == "dense"  # too small a batch to pay off
    monkeypatch.setattr("clt_lens.clt.model.SPARSE_MIN_ELEMENTS", 0)
    assert clt.training_forward(x, y).decode_mode == "sparse"  # 2/48 < 0.1
    clt.cfg = dataclasses.replace(clt.cfg, sparse_max_density=0.01)
    assert clt.training_forward(x, y).decode_mode == "dense"
    clt.cfg = dataclasses.replace(clt.cfg, decode="sparse")
    assert clt.training_forward(x, y).decode_mode == "sparse"
    jr = make_clt(activation="jumprelu", sparse_max_density=1.0)
    assert jr.training_forward(x, y).decode_mode == "dense"  # no density measured yet
    assert jr.training_forward(x, y).decode_mode == "sparse"


def test_auto_crossover_follows_the_decode_path():
    """Unset, "auto"'s crossover is the one measured for the path the decoders take: the CPU
    kernels' (float32/64 on the CPU, kernels built and on) or torch's sparse ops'."""
    from clt_lens.clt import cpu_kernels
    from clt_lens.clt.config import SPARSE_MAX_DENSITY, SPARSE_MAX_DENSITY_CPU_KERNELS

    clt = make_clt(activation="jumprelu")
    assert clt.cfg.sparse_max_density is None
    on_cpu = SPARSE_MAX_DENSITY_CPU_KERNELS if cpu_kernels.library() else SPARSE_MAX_DENSITY
    assert clt.sparse_max_density() == on_cpu
    old = cpu_kernels.set_enabled(False)
    try:
        assert clt.sparse_max_density() == SPARSE_MAX_DENSITY
    finally:
        cpu_kernels.set_enabled(old)
    assert make_clt(activation="jumprelu", sparse_max_density=0.3).sparse_max_density() == 0.3
    assert SPARSE_MAX_DENSITY < SPARSE_MAX_DENSITY_CPU_KERNELS
