"""``clt-lens demo``: the whole path on the embedded default model.

cache -> train -> evaluation table -> feature statistics and exports -> (autointerp when an
API is configured) -> circuit-tracer set -> attribution graph -> viewer files -> index.html.
Each stage calls the same public function as its own subcommand; the demo only picks small
sizes and puts everything under one directory.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

SAMPLE_PROMPT = "ROMEO: But soft, what light through yonder window"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-tokens", type=int, default=262_144)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: demo.yaml)")
    p.add_argument("--feature-tokens", type=int, default=65_536)
    p.add_argument("--eval-tokens", type=int, default=16_384)
    p.add_argument("--density-tokens", type=int, default=131_072,
                   help="held-out tokens over which dead features are counted")
    p.add_argument("--prompt", default=SAMPLE_PROMPT)
    p.add_argument("--fresh", action="store_true", help="delete OUT first instead of reusing it")


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
    from clt_lens.cache import CacheConfig, generate_cache
    from clt_lens.circuits.attribution import attribute_prompt
    from clt_lens.circuits.export import write_circuit_tracer_set
    from clt_lens.config import load_config
    from clt_lens.evals import evaluate, markdown_table
    from clt_lens.features import (
        compute_feature_stats,
        write_dashboard_batches,
        write_neuronpedia_export,
    )
    from clt_lens.models import load_model
    from clt_lens.training import CLTTrainingRunner, TrainConfig
    from clt_lens.training.cli import resolve_config_path

    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    st = _Stages()
    model = load_model("embedded", device=args.device)

    st.start("1/7 activation cache")
    cache_dir = out / "cache"
    generate_cache(
        CacheConfig(out_dir=str(cache_dir), n_tokens=args.cache_tokens, device=args.device),
        model=model,
    )
    st.done()

    st.start("2/7 training")
    overrides = {"cache_dir": str(cache_dir), "out_dir": str(out / "train"),
                 "device": args.device}
    if args.steps:
        overrides["n_steps"] = args.steps
    cfg = load_config(TrainConfig, resolve_config_path("demo"), overrides)
    final = out / "train" / "final"
    if (final / "cfg.json").is_file() and not args.fresh:
        print(f"   reusing {final} (pass --fresh to retrain)")
    else:
        CLTTrainingRunner(cfg, override_model=model).run()
    st.done()

    st.start("3/7 evaluation")
    result = evaluate(final, model=model, n_tokens=args.eval_tokens, out_dir=out / "eval",
                      device=args.device, density_tokens=args.density_tokens)
    print(markdown_table(result))
    st.done()

    st.start("4/7 feature statistics and exports")
    features_dir = out / "features"
    compute_feature_stats(final, model=model, n_tokens=args.feature_tokens,
                          out_dir=features_dir, device=args.device)
    dashboards = _dashboards(final, model, features_dir, out / "dashboards")
    autointerp = _maybe_autointerp(features_dir)
    write_dashboard_batches(features_dir)
    np_export = write_neuronpedia_export(features_dir)
    st.done()

    st.start("5/7 circuit-tracer transcoder set")
    ct_dir = write_circuit_tracer_set(final, out / "circuit_tracer")
    print(f"   {ct_dir}")
    st.done()

    st.start("6/7 attribution graph")
    graph = attribute_prompt(ct_dir, args.prompt, model=model, max_feature_nodes=200,
                             out_dir=out / "graphs", features_dir=features_dir,
                             device=args.device)
    print(f"   {graph.n_nodes} nodes, {graph.n_edges} edges after pruning; "
          f"replacement {graph.replacement_score:.3f}, "
          f"completeness {graph.completeness_score:.3f}")
    st.done()

    st.start("7/7 index")
    _write_viewer_help(out)
    index = _write_index(out, result, graph, dashboards, np_export, autointerp, st.times)
    st.done()
    total = time.perf_counter() - st.t0
    print(f"\nall done in {total / 60:.1f} min. Everything is under {out}/:")
    for label, path in [
        ("index", index), ("training curves", out / "train" / "training_curves.png"),
        ("checkpoint (SAELens folder)", final), ("evaluation", out / "eval" / "eval.json"),
        ("features", features_dir), ("Neuronpedia export", np_export),
        ("circuit-tracer set", ct_dir), ("graph", graph.json_path),
    ]:
        print(f"  {label:<28} {path}")
    print(f"\nopen the viewer:  clt-lens serve {out / 'graphs'}   (then http://127.0.0.1:8032; "
          f"instructions in {out / VIEWER_HELP})")
    return 0


def _dashboards(final: Path, model: Any, features_dir: Path, out: Path) -> list[Path]:
    """SAE-Dashboard HTML for the most active features of each layer (if the extra is there)."""
    from clt_lens.data import load_tokens
    from clt_lens.features import DashboardUnavailableError, iter_features, write_dashboard
    from clt_lens.features.stats import load_clt

    try:
        import sae_dashboard  # noqa: F401
    except ImportError:
        print("   sae-dashboard not installed: skipping HTML dashboards (make install adds it)")
        return []
    clt = load_clt(final)
    tokens = load_tokens("embedded", tokenizer=model.tokenizer, context_size=model.cfg.n_ctx,
                         split="heldout", max_tokens=32 * model.cfg.n_ctx, shuffle=False)
    paths = []
    for layer in range(clt.cfg.n_layers):
        feats = sorted(iter_features(features_dir, layer), key=lambda r: -r["frac_nonzero"])
        chosen = [r["index"] for r in feats if r["frac_nonzero"] > 0][:3]
        if not chosen:
            continue
        try:
            paths.append(write_dashboard(clt, layer, chosen, model=model, tokens=tokens,
                                         out_html=out / f"layer_{layer}.html"))
        except DashboardUnavailableError as e:
            print(f"   {e}")
            return paths
    return paths


def _maybe_autointerp(features_dir: Path) -> dict[str, Any] | None:
    if not (os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL")):
        print("   autointerp skipped: set OPENAI_API_KEY (and OPENAI_BASE_URL for a local server)"
              " and CLT_LENS_AUTOINTERP_MODEL to explain features")
        return None
    from clt_lens.autointerp import run_autointerp

    model = os.environ.get("CLT_LENS_AUTOINTERP_MODEL", "gpt-4o-mini")
    return run_autointerp(features_dir, model=model, max_features=16)


# -- viewer instructions (the same page `clt-lens serve` has at /help.html) ------------------
VIEWER_HELP = "viewer_help.html"


def _write_viewer_help(out: Path) -> Path:
    from clt_lens.serve import ASSETS_DIR

    path = out / VIEWER_HELP
    shutil.copyfile(ASSETS_DIR / "help.html", path)
    return path


def _write_index(out: Path, result: dict, graph: Any, dashboards: list[Path], np_export: Path,
                 autointerp: dict | None, times: dict[str, float]) -> Path:
    from clt_lens.evals import markdown_table

    def link(p: Path, text: str) -> str:
        return f'<a href="{html.escape(os.path.relpath(p, out))}">{html.escape(text)}</a>'

    r = result["replacement"]
    rows = "".join(f"<li>{html.escape(k)}: {v:.0f} s</li>" for k, v in times.items())
    dash = "".join(f"<li>{link(p, p.name)}</li>" for p in dashboards) or "<li>(none)</li>"
    interp = (f"<p>autointerp: {html.escape(json.dumps(autointerp)[:400])}</p>"
              if autointerp else "<p>autointerp: not configured</p>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>clt_lens demo</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}}img{{max-width:100%}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>
<h1>clt_lens demo: a CLT on the embedded model</h1>
<p>CE recovered {r['ce_recovered']:.1%}, KL {r['kl']:.4f}, top-1 agreement
{r['top1_agreement']:.1%}; mean explained variance {result['mean']['explained_variance']:.3f}
at mean L0 {result['mean']['l0']:.1f}.</p>
<h2>Training</h2><img src="train/training_curves.png">
<h2>Evaluation</h2><pre>{html.escape(markdown_table(result))}</pre>
<img src="eval/eval_layers.png"><img src="eval/density.png">
<h2>Feature dashboards (SAE-Dashboard)</h2><ul>{dash}</ul>
<p>Neuronpedia export: {link(np_export, str(np_export.relative_to(out)))}</p>{interp}
<h2>Attribution graph</h2><p>prompt: <code>{html.escape(graph.prompt)}</code>;
{graph.n_nodes} nodes, {graph.n_edges} edges; {link(graph.json_path, graph.json_path.name)}.
Open it in the viewer with <code>clt-lens serve {html.escape(str(out / 'graphs'))}</code>.</p>
<p>{link(out / VIEWER_HELP, "How to use the viewer")}: reading the graph, supernodes, and
testing it with interventions and steering.</p>
<h2>Stage times</h2><ul>{rows}</ul></body></html>"""
    path = out / "index.html"
    path.write_text(page)
    return path
