"""Interventions: ``clt_lens.circuits.intervene`` and the ``/api/intervene`` endpoint of
``clt-lens serve``.

"Same numbers as Python": the endpoint's answer is compared with a direct ``intervene`` call,
and both with an independent computation on the plain HookedTransformer with our own
``CrossLayerTranscoder`` (no circuit-tracer): ``run_with_hooks`` replaces each MLP output by
``CLT reconstruction with the chosen features set + (MLP output - CLT reconstruction)`` at every
layer, with attention patterns and LayerNorm scales frozen to their clean values (or not), or,
for direct effects, with every MLP output frozen to its clean value.
"""

from __future__ import annotations

import json
import math
import threading
import urllib.error
import urllib.request

import pytest
import torch
from test_circuits_common import PROMPT, make_features_dir

from clt_lens.circuits import (
    CircuitsError,
    Intervention,
    attribute_prompt,
    intervene,
    load_replacement_model,
)
from clt_lens.circuits.intervention import prompt_ids
from clt_lens.circuits.synthetic import random_clt
from clt_lens.serve import serve

TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory, embedded_model):
    root = tmp_path_factory.mktemp("workbench")
    clt = random_clt(embedded_model, d_sae=64, seed=31)
    ckpt = root / "ckpt"
    clt.save_model(ckpt)
    fdir = make_features_dir(root / "features", clt,
                             explanations={(1, i): f"feature {i}" for i in range(64)})
    out = root / "graphs"
    res = attribute_prompt(ckpt, PROMPT, model=embedded_model, max_feature_nodes=40,
                           batch_size=48, out_dir=out, slug="tobe", features_dir=fdir)
    rm = load_replacement_model(ckpt, embedded_model)
    tokens = prompt_ids(embedded_model, PROMPT)
    with torch.no_grad():
        acts = rm.get_activations(tokens)[1]
    return {"clt": clt, "ckpt": ckpt, "out": out, "res": res, "rm": rm, "tokens": tokens,
            "acts": acts, "graph": json.loads(res.json_path.read_text())}


def active(acts: torch.Tensor, k: int) -> tuple[int, int, int]:
    """The k-th active (layer, feature, position) with layer >= 1, position >= 1."""
    nz = [(int(layer), int(f), int(p)) for layer, p, f in acts.nonzero() if layer >= 1 and p >= 1]
    return nz[k]


@torch.no_grad()
def reference_logits(model, clt, tokens, ivs, *, freeze=True, direct_only=False):
    """Next-token logits (clean, intervened) computed without circuit-tracer."""
    n_layers, n = clt.cfg.n_layers, len(tokens)
    hook_in = [f"blocks.{layer}.{clt.cfg.input_hook}" for layer in range(n_layers)]
    hook_out = [f"blocks.{layer}.{clt.cfg.output_hook}" for layer in range(n_layers)]
    clean, cache = model.run_with_cache(tokens[None])
    a_clean = [clt.encode_layer(cache[hook_in[layer]][0], layer) for layer in range(n_layers)]

    def set_features(acts):
        acts = [a.clone() for a in acts]
        for iv in ivs:
            if iv.layer >= len(acts):
                continue
            pos = slice(1, n) if iv.position is None else iv.position
            base = a_clean[iv.layer][pos, iv.feature]
            value = {"ablate": 0.0, "clamp": iv.value}.get(iv.op, None)
            acts[iv.layer][pos, iv.feature] = base * iv.value if value is None else value
        return acts

    current = {}
    hooks = []
    if freeze:
        hooks += [(name, lambda x, hook: cache[hook.name]) for name in cache.keys()
                  if name.endswith(("hook_pattern", "hook_scale"))]

    def read(x, hook, layer):
        current[layer] = clt.encode_layer(x[0], layer)

    def write(y, hook, layer):
        acts = a_clean[: layer + 1] if direct_only else [current[s] for s in range(layer + 1)]
        base = cache[hook_out[layer]][0] if direct_only else y[0]
        error = base - clt.decode_layer(acts, layer)
        return (clt.decode_layer(set_features(acts), layer) + error)[None]

    for layer in range(n_layers):
        hooks.append((hook_in[layer], lambda x, hook, layer=layer: read(x, hook, layer)))
        hooks.append((hook_out[layer], lambda y, hook, layer=layer: write(y, hook, layer)))
    logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)
    return clean[0, -1], logits[0, -1]


def assert_close_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    assert err <= TOL * scale, (err, scale)
    p_err = float((got.softmax(-1) - want.softmax(-1)).abs().max())
    assert p_err <= TOL, p_err


def test_intervene_matches_hook_reference(setup, embedded_model):
    rm, clt, tokens, acts = setup["rm"], setup["clt"], setup["tokens"], setup["acts"]
    (l0, f0, p0), (l1, f1, p1) = active(acts, 0), active(acts, 5)
    cases = [
        ([Intervention(l0, f0, p0, "ablate")], True, False),
        ([Intervention(l0, f0, p0, "scale", 3.0), Intervention(l1, f1, p1, "clamp", 4.0)],
         False, False),
        ([Intervention(0, 7, None, "clamp", 3.0)], True, True),
        ([Intervention(l1, f1, None, "scale", -2.0), Intervention(l0, f0, -1, "ablate")],
         True, False),
    ]
    for ivs, freeze, direct in cases:
        r = intervene(rm, PROMPT, ivs, freeze=freeze, direct_only=direct)
        clean, after = reference_logits(embedded_model, clt, tokens, ivs, freeze=freeze,
                                        direct_only=direct)
        assert_close_logits(r.logits_before, clean)
        assert_close_logits(r.logits_after, after)
        # every case moves the prediction well beyond the tolerance: the test can fail
        assert float((after - clean).abs().max()) > 1e-3
        assert r.kl > 0 and r.top_after[0]["prob_after"] == max(
            row["prob_after"] for row in r.top_after)


def test_intervene_continuation_and_watch(setup, embedded_model):
    rm, clt, tokens, acts = setup["rm"], setup["clt"], setup["tokens"], setup["acts"]
    layer, f, p = active(acts, 0)
    ivs = [Intervention(0, 7, None, "clamp", 6.0)]
    r = intervene(rm, PROMPT, ivs, max_new_tokens=3, watch=[(layer, f, p)])
    # greedy continuation, recomputed token by token with the reference
    seq = tokens
    for got in r.continuation_after["ids"]:
        _, logits = reference_logits(embedded_model, clt, seq, ivs)
        assert got == int(logits.argmax())
        seq = torch.cat([seq, seq.new_tensor([got])])
    plain = embedded_model.generate(tokens[None], max_new_tokens=3, do_sample=False,
                                    verbose=False, stop_at_eos=False)[0, len(tokens):]
    assert r.continuation_before["ids"] == plain.tolist()
    w = r.watched[0]
    assert (w["layer"], w["feature"], w["position"]) == (layer, f, p)
    assert w["before"] == pytest.approx(float(acts[layer, p, f]))


def test_direct_ablation_reproduces_graph_edge(setup):
    """Ablating an edge's source with direct effects only moves the target's pre-activation
    by minus the edge weight: the graph's edges are what the workbench measures."""
    graph, rm = setup["graph"], setup["rm"]
    feats = {n["node_id"] for n in graph["nodes"]
             if n["feature_type"] == "cross layer transcoder"}
    edges = [e for e in graph["links"] if e["source"] in feats and e["target"] in feats
             and e["source"].split("_")[0] != e["target"].split("_")[0]]
    edge = max(edges, key=lambda e: abs(e["weight"]))
    sl, sf, sp = map(int, edge["source"].split("_"))
    tl, tf, tp = map(int, edge["target"].split("_"))
    r = intervene(rm, PROMPT, [Intervention(sl, sf, sp, "ablate")], direct_only=True,
                  watch=[(tl, tf, tp)])
    w = r.watched[0]
    assert w["pre_after"] - w["pre_before"] == pytest.approx(-edge["weight"], abs=1e-4)


def test_intervene_rejects_bad_input(setup):
    rm = setup["rm"]
    n = len(setup["tokens"])
    bad = [
        ([Intervention(4, 0, 1)], "layer must be an integer in \\[0, 4\\)"),
        ([Intervention(0, 64, 1)], "feature must be an integer in \\[0, 64\\)"),
        ([Intervention(0, 1, 0)], "BOS"),
        ([Intervention(0, 1, n)], "outside the prompt"),
        ([Intervention(0, 1, 1, "clamp", math.nan)], "finite number"),
        ([Intervention(0, 1, 1, "boost", 1.0)], "op must be one of"),
        ([Intervention(0, 1, 1), Intervention(0, 1, None, "clamp", 1.0)], "already set"),
        ([], "no interventions"),
        ([{"layer": 0, "feature": 1, "strength": 2}], "unknown intervention field"),
    ]
    for ivs, match in bad:
        with pytest.raises(CircuitsError, match=match):
            intervene(rm, PROMPT, ivs)
    with pytest.raises(CircuitsError, match="max_new_tokens"):
        intervene(rm, PROMPT, [Intervention(0, 1, 1)], max_new_tokens=10_000)
    with pytest.raises(CircuitsError, match="needs freeze=True"):
        intervene(rm, PROMPT, [Intervention(0, 1, 1)], freeze=False, direct_only=True)
    with pytest.raises(CircuitsError, match="ReplacementModel"):
        intervene(object(), PROMPT, [Intervention(0, 1, 1)])


# -- the HTTP endpoint ------------------------------------------------------------------------


def call(url: str, body=None, *, raw: bytes | None = None,
         ctype: str = "application/json") -> tuple[int, dict]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                 headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_endpoint_returns_the_python_numbers(setup, embedded_model):
    rm, clt, tokens, acts, out = (setup[k] for k in ("rm", "clt", "tokens", "acts", "out"))
    graph = setup["graph"]
    layer, f, p = active(acts, 0)
    # a feature of the graph (it has a page, so its maximum activation is known)
    gl, gf, _ = map(int, next(n["node_id"] for n in graph["nodes"]
                             if n["feature_type"] == "cross layer transcoder").split("_"))
    files_before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with serve(out, port=0) as srv:
        status, st = call(srv.url + "api/workbench/tobe")
        assert status == 200 and st["available"] and not st["loaded"]
        assert st["transcoders"] == str(setup["ckpt"].resolve()) and st["model"] == "embedded"
        req = {"slug": "tobe", "interventions": [
            {"layer": layer, "feature": f, "position": p, "op": "ablate"},
            {"layer": gl, "feature": gf, "position": -1, "op": "clamp", "value": 1.5,
             "unit": "max_activation"}], "max_new_tokens": 2}
        status, got = call(srv.url + "api/intervene", req)
        assert status == 200, got
        # the graph's own page for clamp x max activation (make_features_dir: max_act 2.0)
        assert got["interventions"][1]["value"] == pytest.approx(3.0)
        ivs = [Intervention(layer, f, p, "ablate"), Intervention(gl, gf, -1, "clamp", 3.0)]
        logit_ids = [int(n["node_id"].split("_")[1]) for n in graph["nodes"]
                     if n["feature_type"] == "logit"]
        direct = intervene(rm, PROMPT, ivs, max_new_tokens=2, logit_tokens=logit_ids)
        clean, after = reference_logits(embedded_model, clt, tokens, ivs)
        p_ref = after.double().softmax(-1)
        for row, drow in zip(got["top_after"], direct.top_after):
            assert row["id"] == drow["id"]
            assert row["prob_after"] == pytest.approx(drow["prob_after"], abs=1e-7)
            assert row["prob_after"] == pytest.approx(float(p_ref[row["id"]]), abs=TOL)
        assert [c["id"] for c in got["logit_changes"]] == logit_ids
        for c in got["logit_changes"]:
            assert c["logit_after"] == pytest.approx(float(after[c["id"]]),
                                                     abs=TOL * float(after.abs().max()))
            assert c["logit_before"] == pytest.approx(float(clean[c["id"]]),
                                                      abs=TOL * float(clean.abs().max()))
        assert got["continuation_after"] == direct.continuation_after
        assert got["continuation_before"] == direct.continuation_before
        # the graph's feature nodes are watched on the graph's prompt
        feature_nodes = {n["node_id"] for n in graph["nodes"]
                         if n["feature_type"] == "cross layer transcoder"
                         and not n["node_id"].endswith("_0")}
        assert feature_nodes and {w["node_id"] for w in got["watched"]} == feature_nodes

        # steering another prompt at every token, generated ones included
        steer = {"slug": "tobe", "prompt": "The king", "max_new_tokens": 3,
                 "interventions": [{"layer": 0, "feature": 7, "position": "all",
                                    "op": "clamp", "value": 6.0}]}
        status, got = call(srv.url + "api/intervene", steer)
        assert status == 200, got
        direct = intervene(rm, "The king", [Intervention(0, 7, None, "clamp", 6.0)],
                           max_new_tokens=3)
        assert got["continuation_after"] == direct.continuation_after
        assert got["graph_prompt"] is False and got["watched"] == []
        _, after = reference_logits(embedded_model, clt, prompt_ids(embedded_model, "The king"),
                                    [Intervention(0, 7, None, "clamp", 6.0)])
        for row in got["top_after"]:
            assert row["prob_after"] == pytest.approx(float(after.double().softmax(-1)[
                row["id"]]), abs=TOL)
        status, st = call(srv.url + "api/workbench/tobe")
        assert st["loaded"] is True
    # interventions write nothing into the served folder
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files_before


def test_endpoint_validates_every_field(setup):
    out = setup["out"]
    ok = {"layer": 1, "feature": 2, "position": 3, "op": "ablate"}
    cases = [
        ({"slug": "tobe", "interventions": [ok], "mode": "x"}, 400, "unknown field"),
        ({"slug": "nope", "interventions": [ok]}, 404, "no graph"),
        ({"slug": "../tobe", "interventions": [ok]}, 400, "slug"),
        ({"slug": "tobe", "interventions": []}, 400, "non-empty list"),
        ({"slug": "tobe", "interventions": [ok] * 257}, 400, "limit is 256"),
        ({"slug": "tobe", "interventions": [{**ok, "layer": 4}]}, 400, "layer must be"),
        ({"slug": "tobe", "interventions": [{**ok, "layer": True}]}, 400, "layer must be"),
        ({"slug": "tobe", "interventions": [{**ok, "feature": -1}]}, 400, "feature must be"),
        ({"slug": "tobe", "interventions": [{**ok, "position": 0}]}, 400, "0 is BOS"),
        ({"slug": "tobe", "interventions": [{**ok, "position": 99}]}, 400, "not a token"),
        ({"slug": "tobe", "interventions": [{**ok, "position": "3"}]}, 400, "position must"),
        ({"slug": "tobe", "interventions": [{**ok, "op": "scale", "value": 1e9}]}, 400,
         "finite number"),
        ({"slug": "tobe", "interventions": [{**ok, "op": "clamp"}]}, 400, "finite number"),
        ({"slug": "tobe", "interventions": [{**ok, "op": "ablate", "value": 3}]}, 400,
         "takes no value"),
        ({"slug": "tobe", "interventions": [{**ok, "op": "scale", "value": 2,
                                             "unit": "max_activation"}]}, 400, "clamp only"),
        ({"slug": "tobe", "interventions": [{**ok, "extra": 1}]}, 400, "unknown field"),
        ({"slug": "tobe", "interventions": [ok], "max_new_tokens": 65}, 400, "max_new_tokens"),
        ({"slug": "tobe", "interventions": [ok], "freeze": "yes"}, 400, "freeze must be"),
        ({"slug": "tobe", "interventions": [ok], "freeze": False, "direct_only": True}, 400,
         "needs freeze"),
        ({"slug": "tobe", "interventions": [ok], "prompt": "x" * 2001}, 400, "limit is 2000"),
        ({"slug": "tobe", "interventions": [ok], "prompt": "  "}, 400, "non-empty"),
    ]
    with serve(out, port=0) as srv:
        url = srv.url + "api/intervene"
        for body, code, match in cases:
            status, got = call(url, body)
            assert status == code and match in got["error"], (body, status, got)
        status, got = call(url, raw=b'{"slug": "tobe", "interventions": [{"layer": 1, '
                                    b'"feature": 2, "op": "clamp", "value": NaN}]}')
        assert status == 400 and "finite number" in got["error"]
        assert call(url, raw=b"{not json")[0] == 400
        assert call(url, raw=b"[1, 2]")[0] == 400
        status, got = call(url, raw=b" " * (64 * 1024 + 1))
        assert status == 413 and "limit" in got["error"]
        status, got = call(url, {"slug": "tobe", "interventions": [
            {**ok, "op": "clamp", "value": 2, "unit": "max_activation", "feature": 63}]})
        assert status == 400 and "no feature page" in got["error"], got
        status, got = call(url, {"slug": "tobe", "interventions": [ok]}, ctype="text/plain")
        assert status == 415
        # all of the above were refused before the model was loaded
        assert call(srv.url + "api/workbench/tobe")[1]["loaded"] is False
        # checks that need the tokenizer: positions of a typed prompt, its length
        status, got = call(url, {"slug": "tobe", "prompt": "The king",
                                 "interventions": [{**ok, "position": 7}]})
        assert status == 400 and "outside the prompt" in got["error"], got
        status, got = call(url, {"slug": "tobe", "prompt": "the " * 400,
                                 "interventions": [ok]})
        assert status == 400 and "tokens" in got["error"], got


def test_endpoint_busy_read_only_and_unavailable(setup, embedded_model, tmp_path):
    out = setup["out"]
    body = {"slug": "tobe", "interventions": [{"layer": 1, "feature": 2, "position": 3}],
            "max_new_tokens": 0}
    with serve(out, port=0) as srv:
        wb = srv.httpd.workbench
        key = wb.source(wb.graph("tobe"))["key"]
        lock = wb._lock(key)
        lock.acquire()
        try:
            status, got = call(srv.url + "api/intervene", body)
            assert status == 429 and got["error"].startswith("busy"), got
            assert call(srv.url + "api/workbench/tobe")[1]["busy"] is True
        finally:
            lock.release()
        # concurrent requests: one runs, the other is told the model is busy
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            call(srv.url + "api/intervene", {**body, "max_new_tokens": 8})[0]))
            for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 200 in results and set(results) <= {200, 429}

    with serve(out, port=0, read_only=True) as srv:
        status, got = call(srv.url + "api/intervene", body)
        assert status == 403 and "--read-only" in got["error"]
        status, st = call(srv.url + "api/workbench/tobe")
        assert st["read_only"] is True and st["available"] is False

    # a graph naming transcoders that moved, and one from an in-memory CLT
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("tobe.json", "graph-metadata.json"):
        (moved / name).write_text((out / name).read_text())
    data = json.loads((moved / "tobe.json").read_text())
    data["metadata"]["clt_lens"]["transcoders"] = str(tmp_path / "gone")
    (moved / "tobe.json").write_text(json.dumps(data))
    with serve(moved, port=0) as srv:
        status, got = call(srv.url + "api/intervene", body)
        assert status == 503 and "does not exist" in got["error"] and "--clt" in got["error"]
        assert call(srv.url + "api/workbench/tobe")[1]["reason"] == got["error"]
    # --clt names them instead; a graph from before prompt ids were recorded still runs on
    # its own prompt when the text tokenizes back to its tokens
    del data["metadata"]["clt_lens"]["prompt_ids"]
    (moved / "tobe.json").write_text(json.dumps(data))
    with serve(moved, port=0, clt=setup["ckpt"]) as srv:
        status, st = call(srv.url + "api/workbench/tobe")
        assert st["available"] is True
        status, got = call(srv.url + "api/intervene", body)
        assert status == 200 and got["prompt_ids"] == setup["tokens"].tolist(), got
        data["metadata"]["prompt_tokens"][2] = " bee"
        (moved / "tobe.json").write_text(json.dumps(data))
        status, got = call(srv.url + "api/intervene", body)
        assert status == 400 and "does not tokenize back" in got["error"]
    data["metadata"]["clt_lens"]["transcoders"] = None
    (moved / "tobe.json").write_text(json.dumps(data))
    with serve(moved, port=0) as srv:
        status, got = call(srv.url + "api/intervene", body)
        assert status == 503 and "in-memory CLT" in got["error"]


def test_graph_metadata_names_its_sources(setup):
    meta = setup["graph"]["metadata"]["clt_lens"]
    assert meta["transcoders"] == str(setup["ckpt"].resolve())
    assert meta["transcoders_kind"] == "clt_checkpoint" and meta["model"] == "embedded"
    assert meta["model_id"].startswith("embedded@") and (meta["n_layers"], meta["d_sae"]) == (4, 64)
    assert meta["prompt_ids"] == setup["tokens"].tolist()


def test_serve_cli_options(setup, tmp_path, capsys):
    import argparse

    from clt_lens.cli import main
    from clt_lens.serve_cli import add_arguments, load

    assert main(["serve", str(setup["out"]), "--clt", str(tmp_path / "missing")]) == 2
    assert "--clt" in capsys.readouterr().err
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = load(*p.parse_known_args([str(setup["out"]), "--read-only", "--model", "embedded",
                                    "--device", "cpu"]))
    assert cfg.read_only and cfg.model == "embedded" and cfg.host == "127.0.0.1"
