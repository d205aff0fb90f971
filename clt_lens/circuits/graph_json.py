"""Fixes to the graph JSON circuit-tracer 0.5.0's ``create_graph_files`` writes.

- Error nodes are named ``0_{layer}_{pos}``, the id of layer-0 feature ``layer`` at ``pos``;
  when both are in a graph the viewer merges them and misroutes links. They become
  ``{layer}_-1_{pos}`` (feature indices are >= 0, so ids are unique), in nodes and links alike.
  Which link end is the error node is decided from the pruned adjacency, recomputed exactly as
  ``create_graph_files`` computes it, not from the ambiguous string.
- Feature nodes get an explanation as ``clerp`` (the label the viewer shows).
"""

from __future__ import annotations

from typing import Any

import torch

from clt_lens.circuits.errors import CircuitsError

ERROR_TYPE = "mlp reconstruction error"
FEATURE_TYPE = "cross layer transcoder"



def error_node_id(layer: int, pos: int) -> str:
    return f"{layer}_-1_{pos}"


def fix_error_node_ids(
    data: dict[str, Any], graph: Any, node_threshold: float, edge_threshold: float
) -> int:
    """Rename error nodes ``0_{layer}_{pos}`` -> ``{layer}_-1_{pos}`` in nodes and links.

    Link ends are matched to graph nodes by position: ``create_graph_files`` lists the edges of
    the pruned adjacency in row-major order, so the same pruning gives each link's (source,
    target) node indices. Weights are compared to be sure the two lists line up. Returns how
    many error nodes were renamed; raises if ids are still not unique.
    """
    from circuit_tracer.graph import prune_graph

    n_features = len(graph.selected_features)
    n_pos = graph.n_pos
    error_end = n_features + graph.cfg.n_layers * n_pos

    device = "cuda" if torch.cuda.is_available() else "cpu"  # as create_graph_files prunes
    graph.to(device)
    try:
        node_mask, edge_mask, _ = (t.cpu() for t in prune_graph(graph, node_threshold,
                                                                 edge_threshold))
    finally:
        graph.to("cpu")
    kept = node_mask.tolist()
    dsts, srcs = edge_mask.nonzero(as_tuple=True)
    pairs = [(s, d) for d, s in zip(dsts.tolist(), srcs.tolist()) if kept[s] and kept[d]]
    links = data["links"]
    adjacency = graph.adjacency_matrix
    if len(pairs) != len(links):
        raise CircuitsError(
            f"graph JSON has {len(links)} links but the pruned graph has {len(pairs)}: cannot "
            "match error nodes (circuit-tracer's create_graph_files changed?)"
        )

    def new_id(idx: int) -> str | None:
        if n_features <= idx < error_end:
            layer, pos = divmod(idx - n_features, n_pos)
            return error_node_id(layer, pos)
        return None

    for link, (s, d) in zip(links, pairs):
        if float(adjacency[d, s]) != float(link["weight"]):
            raise CircuitsError("graph JSON links do not line up with the pruned graph")
        for end, idx in (("source", s), ("target", d)):
            nid = new_id(idx)
            if nid is not None:
                link[end] = nid
    renamed = 0
    for node in data["nodes"]:
        if node.get("feature_type") == ERROR_TYPE:
            node["node_id"] = error_node_id(int(node["layer"]), int(node["ctx_idx"]))
            node["jsNodeId"] = node["node_id"]
            renamed += 1
    check_unique_ids(data)
    return renamed


def check_unique_ids(data: dict[str, Any]) -> None:
    """Node ids must be unique and every link must join two listed nodes."""
    ids = [n["node_id"] for n in data["nodes"]]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise CircuitsError(f"graph JSON has duplicate node ids: {dup[:5]}")
    known = set(ids)
    for link in data["links"]:
        if link["source"] not in known or link["target"] not in known:
            raise CircuitsError(f"graph JSON link {link} joins an unknown node")


def feature_nodes(data: dict[str, Any]) -> set[tuple[int, int]]:
    """(layer, feature index) of every transcoder feature node of a graph JSON."""
    out = set()
    for node in data["nodes"]:
        if node.get("feature_type") == FEATURE_TYPE:
            layer, feat, _ = node["node_id"].split("_")
            out.add((int(layer), int(feat)))
    return out


def add_clerps(data: dict[str, Any], explanations: dict[tuple[int, int], Any]) -> int:
    """Set ``clerp`` of feature nodes with an explanation; returns how many nodes got one."""
    n = 0
    for node in data["nodes"]:
        if node.get("feature_type") != FEATURE_TYPE:
            continue
        layer, feat, _ = node["node_id"].split("_")
        rec = explanations.get((int(layer), int(feat)))
        text = rec.get("explanation") if isinstance(rec, dict) else rec
        if text:
            node["clerp"] = str(text).strip()
            n += 1
    return n
