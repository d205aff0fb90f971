"""What ``clt-lens serve`` runs behind its intervention endpoint (``POST /api/intervene``).

- Every field of a request is checked before anything loads or runs (types, layer and feature
  ids against the transcoders' sizes, positions against the prompt, finite values, caps on the
  request size, prompt length, number of interventions and continuation length); a bad request
  is a ``WorkbenchError`` with status 400 and a message naming the field.
- The transcoders and model are the ones the graph's ``metadata.clt_lens`` names (written by
  ``attribute_prompt``), unless the server was started with ``--clt`` / ``--model``. Each
  (transcoders, model, device) is loaded once, by the first request that needs it; when that
  fails the answer is 503 with the reason.
- One request runs at a time per loaded model: another request for it meanwhile gets 429 "busy".
- The run is ``clt_lens.circuits.intervene``: the page shows what a Python call returns.
- Nothing is written into the served folder (a CLT checkpoint passes through a temporary
  circuit-tracer set in the system temp folder while it loads, as for attribution).
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

from clt_lens.circuits.errors import CircuitsError
from clt_lens.circuits.viewer_data import FEATURES_SUBDIR, cantor_pair, scan_dirname
from clt_lens.errors import CLTLensError
from clt_lens.fsutil import is_safe_name

LIMITS = {
    "max_request_bytes": 64 * 1024,
    "max_prompt_chars": 2000,
    "max_prompt_tokens": 256,
    "max_new_tokens": 64,
    "max_interventions": 256,
    "max_watch": 512,
}
DEFAULT_NEW_TOKENS = 10
UNITS = ("absolute", "max_activation")
_REQUEST_KEYS = ("slug", "prompt", "interventions", "freeze", "direct_only", "max_new_tokens",
                 "watch_graph_features")
_INTERVENTION_KEYS = ("layer", "feature", "position", "op", "value", "unit")
FEATURE_TYPE = "cross layer transcoder"


class WorkbenchError(CLTLensError):
    """A request the endpoint refuses: ``status`` is the HTTP status, ``message`` the reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bad(message: str) -> WorkbenchError:
    return WorkbenchError(400, message)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


class Workbench:
    """Loaded replacement models (one per source), their locks, and the request handling."""

    def __init__(
        self,
        data_dir: Path,
        *,
        read_only: bool = False,
        transcoders: str | None = None,
        model: str | None = None,
        device: str = "cpu",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.read_only = read_only
        self.transcoders_override = (str(Path(transcoders).expanduser().resolve())
                                     if transcoders else None)
        self.model_override = model
        self.device = device
        self._models: dict[tuple[str, str, str], Any] = {}
        self._locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._state: dict[tuple[str, str, str], str] = {}
        self._guard = threading.Lock()
        self._summaries: dict[str, dict[str, Any]] = {}

    # -- graphs and what they name ------------------------------------------------------------
    def graph(self, slug: Any) -> dict[str, Any]:
        if not isinstance(slug, str) or not is_safe_name(f"{slug}.json"):
            raise _bad(f"slug must name a graph of this folder, got {slug!r}")
        path = self.data_dir / f"{slug}.json"
        if not path.is_file():
            raise WorkbenchError(404, f"no graph {slug!r} in {self.data_dir}")
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise WorkbenchError(500, f"{path.name} is not valid JSON: {e}") from e

    def source(self, graph: dict[str, Any]) -> dict[str, Any]:
        """Transcoders, model and sizes for ``graph``; 503 when they cannot be named."""
        meta = graph.get("metadata") or {}
        rec = meta.get("clt_lens") or {}
        transcoders = self.transcoders_override or rec.get("transcoders")
        model = self.model_override or rec.get("model")
        slug = meta.get("slug", "?")
        if not transcoders:
            raise WorkbenchError(503, (
                f"graph {slug!r} does not name its transcoders (it was attributed from an "
                "in-memory CLT, or by an older clt_lens): start 'clt-lens serve' with "
                "--clt CHECKPOINT_OR_SET (and --model if needed)"))
        if not model:
            raise WorkbenchError(503, f"graph {slug!r} does not name its model: start "
                                      "'clt-lens serve' with --model NAME_OR_FOLDER")
        if not Path(transcoders).exists():
            raise WorkbenchError(503, (
                f"the transcoders of graph {slug!r} are not available: {transcoders!r} does not "
                "exist (moved?); start 'clt-lens serve' with --clt PATH"))
        if self.transcoders_override or "n_layers" not in rec:
            summary = self._summary(transcoders)
            n_layers, d_sae = summary["n_layers"], summary["d_sae"]
        else:
            n_layers, d_sae = int(rec["n_layers"]), int(rec["d_sae"])
        model_id = None if self.model_override else rec.get("model_id")
        return {"transcoders": transcoders, "model": str(model), "model_id": model_id,
                "n_layers": n_layers, "d_sae": d_sae,
                "key": (transcoders, str(model), self.device)}

    def _summary(self, transcoders: str) -> dict[str, Any]:
        if transcoders not in self._summaries:
            from clt_lens.circuits.attribution import source_summary

            try:
                self._summaries[transcoders] = source_summary(transcoders)
            except CLTLensError as e:  # CircuitsError, or CheckpointError from a CLT folder
                raise WorkbenchError(503, f"cannot read the transcoders {transcoders!r}: {e}") \
                    from e
        return self._summaries[transcoders]

    def status(self, slug: Any) -> dict[str, Any]:
        """What the page needs to know before offering interventions (nothing is loaded)."""
        graph = self.graph(slug)
        out: dict[str, Any] = {"slug": slug, "read_only": self.read_only, "limits": LIMITS,
                               "default_new_tokens": DEFAULT_NEW_TOKENS, "available": False,
                               "reason": None, "loaded": False, "busy": False}
        if self.read_only:
            out["reason"] = "this server runs with --read-only: interventions are disabled"
            return out
        try:
            src = self.source(graph)
        except WorkbenchError as e:
            out["reason"] = e.message
            return out
        key = src.pop("key")
        out.update(src, available=True, loaded=key in self._models,
                   busy=self._lock(key).locked())
        return out

    # -- requests -----------------------------------------------------------------------------
    def handle(self, raw: bytes) -> dict[str, Any]:
        """Run one ``POST /api/intervene`` body; raises WorkbenchError for refusals."""
        if self.read_only:
            raise WorkbenchError(403, "this server runs with --read-only: interventions are "
                                      "disabled")
        if len(raw) > LIMITS["max_request_bytes"]:
            raise WorkbenchError(413, f"request is {len(raw)} bytes; the limit is "
                                      f"{LIMITS['max_request_bytes']}")
        try:
            req = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"request body is not valid JSON: {e}") from e
        if not isinstance(req, dict):
            raise _bad("request body must be a JSON object")
        unknown = sorted(set(req) - set(_REQUEST_KEYS))
        if unknown:
            raise _bad(f"unknown field(s) {unknown}; expected {list(_REQUEST_KEYS)}")
        graph = self.graph(req.get("slug"))
        src = self.source(graph)
        opts = self._options(req)
        prompt = req.get("prompt")
        graph_ids = None
        if prompt is None:
            graph_ids = _graph_prompt_ids(graph)
        elif not isinstance(prompt, str) or not prompt.strip():
            raise _bad("prompt must be a non-empty string, or null for the graph's prompt")
        elif len(prompt) > LIMITS["max_prompt_chars"]:
            raise _bad(f"prompt is {len(prompt)} characters; the limit is "
                       f"{LIMITS['max_prompt_chars']}")
        ivs = self._interventions(req.get("interventions"), src, graph, graph_ids)
        watch: list[tuple[int, int, int]] = []
        if graph_ids is not None and opts["watch_graph_features"]:
            watch = _graph_features(graph)[: LIMITS["max_watch"]]
        logit_ids = _graph_logit_ids(graph)
        return self._run(src, graph, prompt, graph_ids, ivs, watch, logit_ids, opts)

    def _options(self, req: dict[str, Any]) -> dict[str, Any]:
        opts = {"freeze": req.get("freeze", True), "direct_only": req.get("direct_only", False),
                "watch_graph_features": req.get("watch_graph_features", True)}
        for name, flag in opts.items():
            if not isinstance(flag, bool):
                raise _bad(f"{name} must be true or false, got {flag!r}")
        n_new = req.get("max_new_tokens", DEFAULT_NEW_TOKENS)
        cap = LIMITS["max_new_tokens"]
        if not _is_int(n_new) or not 0 <= n_new <= cap:
            raise _bad(f"max_new_tokens must be an integer in [0, {cap}], got {n_new!r}")
        if opts["direct_only"] and not opts["freeze"]:
            raise _bad("direct_only freezes attention, norms and MLPs: it needs freeze true")
        opts["max_new_tokens"] = n_new
        return opts

    def _interventions(self, items: Any, src: dict[str, Any], graph: dict[str, Any],
                       graph_ids: list[int] | None) -> list[dict[str, Any]]:
        if not isinstance(items, list) or not items:
            raise _bad("interventions must be a non-empty list")
        if len(items) > LIMITS["max_interventions"]:
            raise _bad(f"{len(items)} interventions; the limit is "
                       f"{LIMITS['max_interventions']}")
        out = []
        for k, it in enumerate(items):
            where = f"intervention {k}"
            if not isinstance(it, dict):
                raise _bad(f"{where} must be an object")
            unknown = sorted(set(it) - set(_INTERVENTION_KEYS))
            if unknown:
                raise _bad(f"{where}: unknown field(s) {unknown}; expected "
                           f"{list(_INTERVENTION_KEYS)}")
            layer, feature = it.get("layer"), it.get("feature")
            if not _is_int(layer) or not 0 <= layer < src["n_layers"]:
                raise _bad(f"{where}: layer must be an integer in [0, {src['n_layers']}), "
                           f"got {layer!r}")
            if not _is_int(feature) or not 0 <= feature < src["d_sae"]:
                raise _bad(f"{where}: feature must be an integer in [0, {src['d_sae']}), "
                           f"got {feature!r}")
            pos = it.get("position", "all")
            if pos in ("all", None):
                pos = None
            elif not _is_int(pos):
                raise _bad(f"{where}: position must be a token index or \"all\", got {pos!r}")
            elif graph_ids is not None and not 0 < (pos if pos >= 0 else pos + len(graph_ids)) \
                    < len(graph_ids):
                raise _bad(f"{where}: position {pos} is not a token of the graph's prompt "
                           f"(1..{len(graph_ids) - 1}; 0 is BOS)")
            op = it.get("op", "ablate")
            if op not in ("ablate", "scale", "clamp"):
                raise _bad(f"{where}: op must be ablate, scale or clamp, got {op!r}")
            unit = it.get("unit", "absolute")
            if unit not in UNITS:
                raise _bad(f"{where}: unit must be one of {list(UNITS)}, got {unit!r}")
            value = it.get("value")
            if op == "ablate":
                if value not in (None, 0):
                    raise _bad(f"{where}: ablate takes no value")
                value = None
            elif not _is_number(value) or abs(value) > 1e6:
                raise _bad(f"{where}: {op} needs a finite number value (|value| <= 1e6), "
                           f"got {value!r}")
            row = {"layer": layer, "feature": feature, "position": pos, "op": op,
                   "value": value}
            if unit == "max_activation":
                if op != "clamp":
                    raise _bad(f"{where}: unit max_activation applies to clamp only")
                max_act = self._max_activation(graph, layer, feature, where)
                row["value"] = float(value) * max_act
                row["unit_value"] = {"multiple": value, "max_activation": max_act}
            out.append(row)
        return out

    def _max_activation(self, graph: dict[str, Any], layer: int, feature: int,
                        where: str) -> float:
        scan = (graph.get("metadata") or {}).get("scan")
        page = None
        if isinstance(scan, str):
            path = (self.data_dir / FEATURES_SUBDIR / scan_dirname(scan)
                    / f"{cantor_pair(layer, feature)}.json")
            if path.is_file():
                page = json.loads(path.read_text())
        if page is None:
            raise _bad(f"{where}: no feature page for layer {layer} feature {feature}, so its "
                       "maximum activation is unknown; give an absolute value (unit absolute)")
        if not page.get("activation_frequency") or not _is_number(page.get("act_max")):
            raise _bad(f"{where}: layer {layer} feature {feature} never fired in the feature "
                       "statistics; give an absolute value")
        return float(page["act_max"])

    # -- running ------------------------------------------------------------------------------
    def _lock(self, key: tuple[str, str, str]) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _load(self, src: dict[str, Any]) -> Any:
        key = src["key"]
        if key in self._models:
            return self._models[key]
        from clt_lens.circuits.attribution import load_replacement_model
        from clt_lens.models import load_model, model_id

        try:
            model = load_model(src["model"], device=self.device)
        except Exception as e:  # noqa: BLE001 - any load failure is reported, not raised
            raise WorkbenchError(503, f"cannot load model {src['model']!r}: "
                                      f"{type(e).__name__}: {e}") from e
        got = model_id(model)
        if src["model_id"] and got != src["model_id"]:
            raise WorkbenchError(503, (
                f"model {src['model']!r} loads as {got}, but the graph was attributed with "
                f"{src['model_id']}; start 'clt-lens serve' with --model pointing at that model"))
        try:
            rm = load_replacement_model(src["transcoders"], model, device=self.device)
        except Exception as e:  # noqa: BLE001
            raise WorkbenchError(503, f"cannot load transcoders {src['transcoders']!r} for "
                                      f"model {src['model']!r}: {type(e).__name__}: {e}") from e
        self._models[key] = rm
        return rm

    def _run(self, src: dict[str, Any], graph: dict[str, Any], prompt: str | None,
             graph_ids: list[int] | None, ivs: list[dict[str, Any]],
             watch: list[tuple[int, int, int]], logit_ids: list[int],
             opts: dict[str, Any]) -> dict[str, Any]:
        from clt_lens.circuits.intervention import Intervention, intervene, prompt_ids

        key = src["key"]
        lock = self._lock(key)
        if not lock.acquire(blocking=False):
            what = self._state.get(key, "running an intervention")
            raise WorkbenchError(429, f"busy: this model is {what} for another request; "
                                      "try again when it finishes")
        t0 = time.perf_counter()
        try:
            self._state[key] = "loading"
            rm = self._load(src)
            self._state[key] = "running an intervention"
            if prompt is None and not all(_is_int(i) for i in graph_ids):
                graph_ids = _retokenized_graph_prompt(rm, graph)
            try:
                tokens = prompt_ids(rm, graph_ids if prompt is None else prompt)
            except CircuitsError as e:
                raise _bad(str(e)) from e
            if prompt is not None and len(tokens) > LIMITS["max_prompt_tokens"]:
                raise _bad(f"prompt is {len(tokens)} tokens; the limit is "
                           f"{LIMITS['max_prompt_tokens']}")
            room = rm.cfg.n_ctx - len(tokens)
            n_new = min(opts["max_new_tokens"], room)
            try:
                result = intervene(
                    rm, tokens,
                    [Intervention(iv["layer"], iv["feature"], iv["position"], iv["op"],
                                  iv["value"]) for iv in ivs],
                    freeze=opts["freeze"], direct_only=opts["direct_only"],
                    max_new_tokens=n_new, logit_tokens=logit_ids, watch=watch)
            except CircuitsError as e:
                raise _bad(str(e)) from e
        finally:
            self._state.pop(key, None)
            lock.release()
        out = result.to_dict()
        for row, iv in zip(out["interventions"], ivs):
            if "unit_value" in iv:
                row["unit_value"] = iv["unit_value"]
        meta = graph.get("metadata") or {}
        for row in out["watched"]:
            row["node_id"] = f"{row['layer']}_{row['feature']}_{row['position']}"
        out.update(slug=meta.get("slug"), prompt=prompt, graph_prompt=prompt is None,
                   max_new_tokens=n_new, transcoders=src["transcoders"], model=src["model"],
                   request_seconds=time.perf_counter() - t0)
        return out


def _graph_prompt_ids(graph: dict[str, Any]) -> list[Any]:
    """The graph's prompt token ids (BOS first) as attribution recorded them; for graphs made
    before they were recorded, placeholders of the right length (``_retokenized_graph_prompt``
    fills them in once the tokenizer is loaded)."""
    meta = graph.get("metadata") or {}
    ids = (meta.get("clt_lens") or {}).get("prompt_ids")
    if isinstance(ids, list) and len(ids) >= 2 and all(_is_int(i) for i in ids):
        return ids
    tokens = meta.get("prompt_tokens")
    if not (isinstance(tokens, list) and len(tokens) >= 2 and isinstance(meta.get("prompt"), str)):
        raise _bad("this graph records neither its prompt's token ids nor its tokens: type the "
                   "prompt into the page, or attribute it again")
    return [None] * len(tokens)


def _retokenized_graph_prompt(rm: Any, graph: dict[str, Any]) -> list[int]:
    """Token ids of an older graph's prompt text, accepted only if they decode to exactly the
    tokens the graph lists."""
    meta = graph["metadata"]
    tok = rm.tokenizer
    ids = [int(i) for i in tok(meta["prompt"], add_special_tokens=False)["input_ids"]]
    if [tok.decode([i]) for i in ids] != meta["prompt_tokens"]:
        raise _bad("this graph does not record its prompt's token ids, and its prompt text "
                   "does not tokenize back to its tokens: type the prompt into the page, or "
                   "attribute it again")
    return ids


def _graph_features(graph: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(layer, feature, position) of the graph's feature nodes, most influential first."""
    nodes = [n for n in graph.get("nodes", []) if n.get("feature_type") == FEATURE_TYPE]
    nodes.sort(key=lambda n: n.get("influence") if _is_number(n.get("influence")) else 2.0)
    out = []
    for n in nodes:
        layer, feat, pos = (int(v) for v in str(n["node_id"]).split("_"))
        if pos > 0:
            out.append((layer, feat, pos))
    return out


def _graph_logit_ids(graph: dict[str, Any]) -> list[int]:
    """Token ids of the graph's output (logit) nodes, ``{n_layers + 1}_{token id}_{pos}``."""
    out = []
    for n in graph.get("nodes", []):
        if n.get("feature_type") == "logit":
            try:
                out.append(int(str(n["node_id"]).split("_")[1]))
            except (IndexError, ValueError):
                continue
    return out
