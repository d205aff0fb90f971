"""`clt-lens demo` end to end at tiny sizes: every stage runs and the outputs exist, and its
index.html opens from disk, offline, in headless Chromium as a page that leads to everything.

Autointerp runs against the local stub OpenAI server (``clt_lens.autointerp.stub_server``), so
the index's feature browser has explanations to search.
"""

import importlib.util
import os
import re
import subprocess
import sys
import urllib.parse

import pytest
from browser_helpers import WebDriver, chromium_or_skip, screenshot_dir

from clt_lens.autointerp.stub_server import StubOpenAIServer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    env = dict(os.environ)
    with StubOpenAIServer() as stub:
        env.update(OMP_NUM_THREADS="2", OPENAI_BASE_URL=stub.base_url, OPENAI_API_KEY="test",
                   CLT_LENS_AUTOINTERP_MODEL="stub")
        r = subprocess.run(
            [sys.executable, "-m", "clt_lens", "demo", "--out", str(out), "--cache-tokens",
             "16384", "--steps", "30", "--feature-tokens", "4096", "--eval-tokens", "1024"],
            capture_output=True, text=True, env=env,
        )
    return out, r


def _dashboards_expected() -> bool:
    from clt_lens.demo import _dashboards_unavailable

    return _dashboards_unavailable() is None


def test_demo_runs_the_whole_path(demo):
    out, r = demo
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CE recovered" in r.stdout and "| layer | MSE | FVU |" in r.stdout  # the eval table
    assert "clt-lens serve" in r.stdout and "Neuronpedia export" in r.stdout
    assert "16 features recorded this run" in r.stdout  # autointerp on the dashboards' features
    for rel in ("index.html", "train/final/cfg.json", "train/training_curves.png", "eval/eval.json",
                "features/features.json", "features/autointerp.jsonl",
                "circuit_tracer/config.yaml"):
        assert (out / rel).exists(), rel
    assert list((out / "graphs").glob("*.json")), "no graph JSON"
    assert list((out / "features" / "neuronpedia" / "exports").rglob("batch-0.jsonl.gz"))
    index = (out / "index.html").read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in index
    assert "training_curves.png" in index and "eval_layers.png" in index
    # the viewer's instructions, linked from the index
    assert 'href="viewer_help.html"' in index
    assert "Intervene" in (out / "viewer_help.html").read_text()
    assert "<pre>" not in index and "| layer |" not in index  # tables, not markdown
    assert not re.search(r"""<(script|link|img)[^>]+(src|href)=["']https?:""", index)
    if _dashboards_expected():
        for layer in range(4):
            page = out / "dashboards" / f"layer_{layer}.html"
            assert f'href="dashboards/layer_{layer}.html"' in index
            text = page.read_text(encoding="utf-8")
            assert not re.search(r"""<script[^>]+src=["']https?:""", text), page
    else:
        assert "dashboards skipped" in r.stdout and "No dashboards:" in index


def test_demo_says_early_why_dashboards_are_skipped(monkeypatch):
    from clt_lens.demo import _dashboards_unavailable

    monkeypatch.delenv("CLT_LENS_VIEWER_JS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent-clt-lens-cache")
    why = _dashboards_unavailable()
    if importlib.util.find_spec("sae_dashboard") is None:
        assert "sae-dashboard" in why
    else:
        assert "d3 v6 and plotly" in why and "clt-lens serve --install-js" in why


@pytest.mark.browser
def test_demo_index_renders_offline(demo, tmp_path):
    from clt_lens.autointerp import load_explanations

    chromium, chromedriver = chromium_or_skip()
    out, r = demo
    assert r.returncode == 0, r.stderr[-3000:]
    if not _dashboards_expected():
        pytest.skip("the demo wrote no dashboards: install sae-dashboard (make install) and the "
                    "page scripts ('clt-lens serve --install-js')")
    shots = screenshot_dir(tmp_path)
    explanations = load_explanations(out / "features")
    with WebDriver(chromium, chromedriver) as driver:
        driver.open((out / "index.html").resolve().as_uri())
        assert driver.js("return document.characterSet") == "UTF-8"
        # evaluation tables as tables, every image drawn
        rows = driver.js("return Array.from(document.querySelectorAll('table.eval'))"
                         ".map(t => t.querySelectorAll('tbody tr').length)")
        # per layer (4), replacement model (6), feature density (held-out, rare, window)
        assert rows == [4, 6, 3], rows
        assert driver.js("return Array.from(document.images)"
                         ".every(i => i.complete && i.naturalWidth > 0)")
        assert driver.js("return document.images.length") >= 3
        # every local link leads to something that exists
        hrefs = driver.js("return Array.from(document.querySelectorAll('a[href]'))"
                          ".map(a => a.getAttribute('href'))")
        local = [h for h in hrefs if not h.startswith(("#", "http:"))]
        for h in local:
            target = out / urllib.parse.unquote(h.split("#")[0])
            assert target.exists(), h
        for layer in range(4):
            assert f"dashboards/layer_{layer}.html" in local
        assert any(h.startswith("features/neuronpedia/exports/") for h in local)
        assert any(h.startswith("graphs/") and h.endswith(".json") for h in local)
        assert "clt-lens serve graphs" in driver.js("return document.body.innerText")
        # the feature browser: one row per dashboard feature; search narrows it
        n_rows = driver.js("return document.querySelectorAll('#feature-table tbody tr').length")
        assert n_rows == 16 == len(explanations)
        (layer, index), rec = sorted(explanations.items())[-1]
        box = driver.js("return document.getElementById('feature-search')")
        driver.type_into(box, rec["explanation"][:40])
        visible = driver.js("return Array.from(document.querySelectorAll("
                            "'#feature-table tbody tr')).filter(r => !r.hidden)"
                            ".map(r => r.querySelector('a').textContent)")
        assert f"L{layer}/F{index}" in visible and len(visible) < n_rows, visible
        driver.fit_window_to_page()
        driver.screenshot(shots / "demo_index.png")
        assert driver.remote_refs() == [] and driver.console_errors() == []
        # ... and its link opens that feature's dashboard
        link = driver.js(f"return Array.from(document.querySelectorAll('#feature-table a'))"
                         f".find(a => a.textContent === 'L{layer}/F{index}')")
        driver.click(link)
        assert driver.wait_js("return location.pathname.endsWith('/dashboards/layer_"
                              f"{layer}.html') && document.querySelectorAll("
                              "'.feature-tables tr').length > 0")
        assert driver.js("return document.getElementById('select-0').value") == str(index)
        assert driver.js("return document.querySelectorAll('#histogram-acts-0 .point').length")
        driver.screenshot(shots / "demo_dashboard.png")
        assert driver.remote_refs() == [] and driver.console_errors() == []
