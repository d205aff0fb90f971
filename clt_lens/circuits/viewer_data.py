"""Per-feature JSON for circuit-tracer's viewer, from a features directory.

The viewer (``circuit_tracer/frontend/assets``) loads a feature page with
``loadFeature(scan, featureIndex)``: for a scan starting with ``./`` it fetches
``{scan}/{featureIndex}.json``, where ``featureIndex`` is the graph node's ``feature`` field,
the Cantor pairing of (layer, feature index). It reads (``feature_examples/*.js``,
``render-act-histogram.js``):

- ``examples_quantiles``: ``[{quantile_name, examples: [{tokens, tokens_acts_list,
  train_token_ind, is_repeated_datapoint}]}]`` (token strings, one activation per token, the
  position the context is centred on);
- ``top_logits`` / ``bottom_logits``: lists of token strings;
- ``act_min`` / ``act_max`` (colour scale and histogram range), ``histogram`` (bin heights over
  that range), ``quantile_values`` (100 activation percentiles), ``activation_frequency``.

``clt-lens serve``'s ``feature.html`` also reads ``decoder_norms`` (one per target layer).

Files go to ``out_dir/features/{scan_dirname(scan)}/{featureIndex}.json`` with an ``index.json``
naming the scan; ``clt-lens serve`` points the viewer there. Each page also carries the
autointerp ``explanation`` (and its scores) when ``features_dir/autointerp.jsonl`` has one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clt_lens.circuits.errors import CircuitsError

FEATURES_SUBDIR = "features"
INDEX_FILE = "index.json"
N_PERCENTILES = 100


def cantor_pair(layer: int, index: int) -> int:
    """circuit-tracer's node ``feature`` id of (layer, index)."""
    return (layer + index) * (layer + index + 1) // 2 + index


def cantor_unpair(z: int) -> tuple[int, int]:
    """(layer, index) of a node ``feature`` id; the inverse of ``cantor_pair``."""
    w = (math.isqrt(8 * z + 1) - 1) // 2
    index = z - w * (w + 1) // 2
    return w - index, index


def scan_dirname(scan: str) -> str:
    """Folder name (and URL segment) for a scan's feature pages."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", scan).strip("._")
    return name or "scan"


def read_explanations(features_dir: str | Path) -> dict[tuple[int, int], dict[str, Any]]:
    """Latest ok autointerp record per (layer, index); {} when autointerp never ran."""
    from clt_lens.autointerp import load_explanations

    return load_explanations(features_dir)


def check_features_dir(features_dir: str | Path, *, n_layers: int, d_sae: int) -> dict[str, Any]:
    """The features manifest, checked against the CLT's sizes."""
    from clt_lens.features.format import read_manifest

    manifest = read_manifest(features_dir)
    if manifest["n_layers"] != n_layers or manifest["d_sae"] != d_sae:
        raise CircuitsError(
            f"features directory {str(features_dir)!r} describes n_layers={manifest['n_layers']}, "
            f"d_sae={manifest['d_sae']} but the CLT has n_layers={n_layers}, d_sae={d_sae}"
        )
    return manifest


def write_viewer_features(
    features_dir: str | Path,
    out_dir: str | Path,
    scan: str,
    *,
    features: Iterable[tuple[int, int]] | None = None,
) -> Path:
    """Write viewer feature pages for ``features`` ((layer, index) pairs; all when None).

    ``out_dir`` is the folder ``clt-lens serve`` serves (where the graph JSON files are).
    Returns the folder holding the pages.
    """
    from clt_lens.features.format import iter_features, manifest_layers, read_manifest

    if not isinstance(scan, str) or not scan:
        raise CircuitsError(f"scan must be a non-empty string, got {scan!r}")
    manifest = read_manifest(features_dir)
    wanted: dict[int, set[int]] | None = None
    if features is not None:
        wanted = {}
        for layer, index in features:
            wanted.setdefault(int(layer), set()).add(int(index))
    layers = manifest_layers(manifest)
    missing = sorted(set(wanted or ()) - set(layers))
    if missing:
        raise CircuitsError(f"features directory {str(features_dir)!r} has no layer file for "
                            f"layer(s) {missing}")
    explanations = read_explanations(features_dir)
    dest = Path(out_dir).expanduser().resolve() / FEATURES_SUBDIR / scan_dirname(scan)
    dest.mkdir(parents=True, exist_ok=True)
    written = 0
    for layer in layers:
        if wanted is not None and layer not in wanted:
            continue
        todo = None if wanted is None else set(wanted[layer])
        for rec in iter_features(features_dir, layer):
            if todo is not None:
                if rec["index"] not in todo:
                    continue
                todo.discard(rec["index"])
            page = feature_page(rec, scan, explanations.get((layer, rec["index"])))
            (dest / f"{page['index']}.json").write_text(json.dumps(page))
            written += 1
            if todo is not None and not todo:
                break
        if todo:
            raise CircuitsError(f"layer {layer} of {str(features_dir)!r} has no feature(s) "
                                f"{sorted(todo)[:5]}")
    index_path = dest / INDEX_FILE
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    index.update({"scan": scan, "features_dir": str(Path(features_dir).resolve()),
                  "model": manifest.get("model"), "n_layers": manifest["n_layers"],
                  "d_sae": manifest["d_sae"]})
    index["n_pages"] = sum(1 for p in dest.glob("*.json") if p.name != INDEX_FILE)
    index_path.write_text(json.dumps(index, indent=1))
    return dest


def feature_page(
    rec: dict[str, Any], scan: str, explanation: dict[str, Any] | None
) -> dict[str, Any]:
    """One feature record of a features directory -> the viewer's feature JSON."""
    layer, index = rec["layer"], rec["index"]
    quantiles = []
    if rec["top_examples"]:
        quantiles.append({"quantile_name": "Top activations",
                          "examples": [_example(ex) for ex in rec["top_examples"]]})
    for q in rec.get("quantile_examples") or []:
        if q["examples"]:
            quantiles.append({
                "quantile_name": f"{q['name']} ({q['lo']:.3g} to {q['hi']:.3g})",
                "examples": [_example(ex) for ex in q["examples"]],
            })
    act_max = float(rec["max_act"]) if rec["max_act"] > 0 else 1.0
    histogram, percentiles = _histogram(rec.get("hist") or {}, act_max)
    page: dict[str, Any] = {
        "transcoder_id": scan,
        "index": cantor_pair(layer, index),
        "layer": layer,
        "feature": index,
        "examples_quantiles": quantiles,
        "top_logits": [_display(t) for t, _ in rec["top_logits"]],
        "bottom_logits": [_display(t) for t, _ in rec["bottom_logits"]],
        "act_min": 0.0,
        "act_max": act_max,
        "histogram": histogram,
        "quantile_values": percentiles,
        "activation_frequency": float(rec["frac_nonzero"]),
        # norm of the feature's decoder into each target layer j = layer, layer + 1, ...
        "decoder_norms": [float(x) for x in rec.get("decoder_norms") or []],
        "explanation": None,
    }
    if explanation:
        page["explanation"] = explanation.get("explanation")
        page["explanation_model"] = explanation.get("model")
        page["explanation_scores"] = explanation.get("scores")
    return page


def _display(token: str) -> str:
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def _example(ex: dict[str, Any]) -> dict[str, Any]:
    return {
        "tokens": [_display(t) for t in ex["tokens"]],
        "tokens_acts_list": [float(a) for a in ex["acts"]],
        "train_token_ind": int(ex["max_pos"]),
        "is_repeated_datapoint": False,
    }


def _histogram(hist: dict[str, Any], act_max: float) -> tuple[list[float], list[float]]:
    """Counts over [0, act_max] (the viewer's range) and 100 percentiles of the nonzero acts.

    The features directory bins nonzero activations between their own min and max; each bin's
    count moves to the viewer bin holding its centre, and percentiles interpolate linearly
    inside bins.
    """
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    n_bins = max(len(counts), 1)
    out = [0.0] * n_bins
    total = float(sum(counts))
    if not counts or total <= 0:
        return out, []
    for lo, hi, c in zip(edges, edges[1:], counts):
        centre = 0.5 * (lo + hi)
        b = min(n_bins - 1, max(0, int(centre / act_max * n_bins)))
        out[b] += float(c)
    percentiles = []
    cum, k = 0.0, 0
    for p in range(1, N_PERCENTILES + 1):
        target = total * p / N_PERCENTILES
        while k < len(counts) - 1 and cum + counts[k] < target:
            cum += counts[k]
            k += 1
        frac = 0.0 if counts[k] == 0 else min(1.0, max(0.0, (target - cum) / counts[k]))
        value = edges[k] + frac * (edges[k + 1] - edges[k])
        percentiles.append(float(value) if math.isfinite(value) else 0.0)
    return out, percentiles
