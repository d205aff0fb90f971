"""Attribution graphs: files, scores, error-node ids, labels, bad input, and faithfulness.

The faithfulness test checks graph edges against interventions computed without circuit-tracer:
the plain HookedTransformer is run with attention patterns and LayerNorm scales frozen to their
clean values and every MLP output frozen to its clean value (the local replacement model
circuit-tracer linearises), plus ``delta`` times a source feature's decoder vectors. The change
of a target feature's pre-activation (or of a target's demeaned logit) must equal
``delta / a_source`` times the edge weight.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from circuit_tracer.graph import Graph
from test_circuits_common import (
    PROMPT,
    check_links_match_graph,
    feature_marker,
    make_features_dir,
    model_on,
)

import clt_lens.circuits.attribution as attribution
from clt_lens.circuits import CircuitsError, attribute_prompt, cantor_pair
from clt_lens.circuits.synthetic import random_clt
from clt_lens.cli import main


@pytest.fixture(scope="module")
def clt(embedded_model):
    return random_clt(embedded_model, d_sae=128, seed=11)


@pytest.fixture(scope="module")
def plt_(embedded_model):
    return random_clt(embedded_model, d_sae=128, cross_layer=False, activation="relu", seed=12)


def test_attribute_prompt_files_scores_and_labels(tmp_path, embedded_model, clt, device):
    model = model_on(device, embedded_model)
    ckpt = tmp_path / "ckpt"
    clt.save_model(ckpt)
    explanations = {(layer, i): f"explained {layer}/{i}" for layer in range(4)
                    for i in range(0, 128, 2)}
    fdir = make_features_dir(tmp_path / "features", clt, explanations=explanations)
    out = tmp_path / "graphs"
    res = attribute_prompt(ckpt, PROMPT, model=model, max_feature_nodes=60,
                           batch_size=64, out_dir=out, slug="tobe", features_dir=fdir)
    assert res.json_path == out / "tobe.json" and res.graph_path.is_file()
    assert res.n_feature_nodes == 60 < res.n_active_features
    assert 0 <= res.replacement_score <= 1 and 0 <= res.completeness_score <= 1
    assert len(res.logit_targets) >= 1 and res.n_tokens == len(embedded_model.to_tokens(PROMPT)[0])

    data = json.loads(res.json_path.read_text())
    meta = json.loads((out / "graph-metadata.json").read_text())
    assert [g["slug"] for g in meta["graphs"]] == ["tobe"]
    assert data["metadata"]["scan"] == res.scan == "clt-lens/embedded/ckpt"
    graph = Graph.from_pt(str(res.graph_path))
    # scores are circuit-tracer's own, on the saved (unpruned) graph
    from circuit_tracer.graph import compute_graph_scores

    assert compute_graph_scores(graph) == pytest.approx(
        (res.replacement_score, res.completeness_score))
    assert check_links_match_graph(data, graph) == res.n_edges > 0
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids)) == res.n_nodes
    errors = [n for n in data["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert errors and all(n["node_id"] == f"{n['layer']}_-1_{n['ctx_idx']}" for n in errors)

    features = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert features
    for n in features:
        layer, feat, _ = map(int, n["node_id"].split("_"))
        assert n["feature"] == cantor_pair(layer, feat)
        assert n["clerp"] == explanations.get((layer, feat), "")
        page = json.loads((res.viewer_features_dir / f"{n['feature']}.json").read_text())
        assert page["explanation"] == explanations.get((layer, feat))
        tokens = page["examples_quantiles"][0]["examples"][0]["tokens"]
        assert feature_marker(layer, feat) in "".join(tokens)
    assert res.n_labelled == sum(1 for n in features if n["clerp"])
    assert res.n_labelled > 0
    summary = json.loads((out / "tobe.summary.json").read_text())
    assert summary["n_edges"] == res.n_edges


def test_error_ids_no_longer_collide_with_layer0_features(tmp_path, embedded_model, device):
    """Layer-0 features 0..3 fire everywhere with large decoders, so circuit-tracer's own ids
    for error nodes (``0_{layer}_{pos}``) name those features too."""
    from circuit_tracer.utils import create_graph_files

    clt = random_clt(embedded_model, d_sae=64, seed=13)
    with torch.no_grad():
        clt.b_enc[0, :4] = 4.0
        clt.W_dec[0][:4] *= 30
    res = attribute_prompt(clt, PROMPT, model=model_on(device, embedded_model),
                           max_feature_nodes=80,
                           batch_size=64, out_dir=tmp_path / "ours", slug="g",
                           node_threshold=0.95, edge_threshold=0.99)
    graph = Graph.from_pt(str(res.graph_path))
    create_graph_files(graph, "g", str(tmp_path / "raw"), node_threshold=0.95,
                       edge_threshold=0.99)
    raw = json.loads((tmp_path / "raw" / "g.json").read_text())
    raw_ids = [n["node_id"] for n in raw["nodes"]]
    assert len(set(raw_ids)) < len(raw_ids), "the scenario must reproduce the id collision"
    data = json.loads(res.json_path.read_text())
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(set(ids)) == len(ids) == len(raw_ids)
    assert len(data["links"]) == len(raw["links"])
    check_links_match_graph(data, graph)
    assert res.n_error_nodes_renamed == sum(
        n["feature_type"] == "mlp reconstruction error" for n in raw["nodes"])


# -- faithfulness ------------------------------------------------------------------------------


def clean_cache(model, tokens):
    """Attention patterns, LayerNorm scales and MLP outputs of the clean forward pass."""
    keep = ("hook_pattern", "hook_scale", "hook_mlp_out")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(keep))
    return cache


def frozen_run(model, tokens, w, cache, source=None, delta=0.0):
    """Pre-activations [L, pos, F] and logits [pos, vocab] of the local replacement model (the
    ``cache`` values frozen), with ``delta`` added to feature ``source = (layer, pos, index)``'s
    activation."""
    n_layers = model.cfg.n_layers
    hooks = [(name, lambda a, hook: cache[hook.name]) for name in cache.keys()
             if not name.endswith("hook_mlp_out")]

    def mlp_out(act, hook, layer):
        out = cache[hook.name].clone()
        if source is not None and layer >= source[0]:
            s_layer, s_pos, s_feat = source
            w_dec = w["W_dec"][s_layer]
            if layer - s_layer < w_dec.shape[1]:
                out[0, s_pos] += delta * w_dec[s_feat, layer - s_layer]
        return out

    seen = {}
    for layer in range(n_layers):
        hooks.append((f"blocks.{layer}.hook_mlp_out",
                      lambda a, hook, layer=layer: mlp_out(a, hook, layer)))
        hooks.append((f"blocks.{layer}.ln2.hook_normalized",
                      lambda a, hook, layer=layer: seen.__setitem__(layer, a[0].clone())))
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)[0]
    pre = torch.stack([seen[layer] @ w["W_enc"][layer] + w["b_enc"][layer]
                       for layer in range(n_layers)])
    return pre, logits


@pytest.mark.parametrize("which", ["clt", "plt"])
def test_edges_agree_with_interventions(tmp_path, embedded_model, clt, plt_, which, device):
    """On ``device``: the model, the transcoder exported from there, and the interventions."""
    model = model_on(device, embedded_model)
    transcoder = clt if which == "clt" else plt_
    if torch.device(device).type != "cpu":
        transcoder = copy.deepcopy(transcoder).to(device)  # the fixture stays on the CPU
    res = attribute_prompt(transcoder, "Friends, Romans, countrymen, lend me your ears",
                           model=model, max_feature_nodes=60, batch_size=64,
                           out_dir=tmp_path, slug=which)
    graph = Graph.from_pt(str(res.graph_path))
    w = transcoder.folded_weights()
    tokens = graph.input_tokens[None].to(model.cfg.device)
    cache = clean_cache(model, tokens)
    pre0, logits0 = frozen_run(model, tokens, w, cache)
    selected = graph.active_features[graph.selected_features].tolist()
    acts = graph.activation_values[graph.selected_features]
    # the frozen run reproduces the activations circuit-tracer recorded
    recorded = torch.stack([pre0[layer, pos, f] for layer, pos, f in selected]).cpu()
    assert torch.allclose(recorded, acts, atol=1e-5, rtol=1e-5)

    n_feat = len(selected)
    adj = graph.adjacency_matrix
    feat_edges = adj[:n_feat, :n_feat]
    order = torch.argsort(feat_edges.abs().flatten(), descending=True).tolist()
    pairs = [divmod(k, n_feat) for k in order[:6]]
    # and the strongest edges that cross positions (through attention)
    pairs += [(t, s) for t, s in (divmod(k, n_feat) for k in order[:400])
              if selected[t][1] != selected[s][1]][:4]
    assert len(pairs) == 10
    scale = feat_edges.abs().max().item()
    assert scale > 0
    for t, s in pairs:
        s_layer, s_pos, s_feat = selected[s]
        t_layer, t_pos, t_feat = selected[t]
        a_s = acts[s].item()
        pre1, _ = frozen_run(model, tokens, w, cache, (s_layer, s_pos, s_feat), delta=-a_s)
        measured = (pre1 - pre0)[t_layer, t_pos, t_feat].item()
        predicted = -feat_edges[t, s].item()
        assert measured == pytest.approx(predicted, rel=1e-3, abs=1e-4 * scale), (s, t)

    # logit edges: the demeaned logit, as circuit-tracer defines its logit nodes
    n_logits = len(graph.logit_targets)
    logit_edges = adj[-n_logits:, :n_feat]
    for r in range(min(2, n_logits)):
        s = int(logit_edges[r].abs().argmax())
        a_s = acts[s].item()
        _, logits1 = frozen_run(model, tokens, w, cache, tuple(selected[s]), delta=-a_s)
        d = logits1[-1] - logits0[-1]
        measured = (d[graph.logit_targets[r].vocab_idx] - d.mean()).item()
        assert measured == pytest.approx(-logit_edges[r, s].item(), rel=1e-3,
                                         abs=1e-4 * logit_edges.abs().max().item())

    # the perturbation's effect is linear in delta
    t, s = pairs[0]
    t_layer, t_pos, t_feat = selected[t]
    changes = []
    for frac in (0.5, 1.0, -2.0):
        delta = frac * acts[s].item()
        pre1, _ = frozen_run(model, tokens, w, cache, tuple(selected[s]), delta=delta)
        changes.append((pre1 - pre0)[t_layer, t_pos, t_feat].item())
    assert changes[1] == pytest.approx(2 * changes[0], rel=1e-3)
    assert changes[2] == pytest.approx(-4 * changes[0], rel=1e-3)
    assert changes[1] == pytest.approx(feat_edges[t, s].item(), rel=1e-3)


# -- bad input and CLI ---------------------------------------------------------------------


def test_bad_input_fails_before_heavy_work(tmp_path, embedded_model, clt, monkeypatch):
    def heavy(*a, **k):
        raise AssertionError("heavy work started before the input was checked")

    monkeypatch.setattr(attribution, "build_replacement_model", heavy)
    monkeypatch.setattr(attribution, "write_circuit_tracer_set", heavy)
    from clt_lens.clt import CLTConfig, CrossLayerTranscoder

    kw = {"model": embedded_model, "out_dir": tmp_path}
    three = CrossLayerTranscoder(CLTConfig(d_in=128, d_sae=16, n_layers=3))
    with pytest.raises(CircuitsError, match="n_layers=3.*n_layers=4"):
        attribute_prompt(three, PROMPT, **kw)
    wide = CrossLayerTranscoder(CLTConfig(d_in=64, d_sae=16, n_layers=4))
    with pytest.raises(CircuitsError, match="d_model=128"):
        attribute_prompt(wide, PROMPT, **kw)
    for prompt in ("", "   ", None):
        with pytest.raises(CircuitsError, match="non-empty"):
            attribute_prompt(clt, prompt, **kw)
    with pytest.raises(CircuitsError, match="n_ctx=128"):
        attribute_prompt(clt, "to be or not " * 60, **kw)
    with pytest.raises(CircuitsError, match="exactly one token"):
        attribute_prompt(clt, PROMPT, targets=[" Romans countrymen"], **kw)
    with pytest.raises(CircuitsError, match="offload"):
        attribute_prompt(clt, PROMPT, offload="gpu", **kw)
    with pytest.raises(CircuitsError, match="max_feature_nodes"):
        attribute_prompt(clt, PROMPT, max_feature_nodes=0, **kw)
    with pytest.raises(CircuitsError, match="slug"):
        attribute_prompt(clt, PROMPT, slug="../evil", **kw)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        attribute_prompt(tmp_path / "missing", PROMPT, **kw)
    with pytest.raises(CircuitsError, match="max_n_logits"):
        attribute_prompt(clt, PROMPT, max_n_logits=10**6, **kw)


def test_attribute_cli_with_target_and_exported_set(tmp_path, embedded_model, plt_, capsys,
                                                     device):
    from clt_lens.circuits import write_circuit_tracer_set

    set_dir = write_circuit_tracer_set(plt_, tmp_path / "set")
    code = main(["attribute", "--clt", str(set_dir), "--prompt", PROMPT, "--model", "embedded",
                 "--out", str(tmp_path / "g"), "--slug", "cli", "--target", " question",
                 "--max-feature-nodes", "40", "--batch-size", "64", "--device", device])
    assert code == 0
    out = capsys.readouterr().out
    assert "replacement score" in out and "clt-lens serve" in out
    summary = json.loads((tmp_path / "g" / "cli.summary.json").read_text())
    assert [t for t, _ in summary["logit_targets"]] == [" question"]
    data = json.loads((tmp_path / "g" / "cli.json").read_text())
    assert data["metadata"]["scan"] == summary["scan"]
    code = main(["attribute", "--clt", str(set_dir), "--prompt", "", "--model", "embedded",
                 "--out", str(tmp_path / "g")])
    assert code == 2 and "non-empty" in capsys.readouterr().err
