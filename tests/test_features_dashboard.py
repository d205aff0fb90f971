"""SAE-Dashboard renders a CLT source layer (as a SAELens transcoder) with its own runner."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_features_common import heldout_tokens, model, random_clt

from clt_lens.features.dashboard import (
    DashboardUnavailableError,
    to_hooked_sae_transformer,
    write_dashboard,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sae_dashboard") is None,
    reason="sae-dashboard extra not installed (make install)",
)

LAYER = 1
FEATURES = [0, 7, 21]


@pytest.fixture(scope="module")
def clt():
    return random_clt(32, frac=0.05, seed=3)


def test_hooked_sae_transformer_copy_is_the_same_model():
    m = model()
    hsae = to_hooked_sae_transformer(m)
    toks = heldout_tokens(2)
    with torch.no_grad():
        assert torch.equal(hsae(toks), m(toks))
    assert hsae.tokenizer is m.tokenizer


def test_dashboard_html_shows_our_activations(clt, tmp_path):
    toks = heldout_tokens(12)
    out = write_dashboard(clt, LAYER, FEATURES, model=model(), tokens=toks,
                          out_html=tmp_path / "dash" / "layer1.html")
    html = out.read_text(encoding="utf-8")
    assert len(html) > 10_000 and "DASHBOARD_DATA" in html and "<script" in html
    # The page's data for each feature; its max activation is the CLT's raw activation over the
    # same prompts, BOS excluded as in our statistics: no decoder-norm folding.
    with torch.no_grad():
        _, cache = model().run_with_cache(toks, names_filter=clt.cfg.input_hook_name(LAYER))
        acts = clt.encode_layer(cache[clt.cfg.input_hook_name(LAYER)], LAYER)[:, 1:]
    for f in FEATURES:
        assert f"MAX = {float(acts[..., f].max()):.3f}" in html
    assert html.count("TOP ACTIVATIONS") >= len(FEATURES)


def test_dashboard_bad_input(clt, tmp_path, monkeypatch):
    kw = dict(model=model(), tokens=heldout_tokens(2), out_html=tmp_path / "x.html")
    with pytest.raises(ValueError, match=r"feature indices \[32\]"):
        write_dashboard(clt, 0, [1, 32], **kw)
    with pytest.raises(ValueError, match="layer 4"):
        write_dashboard(clt, 4, [1], **kw)
    with pytest.raises(ValueError, match="TopK"):
        write_dashboard(random_clt(8, activation="topk"), 0, [1], **kw)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sae_dashboard" else real(name, *a))
    with pytest.raises(DashboardUnavailableError, match="pip install --no-deps sae-dashboard"):
        write_dashboard(clt, 0, [1], **kw)
    assert not (tmp_path / "x.html").exists()
