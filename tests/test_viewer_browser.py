"""``clt-lens serve``: the HTTP routes, and circuit-tracer's viewer in headless Chromium.

The browser test (``browser_helpers``: chromedriver over plain urllib, network cut off) needs
chromium + chromium-driver and the viewer's d3/dagre/pako files (``clt-lens serve
--install-js``); without them it is skipped, saying which is missing. Its screenshot is written
to the test's tmp dir, or to ``$CLT_LENS_SCREENSHOT_DIR``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from browser_helpers import WebDriver, chromium_or_skip, screenshot_dir
from test_circuits_common import PROMPT, feature_marker, make_features_dir

from clt_lens.circuits import CircuitsError, attribute_prompt
from clt_lens.circuits.synthetic import random_clt
from clt_lens.serve import LOCAL_SCAN_PREFIX, find_viewer_js, local_index_html, serve


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory, embedded_model):
    root = tmp_path_factory.mktemp("viewer")
    clt = random_clt(embedded_model, d_sae=128, seed=21)
    explanations = {(layer, i): f"explained {layer}/{i}" for layer in range(4)
                    for i in range(128)}
    fdir = make_features_dir(root / "features", clt, explanations=explanations)
    out = root / "graphs"
    res = attribute_prompt(clt, PROMPT, model=embedded_model, max_feature_nodes=60,
                           batch_size=64, out_dir=out, slug="tobe", features_dir=fdir)
    return out, res


def _get(url: str, data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def test_server_routes(graph_dir, tmp_path):
    out, res = graph_dir
    with serve(out, port=0) as srv:
        url = srv.url
        assert url.startswith("http://127.0.0.1:")
        status, body = _get(url + "data/graph-metadata.json")
        assert status == 200 and json.loads(body)["graphs"][0]["slug"] == "tobe"
        # the graph is served with its scan pointing at the local feature pages ...
        status, body = _get(url + "graph_data/tobe.json")
        graph = json.loads(body)
        assert graph["metadata"]["scan"] == LOCAL_SCAN_PREFIX + res.viewer_features_dir.name
        # ... while the file keeps the real scan
        assert json.loads(res.json_path.read_text())["metadata"]["scan"] == res.scan
        node = next(n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder")
        status, body = _get(f"{url}feature_data/{res.viewer_features_dir.name}/"
                            f"{node['feature']}.json")
        page = json.loads(body)
        assert status == 200 and page["index"] == node["feature"] and page["examples_quantiles"]
        status, body = _get(f"{url}feature_data/{res.viewer_features_dir.name}/999999.json")
        assert json.loads(body)["isDead"] is True
        # bundled viewer files are served; nothing outside the allowed folders is
        status, body = _get(url + "util.js")
        assert status == 200 and b"getFile" in body
        for bad in ("data/..%2F..%2Fetc%2Fpasswd", "graph_data/.tobe.json",
                    "feature_data/..%2F/1.json", "vendor/..%2Fserve.py", "../../../etc/passwd"):
            status, body = _get(url + bad)
            assert status == 404 or b"root:" not in body, bad
        status, body = _get(url + "vendor/jetpack-compat.js")
        assert status == 200 and b"d3.conventions" in body
        # the viewer's Save button stores qParams in the graph file
        status, _ = _get(url + "save_graph/tobe",
                         json.dumps({"qParams": {"pinnedIds": "1_2_3"}}).encode())
        assert status == 200
        assert json.loads(res.json_path.read_text())["qParams"] == {"pinnedIds": "1_2_3"}
        status, _ = _get(url + "save_graph/nope", b'{"qParams": {}}')
        assert status == 404


def test_index_html_points_at_local_scripts():
    from clt_lens.serve import frontend_dir

    html = local_index_html((frontend_dir() / "index.html").read_text())
    assert "https://" not in html.split("<script>")[0]
    for name in ("./vendor/d3.min.js", "./vendor/jetpack-compat.js", "./vendor/dagre.min.js",
                 "./vendor/pako.min.js"):
        assert name in html
    assert html.index("d3.min.js") < html.index("jetpack-compat.js") < html.index("util.js")


def test_serve_rejects_bad_dirs(tmp_path):
    with pytest.raises(CircuitsError, match="does not exist"):
        serve(tmp_path / "missing", port=0)
    with pytest.raises(CircuitsError, match="graph-metadata.json"):
        serve(tmp_path, port=0)
    with pytest.raises(CircuitsError, match="lacks"):
        find_viewer_js(tmp_path)


# -- headless Chromium ---------------------------------------------------------------------------


def _browser_or_skip() -> tuple[str, str]:
    chromium, driver = chromium_or_skip()
    if find_viewer_js() is None:
        pytest.skip("the viewer's d3/dagre/pako files are not installed for offline use: run "
                    "'clt-lens serve --install-js' (or set CLT_LENS_VIEWER_JS)")
    return chromium, driver


@pytest.mark.browser
def test_viewer_renders_graph_and_feature_examples(graph_dir, tmp_path):
    chromium, chromedriver = _browser_or_skip()
    out, res = graph_dir
    graph = json.loads(res.json_path.read_text())
    # the viewer shows tokens, logits and nodes within the pruning threshold (influence is the
    # cumulative influence, so the node that crosses the threshold is left out)
    shown_types = ("embedding", "logit")
    expected = [n for n in graph["nodes"]
                if n["feature_type"] in shown_types or n["influence"] <= 0.8]
    n_errors = sum(n["feature_type"] == "mlp reconstruction error" for n in expected)
    shot_dir = screenshot_dir(tmp_path)
    with serve(out, port=0) as srv:
        driver = WebDriver(chromium, chromedriver)
        try:
            driver.open(srv.url + "index.html?slug=tobe")
            shown = driver.wait_js("return document.querySelectorAll('.node').length")
            assert shown == len(expected), (shown, len(expected))
            errors_shown = driver.js(
                "return d3.selectAll('.node').filter(d => d.isError).size()")
            assert errors_shown == n_errors > 0
            prompt_tokens = driver.js(
                "return Array.from(document.querySelectorAll('.prompt-token'))"
                ".map(e => e.textContent).join('|')")
            assert "question" in prompt_tokens
            feature = driver.js(
                "return d3.selectAll('.node')"
                ".filter(d => d.feature_type == 'cross layer transcoder').nodes().at(-1)")
            label = driver.js("return d3.select(arguments[0]).datum().node_id", feature)
            layer, index, _ = map(int, label.split("_"))
            driver.click(feature)
            examples = driver.wait_js(
                "var e = document.querySelector('.feature-example-list');"
                "return e && e.querySelectorAll('.ctx-container').length && e.innerText")
            assert examples and "Top activations" in examples
            assert feature_marker(layer, index) in examples
            detail = driver.js("return document.querySelector('.feature-detail').innerText")
            assert f"explained {layer}/{index}" in detail  # clerp from autointerp
            assert "crown" in detail  # top logits from the feature page
            # the clicked node's input/output edges are listed
            rows = driver.js("return document.querySelectorAll('.node-connections .feature-row')"
                             ".length")
            assert rows > 0
            shot = shot_dir / "viewer_feature_examples.png"
            driver.screenshot(shot)
            assert shot.stat().st_size > 10_000
            # rendered with the network cut off, from nothing but local files
            assert driver.remote_refs() == []
            assert driver.js("return document.characterSet") == "UTF-8"
            errors = [e for e in driver.console_errors() if "favicon" not in e]
            assert not errors, errors
        finally:
            driver.quit()


def test_feature_pages_for_every_feature(tmp_path, embedded_model):
    from clt_lens.circuits.viewer_data import _histogram, cantor_pair, write_viewer_features

    clt = random_clt(embedded_model, d_sae=8, seed=22, fit_decoder=False)
    fdir = make_features_dir(tmp_path / "features", clt, explanations={(1, 3): "the crown"})
    dest = write_viewer_features(fdir, tmp_path / "graphs", "clt-lens/embedded/x")
    pages = sorted(p.name for p in dest.glob("*.json") if p.name != "index.json")
    assert len(pages) == 4 * 8
    assert json.loads((dest / "index.json").read_text())["n_pages"] == 32
    page = json.loads((dest / f"{cantor_pair(1, 3)}.json").read_text())
    assert (page["layer"], page["feature"], page["explanation"]) == (1, 3, "the crown")
    assert [q["quantile_name"] for q in page["examples_quantiles"]] == [
        "Top activations", "Quantile 1 (0.1 to 1)"]
    ex = page["examples_quantiles"][0]["examples"][0]
    assert ex["train_token_ind"] == 3 and len(ex["tokens"]) == len(ex["tokens_acts_list"])
    assert page["top_logits"] == [" crown", " throne"] and page["act_max"] == 2.0
    # the histogram is re-binned onto [0, act_max]; percentiles interpolate inside bins
    heights, pct = _histogram({"edges": [0.1, 0.6, 1.1, 1.6, 2.1], "counts": [8, 6, 4, 2]}, 2.1)
    assert heights == [8, 6, 4, 2]
    assert len(pct) == 100 and pct[39] == pytest.approx(0.6)
    assert pct[49] == pytest.approx(0.6 + 0.5 / 3) and pct[99] == pytest.approx(2.1)
    with pytest.raises(CircuitsError, match="no feature"):
        write_viewer_features(fdir, tmp_path / "graphs", "s", features=[(0, 99)])


def test_serve_cli_errors(tmp_path, capsys):
    from clt_lens.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--js-dir", str(tmp_path)]) == 2
    assert "graph-metadata.json" in capsys.readouterr().err
