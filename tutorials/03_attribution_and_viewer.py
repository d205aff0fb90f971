"""Tutorial 3: attribution graphs with circuit-tracer, and the local graph viewer.

An attribution graph explains one next-token prediction in terms of CLT features. The
*replacement model* swaps every MLP for the CLT and freezes attention patterns and
LayerNorm scales at their values on the prompt; what the CLT misses at each (layer,
position) becomes an *error node*. The model is then linear in the feature activations, so
every edge (feature -> feature, feature -> logit, token -> feature) is an exact direct
effect. circuit-tracer computes these graphs; clt_lens feeds it our CLTs:

1. export the CLT as a circuit-tracer *transcoder set* (a folder circuit-tracer loads);
2. (optional) compute feature statistics so the viewer can show top examples per feature;
3. attribute a prompt with a cap on the number of feature nodes, and read the scores;
4. write and inspect the viewer files, and serve them (``clt-lens serve DIR``);
5. test an edge of the graph with an intervention (what the viewer's Intervene drawer runs).

The same steps as commands::

    clt-lens export runs/tutorials/01/train/final runs/ct_set
    clt-lens attribute --clt runs/ct_set --prompt "ROMEO: But soft" --out runs/graphs \\
        --max-feature-nodes 200 --features runs/features
    clt-lens serve runs/graphs          # then open http://127.0.0.1:8032

Run it::

    python tutorials/03_attribution_and_viewer.py                 # uses tutorial 1's CLT
    python tutorials/03_attribution_and_viewer.py --clt DIR --prompt "JULIET: O Romeo"
    python tutorials/03_attribution_and_viewer.py --serve         # ... then start the viewer
    python tutorials/03_attribution_and_viewer.py --small         # seconds (the test suite)
    python tutorials/03_attribution_and_viewer.py --graph runs/demo/graphs/SLUG.json
                                        # step 5 on the demo's graph (after `clt-lens demo`)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _common import base_parser, get_clt

SIZES = {
    "full": dict(max_feature_nodes=200, feature_tokens=32_768),
    "small": dict(max_feature_nodes=24, feature_tokens=1016),
}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__, "03")
    p.add_argument("--prompt", default="ROMEO: But soft, what light through yonder window")
    p.add_argument("--serve", action="store_true",
                   help="start the viewer on the graphs at the end (Ctrl-C stops it)")
    p.add_argument("--port", type=int, default=8032)
    p.add_argument("--graph", default=None,
                   help="graph JSON to test an edge of in step 5 (e.g. the demo's "
                   "runs/demo/graphs/SLUG.json); default: the graph made here")
    args = p.parse_args(argv)
    size = SIZES["small" if args.small else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from clt_lens import load_model
    from clt_lens.circuits import (
        attribute_prompt,
        build_replacement_model,
        cantor_pair,
        load_transcoders,
        write_circuit_tracer_set,
    )
    from clt_lens.features import compute_feature_stats

    model = load_model("embedded", device=args.device)
    checkpoint = get_clt(args, model, out)

    # ------------------------------------------------------------------------------------
    # 1. Export. circuit-tracer has its own transcoder classes; a transcoder set is a folder
    #    with config.yaml (model_kind cross_layer_transcoder, the hooks, a "scan" name that
    #    identifies this set in graph files) plus per-layer safetensors W_enc_l / W_dec_l.
    #    Weights are written in raw activation space: our input/output normalisation is
    #    folded in, so circuit-tracer needs no knowledge of it.
    # ------------------------------------------------------------------------------------
    print("\n== 1. export a circuit-tracer transcoder set ==")
    ct_dir = write_circuit_tracer_set(checkpoint, out / "ct_set")
    print(f"{ct_dir}: {sorted(f.name for f in ct_dir.iterdir())}")
    config_yaml = (ct_dir / "config.yaml").read_text()
    print("config.yaml:\n  " + "\n  ".join(config_yaml.strip().splitlines()[:6]) + "\n  ...")

    # circuit-tracer loads it with its own loader. Its ReplacementModel.from_pretrained...
    # fetches the model from the hub; build_replacement_model builds the same object from
    # our already loaded HookedTransformer and checks that its logits match the model's.
    transcoders, _ = load_transcoders(ct_dir, device=args.device)
    rm = build_replacement_model(model, transcoders)
    print(f"circuit-tracer objects: {type(transcoders).__name__}, {type(rm).__name__} "
          "(logits checked against the model)")
    # With `rm` you can call circuit-tracer directly, e.g.
    #   from circuit_tracer import attribute; graph = attribute(prompt, rm, max_feature_nodes=200)
    # attribute_prompt below does that and also writes the files the viewer reads.
    del rm

    # ------------------------------------------------------------------------------------
    # 2. Feature statistics (tutorial 4 covers them). Passing them to attribute_prompt
    #    writes a page per feature in the graph (top activating examples, histogram), so
    #    clicking a node in the viewer shows what the feature responds to, offline.
    # ------------------------------------------------------------------------------------
    print("\n== 2. feature statistics for the viewer's feature pages ==")
    features_dir = compute_feature_stats(checkpoint, model=model, n_tokens=size["feature_tokens"],
                                         out_dir=out / "features", device=args.device,
                                         progress=not args.small)
    print(f"{features_dir}")

    # ------------------------------------------------------------------------------------
    # 3. Attribution. The main knobs (all circuit-tracer's own):
    #    - max_feature_nodes: attribute only this many active features, picked greedily by
    #      their estimated influence on the logits; the others get no node, and their edges
    #      are left out of the graph. Time and memory grow with it; a few hundred suit a
    #      short prompt on a CPU.
    #    - max_n_logits / desired_logit_prob: which next tokens to explain (the top ones up
    #      to that cumulative probability); targets=["token"] picks them yourself.
    #    - node_threshold / edge_threshold: pruning of the JSON graph the viewer shows
    #      (keep the nodes/edges that carry this fraction of the influence).
    #    Two scores summarise the graph (circuit-tracer's compute_graph_scores):
    #    - replacement score: the fraction of the influence on the logits that flows from
    #      the input tokens through features rather than through error nodes;
    #    - completeness score: the fraction of the inputs into every node (features and
    #      logits, weighted by the node's influence) that comes from features and tokens
    #      rather than from error nodes.
    #    1.0 would mean the CLT explains the computation fully.
    # ------------------------------------------------------------------------------------
    print("\n== 3. attribution ==")
    graphs_dir = out / "graphs"
    result = attribute_prompt(
        ct_dir,                   # a transcoder set, or the CLT checkpoint folder itself
        args.prompt,
        model=model,
        max_feature_nodes=size["max_feature_nodes"],
        max_n_logits=5,
        desired_logit_prob=0.9,
        out_dir=graphs_dir,
        features_dir=features_dir,
        device=args.device,
    )
    print(f"prompt {result.prompt!r}: {result.n_tokens} tokens, "
          f"{result.n_active_features} active features, "
          f"{result.n_feature_nodes} attributed (cap {size['max_feature_nodes']})")
    print(f"replacement score  {result.replacement_score:.3f}")
    print(f"completeness score {result.completeness_score:.3f}")
    print("explained next tokens:",
          ", ".join(f"{tok!r} p={prob:.2f}" for tok, prob in result.logit_targets))
    print(f"pruned graph: {result.n_nodes} nodes, {result.n_edges} edges "
          f"({result.attribution_seconds:.1f} s of attribution)")

    # The unpruned graph is circuit-tracer's Graph object, saved as .pt: load it for your
    # own analysis (adjacency matrix rows/columns: features, errors, tokens, logits).
    from circuit_tracer.graph import Graph

    graph = Graph.from_pt(str(result.graph_path))
    print(f"{result.graph_path.name}: adjacency matrix {tuple(graph.adjacency_matrix.shape)}, "
          f"active features (layer, pos, index) {tuple(graph.active_features.shape)}")

    # ------------------------------------------------------------------------------------
    # 4. The viewer files. graphs_dir is what `clt-lens serve` serves: graph-metadata.json
    #    lists the graphs, {slug}.json is one pruned graph (Neuronpedia's format, so it can
    #    also be uploaded there), features/{scan}/ holds the feature pages.
    # ------------------------------------------------------------------------------------
    print("\n== 4. viewer files ==")
    for f in sorted(graphs_dir.rglob("*")):
        if f.is_file() and (f.parent == graphs_dir or f.name == "index.json"):
            print(f"  {f.relative_to(graphs_dir)}  ({f.stat().st_size:,} bytes)")
    pages = result.viewer_features_dir
    n_pages = sum(1 for _ in pages.glob("*.json")) - 1 if pages else 0
    print(f"  {pages.relative_to(graphs_dir) if pages else '-'}/  ({n_pages} feature pages)")
    # Feature nodes are named "{layer}_{index}_{position}"; their "feature" field is
    # cantor_pair(layer, index), circuit-tracer's id that is unique across layers (and the
    # name of the feature's page). "influence" is circuit-tracer's cumulative score: rank
    # all nodes by their total (direct + indirect) effect on the explained logits; a node's
    # value is the share of that effect held by it and every node ranked above it. So
    # smaller = more important, and pruning keeps the nodes below node_threshold.
    data = json.loads(result.json_path.read_text())
    tokens = data["metadata"]["prompt_tokens"]
    nodes = [n for n in data["nodes"] if n.get("feature_type") == "cross layer transcoder"]
    print(f"the graph's {len(nodes)} feature nodes; the most influential:")
    for n in sorted(nodes, key=lambda n: n["influence"])[:5]:
        layer, index, pos = (int(v) for v in n["node_id"].split("_"))
        assert n["feature"] == cantor_pair(layer, index)
        print(f"  layer {layer} feature {index:<5} at {tokens[pos]!r:<10} "
              f"activation {n['activation']:.2f}  influence {n['influence']:.3f}")
    print(f"\nopen it in the browser:\n  clt-lens serve {graphs_dir}    "
          f"# then http://127.0.0.1:{args.port}")
    print("  (offline? run `clt-lens serve --install-js` once, with npm, to fetch d3/dagre/pako)")

    # ------------------------------------------------------------------------------------
    # 5. Test an edge by intervening. An edge A -> B between two features says: with the
    #    attention patterns, LayerNorm scales and MLP errors of this prompt held fixed, A's
    #    activation moves B's pre-activation by the edge weight. So ablate A (set it to 0)
    #    with direct effects only (circuit-tracer's feature_intervention with everything
    #    but the features' decoder writes frozen) and B's pre-activation must move by minus
    #    the weight: that confirms the edge; any other change refutes it. With attention and
    #    norms recomputed, the total effect adds the paths through other features.
    #    The graph's metadata names the transcoders and model it came from, which is how
    #    `clt-lens serve` loads them for its Intervene drawer; the same function,
    #    clt_lens.circuits.intervene, runs there.
    # ------------------------------------------------------------------------------------
    print("\n== 5. test an edge with an intervention ==")
    edge_graph = Path(args.graph) if args.graph else result.json_path
    check_edge(edge_graph, device=args.device, n_tokens=3 if args.small else 12)

    if args.serve:
        from clt_lens.serve import serve

        print(f"\nserving {graphs_dir} at http://127.0.0.1:{args.port}/ (Ctrl-C stops)",
              flush=True)
        try:
            serve(graphs_dir, port=args.port, background=False)
        except KeyboardInterrupt:
            pass
    return 0


def check_edge(graph_path: Path, *, device: str, n_tokens: int) -> None:
    """Ablate the source of the graph's strongest feature-to-feature edge; compare the
    target's pre-activation change with the edge weight."""
    from clt_lens.circuits import Intervention, intervene, load_replacement_model

    data = json.loads(graph_path.read_text())
    source = data["metadata"].get("clt_lens") or {}
    if not source.get("transcoders"):
        print(f"{graph_path.name} does not name its transcoders (made from an in-memory CLT)")
        return
    rm = load_replacement_model(source["transcoders"], source["model"], device=device)
    prompt_ids = source["prompt_ids"]  # the graph's own tokens, BOS included
    features = {n["node_id"] for n in data["nodes"]
                if n.get("feature_type") == "cross layer transcoder"}
    edges = [e for e in data["links"] if e["source"] in features and e["target"] in features]
    if edges:
        edge = max(edges, key=lambda e: abs(e["weight"]))
    else:
        # Pruning keeps the nodes closest to the logits; in a small graph those can all sit
        # in one layer and position. The unpruned graph (.pt) still has every edge.
        edge = strongest_unpruned_edge(graph_path.with_suffix(".pt"))
        if edge is None:
            print("edge check: the graph has no feature-to-feature edge")
            return
        print("(no feature-to-feature edge survived pruning; taking the unpruned graph's)")
    (la, fa, pa), (lb, fb, pb) = (tuple(int(v) for v in e.split("_"))
                                  for e in (edge["source"], edge["target"]))
    tokens = data["metadata"]["prompt_tokens"]
    print(f"strongest edge: layer {la} feature {fa} at {tokens[pa]!r} -> layer {lb} feature "
          f"{fb} at {tokens[pb]!r}, weight {edge['weight']:+.4f}")
    ablate_a = [Intervention(layer=la, feature=fa, position=pa, op="ablate")]
    direct = intervene(rm, prompt_ids, ablate_a, direct_only=True, watch=[(lb, fb, pb)])
    total = intervene(rm, prompt_ids, ablate_a, freeze=False, watch=[(lb, fb, pb)],
                      max_new_tokens=n_tokens)
    measured = direct.watched[0]["pre_after"] - direct.watched[0]["pre_before"]
    predicted = -edge["weight"]
    confirmed = abs(measured - predicted) <= 1e-3 * max(1.0, abs(predicted))
    print(f"ablating A, direct effects only: B's pre-activation moves {measured:+.4f} "
          f"(the edge predicts {predicted:+.4f})")
    print(f"edge check: {'confirmed' if confirmed else 'REFUTED'}")
    w = total.watched[0]
    print(f"with attention and norms recomputed: B's pre-activation moves "
          f"{w['pre_after'] - w['pre_before']:+.4f} (activation {w['before']:.3f} -> "
          f"{w['after']:.3f}): the direct effect plus what flows through other features, "
          "attention and norms")
    top = total.top_before[0]
    print(f"next token {top['token']!r}: p {top['prob_before']:.3f} -> {top['prob_after']:.3f}; "
          f"KL(before||after) {total.kl:.4f} nats")
    print(f"continuation before: {total.continuation_before['text']!r}")
    print(f"continuation after:  {total.continuation_after['text']!r}")


def strongest_unpruned_edge(pt_path: Path) -> dict | None:
    """The largest feature-to-feature entry of circuit-tracer's adjacency matrix, in the
    pruned graph's link format. Rows are targets, columns sources; the first rows are the
    selected features, in the order of graph.selected_features."""
    from circuit_tracer.graph import Graph

    if not pt_path.is_file():
        return None
    graph = Graph.from_pt(str(pt_path))
    n = len(graph.selected_features)
    block = graph.adjacency_matrix[:n, :n].abs()
    if n == 0 or float(block.max()) == 0.0:
        return None
    target, source = divmod(int(block.argmax()), n)

    def node_id(i: int) -> str:
        layer, pos, index = (int(v) for v in graph.active_features[graph.selected_features[i]])
        return f"{layer}_{index}_{pos}"

    return {"source": node_id(source), "target": node_id(target),
            "weight": float(graph.adjacency_matrix[target, source])}


if __name__ == "__main__":
    sys.exit(main())
