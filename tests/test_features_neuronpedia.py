"""Neuronpedia dashboard batches and bulk export written from our statistics."""

from __future__ import annotations

import gzip
import json
import math

import pytest
from test_features_common import build_features_dir, write_autointerp

from clt_lens.features.format import iter_features, read_manifest
from clt_lens.features.neuronpedia import (
    dashboard_feature,
    load_explanations,
    write_dashboard_batches,
    write_neuronpedia_export,
)

F = 40
PER_BATCH = 16

# NeuronpediaDashboardFeature.to_dict() keys (sae_dashboard 0.8.0), i.e. what its runner writes
DASHBOARD_FEATURE_KEYS = {
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values",
    "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_l1",
    "correlated_neurons_pearson", "correlated_features_indices", "correlated_features_l1",
    "correlated_features_pearson", "neg_str", "neg_values", "pos_str", "pos_values",
    "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
    "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "n_prompts_total",
    "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations", "vector",
}
ACTIVATION_KEYS = {"bin_min", "bin_max", "bin_contains", "tokens", "values",
                   "qualifying_token_index"}
# Neuronpedia's database models (neuronpedia-utils db_models Feature / Activation / Explanation)
EXPORT_FEATURE_KEYS = {
    "modelId", "layer", "index", "creatorId", "createdAt", "maxActApprox", "hasVector", "vector",
    "vectorLabel", "vectorDefaultSteerStrength", "hookName", "topkCosSimIndices",
    "topkCosSimValues", "neuron_alignment_indices", "neuron_alignment_values",
    "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_pearson",
    "correlated_neurons_l1", "correlated_features_indices", "correlated_features_pearson",
    "correlated_features_l1", "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
    "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "decoder_weights_dist",
}
EXPORT_ACTIVATION_KEYS = {
    "id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue",
    "values", "creatorId", "dataSource", "dataIndex", "dfaValues", "dfaTargetIndex",
    "dfaMaxValue", "createdAt", "lossValues", "logitContributions", "binMin", "binMax",
    "binContains", "qualifyingTokenIndex",
}
EXPORT_EXPLANATION_KEYS = {"id", "modelId", "layer", "index", "description", "authorId",
                           "typeName", "explanationModelName", "notes", "createdAt"}


@pytest.fixture(scope="module")
def fdir(tmp_path_factory):
    out = build_features_dir(tmp_path_factory.mktemp("np"), F)
    write_autointerp(out, [
        (0, 1, "ok", "first try"),
        (0, 1, "ok", "the word 'the'"),  # the latest ok record wins
        (0, 2, "ok", "commas"),
        (0, 2, "failed", None),  # a later failure does not hide the explanation
        (2, 5, "failed", None),
        (3, 39, "ok", "line ends"),
    ])
    return out


def _gz_rows(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_dashboard_batches_follow_sae_dashboards_schema(fdir, tmp_path):
    paths = write_dashboard_batches(fdir, tmp_path, model_id="tiny", features_per_batch=PER_BATCH)
    n_batches = math.ceil(F / PER_BATCH)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in paths) == sorted(
        f"{layer}-clt/batch-{k}.json" for layer in range(4) for k in range(n_batches))
    manifest = read_manifest(fdir)
    for layer in range(4):
        recs = {r["index"]: r for r in iter_features(fdir, layer)}
        seen = []
        for k in range(n_batches):
            batch = json.loads((tmp_path / f"{layer}-clt" / f"batch-{k}.json").read_text())
            assert set(batch) == {"model_id", "layer", "sae_set", "sae_id_suffix", "features"}
            assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("tiny", layer, "clt")
            assert 1 <= len(batch["features"]) <= PER_BATCH
            for feat in batch["features"]:
                assert set(feat) == DASHBOARD_FEATURE_KEYS
                rec = recs[feat["feature_index"]]
                seen.append(feat["feature_index"])
                assert feat["frac_nonzero"] == rec["frac_nonzero"]
                assert feat["pos_str"] == [t for t, _ in rec["top_logits"]]
                assert feat["neg_values"] == [v for _, v in rec["bottom_logits"]]
                assert sum(feat["freq_hist_data_bar_heights"]) == rec["n_fired"]
                assert len(feat["logits_hist_data_bar_values"]) == len(
                    feat["logits_hist_data_bar_heights"]) > 0
                assert feat["n_tokens_in_prompt"] == manifest["context_size"]
                acts = feat["activations"]
                n_q = sum(len(q["examples"]) for q in rec["quantile_examples"])
                assert len(acts) == len(rec["top_examples"]) + n_q
                for a, ex in zip(acts, rec["top_examples"]):
                    assert (a["bin_min"], a["bin_max"], a["bin_contains"]) == (
                        -1, rec["max_act"], -1)
                    assert a["values"] == ex["acts"] and a["tokens"] == ex["tokens"]
                for a in acts:
                    assert set(a) == ACTIVATION_KEYS
                    assert len(a["tokens"]) == len(a["values"])
                    assert a["values"][a["qualifying_token_index"]] == max(a["values"])
                    if a["bin_min"] != -1:
                        assert a["bin_min"] <= max(a["values"]) <= a["bin_max"]
                        assert 0 <= a["bin_contains"] <= 1
        assert seen == list(range(F))
    # sae-dashboard's own classes load the batch (they reject unknown keys) and write it back
    try:
        from sae_dashboard.neuronpedia.neuronpedia_dashboard import NeuronpediaDashboardBatch
    except ImportError:
        return
    data = json.loads((tmp_path / "1-clt" / "batch-0.json").read_text())
    assert NeuronpediaDashboardBatch(**data).to_dict() == data


def test_bulk_export_layout_rows_and_explanations(fdir, tmp_path):
    model_dir = write_neuronpedia_export(fdir, tmp_path, model_id="tiny",
                                         features_per_batch=PER_BATCH, creator_id="me")
    assert model_dir == tmp_path / "tiny"
    assert sorted(p.name for p in model_dir.iterdir()) == [f"{layer}-clt" for layer in range(4)]
    n_batches = math.ceil(F / PER_BATCH)
    for layer in range(4):
        src = model_dir / f"{layer}-clt"
        for name in ("model.jsonl", "sourceset.jsonl", "source.jsonl"):
            json.loads((src / name).read_text())
        assert json.loads((src / "source.jsonl").read_text())["id"] == f"{layer}-clt"
        recs = {r["index"]: r for r in iter_features(fdir, layer)}
        feats = [row for k in range(n_batches)
                 for row in _gz_rows(src / "features" / f"batch-{k}.jsonl.gz")]
        assert [int(r["index"]) for r in feats] == list(range(F))
        for row in feats:
            assert EXPORT_FEATURE_KEYS <= set(row)
            rec = recs[int(row["index"])]
            assert (row["modelId"], row["layer"]) == ("tiny", f"{layer}-clt")
            assert row["creatorId"] == "me"
            assert row["maxActApprox"] == rec["max_act"]
            assert row["decoder_norms"] == rec["decoder_norms"]
            assert len(row["decoder_norms"]) == 4 - layer
            assert row["clt"]["target_layers"] == list(range(layer, 4))
        acts = [row for k in range(n_batches)
                for row in _gz_rows(src / "activations" / f"batch-{k}.jsonl.gz")]
        assert len({r["id"] for r in acts}) == len(acts)
        for row in acts:
            assert set(row) == EXPORT_ACTIVATION_KEYS
            assert len(row["tokens"]) == len(row["values"])
            assert row["maxValue"] == max(row["values"]) == row["values"][row["maxValueTokenIndex"]]
            assert row["maxValue"] <= recs[int(row["index"])]["max_act"]
        expl_files = sorted((src / "explanations").glob("*.jsonl.gz")) if (
            src / "explanations").exists() else []
        expl = [row for p in expl_files for row in _gz_rows(p)]
        for row in expl:
            assert EXPORT_EXPLANATION_KEYS <= set(row)
        got = {(layer, int(r["index"])): r["description"] for r in expl}
        want = {(0, 1): "the word 'the'", (0, 2): "commas"} if layer == 0 else (
            {(3, 39): "line ends"} if layer == 3 else {})
        assert got == want
        for r in expl:
            assert r["typeName"] == "clt-lens-explain-v1"
            assert r["explanationModelName"] == "stub-llm"
            assert r["scores"]["detection"]["balanced_accuracy"] == 0.75
    assert set(load_explanations(fdir)) == {(0, 1), (0, 2), (3, 39)}


def test_bad_export_arguments(fdir, tmp_path):
    with pytest.raises(ValueError, match="features_per_batch"):
        write_dashboard_batches(fdir, tmp_path, features_per_batch=129)
    with pytest.raises(ValueError, match=r"layers \[5\]"):
        write_neuronpedia_export(fdir, tmp_path, layers=[5])
    with pytest.raises(ValueError, match="model id"):
        write_neuronpedia_export(fdir, tmp_path, model_id="a/b")
    with pytest.raises(FileNotFoundError, match="features.json"):
        write_dashboard_batches(tmp_path / "nothing", tmp_path)
    rec = next(iter_features(fdir, 0))
    assert dashboard_feature(rec, read_manifest(fdir))["feature_index"] == 0
