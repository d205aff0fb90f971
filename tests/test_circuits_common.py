"""Helpers shared by the circuit-tracer tests (test_circuits_*.py, test_viewer_browser.py).

No tests here. ``make_features_dir`` writes a small but valid features directory (checked with
``clt_lens.features.format.validate_features_dir``) whose examples carry a marker token
``L{layer}F{index}``, so a test can tell which feature's page a viewer shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

PROMPT = "To be, or not to be, that is the question"

_MODELS: dict[str, Any] = {}


def model_on(device: str, cpu_model: Any) -> Any:
    """The embedded model on ``device``: ``cpu_model`` (the session's) on the CPU, else one
    loaded there once per test session."""
    if torch.device(device).type == "cpu":
        return cpu_model
    if device not in _MODELS:
        from clt_lens.models import load_model

        _MODELS[device] = load_model("embedded", device=device)
    return _MODELS[device]


def feature_marker(layer: int, index: int) -> str:
    return f"L{layer}F{index}"


def _example(layer: int, index: int, scale: float) -> dict[str, Any]:
    tokens = ["The", " king", " said", " " + feature_marker(layer, index), " softly", "."]
    acts = [0.0, 0.0, round(0.3 * scale, 4), round(scale, 4), round(0.1 * scale, 4), 0.0]
    return {"token_ids": [10, 11, 12, 13, 14, 15], "tokens": tokens, "acts": acts,
            "max_act": max(acts), "max_pos": 3}


def make_features_dir(
    path: Path, clt: Any, *, explanations: dict[tuple[int, int], str] | None = None
) -> Path:
    n_layers, n_feat = clt.cfg.n_layers, clt.cfg.d_sae
    path.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format_version": 1, "model": "embedded", "model_id": "embedded@test",
        "checkpoint": str(path / "ckpt"), "n_layers": n_layers, "d_sae": n_feat,
        "n_tokens": 1000, "context_size": 32, "input_hook": clt.cfg.input_hook,
        "output_hook": clt.cfg.output_hook, "dataset": "embedded", "split": "heldout",
        "top_k": 2, "n_quantiles": 1, "sourceset": "clt", "tokenizer": "embedded",
    }
    (path / "features.json").write_text(json.dumps(manifest))
    with torch.no_grad():
        norms = [w.norm(dim=-1) for w in clt.W_dec]  # [F, n_targets]
    for layer in range(n_layers):
        with open(path / f"layer_{layer:02d}.jsonl", "w") as f:
            for i in range(n_feat):
                top = [_example(layer, i, 2.0), _example(layer, i, 1.5)]
                quant = [_example(layer, i, 0.5)]
                dec = norms[layer][i].tolist()
                dec = dec + [0.0] * (n_layers - layer - len(dec))
                rec = {
                    "layer": layer, "index": i, "frac_nonzero": 0.02, "n_fired": 20,
                    "max_act": 2.0, "mean_act": 0.8,
                    "hist": {"edges": [0.1, 0.6, 1.1, 1.6, 2.1], "counts": [8, 6, 4, 2]},
                    "decoder_norms": dec,
                    "top_logits": [[" crown", 0.9], [" throne", 0.5]],
                    "bottom_logits": [[" fish", -0.7], [" bread", -0.2]],
                    "top_examples": top,
                    "quantile_examples": [{"name": "Quantile 1", "lo": 0.1, "hi": 1.0,
                                           "examples": quant}],
                    "negative_examples": [{**_example(layer, i, 0.0), "acts": [0.0] * 6,
                                           "max_act": 0.0, "max_pos": 0}],
                }
                f.write(json.dumps(rec) + "\n")
    if explanations:
        with open(path / "autointerp.jsonl", "w") as f:
            for (layer, i), text in explanations.items():
                f.write(json.dumps({
                    "layer": layer, "index": i, "status": "ok", "explanation": text,
                    "method": "test", "model": "test-llm", "scores": {}, "usage": {},
                    "error": None,
                }) + "\n")
    from clt_lens.features.format import validate_features_dir

    validate_features_dir(path)
    return path


def graph_node_index(graph: Any) -> dict[str, int]:
    """Node id (with error nodes as ``{layer}_-1_{pos}``) -> row/column of the adjacency,
    computed from the Graph alone (independent of the JSON writer)."""
    n_feat = len(graph.selected_features)
    n_pos = graph.n_pos
    n_layers = graph.cfg.n_layers
    index: dict[str, int] = {}
    for k, f in enumerate(graph.selected_features.tolist()):
        layer, pos, feat = graph.active_features[f].tolist()
        index[f"{layer}_{feat}_{pos}"] = k
    for layer in range(n_layers):
        for pos in range(n_pos):
            index[f"{layer}_-1_{pos}"] = n_feat + layer * n_pos + pos
    tok_start = n_feat + n_layers * n_pos
    for pos, tok in enumerate(graph.input_tokens.tolist()):
        index[f"E_{tok}_{pos}"] = tok_start + pos
    logit_start = tok_start + n_pos
    for k, target in enumerate(graph.logit_targets):
        index[f"{n_layers + 1}_{target.vocab_idx}_{n_pos - 1}"] = logit_start + k
    return index


def check_links_match_graph(data: dict[str, Any], graph: Any) -> int:
    """Every link's weight equals the adjacency entry of the nodes its ids name; returns the
    number of links checked."""
    index = graph_node_index(graph)
    adj = graph.adjacency_matrix
    for link in data["links"]:
        s, t = index[link["source"]], index[link["target"]]
        assert float(adj[t, s]) == link["weight"], link
    return len(data["links"])
