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

from clt_lens.circuits import CircuitsError, attribute_prompt, cantor_pair, write_viewer_features
from clt_lens.circuits.synthetic import random_clt
from clt_lens.serve import LOCAL_SCAN_PREFIX, find_viewer_js, local_index_html, serve


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory, embedded_model):
    root = tmp_path_factory.mktemp("viewer")
    clt = random_clt(embedded_model, d_sae=128, seed=21)
    ckpt = root / "ckpt"  # on disk, so the graph's metadata names it for interventions
    clt.save_model(ckpt)
    explanations = {(layer, i): f"explained {layer}/{i}" for layer in range(4)
                    for i in range(128)}
    fdir = make_features_dir(root / "features", clt, explanations=explanations)
    out = root / "graphs"
    res = attribute_prompt(ckpt, PROMPT, model=embedded_model, max_feature_nodes=60,
                           batch_size=64, out_dir=out, slug="tobe", features_dir=fdir)
    with open(fdir / "autointerp.jsonl", "a") as f:  # a scored explanation for one page
        f.write(json.dumps({"layer": 1, "index": 5, "status": "ok", "explanation": "scored 1/5",
                            "method": "test", "model": "test-llm", "usage": {}, "error": None,
                            "scores": {"detection": {"balanced_accuracy": 0.875}}}) + "\n")
    write_viewer_features(fdir, out, res.scan, features=[(1, 5)])
    return out, res


def _get(url: str, data: bytes | None = None,
         ctype: str = "application/json") -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


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
        # a missing page is a 404 whose message the viewer shows (workbench.js)
        missing = cantor_pair(2, 77)
        status, body = _get(f"{url}feature_data/{res.viewer_features_dir.name}/{missing}.json")
        page = json.loads(body)
        assert status == 404 and page["isDead"] is True
        assert "no feature page for layer 2 feature 77" in page["error"]
        status, body = _get(f"{url}feature_data/elsewhere/{missing}.json")
        assert status == 404 and "no feature pages in features/elsewhere" in json.loads(body)[
            "error"]
        # feature nodes link to their page; our scripts are on the page
        assert node["vis_link"].startswith("./feature.html?slug=tobe&layer=")
        status, body = _get(url + "index.html")
        assert b"./workbench/workbench.js" in body and b"./workbench/workbench.css" in body
        for asset in ("workbench/workbench.js", "feature.html", "help.html"):
            assert _get(url + asset)[0] == 200, asset
        # the page with decoder norms and scores
        status, body = _get(f"{url}feature_data/{res.viewer_features_dir.name}/"
                            f"{cantor_pair(1, 5)}.json")
        page = json.loads(body)
        assert len(page["decoder_norms"]) == 3 and page["explanation"] == "scored 1/5"
        assert page["explanation_scores"]["detection"]["balanced_accuracy"] == 0.875
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
        # another site cannot post a form to it (text/plain needs no CORS preflight)
        status, _ = _get(url + "save_graph/tobe", b'{"qParams": {}}', ctype="text/plain")
        assert status == 415
        assert json.loads(res.json_path.read_text())["qParams"] == {"pinnedIds": "1_2_3"}


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


def _open_graph(driver: WebDriver, url: str) -> None:
    driver.session("POST", "/url", {"url": url + "index.html?slug=tobe"})
    assert driver.wait_js("return document.querySelectorAll('.node').length > 0 && "
                          "!!window.cltWorkbench.ctx && !!document.querySelector('.clt-wb-toggle')")


def _feature_nodes(driver: WebDriver) -> list:
    """Shown feature nodes of the link graph, most influential first."""
    return driver.js("return d3.selectAll('.node')"
                     ".filter(d => d.feature_type == 'cross layer transcoder').nodes()"
                     ".sort((a, b) => d3.select(a).datum().influence"
                     " - d3.select(b).datum().influence)")


def _run_and_wait(driver: WebDriver) -> dict:
    """Click Run; the result rows (token id, p before, p after) of both probability tables."""
    # few continuation tokens: each is a forward pass with and without the intervention
    driver.js("window.cltWorkbench.lastResult = null;"
              "document.querySelector('.clt-wb-ntokens').value = 3")
    driver.click(driver.js("return document.querySelector('.clt-wb-run')"))
    done = driver.wait_js(
        "var e = document.querySelector('.clt-wb-error');"
        "if (e && !e.hidden) return 'error: ' + e.textContent;"
        "return window.cltWorkbench.lastResult && "
        "document.querySelectorAll('.clt-wb-top-after tbody tr').length", timeout=120)
    assert done == 10, done
    return driver.js(
        "var rows = sel => Array.from(document.querySelectorAll(sel + ' tbody tr')).map(r =>"
        " [+r.dataset.tokenId, +r.dataset.probBefore, +r.dataset.probAfter]);"
        "return {before: rows('.clt-wb-top-before'), after: rows('.clt-wb-top-after'),"
        " result: window.cltWorkbench.lastResult,"
        " text: document.querySelector('.clt-wb-result').innerText}")


@pytest.mark.browser
def test_viewer_ablation_from_the_graph_page(graph_dir, tmp_path):
    """Click a feature node, ablate it from the Intervene drawer, read the changed tables; then
    the node's feature page, and steering from it."""
    chromium, chromedriver = _browser_or_skip()
    out, res = graph_dir
    shots = screenshot_dir(tmp_path)
    with serve(out, port=0) as srv:
        driver = WebDriver(chromium, chromedriver)
        try:
            _open_graph(driver, srv.url)
            node, other = _feature_nodes(driver)[:2]
            node_id = driver.js("return d3.select(arguments[0]).datum().nodeId", node)
            # a feature without a page: the viewer shows the server's 404 message
            layer, index, _ = map(int, driver.js("return d3.select(arguments[0]).datum()"
                                                 ".nodeId", other).split("_"))
            page = res.viewer_features_dir / f"{cantor_pair(layer, index)}.json"
            page.rename(page.with_suffix(".bak"))
            try:
                driver.click(other)
                shown = driver.wait_js("var e = document.querySelector("
                                       "'.feature-detail .clt-wb-feature-error');"
                                       "return e && e.textContent")
            finally:
                page.with_suffix(".bak").rename(page)
            assert shown and f"no feature page for layer {layer} feature {index}" in shown
            driver.click(node)
            # the feature panel: decoder norms, steer and the feature page link
            block = driver.wait_js("var b = document.querySelector('.clt-wb-feature');"
                                   "return b && b.querySelector('.clt-wb-norms') && b.innerText")
            assert block and "steer with this feature" in block and "feature page" in block
            driver.click(driver.js("return document.querySelector('.clt-wb-toggle')"))
            driver.click(driver.js("return document.querySelector('.clt-wb-add-clicked')"))
            targets = driver.js("return Array.from(document.querySelectorAll('.clt-wb-target'))"
                                ".map(e => e.dataset.nodeId)")
            assert targets == [node_id]
            assert driver.js("return document.querySelector('input[name=clt-wb-op]:checked')"
                             ".value") == "ablate"
            # a bad request: the page shows the server's message
            driver.js("document.querySelector('.clt-wb-prompt').value = 'The king';"
                      "document.querySelector('input[name=clt-wb-mode][value=steer]')"
                      ".checked = true;"
                      "document.querySelector('.clt-wb-positions').value = '99';"
                      "document.querySelector('input[name=clt-wb-pos][value=list]')"
                      ".checked = true;")
            driver.js("document.querySelector('.clt-wb-ntokens').value = 3")
            driver.click(driver.js("return document.querySelector('.clt-wb-run')"))
            error = driver.wait_js("var e = document.querySelector('.clt-wb-error');"
                                   "return e && !e.hidden && e.textContent", timeout=120)
            assert error and "position 99 is outside the prompt" in error, error
            driver.js("document.querySelector('input[name=clt-wb-mode][value=graph]')"
                      ".checked = true")
            got = _run_and_wait(driver)
            assert driver.js("return document.querySelector('.clt-wb-error').hidden")
            probs = {i: (b, a) for i, b, a in got["before"] + got["after"]}
            assert max(abs(b - a) for b, a in probs.values()) > 1e-6  # the ablation moved them
            before = [b for _, b, _ in got["before"]]
            assert before == sorted(before, reverse=True)
            r = got["result"]
            layer, index, pos = map(int, node_id.split("_"))
            assert r["interventions"][0] == {**r["interventions"][0], "layer": layer,
                                             "feature": index, "position": pos, "op": "ablate"}
            assert r["freeze"] is True and r["graph_prompt"] is True
            assert "Next token, before" in got["text"] and "continuation" in got["text"]
            assert "The graph's output logits" in got["text"]
            # the page's "same run in Python" gives the page's numbers
            code = driver.js("return document.querySelector('.clt-wb-python pre').textContent")
            scope: dict = {}
            exec(code, scope)  # noqa: S102 - our own generated snippet
            assert [row["id"] for row in scope["r"].top_after] == [i for i, _, _ in got["after"]]
            for row, (_, _, p_after) in zip(scope["r"].top_after, got["after"]):
                assert row["prob_after"] == pytest.approx(p_after, abs=1e-6)
            driver.screenshot(shots / "viewer_ablation.png")
            driver.js("document.querySelector('.clt-wb-logits').scrollIntoView()")
            driver.screenshot(shots / "viewer_ablation_results.png")
            expected_errors = ("favicon", "/api/intervene", "feature_data/")
            errors = [e for e in driver.console_errors()
                      if not any(x in e for x in expected_errors)]
            assert not errors, errors

            # the node's own page: explanation, decoder norms, examples; steer from it
            driver.session("POST", "/url", {"url": srv.url + "feature.html?slug=tobe&layer=1"
                                            "&index=5&node=1_5_3"})
            text = driver.wait_js("var m = document.querySelector('.fp-main');"
                                  "return m && m.querySelector('.fp-steer') && m.innerText")
            assert "scored 1/5" in text and "detection score: 0.875" in text
            assert driver.js("return document.querySelectorAll('.fp-norms > div').length") == 3
            assert "L1F5" in text  # the examples' marker token
            assert driver.js("return document.querySelector('.fp-back').getAttribute('href')") \
                == "./index.html?slug=tobe&clickedId=1_5_3"
            driver.js("document.querySelector('.fp-steer textarea').value = 'The king';"
                      "document.querySelector('.fp-steer .clt-wb-ntokens').value = 3")
            driver.click(driver.js("return document.querySelector('.fp-steer .clt-wb-run')"))
            steered = driver.wait_js(
                "var e = document.querySelector('.fp-steer .clt-wb-error');"
                "if (e && !e.hidden) return 'error: ' + e.textContent;"
                "return document.querySelectorAll('.fp-steer .clt-wb-top-after tbody tr').length",
                timeout=120)
            assert steered == 10, steered
            assert "clamp to" in driver.js("return document.querySelector('.fp-steer')"
                                           ".innerText")
            driver.screenshot(shots / "viewer_feature_page.png")
            errors = [e for e in driver.console_errors() if "favicon" not in e]
            assert not errors, errors
        finally:
            driver.quit()


@pytest.mark.browser
def test_viewer_supernode_saved_reloaded_and_intervened(graph_dir, tmp_path):
    """Pin two feature nodes, group them (hold g, click both in the subgraph), Save, open the
    graph again from a clean URL, and ablate the group from the drawer."""
    chromium, chromedriver = _browser_or_skip()
    out, res = graph_dir
    shots = screenshot_dir(tmp_path)
    saved = res.json_path.read_text()
    fresh = json.loads(saved)
    fresh["qParams"] = {}  # nothing pinned or grouped (test_server_routes saves a pin)
    res.json_path.write_text(json.dumps(fresh))
    with serve(out, port=0) as srv:
        driver = WebDriver(chromium, chromedriver)
        try:
            _open_graph(driver, srv.url)
            nodes = _feature_nodes(driver)[:2]
            ids = [driver.js("return d3.select(arguments[0]).datum().nodeId", n) for n in nodes]
            for n in nodes:
                driver.ctrl_click(n)
            assert driver.js("return window.cltWorkbench.ctx.visState.pinnedIds") == ids
            boxes = driver.wait_js(
                "var ids = arguments[0] || " + json.dumps(ids) + ";"
                "var boxes = d3.selectAll('.subgraph .supernode-container')"
                ".filter(d => ids.includes(d.node.nodeId)).nodes();"
                "return boxes.length == 2 && boxes")
            assert boxes, "pinned nodes not in the subgraph"
            driver.key("g", down=True)
            for box in boxes:
                driver.click(box)
            driver.key("g", down=False)
            groups = driver.js("return window.cltWorkbench.ctx.visState.subgraph.supernodes")
            assert len(groups) == 1 and sorted(groups[0][1:]) == sorted(ids), groups
            driver.click(driver.js("return document.querySelector('.save-button')"))
            assert driver.wait_js("return document.querySelector('.save-button').textContent"
                                  " == 'Saved!'")
            q = json.loads(res.json_path.read_text())["qParams"]
            assert sorted(json.loads(q["supernodes"])[0][1:]) == sorted(ids)

            # a fresh page on the graph, without the selection in its URL
            driver.session("POST", "/url", {"url": "about:blank"})
            _open_graph(driver, srv.url)
            assert driver.js("return location.search") != "?slug=tobe"  # restored into the URL
            groups = driver.js("return window.cltWorkbench.ctx.visState.subgraph.supernodes")
            assert len(groups) == 1 and sorted(groups[0][1:]) == sorted(ids), groups
            assert driver.wait_js("return d3.selectAll('.subgraph .supernode-container')"
                                  ".filter(d => d.node.isSuperNode && "
                                  "d.node.memberNodes.length == 2).size() == 1")
            driver.click(driver.js("return document.querySelector('.clt-wb-toggle')"))
            group_button = driver.wait_js("return document.querySelector('.clt-wb-add-group')")
            assert "(2)" in driver.js("return arguments[0].textContent", group_button)
            driver.click(group_button)
            targets = driver.js("return Array.from(document.querySelectorAll('.clt-wb-target'))"
                                ".map(e => e.dataset.nodeId)")
            assert sorted(targets) == sorted(ids)
            got = _run_and_wait(driver)
            assert max(abs(b - a) for _, b, a in got["before"] + got["after"]) > 1e-6
            done = {(iv["layer"], iv["feature"], iv["position"]) for iv in
                    got["result"]["interventions"]}
            assert done == {tuple(map(int, i.split("_"))) for i in ids}
            driver.screenshot(shots / "viewer_supernode_intervention.png")
            errors = [e for e in driver.console_errors() if "favicon" not in e]
            assert not errors, errors
        finally:
            driver.quit()
            res.json_path.write_text(saved)


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
