"""Neuronpedia formats written from our statistics (no second pass over the model).

Two outputs, one Neuronpedia *source* per CLT source layer, named ``{layer}-{sourceset}``
(e.g. ``0-clt``), feature indices within the layer:

- **Dashboard batches** (``write_dashboard_batches``): ``{out}/{layer}-{sourceset}/batch-{k}.json``
  with exactly the schema sae-dashboard's ``NeuronpediaRunner`` writes
  (``NeuronpediaDashboardBatch``: ``model_id, layer, sae_set, sae_id_suffix, features[...]``), so
  Neuronpedia's own converter and sae-dashboard's loader read them. Fields that need the model
  and an SAE-shaped encoder (neuron alignment, correlated neurons/features, DFA) are left empty.
- **Bulk export** (``write_neuronpedia_export``): ``{out}/{model}/{layer}-{sourceset}/`` holding
  ``features/batch-{k}.jsonl.gz``, ``activations/batch-{k}.jsonl.gz`` and, when autointerp has
  run, ``explanations/batch-{k}.jsonl.gz``, plus ``model.jsonl``, ``sourceset.jsonl`` and
  ``source.jsonl``; the rows follow Neuronpedia's database models. What Neuronpedia has no field
  for is added as extra keys: on feature rows ``decoder_norms`` (one per target layer j >= l),
  ``clt`` (source layer, target layers, n_fired, mean_act), on explanation rows ``scores``.

Activations are the top examples (``bin_min = -1``, ``bin_max`` = the feature's maximum,
``bin_contains = -1``, as sae-dashboard marks its top group) followed by the quantile bins from
the highest down (``bin_min``/``bin_max`` the interval, ``bin_contains`` the estimated fraction
of tokens in it). Negative examples are not exported: they are all zeros.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clt_lens.errors import InputError
from clt_lens.features.format import (
    AUTOINTERP_FILE,
    iter_features,
    manifest_layers,
    read_manifest,
)

MAX_FEATURES_PER_BATCH = 128  # Neuronpedia's upload limit; also the export batch size

_EMPTY_DASHBOARD_LISTS = (
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_l1",
    "correlated_neurons_pearson",
    "correlated_features_indices",
    "correlated_features_l1",
    "correlated_features_pearson",
)


def source_id(layer: int, sourceset: str) -> str:
    """Neuronpedia source id of a CLT source layer, e.g. ``0-clt``."""
    return f"{layer}-{sourceset}"


def load_explanations(features_dir: str | Path) -> dict[tuple[int, int], dict]:
    """The latest ``status == "ok"`` autointerp record per (layer, index); {} if none."""
    try:
        from clt_lens.autointerp import load_explanations as _load
    except ImportError:
        _load = None
    if _load is not None:
        return _load(features_dir)
    out: dict[tuple[int, int], dict] = {}
    path = Path(features_dir) / AUTOINTERP_FILE
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a partial last line from an interrupted run
            if isinstance(rec, dict) and rec.get("status") == "ok" and rec.get("explanation"):
                out[(rec["layer"], rec["index"])] = rec
    return out


def _bar_centres(hist: dict) -> tuple[list[float], list[int]]:
    edges, counts = hist.get("edges", []), hist.get("counts", [])
    return [(a + b) / 2 for a, b in zip(edges, edges[1:])], list(counts)


def _activation_groups(rec: dict) -> Iterator[tuple[float, float, float, dict]]:
    """(bin_min, bin_max, bin_contains, example) in Neuronpedia's order."""
    for ex in rec["top_examples"]:
        yield -1.0, float(rec["max_act"]), -1.0, ex
    for qbin in rec["quantile_examples"]:
        contains = float(qbin.get("contains", 0.0))
        for ex in qbin["examples"]:
            yield float(qbin["lo"]), float(qbin["hi"]), contains, ex


def dashboard_feature(rec: dict, manifest: dict) -> dict[str, Any]:
    """One feature in sae-dashboard's ``NeuronpediaDashboardFeature`` schema."""
    freq_values, freq_heights = _bar_centres(rec["hist"])
    logit_values, logit_heights = _bar_centres(rec.get("logits_hist") or {})
    feature: dict[str, Any] = {"feature_index": rec["index"]}
    feature.update({key: [] for key in _EMPTY_DASHBOARD_LISTS})
    feature.update({
        "neg_str": [t for t, _ in rec["bottom_logits"]],
        "neg_values": [v for _, v in rec["bottom_logits"]],
        "pos_str": [t for t, _ in rec["top_logits"]],
        "pos_values": [v for _, v in rec["top_logits"]],
        "frac_nonzero": rec["frac_nonzero"],
        "freq_hist_data_bar_values": freq_values,
        "freq_hist_data_bar_heights": freq_heights,
        "logits_hist_data_bar_heights": logit_heights,
        "logits_hist_data_bar_values": logit_values,
        "n_prompts_total": int(manifest.get("n_sequences", 0)),
        "n_tokens_in_prompt": int(manifest["context_size"]),
        "dataset": manifest["dataset"],
        "decoder_weights_dist": [],
        "activations": [
            {
                "bin_min": lo,
                "bin_max": hi,
                "bin_contains": contains,
                "tokens": ex["tokens"],
                "values": ex["acts"],
                "qualifying_token_index": ex["max_pos"],
            }
            for lo, hi, contains, ex in _activation_groups(rec)
        ],
        "vector": [],
    })
    return feature


def _batches(items: list, size: int) -> Iterator[tuple[int, list]]:
    for k, lo in enumerate(range(0, len(items), size)):
        yield k, items[lo : lo + size]


def _check_batch_size(size: int) -> None:
    if not 1 <= size <= MAX_FEATURES_PER_BATCH:
        raise InputError(f"features_per_batch must be in [1, {MAX_FEATURES_PER_BATCH}], got {size}")


def _layers(manifest: dict, layers: list[int] | None) -> list[int]:
    have = manifest_layers(manifest)
    if layers is None:
        return have
    missing = [x for x in layers if x not in have]
    if missing:
        raise InputError(f"layers {missing} have no statistics in this features directory "
                         f"(it holds layers {have})")
    return list(layers)


def write_dashboard_batches(
    features_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    model_id: str | None = None,
    layers: list[int] | None = None,
    features_per_batch: int = MAX_FEATURES_PER_BATCH,
) -> list[Path]:
    """Write ``batch-{k}.json`` per source layer; default ``out_dir``:
    ``features_dir/neuronpedia/dashboards``."""
    _check_batch_size(features_per_batch)
    manifest = read_manifest(features_dir)
    layers = _layers(manifest, layers)
    out_root = Path(out_dir or Path(features_dir) / "neuronpedia" / "dashboards")
    sourceset = manifest["sourceset"]
    written = []
    for layer in layers:
        feats = [dashboard_feature(rec, manifest) for rec in iter_features(features_dir, layer)]
        d = out_root / source_id(layer, sourceset)
        d.mkdir(parents=True, exist_ok=True)
        for k, chunk in _batches(feats, features_per_batch):
            batch = {
                "model_id": model_id or manifest["model"],
                "layer": layer,
                "sae_set": sourceset,
                "sae_id_suffix": None,
                "features": chunk,
            }
            path = d / f"batch-{k}.json"
            path.write_text(json.dumps(batch), encoding="utf-8")
            written.append(path)
    return written


def _write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(
        filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=5
    ) as gz:
        gz.write(data)


def write_neuronpedia_export(
    features_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    model_id: str | None = None,
    layers: list[int] | None = None,
    features_per_batch: int = MAX_FEATURES_PER_BATCH,
    creator_id: str | None = None,
) -> Path:
    """Write the bulk export (module doc) under ``out_dir`` (default ``features_dir/neuronpedia/
    exports``); returns ``out_dir/{model}``."""
    _check_batch_size(features_per_batch)
    manifest = read_manifest(features_dir)
    layers = _layers(manifest, layers)
    model = model_id or manifest["model"]
    if not model or "/" in model:
        raise InputError(f"model id {model!r} must be a non-empty name without '/'")
    out_root = Path(out_dir or Path(features_dir) / "neuronpedia" / "exports")
    model_dir = out_root / model
    sourceset = manifest["sourceset"]
    n_layers = manifest["n_layers"]
    explanations = load_explanations(features_dir)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat()
    common = {"creatorId": creator_id, "createdAt": now}

    for layer in layers:
        src = source_id(layer, sourceset)
        src_dir = model_dir / src
        src_dir.mkdir(parents=True, exist_ok=True)
        (src_dir / "model.jsonl").write_text(json.dumps({
            "id": model, "displayNameShort": model, "displayName": model,
            "instruct": False, "layers": n_layers, **common, "updatedAt": now,
        }) + "\n", encoding="utf-8")
        (src_dir / "sourceset.jsonl").write_text(json.dumps({
            "modelId": model, "name": sourceset, "type": "clt",
            "description": f"Cross-layer transcoder, {manifest['d_sae']} features per layer "
                           f"({manifest['input_hook']} -> {manifest['output_hook']})",
            "visibility": "PUBLIC", **common,
        }) + "\n", encoding="utf-8")
        (src_dir / "source.jsonl").write_text(json.dumps({
            "id": src, "modelId": model, "setName": sourceset, "visibility": "PUBLIC",
            "dataset": manifest["dataset"], "num_prompts": manifest.get("n_sequences"),
            "num_tokens_in_prompt": manifest["context_size"],
            "hookName": f"blocks.{layer}.{manifest['input_hook']}", **common,
        }) + "\n", encoding="utf-8")

        records = list(iter_features(features_dir, layer))
        for k, chunk in _batches(records, features_per_batch):
            feature_rows, activation_rows, explanation_rows = [], [], []
            for rec in chunk:
                dash = dashboard_feature(rec, manifest)
                acts = dash.pop("activations")
                for key in ("feature_index", "n_prompts_total", "n_tokens_in_prompt", "dataset",
                            "vector"):
                    dash.pop(key)
                index = str(rec["index"])
                feature_rows.append({
                    "modelId": model, "layer": src, "index": index, **common,
                    "maxActApprox": rec["max_act"], "hasVector": False, "vector": [],
                    "vectorLabel": None, "vectorDefaultSteerStrength": None, "hookName": None,
                    "topkCosSimIndices": [], "topkCosSimValues": [],
                    **dash,
                    "decoder_norms": rec["decoder_norms"],
                    "clt": {
                        "source_layer": layer,
                        "target_layers": list(range(layer, n_layers)),
                        "n_fired": rec["n_fired"],
                        "mean_act": rec["mean_act"],
                    },
                })
                for a_k, act in enumerate(acts):
                    values = act["values"]
                    activation_rows.append({
                        "id": f"{model}-{src}-{index}-{a_k}",
                        "tokens": act["tokens"], "modelId": model, "layer": src, "index": index,
                        "maxValue": max(values), "maxValueTokenIndex": values.index(max(values)),
                        "minValue": min(values), "values": values, **common,
                        "dataSource": None, "dataIndex": None, "dfaValues": [],
                        "dfaTargetIndex": None, "dfaMaxValue": None, "lossValues": [],
                        "logitContributions": None, "binMin": act["bin_min"],
                        "binMax": act["bin_max"], "binContains": act["bin_contains"],
                        "qualifyingTokenIndex": act["qualifying_token_index"],
                    })
                expl = explanations.get((layer, rec["index"]))
                if expl is not None:
                    explanation_rows.append({
                        "id": f"{model}-{src}-{index}-explanation",
                        "modelId": model, "layer": src, "index": index,
                        "description": expl["explanation"], "authorId": creator_id,
                        "typeName": expl.get("method"), "explanationModelName": expl.get("model"),
                        "notes": None, "createdAt": now, "scores": expl.get("scores") or {},
                    })
            _write_jsonl_gz(src_dir / "features" / f"batch-{k}.jsonl.gz", feature_rows)
            _write_jsonl_gz(src_dir / "activations" / f"batch-{k}.jsonl.gz", activation_rows)
            if explanation_rows:
                _write_jsonl_gz(src_dir / "explanations" / f"batch-{k}.jsonl.gz", explanation_rows)
    return model_dir
