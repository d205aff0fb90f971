"""``clt-lens upload``: send a features directory to Neuronpedia through the ``neuronpedia``
client (``FeatureRequest.upload_batch``, at most 128 features per call).

One Neuronpedia source per CLT source layer, ``{layer}-{sourceset}`` (e.g. ``0-clt``). Each
feature carries its density, top/bottom logits, activation examples (top examples, then the
quantile bins) and, when autointerp has run, its explanation. (The client's payload has no
field for explanation scores; they are in the bulk export, ``clt-lens features --neuronpedia``.)

Configuration, read from the environment as the ``neuronpedia`` package does:

- ``NEURONPEDIA_API_KEY``: the API key (or ``--api-key``; the package also honours
  ``neuronpedia.set_api_key``). Sent as the ``X-Api-Key`` header.
- ``USE_LOCALHOST=true``: the package's own switch to ``http://localhost:3000/api`` (read when
  the package is imported).
- ``NEURONPEDIA_BASE_URL`` (ours, or ``--base-url``): any other API root, e.g. a self-hosted
  Neuronpedia at ``http://host:3000/api``. The package has no setting for this, so it is set on
  the request object.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from clt_lens.cli_args import add_config_arguments, add_positionals, command_config
from clt_lens.errors import CLTLensError, InputError
from clt_lens.features.format import iter_features, manifest_layers, read_manifest
from clt_lens.features.neuronpedia import (
    MAX_FEATURES_PER_BATCH,
    load_explanations,
    source_id,
)

BASE_URL_ENV = "NEURONPEDIA_BASE_URL"
_SOURCE_RE = re.compile(r"^(\d+)-(.+)$")


class UploadError(CLTLensError, RuntimeError):
    """A request to Neuronpedia failed; the message names the source and batch."""


def feature_payload(
    rec: dict, *, model_id: str, source: str, explanation: dict | None
) -> Any:
    """A ``neuronpedia.np_feature.Feature`` built from one feature record."""
    from neuronpedia.np_activation import Activation
    from neuronpedia.np_explanation import Explanation
    from neuronpedia.np_feature import Feature, Logit

    index = int(rec["index"])
    activations = [
        Activation(modelId=model_id, source=source, index=index, tokens=ex["tokens"],
                   values=ex["acts"], quantileMax=float(rec["max_act"]))
        for ex in rec["top_examples"]
    ]
    for qbin in rec["quantile_examples"]:
        frac = qbin.get("contains")
        frac = None if frac is None else min(max(float(frac), 0.0), 1.0)
        activations += [
            Activation(modelId=model_id, source=source, index=index, tokens=ex["tokens"],
                       values=ex["acts"], quantileMax=float(qbin["hi"]),
                       quantileMin=float(qbin["lo"]), quantileFraction=frac)
            for ex in qbin["examples"]
        ]
    explanations = None
    if explanation is not None:
        explanations = [Explanation(
            modelId=model_id, source=source, index=index, text=explanation["explanation"],
            method=explanation.get("method"), explainer_model=explanation.get("model"),
        )]
    return Feature(
        modelId=model_id,
        source=source,
        index=index,
        density=float(rec["frac_nonzero"]),
        top_logits=[Logit(token=t, value=float(v)) for t, v in rec["top_logits"]],
        bottom_logits=[Logit(token=t, value=float(v)) for t, v in rec["bottom_logits"]],
        explanations=explanations,
        activations=activations,
    )


def _resolve_sources(
    manifest: dict, source: str | None, layers: list[int] | None
) -> list[tuple[int, str]]:
    have = manifest_layers(manifest)
    sourceset = manifest["sourceset"]
    if source:
        m = _SOURCE_RE.match(source)
        if m:  # one source, "{layer}-{sourceset}"
            layer = int(m.group(1))
            if layers is not None and layers != [layer]:
                raise InputError(f"--source {source} names layer {layer}; --layers {layers} "
                                 "disagrees")
            layers, sourceset = [layer], m.group(2)
        else:
            sourceset = source
    if "/" in sourceset or not sourceset:
        raise InputError(f"source set {sourceset!r} must be a non-empty name without '/'")
    chosen = have if layers is None else layers
    missing = [x for x in chosen if x not in have]
    if missing:
        raise InputError(f"layers {missing} have no statistics in this features directory "
                         f"(it holds layers {have})")
    return [(layer, source_id(layer, sourceset)) for layer in chosen]


def _request(api_key: str | None, base_url: str | None) -> Any:
    from neuronpedia.requests.base_request import NPKeyMissingError
    from neuronpedia.requests.feature_request import FeatureRequest

    try:
        request = FeatureRequest(api_key=api_key)
    except NPKeyMissingError:
        raise InputError(
            "no Neuronpedia API key: set NEURONPEDIA_API_KEY (or pass --api-key)"
        ) from None
    base_url = base_url or os.environ.get(BASE_URL_ENV)
    if base_url:
        if not base_url.startswith(("http://", "https://")):
            raise InputError(f"base URL {base_url!r} must start with http:// or https://")
        request.BASE_URL = base_url.rstrip("/")
    return request


def _send(request: Any, model_id: str, layer: int, src: str, batch: list[Any], k: int) -> None:
    if request is None:  # dry run
        return
    try:
        # the client prints a line per request; the progress bar says the same
        with contextlib.redirect_stdout(io.StringIO()):
            request.upload_batch(model_id, src, batch)
    except Exception as e:
        raise UploadError(
            f"uploading batch {k} of source {src} ({len(batch)} features) to "
            f"{request.BASE_URL} failed: {type(e).__name__}: {e}. Batches before it were "
            f"sent; rerun with --layers {layer} to redo this source."
        ) from e


def upload_features(
    features_dir: str | Path,
    *,
    model_id: str | None = None,
    source: str | None = None,
    layers: list[int] | None = None,
    api_key: str | None = None,
    base_url: str | None = None,
    batch_size: int = MAX_FEATURES_PER_BATCH,
    explanations: bool = True,
    dry_run: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Upload every feature of the chosen source layers; returns a summary.

    ``source``: a source set name (one source per layer, ``{layer}-{source}``) or one source
    ``{layer}-{set}``; default the manifest's sourceset. ``dry_run`` builds every payload and
    sends nothing.
    """
    if not 1 <= batch_size <= MAX_FEATURES_PER_BATCH:
        raise InputError(f"batch_size must be in [1, {MAX_FEATURES_PER_BATCH}], got {batch_size}")
    manifest = read_manifest(features_dir)
    model_id = model_id or manifest["model"]
    if not model_id or "/" in model_id:
        raise InputError(f"model id {model_id!r} must be a non-empty name without '/'")
    sources = _resolve_sources(manifest, source, layers)
    request = None if dry_run else _request(api_key, base_url)
    expl = load_explanations(features_dir) if explanations else {}
    total = manifest["d_sae"] * len(sources)
    summary: dict[str, Any] = {"model_id": model_id, "sources": {}, "requests": 0,
                               "features": 0, "dry_run": dry_run}
    bar = tqdm(total=total, unit="feat", desc="upload", disable=not progress)
    for layer, src in sources:
        batch: list[Any] = []
        n_batches = 0
        for rec in iter_features(features_dir, layer):
            batch.append(feature_payload(rec, model_id=model_id, source=src,
                                         explanation=expl.get((layer, rec["index"]))))
            if len(batch) == batch_size:
                _send(request, model_id, layer, src, batch, n_batches)
                n_batches += 1
                bar.update(len(batch))
                summary["features"] += len(batch)
                batch = []
        if batch:
            _send(request, model_id, layer, src, batch, n_batches)
            n_batches += 1
            bar.update(len(batch))
            summary["features"] += len(batch)
        summary["sources"][src] = n_batches
        summary["requests"] += n_batches
    bar.close()
    return summary


# ----------------------------------------------------------------------------------------------
# CLI


@dataclass
class UploadConfig:
    features_dir: str  # directory written by 'clt-lens features'
    model_id: str | None = None  # Neuronpedia model id; default: the manifest's model
    # source set name (default: the manifest's sourceset), or one source '{layer}-{set}'
    source: str | None = None
    layers: list[int] | None = None  # source layers to send (comma-separated); default: all
    api_key: str | None = None  # default: $NEURONPEDIA_API_KEY; never written to any file
    # API root, e.g. http://localhost:3000/api; default: $NEURONPEDIA_BASE_URL, else the
    # neuronpedia package's
    base_url: str | None = None
    batch_size: int = MAX_FEATURES_PER_BATCH  # features per request (Neuronpedia's limit: 128)
    explanations: bool = True  # send autointerp explanations
    dry_run: bool = False  # build the payloads, send nothing


CONFIG = UploadConfig
POSITIONALS = ("features_dir",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Upload a features directory to Neuronpedia (one source per CLT source layer, "
        "'{layer}-{sourceset}'). Environment: NEURONPEDIA_API_KEY (required), USE_LOCALHOST=true "
        "(the neuronpedia package's switch to http://localhost:3000/api), NEURONPEDIA_BASE_URL "
        "(any other API root)."
    )
    parser.usage = "clt-lens upload [CONFIG.yaml] FEATURES_DIR [--field value ...]"
    add_positionals(parser, *POSITIONALS)
    add_config_arguments(parser, UploadConfig)
    # the first CLI's switch; its meaning is inverted, so it is an alias, not a renamed key
    parser.add_argument("--no-explanations", dest="explanations", action="store_const",
                        const=False, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def load(args: argparse.Namespace, extra: Sequence[str]) -> UploadConfig:
    return command_config(UploadConfig, args, extra, "upload", POSITIONALS)


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    cfg = load(args, extra)
    try:
        summary = upload_features(**dataclasses.asdict(cfg))
    except UploadError as e:
        print(f"clt-lens upload: {e}")
        return 1
    verb = "would send" if summary["dry_run"] else "sent"
    print(f"{verb} {summary['features']} features of model {summary['model_id']} in "
          f"{summary['requests']} requests: " + ", ".join(
              f"{s} ({n})" for s, n in summary["sources"].items()))
    return 0
