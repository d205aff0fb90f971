"""The features directory: names, reading, and a strict schema check.

Layout (written by ``clt-lens features``; read by autointerp, the exports and the viewer)::

    features_dir/
      features.json        manifest (MANIFEST_KEYS)
      layer_{l:02d}.jsonl  one feature per line, in index order, "layer" and "index" first
      autointerp.jsonl     appended by autointerp

A feature record holds ``frac_nonzero``, ``n_fired``, ``max_act``, ``mean_act`` (over firing
tokens), ``hist`` (histogram of nonzero activations), ``decoder_norms`` (one per target layer
j >= l), ``top_logits`` / ``bottom_logits`` (direct effect on the unembedding),
``top_examples``, ``quantile_examples``, ``negative_examples``. Fields beyond the shared
format, which readers may ignore: ``logits_hist`` (histogram of the feature's direct logit
effects over the vocabulary, used by the Neuronpedia export), ``contains`` on each quantile
bin (estimated fraction of held-out tokens whose activation lies in the bin) and, in the
manifest, ``layers`` (the source layers written) plus the example settings.

An example is ``{"token_ids", "tokens", "acts", "max_act", "max_pos"}``: a window of a held-out
sequence (BOS excluded), the feature's raw activation on every token (0 where it does not fire),
the window's maximum and its position.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clt_lens.errors import CLTLensError, MissingFileError

FORMAT_VERSION = 1
MANIFEST_FILE = "features.json"
AUTOINTERP_FILE = "autointerp.jsonl"
DEFAULT_SOURCESET = "clt"

MANIFEST_KEYS: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "model": str,
    "model_id": str,
    "checkpoint": str,
    "n_layers": int,
    "d_sae": int,
    "n_tokens": int,
    "context_size": int,
    "input_hook": str,
    "output_hook": str,
    "dataset": str,
    "split": str,
    "top_k": int,
    "n_quantiles": int,
    "sourceset": str,
    "tokenizer": str,
}
FEATURE_KEYS: dict[str, type | tuple[type, ...]] = {
    "layer": int,
    "index": int,
    "frac_nonzero": float,
    "n_fired": int,
    "max_act": float,
    "mean_act": float,
    "hist": dict,
    "decoder_norms": list,
    "top_logits": list,
    "bottom_logits": list,
    "top_examples": list,
    "quantile_examples": list,
    "negative_examples": list,
}
EXAMPLE_KEYS: dict[str, type | tuple[type, ...]] = {
    "token_ids": list,
    "tokens": list,
    "acts": list,
    "max_act": float,
    "max_pos": int,
}


class FeaturesFormatError(CLTLensError, ValueError):
    """A features directory or record does not follow the format; the message says where."""


def layer_file_name(layer: int) -> str:
    return f"layer_{layer:02d}.jsonl"


def read_manifest(features_dir: str | Path) -> dict[str, Any]:
    """The validated manifest of ``features_dir``."""
    path = Path(features_dir) / MANIFEST_FILE
    if not path.is_file():
        raise MissingFileError(
            f"{path} not found: is {features_dir} a directory written by 'clt-lens features'?"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FeaturesFormatError(f"{path}: not valid JSON ({e})") from None
    validate_manifest(manifest, where=str(path))
    return manifest


def manifest_layers(manifest: dict[str, Any]) -> list[int]:
    """The source layers that have a layer file (all layers unless the run chose some)."""
    return list(manifest.get("layers") or range(manifest["n_layers"]))


def iter_features(features_dir: str | Path, layer: int) -> Iterator[dict[str, Any]]:
    """Yield the feature records of one source layer, in index order."""
    path = Path(features_dir) / layer_file_name(layer)
    if not path.is_file():
        raise MissingFileError(f"{path} not found (layer {layer} of {features_dir})")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise FeaturesFormatError(f"{path}:{lineno}: not valid JSON ({e})") from None


def _check_types(obj: Any, keys: dict[str, Any], where: str) -> None:
    if not isinstance(obj, dict):
        raise FeaturesFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, typ in keys.items():
        if key not in obj:
            raise FeaturesFormatError(f"{where}: missing key {key!r}")
        value = obj[key]
        # JSON has one number type: an int is a valid float, a bool is not an int
        ok = isinstance(value, typ) and not isinstance(value, bool)
        if typ is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            raise FeaturesFormatError(
                f"{where}: {key!r} must be {getattr(typ, '__name__', typ)}, "
                f"got {type(value).__name__}"
            )


def validate_manifest(manifest: Any, *, where: str = MANIFEST_FILE) -> None:
    _check_types(manifest, MANIFEST_KEYS, where)
    if manifest["format_version"] != FORMAT_VERSION:
        raise FeaturesFormatError(
            f"{where}: format_version {manifest['format_version']} is not {FORMAT_VERSION}"
        )
    for key in ("n_layers", "d_sae", "context_size", "top_k"):
        if manifest[key] < 1:
            raise FeaturesFormatError(f"{where}: {key!r} must be >= 1, got {manifest[key]}")


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def validate_example(ex: Any, where: str, *, negative: bool = False) -> None:
    """Check one Example: types, equal lengths, and max_act/max_pos agreeing with acts."""
    _check_types(ex, EXAMPLE_KEYS, where)
    ids, toks, acts = ex["token_ids"], ex["tokens"], ex["acts"]
    if not ids:
        raise FeaturesFormatError(f"{where}: empty example")
    if not (len(ids) == len(toks) == len(acts)):
        raise FeaturesFormatError(
            f"{where}: token_ids/tokens/acts lengths differ ({len(ids)}, {len(toks)}, {len(acts)})"
        )
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise FeaturesFormatError(f"{where}: token_ids must be non-negative integers")
    if not all(isinstance(t, str) for t in toks):
        raise FeaturesFormatError(f"{where}: tokens must be strings")
    if not all(_is_num(a) and a >= 0 for a in acts):
        raise FeaturesFormatError(f"{where}: acts must be finite numbers >= 0")
    pos = ex["max_pos"]
    if not 0 <= pos < len(acts):
        raise FeaturesFormatError(f"{where}: max_pos {pos} outside the window of {len(acts)}")
    if ex["max_act"] != max(acts) or acts[pos] != ex["max_act"]:
        raise FeaturesFormatError(
            f"{where}: max_act {ex['max_act']} at max_pos {pos} disagrees with acts "
            f"(max {max(acts)}, acts[max_pos] {acts[pos]})"
        )
    if negative and ex["max_act"] != 0:
        raise FeaturesFormatError(f"{where}: a negative example must not fire (max_act 0)")


def _validate_hist(hist: Any, where: str) -> None:
    _check_types(hist, {"edges": list, "counts": list}, where)
    edges, counts = hist["edges"], hist["counts"]
    if not edges and not counts:
        return
    if len(edges) != len(counts) + 1:
        raise FeaturesFormatError(f"{where}: needs len(edges) == len(counts) + 1")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise FeaturesFormatError(f"{where}: edges must increase")
    if not all(isinstance(c, int) and c >= 0 for c in counts):
        raise FeaturesFormatError(f"{where}: counts must be non-negative integers")


def _validate_logits(rows: Any, where: str, *, descending: bool) -> None:
    if not isinstance(rows, list):
        raise FeaturesFormatError(f"{where}: must be a list")
    for r in rows:
        if not (isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) and _is_num(r[1])):
            raise FeaturesFormatError(f"{where}: rows must be [token_str, value], got {r!r}")
    values = [r[1] for r in rows]
    if values != sorted(values, reverse=descending):
        raise FeaturesFormatError(f"{where}: values must be sorted")


def validate_feature(
    rec: Any, *, n_layers: int, layer: int | None = None, d_sae: int | None = None,
    where: str = "feature",
) -> None:
    """Check a feature record against the format (types, lengths, orderings, consistency)."""
    _check_types(rec, FEATURE_KEYS, where)
    l, i = rec["layer"], rec["index"]
    where = f"{where} (layer {l}, index {i})"
    if layer is not None and l != layer:
        raise FeaturesFormatError(f"{where}: layer {l} in the file of layer {layer}")
    if not 0 <= l < n_layers or i < 0 or (d_sae is not None and i >= d_sae):
        raise FeaturesFormatError(f"{where}: layer/index out of range")
    if not 0.0 <= rec["frac_nonzero"] <= 1.0:
        raise FeaturesFormatError(f"{where}: frac_nonzero {rec['frac_nonzero']} not in [0, 1]")
    if len(rec["decoder_norms"]) != n_layers - l or not all(
        _is_num(x) and x >= 0 for x in rec["decoder_norms"]
    ):
        raise FeaturesFormatError(
            f"{where}: decoder_norms must hold {n_layers - l} non-negative numbers"
        )
    _validate_hist(rec["hist"], f"{where} hist")
    if sum(rec["hist"]["counts"]) != rec["n_fired"]:
        raise FeaturesFormatError(f"{where}: hist counts do not sum to n_fired")
    _validate_logits(rec["top_logits"], f"{where} top_logits", descending=True)
    _validate_logits(rec["bottom_logits"], f"{where} bottom_logits", descending=False)
    top = rec["top_examples"]
    for k, ex in enumerate(top):
        validate_example(ex, f"{where} top_examples[{k}]")
    maxima = [ex["max_act"] for ex in top]
    if maxima != sorted(maxima, reverse=True):
        raise FeaturesFormatError(f"{where}: top_examples not sorted by max_act")
    if (rec["n_fired"] == 0) != (not top):
        raise FeaturesFormatError(f"{where}: top_examples present iff the feature fired")
    if top and maxima[0] != rec["max_act"]:
        raise FeaturesFormatError(f"{where}: max_act differs from the first top example")
    if not top and rec["max_act"] != 0:
        raise FeaturesFormatError(f"{where}: a feature that never fired has max_act 0")
    for q, qbin in enumerate(rec["quantile_examples"]):
        wq = f"{where} quantile_examples[{q}]"
        _check_types(qbin, {"name": str, "lo": float, "hi": float, "examples": list}, wq)
        if qbin["hi"] < qbin["lo"]:
            raise FeaturesFormatError(f"{wq}: hi < lo")
        for k, ex in enumerate(qbin["examples"]):
            validate_example(ex, f"{wq} examples[{k}]")
            if not qbin["lo"] <= ex["max_act"] <= qbin["hi"]:
                raise FeaturesFormatError(f"{wq} examples[{k}]: max_act outside [lo, hi]")
    for k, ex in enumerate(rec["negative_examples"]):
        validate_example(ex, f"{where} negative_examples[{k}]", negative=True)


def validate_features_dir(features_dir: str | Path) -> dict[str, Any]:
    """Validate the manifest and every layer file; returns the manifest."""
    manifest = read_manifest(features_dir)
    n_layers, d_sae = manifest["n_layers"], manifest["d_sae"]
    for layer in manifest_layers(manifest):
        path = Path(features_dir) / layer_file_name(layer)
        expected = 0
        for rec in iter_features(features_dir, layer):
            validate_feature(rec, n_layers=n_layers, layer=layer, d_sae=d_sae, where=str(path))
            if rec["index"] != expected:
                raise FeaturesFormatError(
                    f"{path}: index {rec['index']} where {expected} was expected (index order)"
                )
            expected += 1
        if expected != d_sae:
            raise FeaturesFormatError(f"{path}: {expected} features, manifest says d_sae={d_sae}")
    return manifest
