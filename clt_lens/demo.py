"""``clt-lens demo``: the whole path on the embedded default model.

cache -> train -> evaluation table -> feature statistics -> (autointerp when an API is
configured) -> SAE-Dashboard pages and Neuronpedia export -> circuit-tracer set -> attribution
graph -> viewer files -> index.html (``demo_index``). Each stage calls the same public function
as its own subcommand; the demo only picks small sizes and puts everything under one directory.

Dashboards and autointerp cover the same features (the ``FEATURES_PER_LAYER`` most frequent of
each layer), so the index's feature browser can show an explanation next to each dashboard.
Without sae-dashboard or the pinned page scripts (``clt-lens serve --install-js``) the demo
says so at the start, skips the dashboards, and the index tells how to get them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from clt_lens.cli_args import add_config_arguments, add_positionals, command_config

SAMPLE_PROMPT = "ROMEO: But soft, what light through yonder window"
FEATURES_PER_LAYER = 4


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"  # output directory; a second run reuses what is there
    device: str = "cpu"  # torch device for every stage
    cache_tokens: int = 262_144  # tokens of activations cached for training
    n_steps: int | None = None  # training steps; default: demo.yaml's
    feature_tokens: int = 65_536  # tokens for the feature statistics
    eval_tokens: int = 16_384  # tokens for FVU/L0/CE/KL
    density_tokens: int = 131_072  # held-out tokens over which dead features are counted
    prompt: str = SAMPLE_PROMPT  # prompt of the attribution graph
    fresh: bool = False  # delete out_dir first instead of reusing it

    renamed_keys: ClassVar[dict[str, str]] = {"out": "out_dir", "steps": "n_steps"}


CONFIG = DemoConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "clt-lens demo [CONFIG.yaml] [--field value ...]"
    add_positionals(p)
    add_config_arguments(p, DemoConfig)


def load(args: argparse.Namespace, extra: list[str]) -> DemoConfig:
    return command_config(DemoConfig, args, extra, "demo")


class _Stages:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}

    def start(self, name: str) -> None:
        self.name, self.t = name, time.perf_counter()
        print(f"\n== {name} ==", flush=True)

    def done(self) -> None:
        self.times[self.name] = time.perf_counter() - self.t
        print(f"   ({self.times[self.name]:.0f} s)", flush=True)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = load(args, extra)
    from clt_lens.cache import CacheConfig, generate_cache
    from clt_lens.circuits.attribution import attribute_prompt
    from clt_lens.circuits.export import write_circuit_tracer_set
    from clt_lens.config import load_config
    from clt_lens.demo_index import write_index
    from clt_lens.evals import evaluate, markdown_table
    from clt_lens.features import (
        compute_feature_stats,
        write_dashboard_batches,
        write_neuronpedia_export,
    )
    from clt_lens.models import load_model
    from clt_lens.training import CLTTrainingRunner, TrainConfig
    from clt_lens.training.cli import resolve_config_path

    out = Path(cfg.out_dir)
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    no_dashboards = _dashboards_unavailable()
    if no_dashboards:
        print(f"note: the SAE-Dashboard pages will be skipped. {no_dashboards}", flush=True)
    st = _Stages()
    model = load_model("embedded", device=cfg.device)

    st.start("1/7 activation cache")
    cache_dir = out / "cache"
    generate_cache(
        CacheConfig(out_dir=str(cache_dir), n_tokens=cfg.cache_tokens, device=cfg.device),
        model=model,
    )
    st.done()

    st.start("2/7 training")
    overrides = {"cache_dir": str(cache_dir), "out_dir": str(out / "train"),
                 "device": cfg.device}
    if cfg.n_steps:
        overrides["n_steps"] = cfg.n_steps
    train_cfg = load_config(TrainConfig, resolve_config_path("demo"), overrides)
    final = out / "train" / "final"
    if (final / "cfg.json").is_file() and not cfg.fresh:
        print(f"   reusing {final} (pass --fresh to retrain)")
    else:
        CLTTrainingRunner(train_cfg, override_model=model).run()
    st.done()

    st.start("3/7 evaluation")
    result = evaluate(final, model=model, n_tokens=cfg.eval_tokens, out_dir=out / "eval",
                      device=cfg.device, density_tokens=cfg.density_tokens)
    print(markdown_table(result))
    st.done()

    st.start("4/7 feature statistics and exports")
    features_dir = out / "features"
    compute_feature_stats(final, model=model, n_tokens=cfg.feature_tokens,
                          out_dir=features_dir, device=cfg.device)
    chosen = _choose_features(features_dir)
    autointerp = _maybe_autointerp(features_dir, chosen)
    dashboards: dict[int, Path] = {}
    if no_dashboards:
        print(f"   dashboards skipped: {no_dashboards}")
    else:
        dashboards = _dashboards(final, model, chosen, out / "dashboards")
    write_dashboard_batches(features_dir)
    np_export = write_neuronpedia_export(features_dir)
    st.done()

    st.start("5/7 circuit-tracer transcoder set")
    ct_dir = write_circuit_tracer_set(final, out / "circuit_tracer")
    print(f"   {ct_dir}")
    st.done()

    st.start("6/7 attribution graph")
    graph = attribute_prompt(ct_dir, cfg.prompt, model=model, max_feature_nodes=200,
                             out_dir=out / "graphs", features_dir=features_dir,
                             device=cfg.device)
    print(f"   {graph.n_nodes} nodes, {graph.n_edges} edges after pruning; "
          f"replacement {graph.replacement_score:.3f}, "
          f"completeness {graph.completeness_score:.3f}")
    st.done()

    st.start("7/7 index")
    _write_viewer_help(out)
    index = write_index(out, result=result, graph=graph, dashboards=dashboards,
                        dashboard_note=no_dashboards, features_dir=features_dir, chosen=chosen,
                        np_export=np_export, ct_dir=ct_dir, checkpoint=final,
                        autointerp=autointerp, times=st.times)
    st.done()
    total = time.perf_counter() - st.t0
    print(f"\nall done in {total / 60:.1f} min. Everything is under {out}/:")
    for label, path in [
        ("index (open in a browser)", index),
        ("training curves", out / "train" / "training_curves.png"),
        ("checkpoint (SAELens folder)", final), ("evaluation", out / "eval" / "eval.json"),
        ("features", features_dir),
        *([("dashboards (SAE-Dashboard)", out / "dashboards")] if dashboards else []),
        ("Neuronpedia export", np_export),
        ("circuit-tracer set", ct_dir), ("graph", graph.json_path),
    ]:
        print(f"  {label:<28} {path}")
    print(f"\nopen the viewer:  clt-lens serve {out / 'graphs'}   (then http://127.0.0.1:8032; "
          f"instructions in {out / VIEWER_HELP})")
    return 0


def _dashboards_unavailable() -> str | None:
    """Why no dashboard can be written here (with how to fix it), or None."""
    from clt_lens.features.dashboard import (
        DashboardUnavailableError,
        require_dashboard_scripts,
        require_sae_dashboard,
    )

    try:
        require_sae_dashboard()
        require_dashboard_scripts()
    except DashboardUnavailableError as e:
        return str(e)
    return None


def _choose_features(features_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """The records of the FEATURES_PER_LAYER features of each layer that fire most often
    (dead ones never)."""
    import heapq

    from clt_lens.features import iter_features, read_manifest

    chosen = {}
    for layer in read_manifest(features_dir)["layers"]:
        # nlargest keeps only the winners' records in memory, not the whole layer's
        top = heapq.nlargest(FEATURES_PER_LAYER, (r for r in iter_features(features_dir, layer)
                                                  if r["frac_nonzero"] > 0),
                             key=lambda r: r["frac_nonzero"])
        if top:
            chosen[layer] = top
    return chosen


def _dashboards(final: Path, model: Any, chosen: dict[int, list[dict[str, Any]]],
                out: Path) -> dict[int, Path]:
    """One SAE-Dashboard page per layer for the chosen features."""
    import torch

    from clt_lens.clt.loading import load_clt
    from clt_lens.data import load_tokens
    from clt_lens.features import write_dashboard

    clt = load_clt(final)
    tokens = load_tokens("embedded", tokenizer=model.tokenizer, context_size=model.cfg.n_ctx,
                         split="heldout", max_tokens=32 * model.cfg.n_ctx, shuffle=False)
    pages = {}
    for layer, records in chosen.items():
        with torch.no_grad():
            pages[layer] = write_dashboard(clt, layer, [r["index"] for r in records],
                                           model=model, tokens=tokens,
                                           out_html=out / f"layer_{layer}.html")
        print(f"   {pages[layer]}")
    return pages


def _maybe_autointerp(features_dir: Path,
                      chosen: dict[int, list[dict[str, Any]]]) -> dict[str, Any] | None:
    if not (os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL")):
        print("   autointerp skipped: set OPENAI_API_KEY (and OPENAI_BASE_URL for a local server)"
              " and CLT_LENS_AUTOINTERP_MODEL to explain features")
        return None
    from clt_lens.autointerp import run_autointerp

    model = os.environ.get("CLT_LENS_AUTOINTERP_MODEL", "gpt-4o-mini")
    pairs = [(layer, r["index"]) for layer, records in chosen.items() for r in records]
    return run_autointerp(features_dir, model=model, features=pairs)


# -- viewer instructions (the same page `clt-lens serve` has at /help.html) ------------------
VIEWER_HELP = "viewer_help.html"


def _write_viewer_help(out: Path) -> Path:
    from clt_lens.serve import ASSETS_DIR

    path = out / VIEWER_HELP
    shutil.copyfile(ASSETS_DIR / "help.html", path)
    return path
