"""A resumable autointerp run: explain and score features with bounded concurrency.

Worker threads (``concurrency`` of them) each take one feature at a time and send its
requests in turn (explanation, then each scorer). Only the main thread writes
autointerp.jsonl, one fsynced line per finished feature, so after a crash every complete
line is a finished feature and a new run skips it without sending anything for it.
A feature cut short (budget, fatal error, Ctrl-C, kill, or retries running out on 429/5xx/
timeouts) leaves no record and is redone by the next run; a verdict on the feature itself
(unparseable answer, a request the server refuses with 4xx) is recorded as "failed" and
redone only with ``retry_failed``. After ``max_consecutive_failures`` features in a row
gave up on retries, the server is taken to be down and the run stops.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from clt_lens.autointerp.client import (
    Budget,
    BudgetExhausted,
    ChatClient,
    FatalAPIError,
    Meter,
    RequestFailed,
    RetryPolicy,
    RunStopped,
    Tally,
    resolve_endpoint,
)
from clt_lens.autointerp.config import DEFAULT_SCORERS, AutointerpConfig
from clt_lens.autointerp.examples import split_examples
from clt_lens.autointerp.explainer import explain_feature, truncate_raw
from clt_lens.autointerp.featuredir import FeaturesDir
from clt_lens.autointerp.prompts import EXPLAIN_METHOD
from clt_lens.autointerp.records import (
    SUMMARY_FILE,
    RecordWriter,
    latest_records,
    write_json_atomic,
)
from clt_lens.autointerp.scorers import SCORE_KEYS, score_feature
from clt_lens.config import build_config, config_to_dict
from clt_lens.errors import InputError


def run_autointerp(
    features_dir: str | Path,
    *,
    model: str,
    api_key: str | None = None,
    base_url: str | None = None,
    layers: Sequence[int] | None = None,
    features: Iterable[tuple[int, int] | str] | None = None,
    max_features: int | None = None,
    concurrency: int = 4,
    max_requests: int | None = None,
    max_tokens_budget: int | None = None,
    timeout: float = 30.0,
    max_retries: int = 5,
    seed: int = 0,
    scorers: Sequence[str] = DEFAULT_SCORERS,
    price_per_1k_input: float | None = None,
    price_per_1k_output: float | None = None,
    retry_failed: bool = False,
    temperature: float | None = 0.0,
    max_output_tokens: int | None = None,
    retry_base_delay: float = 1.0,
    retry_max_delay: float = 60.0,
    max_retry_after: float = 120.0,
    max_consecutive_failures: int = 5,
    n_explain_top: int = 10,
    n_explain_quantile: int = 5,
    n_score_positive: int = 10,
    n_score_negative: int = 10,
    progress: bool = True,
) -> dict[str, Any]:
    """Explain and score the features in ``features_dir``; returns the run summary (also
    written to ``autointerp_summary.json``). Results are appended to ``autointerp.jsonl``.

    The model, API key and base URL come from the arguments or OPENAI_API_KEY /
    OPENAI_BASE_URL; any OpenAI-compatible chat-completions server works (vLLM, Ollama).
    Features already recorded for this model are skipped (``retry_failed`` redoes failed
    ones). ``features`` takes (layer, index) pairs or "layer:index" strings.
    """
    feature_strs = None
    if features is not None:
        feature_strs = [f if isinstance(f, str) else f"{int(f[0])}:{int(f[1])}" for f in features]
    cfg = build_config(
        AutointerpConfig,
        {
            "model": model, "api_key": api_key, "base_url": base_url,
            "layers": None if layers is None else list(layers), "features": feature_strs,
            "max_features": max_features, "retry_failed": retry_failed,
            "concurrency": concurrency, "max_requests": max_requests,
            "max_tokens_budget": max_tokens_budget, "timeout": timeout,
            "max_retries": max_retries, "retry_base_delay": retry_base_delay,
            "retry_max_delay": retry_max_delay, "max_retry_after": max_retry_after,
            "max_consecutive_failures": max_consecutive_failures,
            "seed": seed, "scorers": list(scorers), "temperature": temperature,
            "max_output_tokens": max_output_tokens, "price_per_1k_input": price_per_1k_input,
            "price_per_1k_output": price_per_1k_output, "n_explain_top": n_explain_top,
            "n_explain_quantile": n_explain_quantile, "n_score_positive": n_score_positive,
            "n_score_negative": n_score_negative,
        },
    )
    return run_with_config(features_dir, cfg, progress=progress)


class _Selection:
    """Which features this run covers, in (layer, index) order."""

    def __init__(self, fdir: FeaturesDir, cfg: AutointerpConfig) -> None:
        ids = cfg.feature_ids()
        layers = list(range(fdir.n_layers)) if cfg.layers is None else sorted(set(cfg.layers))
        for layer in layers:
            if layer >= fdir.n_layers:
                raise InputError(
                    f"config key 'layers': layer {layer} is out of range "
                    f"(the features directory has n_layers={fdir.n_layers})"
                )
        self.wanted: dict[int, set[int]] | None = None
        if ids is not None:
            for layer, index in ids:
                if layer >= fdir.n_layers or index >= fdir.d_sae:
                    raise InputError(
                        f"config key 'features': {layer}:{index} is out of range "
                        f"(n_layers={fdir.n_layers}, d_sae={fdir.d_sae})"
                    )
            self.wanted = {}
            for layer, index in ids:
                if layer in layers:
                    self.wanted.setdefault(layer, set()).add(index)
            layers = sorted(self.wanted)
        self.layers = layers
        if self.wanted is not None:
            self.total = sum(len(v) for v in self.wanted.values())
        else:
            self.total = fdir.d_sae * len(layers)
        if cfg.max_features is not None:
            self.total = min(self.total, cfg.max_features)

    def includes(self, layer: int, index: int) -> bool:
        return self.wanted is None or index in self.wanted.get(layer, ())


def _has_activations(feature: dict) -> bool:
    if feature.get("n_fired") == 0:
        return False
    groups = [feature.get("top_examples") or []]
    groups += [q.get("examples") or [] for q in feature.get("quantile_examples") or []]
    return any(isinstance(ex, dict) and (ex.get("max_act") or 0) > 0 for g in groups for ex in g)


class _Run:
    def __init__(self, cfg: AutointerpConfig, chat: ChatClient) -> None:
        self.cfg, self.chat = cfg, chat

    def record(self, layer: int, index: int, tally: Tally, *, status: str,
               explanation: str | None = None, scores: dict | None = None,
               error: str | None = None) -> dict:
        return {
            "layer": layer, "index": index, "status": status, "explanation": explanation,
            "method": EXPLAIN_METHOD, "model": self.cfg.model, "scores": scores or {},
            "usage": tally.as_dict(), "error": error,
        }

    def process(self, feature: dict) -> dict:
        """One feature's record. Raises RequestFailed (transient: retries ran out) or
        BudgetExhausted / FatalAPIError / RunStopped (the run must stop): the feature is
        then unfinished, gets no record, and the next run tries it again."""
        layer, index = int(feature["layer"]), int(feature["index"])
        cfg, tally = self.cfg, Tally()
        try:
            split = split_examples(
                feature, seed=cfg.seed, n_explain_top=cfg.n_explain_top,
                n_explain_quantile=cfg.n_explain_quantile,
                n_score_positive=cfg.n_score_positive, n_score_negative=cfg.n_score_negative,
            )
        except ValueError as e:
            return self.record(layer, index, tally, status="failed",
                               error=f"malformed feature record: {e}")
        try:
            explanation, raw = explain_feature(feature, split, self.chat, tally)
        except RequestFailed as e:
            if e.transient:
                raise  # not a verdict on this feature: leave it unfinished
            return self.record(layer, index, tally, status="failed",
                               error=f"explanation request refused: {e}")
        if explanation is None:
            return self.record(
                layer, index, tally, status="failed",
                error=f"unparseable explanation (no 'Explanation:' line): {truncate_raw(raw)}",
            )
        scores, errors = {}, []
        for name in cfg.scorers:
            score, err = score_feature(name, explanation, feature, split, self.chat, tally,
                                       seed=cfg.seed)
            if score is not None:
                scores[name] = score
            if err is not None:
                errors.append(err)
        return self.record(layer, index, tally, status="ok", explanation=explanation,
                           scores=scores, error="; ".join(errors) or None)


def run_with_config(
    features_dir: str | Path, cfg: AutointerpConfig, *, progress: bool = True
) -> dict[str, Any]:
    """``run_autointerp`` for a validated AutointerpConfig (what the CLI calls)."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    fdir = FeaturesDir(features_dir)
    sel = _Selection(fdir, cfg)
    fdir.check_layers(sel.layers)
    api_key, base_url = resolve_endpoint(cfg.api_key, cfg.base_url)

    writer = RecordWriter(fdir.path).open()
    try:
        latest = latest_records(fdir.path, model=cfg.model)
        finished = {
            key for key, rec in latest.items()
            if rec["status"] == "ok" or not cfg.retry_failed
        }
        stop = threading.Event()
        meter = Meter()
        budget = Budget(cfg.max_requests, cfg.max_tokens_budget)
        chat = ChatClient(
            model=cfg.model, api_key=api_key, base_url=base_url, timeout=cfg.timeout,
            retry=RetryPolicy(cfg.max_retries, cfg.retry_base_delay, cfg.retry_max_delay,
                              cfg.max_retry_after),
            budget=budget, meter=meter, stop=stop, temperature=cfg.temperature,
            max_output_tokens=cfg.max_output_tokens, seed=cfg.seed,
        )
        run = _Run(cfg, chat)
        counts = dict.fromkeys(
            ("already_done", "dead_skipped", "submitted", "ok", "failed", "gave_up",
             "abandoned"), 0
        )
        streak = [0]  # features in a row that gave up on transient errors
        found: set[tuple[int, int]] = set()
        new_records: list[dict] = []
        state: dict[str, Any] = {"stopped": "completed", "reason": None}

        def candidates() -> Iterator[dict]:
            n_selected = 0
            for layer in sel.layers:
                def parse(index: int, layer: int = layer) -> bool:
                    return sel.includes(layer, index) and (layer, index) not in finished

                for index, feature in fdir.iter_layer(layer, parse):
                    if not sel.includes(layer, index):
                        continue
                    found.add((layer, index))
                    if feature is not None and not _has_activations(feature):
                        counts["dead_skipped"] += 1
                        bar.update(1)
                        continue
                    # Finished features count towards max_features, so a resumed run with
                    # the same options targets the same features.
                    if cfg.max_features is not None and n_selected >= cfg.max_features:
                        return
                    n_selected += 1
                    if feature is None:
                        counts["already_done"] += 1
                        bar.update(1)
                        continue
                    yield feature

        def collect(futures: dict[Future, tuple[int, int]]) -> None:
            """Wait for at least one feature to finish and handle every finished one."""
            done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            for fut in done:
                futures.pop(fut)
                try:
                    rec = fut.result()
                except BudgetExhausted as e:
                    counts["abandoned"] += 1
                    if state["stopped"] == "completed":
                        state.update(stopped="budget", reason=str(e))
                    stop.set()
                    continue
                except FatalAPIError as e:
                    counts["abandoned"] += 1
                    state.update(stopped="fatal_error", reason=str(e))
                    stop.set()
                    continue
                except RunStopped:
                    counts["abandoned"] += 1
                    continue
                except RequestFailed as e:  # transient: retries ran out
                    counts["gave_up"] += 1
                    streak[0] += 1
                    if streak[0] >= cfg.max_consecutive_failures and not stop.is_set():
                        state.update(
                            stopped="unavailable",
                            reason=f"{streak[0]} features in a row gave up after retries "
                                   f"(last: {e})",
                        )
                        stop.set()
                    bar.update(1)
                    continue
                streak[0] = 0
                writer.append(rec)
                new_records.append(rec)
                counts[rec["status"]] += 1
                bar.update(1)

        bar = tqdm(total=sel.total, desc="autointerp", unit="feature", disable=not progress,
                   mininterval=1.0)
        futures: dict[Future, tuple[int, int]] = {}
        interrupted = threading.Event()

        def on_sigint(signum: int, frame: Any) -> None:
            # First Ctrl-C: stop sending, let in-flight requests finish, keep their records,
            # write the summary. A second one aborts at once.
            if interrupted.is_set():
                raise KeyboardInterrupt
            interrupted.set()
            stop.set()
            if progress:
                print("\nautointerp: stopping after the requests in flight "
                      "(Ctrl-C again to abort)", file=sys.stderr, flush=True)

        old_handler = None
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGINT, on_sigint)
        pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="autointerp")
        try:
            for feature in candidates():
                while len(futures) >= cfg.concurrency and not stop.is_set():
                    collect(futures)
                if stop.is_set():
                    break
                key = (int(feature["layer"]), int(feature["index"]))
                futures[pool.submit(run.process, feature)] = key
                counts["submitted"] += 1
            while futures:
                collect(futures)
        except BaseException:
            stop.set()
            raise
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            pool.shutdown(wait=True)
            bar.close()
            chat.close()
        if interrupted.is_set() and state["stopped"] == "completed":
            state.update(stopped="interrupted", reason="interrupted (Ctrl-C)")

        missing = []
        if sel.wanted is not None and state["stopped"] == "completed" and cfg.max_features is None:
            missing = sorted(
                f"{layer}:{index}" for layer, idxs in sel.wanted.items() for index in idxs
                if (layer, index) not in found
            )
        summary = _summary(
            fdir, cfg, base_url, state, counts, missing, meter.snapshot(), new_records,
            started_at, time.monotonic() - started,
        )
        write_json_atomic(fdir.path / SUMMARY_FILE, summary)
    finally:
        writer.close()
    if progress:
        print(format_summary(summary), flush=True)
    if interrupted.is_set():
        raise KeyboardInterrupt
    return summary


def _summary(
    fdir: FeaturesDir, cfg: AutointerpConfig, base_url: str | None, state: dict,
    counts: dict[str, int], missing: list[str], usage: dict, new_records: list[dict],
    started_at: str, elapsed: float,
) -> dict[str, Any]:
    cost = None
    if cfg.price_per_1k_input is not None or cfg.price_per_1k_output is not None:
        c_in = usage["prompt_tokens"] / 1000.0 * (cfg.price_per_1k_input or 0.0)
        c_out = usage["completion_tokens"] / 1000.0 * (cfg.price_per_1k_output or 0.0)
        cost = {
            "input": c_in, "output": c_out, "total": c_in + c_out,
            "price_per_1k_input": cfg.price_per_1k_input,
            "price_per_1k_output": cfg.price_per_1k_output,
        }
    scores_mean: dict[str, Any] = {}
    for name in cfg.scorers:
        key = SCORE_KEYS[name]
        vals = [r["scores"][name][key] for r in new_records if name in r.get("scores", {})]
        scores_mean[name] = {f"mean_{key}": sum(vals) / len(vals) if vals else None,
                             "n_features": len(vals)}
    explained_total = sum(
        1 for rec in latest_records(fdir.path, model=cfg.model).values() if rec["status"] == "ok"
    )
    settings = {
        k: v for k, v in config_to_dict(cfg).items() if k not in ("api_key", "model", "base_url")
    }
    return {
        "features_dir": str(fdir.path.resolve()),
        "model": cfg.model,
        "base_url": _public_url(base_url or "https://api.openai.com/v1"),
        "method": EXPLAIN_METHOD,
        "stopped": state["stopped"],
        "stop_reason": state["reason"],
        "complete": state["stopped"] == "completed",
        "features": {**counts, "not_found": missing, "explained_total": explained_total},
        "usage": usage,
        "cost": cost,
        "scores": scores_mean,
        "settings": settings,
        "started_at": started_at,
        "elapsed_s": round(elapsed, 3),
    }


def _public_url(url: str) -> str:
    """The URL without any user:password part, safe to write to the summary."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def format_summary(s: dict[str, Any]) -> str:
    f, u = s["features"], s["usage"]
    lines = [
        f"autointerp ({s['model']} at {s['base_url']}): {f['ok'] + f['failed']} features "
        f"recorded this run ({f['ok']} ok, {f['failed']} failed); {f['already_done']} already "
        f"done, {f['dead_skipped']} dead skipped; {f['explained_total']} explained in total",
    ]
    if f["gave_up"]:
        lines.append(f"  {f['gave_up']} features gave up after retries (server errors, "
                     "timeouts); they have no record and the next run tries them again")
    if s["stopped"] == "budget":
        lines.append(f"  stopped by the budget: {s['stop_reason']} ({f['abandoned']} features "
                     "left unfinished); run again with a larger budget to continue")
    elif s["stopped"] != "completed":
        lines.append(f"  stopped ({s['stopped']}): {s['stop_reason']}")
    errors = ", ".join(f"{k} {v}" for k, v in u["errors"].items() if v) or "none"
    lines.append(
        f"  requests {u['requests']} (retries {u['retries']}; errors: {errors}); tokens "
        f"{u['prompt_tokens']:,} in + {u['completion_tokens']:,} out"
        + (f"; cost ${s['cost']['total']:.4f}" if s["cost"] else "")
    )
    scores = [
        f"{name} {v[f'mean_{SCORE_KEYS[name]}']:.3f} "
        f"({SCORE_KEYS[name].replace('_', ' ')}, n={v['n_features']})"
        for name, v in s["scores"].items() if v[f"mean_{SCORE_KEYS[name]}"] is not None
    ]
    if scores:
        lines.append("  mean scores this run: " + ", ".join(scores))
    if f["failed"]:
        lines.append("  failed features keep their error in autointerp.jsonl; "
                     "--retry-failed redoes them")
    if f["not_found"]:
        lines.append(f"  not found in the layer files: {', '.join(f['not_found'][:20])}")
    lines.append(f"  results: {Path(s['features_dir']) / 'autointerp.jsonl'}")
    return "\n".join(lines)
