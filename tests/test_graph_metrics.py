"""The attribution-graph metrics: exact values on a hand-built graph, agreement with
circuit-tracer and with real ablations on a graph of the embedded model, and the eval CLI."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from clt_lens.evals.graph_metrics import (
    ablation_faithfulness,
    heldout_prompts,
    path_lengths,
    pruned_completeness,
    signed_logit_effects,
    size_at_completeness,
    spearman,
)


def tiny_graph() -> SimpleNamespace:
    """1 layer, tokens [BOS, t1], one feature f at t1, one logit.

    Nodes: [f, err(0,0), err(0,1), BOS, t1, logit]; edges (target <- source): f <- t1 (1),
    f <- err(0,1) (-1), logit <- f (3), logit <- t1 (1).
    """
    a = torch.zeros(6, 6)
    f, e01, t1, logit = 0, 2, 4, 5
    a[f, t1], a[f, e01] = 1.0, -1.0
    a[logit, f], a[logit, t1] = 3.0, 1.0
    return SimpleNamespace(
        adjacency_matrix=a, selected_features=torch.tensor([0]),
        active_features=torch.tensor([[0, 1, 7]]), input_tokens=torch.tensor([0, 11]),
        logit_targets=[None], logit_probabilities=torch.tensor([1.0]),
        cfg=SimpleNamespace(n_layers=1))


def test_path_lengths_and_completeness_by_hand():
    from circuit_tracer.graph import compute_graph_scores

    g = tiny_graph()
    p = path_lengths(g, node_threshold=1.0, edge_threshold=1.0)
    # normalised |weights|: logit <- f 0.75, <- t1 0.25; f <- t1 0.5, <- err 0.5. Influence
    # reaching t1: 0.25 in one edge, 0.75 * 0.5 in two; 0.375 ends at the error node.
    assert p["distribution"] == pytest.approx([0.25 / 0.625, 0.375 / 0.625])
    assert p["mean"] == pytest.approx(1.6)
    assert p["token_share"] == pytest.approx(0.625)
    assert p["error_share"] == pytest.approx(0.375)
    assert p["shortest"] == 1.0
    # circuit-tracer's completeness: rows weighted by influence + logit weight, error and
    # token rows count 1: (0.5 * 0.75 + 0.375 + 0.625 + 1) / (0.75 + 0.375 + 0.625 + 1)
    full = 2.375 / 2.75
    assert compute_graph_scores(g)[1] == pytest.approx(full)
    assert pruned_completeness(g, 1) == pytest.approx(full)
    # without f the logit's 0.75 from f is unexplained and f's own row is gone
    assert pruned_completeness(g, 0) == pytest.approx((0.25 + 0.375 + 0.625) / 2.0)
    assert size_at_completeness(g, (0.6, 0.8, 0.9)) == {"0.6": 0, "0.8": 1, "0.9": None}
    # the signed effect of f on the logit is its edge; of t1, direct plus through f
    eff = signed_logit_effects(g)
    assert eff[0] == pytest.approx(3.0) and eff[4] == pytest.approx(1.0 + 3.0)
    assert eff[2] == pytest.approx(-3.0)


def test_signed_effects_are_the_path_sums():
    torch.manual_seed(0)
    n = 9
    a = torch.randn(n, n).tril(-1)  # a DAG: sources come before targets
    g = SimpleNamespace(adjacency_matrix=a, logit_targets=[None, None],
                        logit_probabilities=torch.tensor([0.7, 0.2]),
                        cfg=SimpleNamespace(n_layers=n))
    w = torch.zeros(n)
    w[-2:] = torch.tensor([0.7, 0.2])
    total = w @ (torch.linalg.inv(torch.eye(n) - a) - torch.eye(n))
    assert torch.allclose(signed_logit_effects(g), total, atol=1e-5)


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(20):
        x = [rng.choice([0, 1, 2, 3.5, rng.random()]) for _ in range(15)]
        y = [rng.random() if rng.random() < 0.7 else 1.0 for _ in range(15)]
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2], [2, 1]) != spearman([1, 2], [2, 1])  # nan below 3 points
    assert spearman([1, 1, 1], [1, 2, 3]) != spearman([1, 1, 1], [1, 2, 3])  # no spread


@pytest.fixture(scope="module")
def attributed(embedded_model):
    """A calibrated random CLT, its replacement model and the graph of one prompt."""
    import warnings

    from circuit_tracer import attribute

    from clt_lens.circuits.attribution import load_replacement_model, tokenize_prompt
    from clt_lens.circuits.synthetic import random_clt

    clt = random_clt(embedded_model, d_sae=64, seed=3)
    rm = load_replacement_model(clt, embedded_model)
    toks = tokenize_prompt(rm, "To be, or not to be, that is the question")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = attribute(toks, rm, batch_size=64)
    return clt, rm, graph, toks


def test_real_graph_scores_agree_with_circuit_tracer(attributed):
    from circuit_tracer.graph import compute_graph_scores

    _, _, graph, _ = attributed
    n = len(graph.selected_features)
    assert pruned_completeness(graph, n) == pytest.approx(compute_graph_scores(graph)[1],
                                                          abs=1e-5)
    sizes = size_at_completeness(graph, (0.3, 0.5, 0.99))
    for c, k in sizes.items():
        if k is None:
            assert pruned_completeness(graph, n) < float(c)
        else:
            assert pruned_completeness(graph, k) >= float(c)
            assert k == 0 or pruned_completeness(graph, k - 1) < float(c)
    p = path_lengths(graph)
    assert p["distribution"] and sum(p["distribution"]) == pytest.approx(1.0)
    assert p["token_share"] + p["error_share"] == pytest.approx(1.0, abs=1e-4)
    assert 1.0 <= p["shortest"] <= p["mean"] <= graph.cfg.n_layers + 1


def test_ablations_follow_the_graph(attributed):
    _, rm, graph, toks = attributed
    res = ablation_faithfulness(graph, rm, n_features=6, tokens=toks)
    assert res["n"] == 6
    feats = res["features"]
    assert [f["group"] for f in feats] == ["top"] * 3 + ["spread"] * 3
    top_infl = min(f["influence"] for f in feats if f["group"] == "top")
    assert all(f["influence"] <= top_infl for f in feats if f["group"] == "spread")
    assert all(f["influence"] > 0 for f in feats)  # no structurally silent features
    assert all(f["position"] >= 1 for f in feats)
    # the most influential feature: the graph's linear prediction and the real ablation agree
    # in sign and to within a factor of two
    top = max(feats, key=lambda f: f["influence"])
    assert top["predicted"] * top["measured"] > 0
    assert 0.5 < top["measured"] / top["predicted"] < 2.0
    assert res["spearman_influence"] > 0.6


def test_heldout_prompts_come_from_the_heldout_plays(embedded_model):
    from clt_lens.data import read_embedded_documents

    tok = embedded_model.tokenizer
    prompts = heldout_prompts(6, tokenizer=tok, min_tokens=5, max_tokens=9, seed=1)
    assert prompts == heldout_prompts(6, tokenizer=tok, min_tokens=5, max_tokens=9, seed=1)
    assert len(set(prompts)) == 6
    heldout = "\n".join(read_embedded_documents("heldout"))
    for p in prompts:
        assert p in heldout
        assert 5 <= len(tok(p, add_special_tokens=False)["input_ids"]) <= 9
    with pytest.raises(ValueError, match="min_tokens"):
        heldout_prompts(2, tokenizer=tok, min_tokens=9, max_tokens=5)


def test_eval_cli_reports_graphs_density_and_training_window(tmp_path: Path, attributed,
                                                             monkeypatch, capsys):
    from clt_lens.cli import main

    run = tmp_path / "run"
    attributed[0].save_model(str(run / "final"))
    (run / "train_config.json").write_text(json.dumps({"dead_window_tokens": 5000}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"kind": "train", "step": 1, "tokens": 100, "dead_frac_per_layer": [0.5] * 4},
        {"kind": "heldout", "step": 1},
        {"kind": "train", "step": 2, "tokens": 200, "dead_frac_per_layer": [0.0, 0.1, 0.2, 0.3]},
    )) + "\n")
    out = tmp_path / "eval"
    monkeypatch.setattr(sys, "argv", ["clt-lens"])
    code = main(["eval", str(run / "final"), "--tokens", "254", "--no-single-layer",
                 "--density-tokens", "1016", "--graphs", "2", "--graph-max-nodes", "24",
                 "--ablate", "2", "--out", str(out)])
    assert code in (0, None)
    res = json.loads((out / "eval.json").read_text())
    assert res["feature_density"]["n_tokens"] == 8 * 127  # 8 sequences of BOS + 127 tokens
    assert res["training_window"]["dead_fraction"] == [0.0, 0.1, 0.2, 0.3]
    assert res["training_window"]["window_tokens"] == 5000
    g = res["graphs"]
    assert len(g["prompts"]) == 2 and g["settings"]["max_feature_nodes"] == 24
    assert all(r["n_attributed_features"] <= 24 for r in g["prompts"])
    assert all(r["faithfulness"]["n"] <= 2 for r in g["prompts"])
    assert (out / "graphs.png").stat().st_size > 1000
    md = (out / "eval.md").read_text()
    assert "dead in the training window (5,000 tokens, step 2)" in md
    assert "mean path length, input to logit (pruned)" in md
    assert "influence vs ablation effect, Spearman" in md
    assert "strongest features only" in md
    assert md in capsys.readouterr().out
