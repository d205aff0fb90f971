"""The attribution-graph metrics of the circuit-tracing papers, for any transcoder set.

On one circuit-tracer ``Graph`` (rows = targets, columns = sources; nodes ordered features,
error nodes, token embeddings, logits):

- ``replacement`` and ``completeness``: circuit-tracer's ``compute_graph_scores`` on the
  unpruned graph (the fraction of token-to-logit influence that avoids error nodes; the
  influence-weighted fraction of each node's input that comes from features and tokens).
- ``path_lengths``: in the graph pruned as the viewer shows it (``prune_graph``, node 0.8 /
  edge 0.98), the distribution of the number of edges on the paths from a token embedding to
  the logits, each path weighted by its share of the logits' influence (each node's incoming
  |edge weights| normalised to 1, as circuit-tracer's influence is; a direct token -> logit edge
  has length 1, token -> feature -> logit length 2). Influence that ends at an error node is
  not a path from the input and is reported apart (``error_share``). Also the shortest path.
- ``size_at_completeness``: the fewest feature nodes, taken in order of influence, whose graph
  keeps a completeness score of at least c (features left out count as error), for c in
  (0.8, 0.9, 0.95); None where even the whole graph falls short.
- ``ablation_faithfulness``: for a sample of the graph's features (its strongest ones and
  others spread over the ranks of influence), the influence the graph gives each against the
  measured effect of ablating it (``intervene``, attention patterns and
  LayerNorm scales frozen as in attribution, the MLPs recomputed, so the model's own response,
  not the linear graph, is measured) on the graph's logit targets (logit minus mean logit,
  weighted by target probability, as the graph's logit nodes are): Spearman rank correlation of
  influence against |effect| over the sample and over its strongest features alone, and of the
  graph's signed prediction (minus the sum over paths of
  the products of edge weights) against the signed effect.

``evaluate_graphs`` runs circuit-tracer's ``attribute`` on a list of prompts through one
replacement model and returns every metric per prompt with medians and quartiles;
``heldout_prompts`` draws prompts from a held-out split.
"""

from __future__ import annotations

import math
import random
import statistics
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

COMPLETENESS_LEVELS = (0.8, 0.9, 0.95)
NODE_THRESHOLD = 0.8  # circuit-tracer's and the viewer's pruning defaults
EDGE_THRESHOLD = 0.98


# ---- graph layout ---------------------------------------------------------------------------
def _layout(graph: Any) -> dict[str, int]:
    n_feat = len(graph.selected_features)
    n_tok = len(graph.input_tokens)
    n_err = n_tok * graph.cfg.n_layers
    n_logit = len(graph.logit_targets)
    return {"features": n_feat, "error_start": n_feat, "token_start": n_feat + n_err,
            "logit_start": n_feat + n_err + n_tok, "n": n_feat + n_err + n_tok + n_logit,
            "tokens": n_tok, "logits": n_logit}


def _logit_weights(graph: Any) -> torch.Tensor:
    a = graph.adjacency_matrix
    w = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
    w[-len(graph.logit_targets):] = graph.logit_probabilities.to(a.dtype)
    return w


def _normalized(matrix: torch.Tensor) -> torch.Tensor:
    m = matrix.abs()
    return m / m.sum(dim=1, keepdim=True).clamp(min=1e-10)


def node_influence(graph: Any) -> torch.Tensor:
    """circuit-tracer's influence of every node on the logits (what pruning ranks by)."""
    from circuit_tracer.graph import compute_node_influence

    return compute_node_influence(graph.adjacency_matrix, _logit_weights(graph))


# ---- path length ----------------------------------------------------------------------------
def path_lengths(graph: Any, node_threshold: float = NODE_THRESHOLD,
                 edge_threshold: float = EDGE_THRESHOLD) -> dict[str, Any]:
    """Input-to-logit path lengths in the pruned graph (see the module docstring)."""
    from circuit_tracer.graph import prune_graph

    lay = _layout(graph)
    node_mask, edge_mask, _ = prune_graph(graph, node_threshold, edge_threshold)
    a = graph.adjacency_matrix.clone()
    a[~edge_mask] = 0
    a[~node_mask] = 0
    a[:, ~node_mask] = 0
    norm = _normalized(a)
    tok = slice(lay["token_start"], lay["logit_start"])
    err = slice(lay["error_start"], lay["token_start"])
    mass = _logit_weights(graph)
    total = float(mass.sum())
    by_length: list[float] = []
    error_mass = 0.0
    # edges only go from lower to higher layers (or into logits), so every path has at most
    # n_layers feature/error nodes between a token and a logit
    for _ in range(graph.cfg.n_layers + 2):
        mass = mass @ norm
        by_length.append(float(mass[tok].sum()))
        error_mass += float(mass[err].sum())
        if float(mass.abs().sum()) <= 1e-12 * max(total, 1e-30):
            break
    token_mass = sum(by_length)
    dist = [m / token_mass for m in by_length] if token_mass > 0 else []
    while dist and dist[-1] == 0:
        dist.pop()
    mean = sum((k + 1) * p for k, p in enumerate(dist)) if dist else float("nan")
    return {
        "mean": mean,
        "distribution": dist,  # dist[k]: share of token-to-logit influence on paths of k+1 edges
        "shortest": _shortest_path(a != 0, lay),
        "token_share": token_mass / total if total > 0 else float("nan"),
        "error_share": error_mass / total if total > 0 else float("nan"),
        "n_feature_nodes": int(node_mask[: lay["features"]].sum()),
        "n_error_nodes": int(node_mask[err].sum()),
        "n_edges": int((a != 0).sum()),
    }


def _shortest_path(edges: torch.Tensor, lay: dict[str, int]) -> float:
    """Fewest edges from any token to any logit node (nan when no token reaches a logit)."""
    reached = torch.zeros(edges.shape[0], dtype=torch.bool, device=edges.device)
    reached[lay["logit_start"]:] = True
    for k in range(1, edges.shape[0] + 1):
        new = edges[reached].any(0) & ~reached  # sources feeding a reached node
        if new[lay["token_start"]:lay["logit_start"]].any():
            return float(k)
        if not new.any():
            return float("nan")
        reached |= new
    return float("nan")


# ---- graph size at fixed completeness --------------------------------------------------------
def pruned_completeness(graph: Any, n_features: int, influence: torch.Tensor | None = None,
                        norm: torch.Tensor | None = None) -> float:
    """Completeness of the graph that keeps only its ``n_features`` most influential features.

    circuit-tracer's completeness with the dropped features merged into the error: over every
    node left (kept features, error nodes, tokens, logits), weighted by its influence in the
    whole graph plus its logit probability, the fraction of its normalised input that does not
    come from error nodes or dropped features (error and token nodes have no input and count 1,
    as in circuit-tracer). With every feature kept this is ``compute_graph_scores``' value.
    """
    lay = _layout(graph)
    influence = node_influence(graph) if influence is None else influence
    norm = _normalized(graph.adjacency_matrix) if norm is None else norm
    weights = influence + _logit_weights(graph)
    order = influence[: lay["features"]].argsort(descending=True)
    keep = torch.ones(lay["n"], dtype=torch.bool, device=norm.device)
    keep[order[n_features:]] = False
    unexplained = ~keep
    unexplained[lay["error_start"]:lay["token_start"]] = True
    frac = 1 - norm[keep][:, unexplained].sum(1)
    w = weights[keep]
    return float((frac * w).sum() / w.sum().clamp(min=1e-30))


def size_at_completeness(graph: Any, levels: Sequence[float] = COMPLETENESS_LEVELS
                         ) -> dict[str, int | None]:
    """For each level c, the fewest top-influence features whose graph has completeness >= c."""
    lay = _layout(graph)
    influence = node_influence(graph)
    norm = _normalized(graph.adjacency_matrix)
    n = lay["features"]
    cache: dict[int, float] = {}

    def score(k: int) -> float:
        if k not in cache:
            cache[k] = pruned_completeness(graph, k, influence, norm)
        return cache[k]

    out: dict[str, int | None] = {}
    for c in levels:
        if score(n) < c:
            out[str(c)] = None
            continue
        # completeness grows with k (almost always: dropping a weak feature also drops its own
        # row), so bisection finds the first k that reaches c
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            if score(mid) >= c:
                hi = mid
            else:
                lo = mid + 1
        out[str(c)] = lo
    return out


# ---- faithfulness ----------------------------------------------------------------------------
def signed_logit_effects(graph: Any) -> torch.Tensor:
    """Each node's total effect on the probability-weighted logit targets in the linear graph:
    the sum over paths of the products of signed edge weights ([n_nodes])."""
    a = graph.adjacency_matrix
    w = _logit_weights(graph)
    cur = w @ a
    total = cur.clone()
    for _ in range(graph.cfg.n_layers + 2):
        cur = cur @ a
        if not bool(cur.any()):
            break
        total += cur
    return total


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan with < 3 points or no spread."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 3:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else float("nan")


def _ranks(v: Sequence[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def sample_features(influence: torch.Tensor, n: int) -> tuple[list[int], list[int]]:
    """Feature nodes to ablate: the ``n // 2`` most influential ("top") and ``n - n // 2`` at
    evenly spaced ranks of influence among the rest ("spread"), so the sample holds the
    features a reader of the graph looks at and spans the weak ones; all if there are <= n.

    Features with zero influence are left out: they have no path to the logits (e.g. the last
    layer's features before the last position), so their ablation does nothing by construction
    and their tied zeros would inflate the rank correlation.
    """
    order = [i for i in influence.argsort(descending=True).tolist() if influence[i] > 0]
    n_top = n // 2
    top, rest = order[:n_top], order[n_top:]
    m = n - n_top
    if len(rest) <= m:
        return top, rest
    if m == 1:
        return top, [rest[0]]
    idx = sorted({round(i * (len(rest) - 1) / (m - 1)) for i in range(m)})
    return top, [rest[i] for i in idx]


@torch.no_grad()
def ablation_faithfulness(graph: Any, replacement_model: Any, *, n_features: int = 24,
                          tokens: torch.Tensor | None = None) -> dict[str, Any]:
    """Attributed influence against the measured effect of ablating each sampled feature."""
    from clt_lens.circuits.intervention import Intervention, intervene

    lay = _layout(graph)
    if lay["features"] == 0:
        return {"n": 0, **faithfulness_scores([]), "features": []}
    influence = node_influence(graph)[: lay["features"]]
    predicted = -signed_logit_effects(graph)[: lay["features"]]
    ids = graph.logit_token_ids.tolist()
    probs = graph.logit_probabilities.double().cpu()
    toks = graph.input_tokens if tokens is None else tokens
    rows = []
    top, spread = sample_features(influence, n_features)
    for node, group in [(n, "top") for n in top] + [(n, "spread") for n in spread]:
        layer, pos, feat = (int(v) for v in graph.active_features[graph.selected_features[node]])
        res = intervene(replacement_model, toks, [Intervention(layer, feat, pos, "ablate")],
                        freeze=True, top_k=1)
        before, after = res.logits_before.double(), res.logits_after.double()
        delta = (after[ids] - after.mean()) - (before[ids] - before.mean())
        effect = float((delta * probs).sum())
        rows.append({"layer": layer, "position": pos, "feature": feat, "group": group,
                     "influence": float(influence[node]), "predicted": float(predicted[node]),
                     "measured": effect})
    return {"n": len(rows), **faithfulness_scores(rows), "features": rows}


def faithfulness_scores(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Spearman of influence against |measured effect| over all rows and over the "top" ones
    (the strongest features: does the graph rank the nodes a reader looks at?), and of the
    signed linear prediction against the signed effect."""
    top = [r for r in rows if r.get("group") == "top"]
    return {
        "spearman_influence": spearman([r["influence"] for r in rows],
                                       [abs(r["measured"]) for r in rows]),
        "spearman_top": spearman([r["influence"] for r in top], [abs(r["measured"]) for r in top]),
        "spearman_signed": spearman([r["predicted"] for r in rows],
                                    [r["measured"] for r in rows]),
    }


# ---- one graph, many prompts -----------------------------------------------------------------
def graph_metrics(graph: Any, *, levels: Sequence[float] = COMPLETENESS_LEVELS,
                  node_threshold: float = NODE_THRESHOLD,
                  edge_threshold: float = EDGE_THRESHOLD) -> dict[str, Any]:
    """Scores, path lengths and sizes of one graph (no model needed)."""
    from circuit_tracer.graph import compute_graph_scores

    replacement, completeness = compute_graph_scores(graph)
    paths = path_lengths(graph, node_threshold, edge_threshold)
    return {
        "replacement": float(replacement),
        "completeness": float(completeness),
        "n_active_features": int(graph.active_features.shape[0]),
        "n_attributed_features": int(len(graph.selected_features)),
        "pruned_feature_nodes": paths.pop("n_feature_nodes"),
        "pruned_error_nodes": paths.pop("n_error_nodes"),
        "pruned_edges": paths.pop("n_edges"),
        "path_length": paths,
        "size_at_completeness": size_at_completeness(graph, levels),
    }


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """Median, quartiles, mean, min and max over prompts (None / nan left out and counted)."""
    v = sorted(x for x in values if x is not None and not math.isnan(x))
    missing = len(values) - len(v)
    if not v:
        return {"n": 0, "missing": missing}
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"n": len(v), "missing": missing, "median": q[1], "q1": q[0], "q3": q[2],
            "mean": sum(v) / len(v), "min": v[0], "max": v[-1]}


SUMMARY_KEYS = {
    "replacement": lambda r: r["replacement"],
    "completeness": lambda r: r["completeness"],
    "path_length_mean": lambda r: r["path_length"]["mean"],
    "path_length_shortest": lambda r: r["path_length"]["shortest"],
    "path_error_share": lambda r: r["path_length"]["error_share"],
    "pruned_feature_nodes": lambda r: r["pruned_feature_nodes"],
    "pruned_edges": lambda r: r["pruned_edges"],
    "active_features": lambda r: r["n_active_features"],
    "attributed_features": lambda r: r["n_attributed_features"],
    "faithfulness_spearman": lambda r: r.get("faithfulness", {}).get("spearman_influence"),
    "faithfulness_spearman_top": lambda r: r.get("faithfulness", {}).get("spearman_top"),
    "faithfulness_spearman_signed": lambda r: r.get("faithfulness", {}).get("spearman_signed"),
    "attribute_seconds": lambda r: r["attribute_seconds"],
}


def evaluate_graphs(
    transcoders: Any,
    prompts: Sequence[str],
    *,
    model: Any = "embedded",
    max_feature_nodes: int | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 256,
    n_ablate: int = 24,
    levels: Sequence[float] = COMPLETENESS_LEVELS,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Attribute every prompt through ``transcoders`` (a CLT object, checkpoint or circuit-tracer
    set folder) and measure each graph; ``n_ablate`` features per graph are ablated for the
    faithfulness score (0 skips it). Returns ``{"prompts": [...], "summary": {...},
    "pooled_faithfulness": {...}, "settings": {...}}``."""
    from circuit_tracer import attribute

    from clt_lens.circuits.attribution import load_replacement_model, tokenize_prompt
    from clt_lens.circuits.errors import CircuitsError

    if isinstance(prompts, str) or not prompts or not all(
            isinstance(p, str) and p.strip() for p in prompts):
        raise CircuitsError("prompts must be a non-empty list of non-empty strings")
    if not all(0 < c <= 1 for c in levels):
        raise CircuitsError(f"completeness levels must be in (0, 1], got {list(levels)}")
    if n_ablate < 0 or (max_feature_nodes is not None and max_feature_nodes < 1):
        raise CircuitsError("n_ablate must be >= 0 and max_feature_nodes positive or None")
    rm = load_replacement_model(transcoders, model, device=device)
    token_lists = [tokenize_prompt(rm, p) for p in prompts]  # bad prompts fail before any work
    if max_feature_nodes is not None:
        batch_size = min(batch_size, max(max_feature_nodes, max_n_logits))
    rows: list[dict[str, Any]] = []
    for prompt, toks in tqdm(list(zip(prompts, token_lists)), desc="graphs",
                             disable=not progress, unit="prompt"):
        # attribution runs backward passes, even when called under no_grad (as evaluate is)
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            t0 = time.perf_counter()
            graph = attribute(toks, rm, max_n_logits=max_n_logits,
                              desired_logit_prob=desired_logit_prob, batch_size=batch_size,
                              max_feature_nodes=max_feature_nodes)
            seconds = time.perf_counter() - t0
        rm.reset_hooks()
        row = {"prompt": prompt, "n_tokens": len(toks), "attribute_seconds": seconds,
               **graph_metrics(graph, levels=levels)}
        if n_ablate:
            row["faithfulness"] = ablation_faithfulness(graph, rm, n_features=n_ablate,
                                                        tokens=toks)
        rows.append(row)
    summary = {k: summarize([get(r) for r in rows]) for k, get in SUMMARY_KEYS.items()}
    for c in levels:
        summary[f"size_at_completeness_{c}"] = summarize(
            [r["size_at_completeness"][str(c)] for r in rows])
    pooled = {}
    if n_ablate:
        feats = [f for r in rows for f in r["faithfulness"]["features"]]
        pooled = {"n": len(feats), **faithfulness_scores(feats)}
    return {
        "prompts": rows,
        "summary": summary,
        "pooled_faithfulness": pooled,
        "path_length_distribution": mean_distribution(
            [r["path_length"]["distribution"] for r in rows]),
        "settings": {"max_feature_nodes": max_feature_nodes, "max_n_logits": max_n_logits,
                     "desired_logit_prob": desired_logit_prob, "n_ablate": n_ablate,
                     "levels": list(levels), "node_threshold": NODE_THRESHOLD,
                     "edge_threshold": EDGE_THRESHOLD, "n_prompts": len(rows)},
    }


def mean_distribution(dists: Sequence[Sequence[float]]) -> list[float]:
    """The average over prompts of path-length distributions (each prompt weighs the same)."""
    dists = [d for d in dists if d]
    if not dists:
        return []
    n = max(len(d) for d in dists)
    return [sum(d[k] if k < len(d) else 0.0 for d in dists) / len(dists) for k in range(n)]


# ---- prompts ----------------------------------------------------------------------------------
def heldout_prompts(n: int, *, tokenizer: Any, dataset: str = "embedded", split: str = "heldout",
                    min_tokens: int = 8, max_tokens: int = 16, seed: int = 0) -> list[str]:
    """``n`` prompts from the spoken lines of a held-out split: a seeded sample of lines of at
    least ``min_tokens`` tokens, each cut to a seeded length in [min_tokens, max_tokens] at a
    token boundary (so the model predicts a real next word). Speaker names (upper-case lines)
    and stage directions are skipped."""
    from clt_lens.data import read_embedded_documents

    if n < 1 or not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need n >= 1 and 1 <= min_tokens <= max_tokens, got {n}, "
                         f"{min_tokens}, {max_tokens}")
    if dataset != "embedded":
        raise ValueError("heldout_prompts reads the embedded corpus; pass prompts explicitly "
                         "for another dataset")
    lines = []
    for doc in read_embedded_documents(split):
        for line in doc.splitlines():
            s = line.strip()
            if (len(s.split()) >= 5 and not s.isupper() and not s.startswith(("[", "Enter",
                                                                            "Exit", "Exeunt"))):
                lines.append(s)
    rng = random.Random(seed)
    rng.shuffle(lines)
    out: list[str] = []
    for s in lines:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(ids) < min_tokens + 1:  # keep at least one token to predict
            continue
        k = rng.randint(min_tokens, min(max_tokens, len(ids) - 1))
        prompt = tokenizer.decode(ids[:k])
        if prompt.strip() and prompt not in out:
            out.append(prompt)
        if len(out) == n:
            return out
    raise ValueError(f"the {split!r} split has only {len(out)} usable lines; asked for {n}")
