"""SAE-Dashboard renders a CLT source layer (as a SAELens transcoder) with its own runner, into
a page that opens from disk with no network (checked in headless Chromium, network cut off).

The page is built once per module from held-out prompts salted with tokens that are hard to
show: a newline, a lone non-ASCII byte, "<", and (through a copy of the embedded tokenizer
with a few vocabulary entries renamed) whole tokens for "−", "é", " café", "€" and " <b>&amp;".
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from browser_helpers import WebDriver, chromium_or_skip, screenshot_dir
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


# byte-level vocabulary strings of the renamed tokens -> the text they stand for
RENAMED = {"âĪĴ": "−", "Ã©": "é", "ĠcafÃ©": " café", "âĤ¬": "€", "Ġ<b>&amp;": " <b>&amp;"}
# single-byte tokens of the embedded vocabulary -> how the page must show them
BYTES = {"Ċ": "↵", "â": "\\xe2", "<": "<"}


@pytest.fixture(scope="module")
def clt():
    clt = random_clt(32, frac=0.05, seed=3)
    with torch.no_grad():  # logit effects of a few tenths, so the logit axis has negative ticks
        clt.W_dec[LAYER].mul_(20)
    return clt


def _tokenizer_with_renamed_tokens(tmp_path):
    """The embedded tokenizer with its last vocabulary entries renamed to RENAMED's strings (the
    merges that built them dropped), saved and reloaded as a Hugging Face tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = json.loads(model().tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    old = {by_id[len(vocab) - 1 - k]: new for k, new in enumerate(RENAMED)}
    spec["model"]["vocab"] = {old.get(t, t): i for t, i in vocab.items()}
    spec["model"]["merges"] = [
        m for m in spec["model"]["merges"]
        if "".join(m) not in old and not set(m) & set(old)
    ]
    from tokenizers import Tokenizer

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    return tok, {new: spec["model"]["vocab"][new] for new in RENAMED}


@pytest.fixture(scope="module")
def page(clt, tmp_path_factory):
    """(html path, tokens, renamed-token ids): one dashboard page for FEATURES of LAYER."""
    root = tmp_path_factory.mktemp("dashboard")
    tok, renamed_ids = _tokenizer_with_renamed_tokens(root / "tokenizer")
    hsae = to_hooked_sae_transformer(model())
    hsae.tokenizer = tok
    special = list(renamed_ids.values()) + [tok.get_vocab()[b] for b in BYTES]
    toks = heldout_tokens(12).clone()
    # every third position (BOS kept) holds one of them, so every shown context has several
    for n, pos in enumerate(range(1, toks.shape[1], 3)):
        toks[:, pos] = special[n % len(special)]
    out = write_dashboard(clt, LAYER, FEATURES, model=hsae, tokens=toks,
                          out_html=root / "dash" / "layer1.html")
    return out, toks, renamed_ids


def _max_acts(clt, toks):
    with torch.no_grad():
        _, cache = model().run_with_cache(toks, names_filter=clt.cfg.input_hook_name(LAYER))
        acts = clt.encode_layer(cache[clt.cfg.input_hook_name(LAYER)], LAYER)[:, 1:]
    return {f: float(acts[..., f].max()) for f in FEATURES}


def test_hooked_sae_transformer_copy_is_the_same_model():
    m = model()
    hsae = to_hooked_sae_transformer(m)
    toks = heldout_tokens(2)
    with torch.no_grad():
        assert torch.equal(hsae(toks), m(toks))
    assert hsae.tokenizer is m.tokenizer


def test_dashboard_html_shows_our_activations(clt, page):
    out, toks, _ = page
    html = out.read_text(encoding="utf-8")
    assert len(html) > 10_000 and "DASHBOARD_DATA" in html and "<script" in html
    # a whole document that says it is UTF-8 (Chromium guesses right for a file without the
    # declaration; other browsers, and servers, need it), loading nothing from the network
    assert html.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in html[:300]
    assert not re.search(r"""<(script|link)[^>]+(src|href)=["']?(https?:)?//""", html)
    # The page's data for each feature; its max activation is the CLT's raw activation over the
    # same prompts, BOS excluded as in our statistics: no decoder-norm folding.
    for m in _max_acts(clt, toks).values():
        assert f"MAX = {m:.3f}" in html
    assert html.count("TOP ACTIVATIONS") >= len(FEATURES)


# -- in headless Chromium, from disk, network cut off ----------------------------------------

TOKEN_TEXTS = "return Array.from(document.querySelectorAll('span.token')).map(e => e.textContent)"


@pytest.mark.browser
def test_dashboard_renders_offline(clt, page, tmp_path):
    chromium, chromedriver = chromium_or_skip()
    out, toks, _ = page
    max_acts = _max_acts(clt, toks)
    with WebDriver(chromium, chromedriver) as driver:
        driver.open(out.resolve().as_uri())
        assert driver.js("return document.characterSet") == "UTF-8"
        # feature tables with rows, both histograms with bars, highlighted top activations
        assert driver.wait_js("return document.querySelectorAll('.feature-tables tr').length")
        bars = driver.wait_js(
            "return ['#histogram-acts-0', '#histogram-logits-0']"
            ".every(h => document.querySelectorAll(h + ' .point').length > 0)")
        assert bars, "a histogram has no bars"
        lit = driver.js("return Array.from(document.querySelectorAll('span.token'))"
                        ".filter(e => e.style.backgroundColor && "
                        "!['white', 'rgb(255, 255, 255)', 'transparent']"
                        ".includes(e.style.backgroundColor)).length")
        assert lit > 0, "no highlighted tokens in the top activations"
        assert driver.js("return document.querySelectorAll('.logits-table tr').length") > 0
        title = driver.js("return document.body.innerText")
        first = FEATURES[0]
        assert f"MAX = {max_acts[first]:.3f}" in title
        # text as written: a minus sign on the logit axis, whole characters, visible newlines
        ticks = driver.js("return Array.from(document.querySelectorAll("
                          "'#histogram-logits-0 .xtick text')).map(e => e.textContent).join(' ')")
        assert "\u2212" in ticks and "â" not in ticks, ticks
        shown = set(driver.js(TOKEN_TEXTS))
        for text in [*RENAMED.values(), *BYTES.values()]:
            assert text in shown, (text, sorted(shown)[:40])
        assert not [t for t in shown if re.search("[ĠĊĉÃâĪĴĤ]", t)], shown
        # the hover cards quote the token as text, not as markup
        codes = driver.js("return Array.from(document.querySelectorAll('.tooltip code'))"
                          ".map(e => e.textContent)")
        assert " <b>&amp;" in codes
        driver.screenshot(screenshot_dir(tmp_path) / "dashboard_layer1.png")
        # the dropdown switches features
        other = FEATURES[-1]
        driver.js("var s = document.getElementById('select-0'); s.value = arguments[0];"
                  "s.dispatchEvent(new Event('change'));", str(other))
        assert driver.wait_js(f"return document.body.innerText.includes("
                              f"'MAX = {max_acts[other]:.3f}')")
        assert driver.js("return document.querySelectorAll('#histogram-acts-0 .point').length")
        assert driver.remote_refs() == []
        assert driver.console_errors() == []
        # a link can open the page at a feature
        driver.open(out.resolve().as_uri() + f"#feature={FEATURES[1]}")
        assert driver.wait_js(f"return document.body.innerText.includes("
                              f"'MAX = {max_acts[FEATURES[1]]:.3f}')")
        assert driver.js("return document.getElementById('select-0').value") == str(FEATURES[1])


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


def test_dashboard_needs_the_page_scripts(clt, tmp_path, monkeypatch, capsys):
    """Without d3/plotly installed, no page is written (it would be blank offline): the error
    says how to install them, and ``clt-lens features --dashboard`` stops before its pass."""
    from clt_lens.cli import main
    from clt_lens.vendor_js import DASHBOARD_SCRIPTS

    monkeypatch.delenv("CLT_LENS_VIEWER_JS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    kw = dict(model=model(), tokens=heldout_tokens(2), out_html=tmp_path / "x.html")
    with pytest.raises(DashboardUnavailableError, match="clt-lens serve --install-js"):
        write_dashboard(clt, 0, [1], **kw)
    altered = tmp_path / "altered"
    altered.mkdir()
    for name in DASHBOARD_SCRIPTS:
        (altered / name).write_text("window.d3 = {};")
    with pytest.raises(DashboardUnavailableError, match="sha256"):
        write_dashboard(clt, 0, [1], js_dir=altered, **kw)
    assert not (tmp_path / "x.html").exists()
    ckpt = tmp_path / "run" / "final"
    clt.save_model(ckpt)
    out = tmp_path / "run" / "features"
    assert main(["features", str(ckpt), "--dashboard", "1:0", "--out", str(out)]) == 2
    assert "clt-lens serve --install-js" in capsys.readouterr().err
    assert not out.exists()
