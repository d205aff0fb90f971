"""SAELens layer views of a CLT and the splice into a HookedTransformer."""

from __future__ import annotations

import pytest
import torch
from sae_lens import JumpReLUTranscoder, Transcoder
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import JumpReLUSkipTranscoder, SkipTranscoder
from transformer_lens import HookedTransformer, HookedTransformerConfig

from clt_lens.clt import CLTConfig, CrossLayerTranscoder, run_with_clt

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning")

L, D, F = 2, 64, 96


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=64,
        n_ctx=16,
        d_head=16,
        n_heads=4,
        d_mlp=256,
        d_vocab=100,
        act_fn="gelu",
        normalization_type="LN",
    )
    return HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(1))


def make_clt(model: HookedTransformer | None = None, tokens=None, **kw) -> CrossLayerTranscoder:
    torch.manual_seed(0)
    fields = dict(d_in=D, d_sae=F, n_layers=L)
    fields.update(kw)
    fields.setdefault("metadata", SAEMetadata(model_name="tiny", context_size=16))
    clt = CrossLayerTranscoder(CLTConfig(**fields))
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.1)
        clt.b_dec.normal_(0, 0.05)
        if clt.cfg.skip:
            clt.W_skip.normal_(0, 0.05)
        if clt.cfg.activation == "batchtopk":
            clt.topk_threshold.copy_(torch.tensor([0.05, 0.1]))
    if model is not None:
        x, y = collect(model, clt, tokens)
        clt.estimate_normalization(x.flatten(0, 1), y.flatten(0, 1))
    else:
        with torch.no_grad():
            clt.input_scale.copy_(torch.tensor([0.7, 1.9]))
            clt.output_scale.copy_(torch.tensor([2.5, 0.4]))
    return clt


def collect(model, clt, tokens):
    """True inputs/outputs [batch, pos, L, d] at the CLT's hooks."""
    names = [clt.cfg.input_hook_name(i) for i in range(L)]
    names += [clt.cfg.output_hook_name(i) for i in range(L)]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    x = torch.stack([cache[clt.cfg.input_hook_name(i)] for i in range(L)], 2)
    y = torch.stack([cache[clt.cfg.output_hook_name(i)] for i in range(L)], 2)
    return x, y


# ---- layer views -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, cls",
    [
        (dict(activation="jumprelu"), JumpReLUTranscoder),
        (dict(activation="jumprelu", skip=True), JumpReLUSkipTranscoder),
        (dict(activation="relu"), Transcoder),
        (dict(activation="relu", skip=True, cross_layer=False), SkipTranscoder),
        (dict(activation="batchtopk", k=8), JumpReLUTranscoder),
    ],
)
def test_layer_transcoder_encodes_like_the_clt(kw, cls):
    clt = make_clt(**kw)
    x = torch.randn(20, L, D) * 3
    with torch.no_grad():
        acts = clt.encode(x)
        for layer in range(L):
            tc = clt.layer_transcoder(layer)
            assert type(tc) is cls
            assert tc.cfg.metadata.hook_name == f"blocks.{layer}.ln2.hook_normalized"
            assert tc.cfg.metadata.hook_name_out == f"blocks.{layer}.hook_mlp_out"
            assert tc.cfg.metadata.model_name == "tiny"
            torch.testing.assert_close(tc.encode(x[:, layer]), acts[:, layer])
            assert (acts[:, layer] > 0).any()
            # its decoder is the source layer's own-layer decoder in raw space
            own = clt.decode_layer(
                [torch.zeros_like(acts[:, 0])] * layer + [acts[:, layer]], layer, x[:, layer]
            )
            if not clt.cfg.cross_layer or layer == 0:
                torch.testing.assert_close(tc(x[:, layer]), own, atol=1e-5, rtol=1e-5)


def test_layer_transcoder_refuses_topk():
    clt = make_clt(activation="topk", k=4)
    with pytest.raises(ValueError, match="convert_topk_to_jumprelu"):
        clt.layer_transcoder(0)
    with pytest.raises(ValueError, match="out of range"):
        make_clt().layer_transcoder(L)


# ---- splice ------------------------------------------------------------------------------
def test_splice_with_error_term_reproduces_the_model(model, tokens):
    clt = make_clt(model, tokens, skip=True)
    with torch.no_grad():
        base = model(tokens)
        with_err = run_with_clt(model, clt, tokens, error_term=True)
        without = run_with_clt(model, clt, tokens)
    torch.testing.assert_close(with_err, base, atol=1e-4, rtol=1e-4)
    assert (without - base).abs().max() > 1e-2


@pytest.mark.parametrize("cross_layer", [True, False])
def test_single_layer_splice_changes_outputs_from_that_layer_on(model, tokens, cross_layer):
    clt = make_clt(model, tokens, cross_layer=cross_layer)
    x, _ = collect(model, clt, tokens)
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
    seen = {}

    def grab(t, hook):
        seen[hook.name] = t.detach().clone()

    with torch.no_grad():
        _, true = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        model.add_hook(lambda n: n in names, grab)
        try:
            logits = run_with_clt(model, clt, tokens, layers=[1])
        finally:
            model.reset_hooks()
        # layer 0 and the residual up to layer 1's MLP are untouched
        for name in names[:2]:
            torch.testing.assert_close(seen[name], true[name])
        # layer 1's MLP output (resid_post - resid_mid) is the CLT's reconstruction from the
        # true inputs
        expected = clt(x.flatten(0, 1)).view_as(x)[:, :, 1]
        mlp_out = seen[names[2]] - seen[names[1]]
        torch.testing.assert_close(mlp_out, expected, atol=1e-4, rtol=1e-4)
        assert (logits - model(tokens)).abs().max() > 1e-3
        # replacing every layer differs from replacing only the last one
        all_layers = run_with_clt(model, clt, tokens)
        assert (all_layers - logits).abs().max() > 1e-4


def test_splice_layer_zero_feeds_later_layers(model, tokens):
    """Replacing layer 0 changes layer 1's input, so layer 1's features see the splice."""
    clt = make_clt(model, tokens)
    with torch.no_grad():
        base = model(tokens)
        spliced = run_with_clt(model, clt, tokens, layers=[0])
    assert (spliced - base).abs().max() > 1e-3


def test_splice_rejects_a_mismatched_clt(model, tokens):
    with pytest.raises(ValueError, match="n_layers=2"):
        run_with_clt(model, CrossLayerTranscoder(CLTConfig(d_in=D, d_sae=8, n_layers=3)), tokens)
    with pytest.raises(ValueError, match="d_model=64"):
        run_with_clt(model, CrossLayerTranscoder(CLTConfig(d_in=32, d_sae=8, n_layers=2)), tokens)
    bad_hook = CrossLayerTranscoder(
        CLTConfig(d_in=D, d_sae=8, n_layers=2, metadata=SAEMetadata(hook_name="ln9.hook_nope"))
    )
    with pytest.raises(ValueError, match="ln9.hook_nope"):
        run_with_clt(model, bad_hook, tokens)
    with pytest.raises(ValueError, match="out of range"):
        run_with_clt(model, make_clt(), tokens, layers=[2])


def test_splice_gradients_flow_through_the_reconstruction(model, tokens):
    clt = make_clt(model, tokens)
    logits = run_with_clt(model, clt, tokens, error_term=True)
    logits[:, -1].logsumexp(-1).sum().backward()
    assert clt.W_dec[0].grad is not None and clt.W_dec[0].grad.abs().sum() > 0
    assert clt.W_enc.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
