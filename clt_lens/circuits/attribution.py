"""Attribution graphs for one prompt with circuit-tracer, written for its viewer.

``attribute_prompt`` checks every input first (prompt length, CLT sizes against the model,
targets), then: CLT -> circuit-tracer transcoder set (``export``) -> offline ReplacementModel
(``replacement``) -> ``circuit_tracer.attribute`` -> ``{slug}.pt`` (the unpruned graph) ->
replacement/completeness scores -> ``create_graph_files`` (``{slug}.json`` +
``graph-metadata.json``) -> our fixes to that JSON (``graph_json``: unique error-node ids,
explanations as ``clerp`` labels) -> viewer feature pages for the graph's features
(``viewer_data``) when a features directory is given.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import re
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from clt_lens.circuits.errors import CircuitsError
from clt_lens.circuits.export import default_scan, write_circuit_tracer_set
from clt_lens.circuits.graph_json import add_clerps, feature_nodes, fix_error_node_ids
from clt_lens.circuits.loading import clt_summary, is_transcoder_set_dir, load_clt, load_transcoders
from clt_lens.circuits.replacement import (
    REPLACEMENT_MLP_HOOKS,
    build_replacement_model,
    check_family,
)
from clt_lens.clt.activations import REGISTRY as ACTIVATION_REGISTRY
from clt_lens.clt.loading import check_fits, model_for
from clt_lens.fsutil import atomic_path

OFFLOAD_CHOICES = (None, "cpu", "disk")
SOURCE_KEY = "clt_lens"  # graph metadata naming the transcoders and model (see source_record)
_SLUG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclasses.dataclass
class AttributionResult:
    """What ``attribute_prompt`` wrote and measured."""

    slug: str
    prompt: str
    scan: str
    out_dir: Path
    graph_path: Path  # unpruned circuit-tracer Graph (.pt)
    json_path: Path  # pruned graph for the viewer / Neuronpedia
    metadata_path: Path  # graph-metadata.json listing the graphs of out_dir
    n_tokens: int  # including the BOS circuit-tracer ignores
    n_active_features: int
    n_feature_nodes: int  # features attributed (at most max_feature_nodes)
    n_nodes: int  # nodes of the pruned JSON graph
    n_edges: int
    n_error_nodes_renamed: int
    n_labelled: int  # feature nodes that got an explanation as clerp
    replacement_score: float
    completeness_score: float
    logit_targets: list[tuple[str, float]]  # (token, probability)
    attribution_seconds: float
    total_seconds: float
    viewer_features_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def transcoder_set_summary(set_dir: str | Path) -> dict[str, Any]:
    """Sizes and hooks of a circuit-tracer set folder, from config.yaml and tensor headers."""
    import yaml
    from safetensors import safe_open

    d = Path(set_dir).expanduser().resolve()
    config = yaml.safe_load((d / "config.yaml").read_text()) or {}
    kind = config.get("model_kind")
    if kind == "cross_layer_transcoder":
        first, key, count_glob = d / "W_enc_0.safetensors", "W_enc_0", "W_enc_*.safetensors"
    elif kind == "transcoder_set":
        first, key, count_glob = d / "layer_0.safetensors", "W_enc", "layer_*.safetensors"
    else:
        raise CircuitsError(f"{d / 'config.yaml'}: unknown model_kind {kind!r}")
    if not first.is_file():
        raise CircuitsError(f"transcoder set {str(d)!r} has no {first.name}")
    with safe_open(str(first), framework="pt") as f:
        n_feat, d_model = f.get_slice(key).get_shape()
    for hook in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(config.get(hook), str):
            raise CircuitsError(f"{d / 'config.yaml'}: missing {hook!r}")
    return {
        "n_layers": len(list(d.glob(count_glob))),
        "d_model": d_model,
        "d_sae": n_feat,
        "activation": None,
        "cross_layer": kind == "cross_layer_transcoder",
        "skip": False,
        "input_hook": config["feature_input_hook"],
        "output_hook": config["feature_output_hook"],
        "model_name": config.get("model_name"),
        "scan": config.get("scan") or str(d),
        "source": str(d),
    }


def source_summary(clt_checkpoint_or_clt: Any) -> dict[str, Any]:
    """Sizes and hooks of a CLT object, CLT checkpoint or circuit-tracer set, without weights."""
    if is_transcoder_set_dir(clt_checkpoint_or_clt):
        return transcoder_set_summary(clt_checkpoint_or_clt)
    return clt_summary(clt_checkpoint_or_clt)


def load_circuit_tracer_transcoders(
    clt_checkpoint_or_clt: Any, summary: dict[str, Any], model: Any, scan: str | None = None
) -> tuple[Any, str]:
    """circuit-tracer transcoders (on the model's device and dtype) and their scan name.

    A set folder is loaded as is; a CLT (object or checkpoint) is exported to a temporary set
    first, with its normalisation folded in.
    """
    dtype, device = model.cfg.dtype, model.cfg.device
    if is_transcoder_set_dir(clt_checkpoint_or_clt):
        transcoders, _ = load_transcoders(clt_checkpoint_or_clt, device=device, dtype=dtype)
        scan = scan or summary["scan"]
    else:
        clt = load_clt(clt_checkpoint_or_clt)
        source = clt_checkpoint_or_clt if isinstance(clt_checkpoint_or_clt, str | Path) else None
        scan = scan or default_scan(clt, clt.cfg.metadata.model_name or model.cfg.model_name,
                                    source)
        with tempfile.TemporaryDirectory(prefix="clt-lens-ct-") as tmp:
            set_dir = write_circuit_tracer_set(clt, Path(tmp) / "set", dtype=torch.float32,
                                               scan=scan)
            transcoders, _ = load_transcoders(set_dir, device=device, dtype=dtype)
    transcoders.scan = scan
    return transcoders, scan


def model_reference(model: Any, ht: Any) -> str | None:
    """What ``load_model`` needs to load ``ht`` again: the name or folder it came from."""
    if isinstance(model, str | Path):
        path = Path(model).expanduser()
        return str(path.resolve()) if path.exists() else str(model)
    from clt_lens.models import EMBEDDED_MODELS

    if ht.cfg.model_name in EMBEDDED_MODELS:
        return ht.cfg.model_name
    folder = ht.cfg.tokenizer_name
    if folder and (Path(folder) / "config.json").is_file():
        return str(Path(folder).resolve())
    return ht.cfg.model_name or None


def source_record(
    clt_checkpoint_or_clt: Any, summary: dict[str, Any], model: Any, ht: Any
) -> dict[str, Any]:
    """``metadata.clt_lens`` of a graph: where its transcoders and model can be loaded from
    (``clt-lens serve`` loads them for interventions), with sizes to validate requests."""
    from clt_lens.models import model_id

    transcoders = kind = None  # an in-memory CLT: nothing on disk to name
    if isinstance(clt_checkpoint_or_clt, str | Path):
        transcoders = summary.get("source") or str(Path(clt_checkpoint_or_clt).resolve())
        kind = "circuit_tracer_set" if "scan" in summary else "clt_checkpoint"
    return {
        "transcoders": transcoders,
        "transcoders_kind": kind,
        "model": model_reference(model, ht),
        "model_id": model_id(ht),
        "n_layers": int(summary["n_layers"]),
        "d_sae": int(summary["d_sae"]),
    }


def default_slug(prompt: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-").lower()[:40].strip("-") or "prompt"
    return f"{words}-{hashlib.sha1(prompt.encode()).hexdigest()[:6]}"


def _check_args(
    prompt: Any, max_n_logits: Any, desired_logit_prob: Any, batch_size: Any,
    max_feature_nodes: Any, offload: Any, node_threshold: Any, edge_threshold: Any, slug: Any,
) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise CircuitsError(f"prompt must be a non-empty string, got {prompt!r}")
    for name, value in (("max_n_logits", max_n_logits), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CircuitsError(f"{name} must be a positive integer, got {value!r}")
    if max_feature_nodes is not None and (
        isinstance(max_feature_nodes, bool) or not isinstance(max_feature_nodes, int)
        or max_feature_nodes < 1
    ):
        raise CircuitsError(f"max_feature_nodes must be a positive integer or None, "
                            f"got {max_feature_nodes!r}")
    if not isinstance(desired_logit_prob, int | float) or not 0 < desired_logit_prob <= 1:
        raise CircuitsError(f"desired_logit_prob must be in (0, 1], got {desired_logit_prob!r}")
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not isinstance(value, int | float) or not 0 <= value <= 1:
            raise CircuitsError(f"{name} must be in [0, 1], got {value!r}")
    if offload not in OFFLOAD_CHOICES:
        raise CircuitsError(f"offload must be one of {list(OFFLOAD_CHOICES)}, got {offload!r}")
    if slug is not None and (not isinstance(slug, str) or not _SLUG_RE.match(slug)):
        raise CircuitsError(
            f"slug {slug!r} must be 1-128 characters of letters, digits, '.', '_' or '-' "
            "(it names the graph files)"
        )


def _check_fit(summary: dict[str, Any], model: Any, what: str) -> None:
    check_family(model)
    check_fits(model, summary["n_layers"], summary["d_model"], what, error=CircuitsError,
               hooks=(summary["input_hook"], summary["output_hook"]),
               extra_hooks=REPLACEMENT_MLP_HOOKS)
    name = summary.get("activation")  # None: a circuit-tracer set
    act = ACTIVATION_REGISTRY.get(name) if isinstance(name, str) else None
    if act is not None and act.circuit_tracer_activation is None:
        raise CircuitsError(
            f"{what} uses {act.label}, which circuit-tracer cannot run; convert it with "
            "clt_lens.clt.convert_topk_to_jumprelu first"
        )
    if summary.get("cross_layer") and summary.get("skip"):
        raise CircuitsError(
            f"{what} is a cross-layer CLT with a skip connection: circuit-tracer 0.5.0 cannot "
            "load its W_skip"
        )


def tokenize_prompt(model: Any, prompt: str) -> torch.Tensor:
    """Prompt -> 1-D token ids with a leading special token, as circuit-tracer attributes them.

    circuit-tracer prepends one itself but picks it with ``filter(None, ids)``, which skips id 0
    (this repo's BOS), so the BOS is added here and circuit-tracer then leaves the ids alone.
    """
    tok = model.tokenizer
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise CircuitsError(f"prompt {prompt!r} tokenizes to no tokens")
    special = next(
        (i for i in (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) if i is not None), None
    )
    if special is None:
        raise CircuitsError("the tokenizer has no BOS/PAD/EOS token to start the prompt with")
    if ids[0] != special:
        ids = [special, *ids]
    if len(ids) > model.cfg.n_ctx:
        raise CircuitsError(
            f"prompt is {len(ids)} tokens (with BOS) but the model's context is "
            f"n_ctx={model.cfg.n_ctx}"
        )
    return torch.tensor(ids, dtype=torch.long, device=model.cfg.device)


def check_targets(model: Any, targets: Sequence[str] | None) -> list[str] | None:
    """Each target must be exactly one token of the model's tokenizer."""
    if targets is None:
        return None
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise CircuitsError(f"targets must be a list of token strings, got {targets!r}")
    for t in targets:
        ids = model.tokenizer.encode(t, add_special_tokens=False)
        if len(ids) != 1:
            raise CircuitsError(
                f"target {t!r} is {len(ids)} tokens {ids} for this tokenizer; a target must be "
                "exactly one token (mind the leading space, e.g. ' king')"
            )
    return list(targets) or None


def attribute_prompt(
    clt_checkpoint_or_clt: Any,
    prompt: str,
    *,
    model: Any = "embedded",
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 256,
    max_feature_nodes: int | None = None,
    offload: str | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    out_dir: str | Path,
    slug: str | None = None,
    features_dir: str | Path | None = None,
    targets: Sequence[str] | None = None,
    scan: str | None = None,
    device: str | torch.device = "cpu",
    verbose: bool = False,
) -> AttributionResult:
    """Attribution graph of ``prompt`` through a CLT, written to ``out_dir`` for the viewer.

    ``clt_checkpoint_or_clt``: a CrossLayerTranscoder, a CLT checkpoint (SAELens folder or run
    directory) or an exported circuit-tracer set folder. ``model``: a ``load_model`` name/path or
    a loaded HookedTransformer. ``targets``: optional single-token strings to attribute instead
    of the most likely next tokens. Other arguments are circuit-tracer's (``attribute``,
    ``prune_graph``). Returns an ``AttributionResult``.
    """
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores
    from circuit_tracer.utils import create_graph_files

    t_start = time.perf_counter()
    _check_args(prompt, max_n_logits, desired_logit_prob, batch_size, max_feature_nodes,
                offload, node_threshold, edge_threshold, slug)
    if out_dir is None:
        raise CircuitsError("out_dir is required")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise CircuitsError(f"out_dir {str(out)!r} is a file")
    if features_dir is not None and not Path(features_dir).is_dir():
        raise CircuitsError(f"features directory {str(features_dir)!r} does not exist")

    summary = source_summary(clt_checkpoint_or_clt)
    what = f"CLT {summary['source']}" if summary.get("source") else "the CLT"

    if features_dir is not None:
        from clt_lens.circuits.viewer_data import check_features_dir

        check_features_dir(features_dir, n_layers=summary["n_layers"], d_sae=summary["d_sae"])
    ht, _ = model_for(None, model, device)
    _check_fit(summary, ht, what)
    if max_n_logits > ht.cfg.d_vocab:
        raise CircuitsError(f"max_n_logits={max_n_logits} exceeds the vocabulary "
                            f"(d_vocab={ht.cfg.d_vocab})")
    target_list = check_targets(ht, targets)
    tokens = tokenize_prompt(ht, prompt)
    slug = slug or default_slug(prompt)

    # Heavy work starts here.
    transcoders, scan = load_circuit_tracer_transcoders(clt_checkpoint_or_clt, summary, ht, scan)
    rm = build_replacement_model(ht, transcoders)

    # circuit-tracer runs the prompt batch_size times in parallel whatever the number of rows it
    # fills; with a node cap below batch_size, the extra copies only cost time.
    if max_feature_nodes is not None:
        n_logit_rows = len(target_list) if target_list else max_n_logits
        batch_size = min(batch_size, max(max_feature_nodes, n_logit_rows))
    with warnings.catch_warnings():
        # Emitted on every backward pass by circuit-tracer's hooks; harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        t0 = time.perf_counter()
        graph = attribute(
            tokens, rm,
            attribution_targets=target_list,
            max_n_logits=max_n_logits,
            desired_logit_prob=desired_logit_prob,
            batch_size=batch_size,
            max_feature_nodes=max_feature_nodes,
            offload=offload,
            verbose=verbose,
        )
        attribution_seconds = time.perf_counter() - t0
    rm.reset_hooks(including_permanent=True)
    del rm
    gc.collect()
    graph.scan = scan

    out.mkdir(parents=True, exist_ok=True)
    graph_path = out / f"{slug}.pt"
    _atomic(graph_path, lambda p: graph.to_pt(str(p)))
    replacement, completeness = compute_graph_scores(graph)
    create_graph_files(graph, slug, str(out), scan=scan, node_threshold=node_threshold,
                       edge_threshold=edge_threshold)
    json_path = out / f"{slug}.json"
    data = json.loads(json_path.read_text())
    n_renamed = fix_error_node_ids(data, graph, node_threshold, edge_threshold)
    data["metadata"][SOURCE_KEY] = {**source_record(clt_checkpoint_or_clt, summary, model, ht),
                                    "prompt_ids": [int(t) for t in tokens]}

    n_labelled = 0
    viewer_dir = None
    if features_dir is not None:
        from clt_lens.circuits.viewer_data import read_explanations, write_viewer_features

        n_labelled = add_clerps(data, read_explanations(features_dir))
        graph_features = sorted(feature_nodes(data))
        viewer_dir = write_viewer_features(features_dir, out, scan, features=graph_features)
    _atomic(json_path, lambda p: p.write_text(json.dumps(data, indent=1)))

    result = AttributionResult(
        slug=slug,
        prompt=prompt,
        scan=scan,
        out_dir=out,
        graph_path=graph_path,
        json_path=json_path,
        metadata_path=out / "graph-metadata.json",
        n_tokens=len(tokens),
        n_active_features=int(graph.active_features.shape[0]),
        n_feature_nodes=int(len(graph.selected_features)),
        n_nodes=len(data["nodes"]),
        n_edges=len(data["links"]),
        n_error_nodes_renamed=n_renamed,
        n_labelled=n_labelled,
        replacement_score=float(replacement),
        completeness_score=float(completeness),
        logit_targets=[(t.token_str, float(p)) for t, p in
                       zip(graph.logit_targets, graph.logit_probabilities.tolist())],
        attribution_seconds=attribution_seconds,
        total_seconds=time.perf_counter() - t_start,
        viewer_features_dir=viewer_dir,
    )
    _atomic(out / f"{slug}.summary.json",
            lambda p: p.write_text(json.dumps(result.to_dict(), indent=1)))
    return result


def _atomic(path: Path, write: Any) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def load_replacement_model(
    transcoders: Any, model: Any = "embedded", *, device: str | torch.device = "cpu"
) -> Any:
    """circuit-tracer ``ReplacementModel`` from a CLT (object, checkpoint folder or training
    run) or a circuit-tracer set folder, and a model (a ``load_model`` name/path or a loaded
    HookedTransformer). Sizes and hooks are checked against the model before weights are read.
    """
    summary = source_summary(transcoders)
    what = f"CLT {summary['source']}" if summary.get("source") else "the CLT"
    ht, _ = model_for(None, model, device)
    _check_fit(summary, ht, what)
    tcs, _ = load_circuit_tracer_transcoders(transcoders, summary, ht)
    return build_replacement_model(ht, tcs)
