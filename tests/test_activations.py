"""Activation collection against TransformerLens's own run_with_cache, on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from clt_lens.activations import (
    HookError,
    HookSpec,
    collect_activations,
    stream_activations,
    valid_hook_names,
)

BOS, PAD = 0, 63


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, n_ctx=12, d_head=8, n_heads=4, d_mlp=64, d_vocab=64,
        act_fn="gelu", normalization_type="LN", seed=1,
    )
    m = HookedTransformer(cfg)
    # Non-trivial LN affine so that mlp.hook_in (after w, b) differs from ln2.hook_normalized.
    with torch.no_grad():
        for block in m.blocks:
            block.ln2.w.uniform_(0.5, 1.5)
            block.ln2.b.normal_(0, 0.1)
    return m.eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, PAD, (4, 12), generator=g)
    t[[0, 1, 3], 0] = BOS  # row 2 does not start with BOS: nothing dropped there
    t[1, 9:] = PAD  # right padding
    t[3, 5:] = PAD
    return t


def kept_positions(tokens: torch.Tensor) -> list[tuple[int, int]]:
    """Reference mask, written out position by position."""
    out = []
    for i in range(tokens.shape[0]):
        for j in range(tokens.shape[1]):
            tok = int(tokens[i, j])
            if (j == 0 and tok == BOS) or tok == PAD:
                continue
            out.append((i, j))
    return out


def reference(model, tokens, name: str) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens)
    pos = kept_positions(tokens)
    layers = []
    for layer in range(model.cfg.n_layers):
        if name == "mlp.hook_in":  # what the MLP receives: LN output after its affine
            ln = model.blocks[layer].ln2
            act = cache[f"blocks.{layer}.ln2.hook_normalized"] * ln.w + ln.b
        elif name == "mlp.hook_out":
            act = cache[f"blocks.{layer}.hook_mlp_out"]
        elif name == "hook_mlp_in":
            act = cache[f"blocks.{layer}.hook_resid_mid"]  # TL passes resid_mid to hook_mlp_in
        else:
            act = cache[f"blocks.{layer}.{name}"]
        layers.append(torch.stack([act[i, j] for i, j in pos]))
    return torch.stack(layers, dim=1)


@pytest.mark.parametrize(
    "input_hook", ["ln2.hook_normalized", "hook_resid_mid", "hook_mlp_in", "mlp.hook_in"]
)
def test_matches_run_with_cache(model, tokens, input_hook):
    x, y = collect_activations(model, tokens, HookSpec(input_hook), pad_token_id=PAD,
                               bos_token_id=BOS)
    n = len(kept_positions(tokens))
    assert x.shape == y.shape == (n, 3, 32) and x.dtype == torch.float32
    assert torch.equal(x, reference(model, tokens, input_hook))
    assert torch.equal(y, reference(model, tokens, "hook_mlp_out"))
    assert model.cfg.use_hook_mlp_in is False  # switched on only for the pass


def test_mlp_hook_in_differs_from_normalized(model, tokens):
    a, _ = collect_activations(model, tokens, HookSpec("mlp.hook_in"), bos_token_id=BOS)
    b, _ = collect_activations(model, tokens, HookSpec("ln2.hook_normalized"), bos_token_id=BOS)
    assert (a - b).abs().max() > 0.05


def test_mlp_hook_out_equals_hook_mlp_out(model, tokens):
    _, y1 = collect_activations(model, tokens, HookSpec(output_hook="mlp.hook_out"))
    _, y2 = collect_activations(model, tokens, HookSpec(output_hook="hook_mlp_out"))
    assert torch.equal(y1, y2)


def test_bos_kept_when_disabled_or_unknown(model, tokens):
    x, _ = collect_activations(model, tokens, exclude_bos=False, bos_token_id=BOS)
    assert x.shape[0] == tokens.numel()
    x, _ = collect_activations(model, tokens)  # no tokenizer, no bos id: nothing is BOS
    assert x.shape[0] == tokens.numel()
    x, _ = collect_activations(model, tokens, bos_token_id=BOS)
    assert x.shape[0] == tokens.numel() - 3


def test_stops_before_unembed(model, tokens, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("unembed ran")

    monkeypatch.setattr(model.unembed, "forward", boom)
    monkeypatch.setattr(model.ln_final, "forward", boom)
    x, _ = collect_activations(model, tokens)
    assert x.shape[0] == tokens.numel()


def test_only_needed_hooks_cached(model, tokens, monkeypatch):
    seen = []
    orig = model.hooks

    def spy(fwd_hooks=(), **kw):
        seen.extend(name for name, _ in fwd_hooks)
        return orig(fwd_hooks=fwd_hooks, **kw)

    monkeypatch.setattr(model, "hooks", spy)
    collect_activations(model, tokens, HookSpec("hook_resid_mid", "hook_mlp_out"))
    assert sorted(seen) == sorted(HookSpec("hook_resid_mid").input_names(3)
                                  + HookSpec().output_names(3))
    assert not any(h.fwd_hooks for h in model.hook_dict.values())  # removed afterwards


def test_bad_hooks_are_named(model, tokens):
    with pytest.raises(HookError) as e:
        collect_activations(model, tokens, HookSpec("ln2.hook_normalised"))
    msg = str(e.value)
    assert "ln2.hook_normalised" in msg and "ln2.hook_normalized" in msg and "hook_resid_mid" in msg
    with pytest.raises(HookError, match="attn.hook_z.*shape"):
        collect_activations(model, tokens, HookSpec("attn.hook_z"))
    with pytest.raises(HookError, match="block-relative"):
        HookSpec("blocks.0.hook_resid_mid")
    assert "mlp.hook_in" in valid_hook_names(model)


def test_hookspec_names_and_json():
    spec = HookSpec("hook_resid_mid", "hook_mlp_out")
    assert spec.input_names(2) == ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"]
    assert spec.output_names(1) == ["blocks.0.hook_mlp_out"]
    assert HookSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(HookError):
        HookSpec.from_dict({"input_hook": "x", "bogus": 1})


def test_stream_rebatches_in_order(model, tokens):
    full_x, full_y = collect_activations(model, tokens, pad_token_id=PAD, bos_token_id=BOS)
    batches = list(stream_activations(model, tokens.split(1), batch_tokens=7, pad_token_id=PAD,
                                      bos_token_id=BOS))
    assert [b[0].shape[0] for b in batches[:-1]] == [7] * (len(batches) - 1)
    assert torch.equal(torch.cat([b[0] for b in batches]), full_x)
    assert torch.equal(torch.cat([b[1] for b in batches]), full_y)
    per_batch = list(stream_activations(model, tokens.split(2), bos_token_id=BOS))
    assert len(per_batch) == 2
