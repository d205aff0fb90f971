"""Tutorial 4: feature statistics and automatic interpretability with an LLM.

What does a feature respond to? Two steps answer it at scale:

1. ``compute_feature_stats``: one streaming pass over held-out text records, per feature,
   its firing frequency, activation histogram, top-activating contexts, contexts from
   each activation quantile, and the tokens its total decoder write promotes/suppresses
   (logit effects). They land in a *features directory* (one JSON line per feature).
2. ``run_autointerp``: an LLM reads a feature's examples (activating tokens marked
   ``<<like this>>``) and writes a one-line explanation; then it is *scored*: another prompt
   asks the LLM to pick, from held-out excerpts mixing activating and non-activating ones,
   which match the explanation (detection) or whose marked tokens fit it (fuzzing). The
   balanced accuracy of those guesses is the explanation's score. ``"simulation"`` (opt-in)
   asks for every token's activation instead and scores the correlation.

Any OpenAI-compatible chat-completions server works::

    export OPENAI_API_KEY=sk-...                        # OpenAI
    python tutorials/04_autointerp.py --base-url https://api.openai.com/v1 --model gpt-4o-mini
    # vLLM:   vllm serve Qwen/Qwen2.5-7B-Instruct   ->  --base-url http://localhost:8000/v1
    # Ollama: ollama serve                          ->  --base-url http://localhost:11434/v1
    #         (local servers need no key; OPENAI_BASE_URL works instead of --base-url)
    clt-lens autointerp runs/features --model gpt-4o-mini --max-features 100   # the command

Without ``--base-url`` this script starts clt_lens's bundled stub server
(``clt_lens.autointerp.stub_server``) on 127.0.0.1: a scripted "LLM" that explains each
feature as the token most often marked in its examples. It needs no network, so the
tutorial runs offline; the explanations are only as good as that rule.

Run it::

    python tutorials/04_autointerp.py                  # uses tutorial 1's CLT if present
    python tutorials/04_autointerp.py --small          # seconds (the test suite)

Records are appended to ``FEATURES_DIR/autointerp.jsonl`` as each feature finishes, so an
interrupted (or budget-stopped) run continues where it stopped when started again.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import sys
from pathlib import Path

from _common import base_parser, get_clt

SIZES = {
    "full": dict(feature_tokens=65_536, max_features=32),
    "small": dict(feature_tokens=2032, max_features=4),
}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__, "04")
    p.add_argument("--base-url", default=None,
                   help="OpenAI-compatible API base URL (default: $OPENAI_BASE_URL, else "
                        "start the bundled stub server)")
    p.add_argument("--model", default="gpt-4o-mini", help="the explainer/scorer LLM")
    p.add_argument("--max-features", type=int, default=None)
    args = p.parse_args(argv)
    size = SIZES["small" if args.small else "full"]
    max_features = args.max_features or size["max_features"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from clt_lens import load_model
    from clt_lens.autointerp import load_explanations, run_autointerp
    from clt_lens.circuits import write_viewer_features
    from clt_lens.features import (
        compute_feature_stats,
        iter_features,
        read_manifest,
        write_neuronpedia_export,
    )

    model = load_model("embedded", device=args.device)
    checkpoint = get_clt(args, model, out)

    # ------------------------------------------------------------------------------------
    # 1. Feature statistics. n_tokens held-out tokens are run through model + CLT once;
    #    per feature the top_k strongest contexts (a window of tokens around the peak) and
    #    examples from n_quantiles activation bands are kept with bounded memory. The
    #    directory: features.json (manifest) + layer_LL.jsonl (one record per feature).
    #    `clt-lens features CHECKPOINT --n_tokens N --out_dir DIR` is the same.
    # ------------------------------------------------------------------------------------
    print("\n== 1. feature statistics ==")
    features_dir = compute_feature_stats(
        checkpoint, model=model, n_tokens=size["feature_tokens"], top_k=20, n_quantiles=5,
        out_dir=out / "features", device=args.device, progress=not args.small,
    )
    manifest = read_manifest(features_dir)
    print(f"{features_dir}: {manifest['n_layers']} layers x {manifest['d_sae']} features, "
          f"{manifest['n_tokens']:,} tokens of {manifest['dataset']}[{manifest['split']}]")
    layer = manifest["n_layers"] // 2
    records = list(iter_features(features_dir, layer))
    alive = [r for r in records if r["n_fired"] > 0]
    print(f"layer {layer}: {len(alive)}/{len(records)} features fired; record keys: "
          f"{sorted(records[0])}")
    # A record at a glance: the strongest context, with the peak token marked.
    rec = max(alive, key=lambda r: r["max_act"])
    ex = rec["top_examples"][0]
    peak = max(range(len(ex["acts"])), key=lambda i: ex["acts"][i])
    context = "".join(f"<<{t}>>" if i == peak else t for i, t in enumerate(ex["tokens"]))
    print(f"feature {layer}:{rec['index']} fires on {rec['frac_nonzero']:.1%} of tokens, "
          f"max {rec['max_act']:.2f}; its strongest context:\n  {context.strip()!r}")
    print(f"  promotes {[t for t, _ in rec['top_logits'][:5]]}, "
          f"suppresses {[t for t, _ in rec['bottom_logits'][:5]]}")

    # ------------------------------------------------------------------------------------
    # 2. Autointerp. Each feature costs one explanation request plus one per scorer.
    #    Useful options: max_features (the first live features in (layer, index) order;
    #    features=[(layer, index), ...] picks them yourself), concurrency (parallel requests),
    #    max_tokens_budget / max_requests (hard stops), price_per_1k_input/output (cost in
    #    the summary). 429s and 5xx are retried with backoff, honouring Retry-After.
    # ------------------------------------------------------------------------------------
    print("\n== 2. autointerp ==")
    with contextlib.ExitStack() as stack:
        base_url = args.base_url
        api_key = None  # None: $OPENAI_API_KEY; a local server needs none
        if base_url is None and not os.environ.get("OPENAI_BASE_URL"):
            from clt_lens.autointerp.stub_server import StubOpenAIServer

            stub = stack.enter_context(StubOpenAIServer())  # 127.0.0.1, a free port
            base_url, api_key = stub.base_url, "stub-needs-no-key"
            print(f"no --base-url / OPENAI_BASE_URL: using the local stub server at {base_url}")
        summary = run_autointerp(
            features_dir,
            model=args.model,
            base_url=base_url,
            api_key=api_key,
            layers=[layer],               # None: every layer
            max_features=max_features,
            concurrency=4,
            scorers=("detection", "fuzzing"),
            max_tokens_budget=2_000_000,  # stop before spending more than this
            progress=not args.small,
        )
    # The summary (also saved as autointerp_summary.json) counts features, requests,
    # tokens, retries and cost, and averages the scores; with progress on, run_autointerp
    # has printed it already.
    if args.small:
        from clt_lens.autointerp.runner import format_summary

        print(format_summary(summary))
    det = summary["scores"].get("detection", {}).get("mean_balanced_accuracy")
    print(f"e.g. summary['scores']['detection']['mean_balanced_accuracy'] = {det}")

    # ------------------------------------------------------------------------------------
    # 3. Where the explanations land.
    #    a) autointerp.jsonl in the features directory (every record, ok or failed, with
    #       usage); load_explanations gives the latest good one per (layer, index).
    # ------------------------------------------------------------------------------------
    print("\n== 3. where the explanations land ==")
    explanations = load_explanations(features_dir)
    print(f"a) {features_dir / 'autointerp.jsonl'}: {len(explanations)} explanations")
    for (lay, idx), e in sorted(explanations.items())[:5]:
        scores = ", ".join(f"{k} {v['balanced_accuracy']:.2f}" for k, v in e["scores"].items())
        print(f"   {lay}:{idx:<4} {e['explanation']!r:<40} ({scores})")
        if e.get("error"):
            # e.g. "detection: skipped, no negative examples": the feature fired in every
            # window of the statistics pass, so there was nothing non-activating to mix in
            print(f"        note: {e['error']}")

    #    b) the Neuronpedia bulk export (features, activations, explanations as gzipped JSON
    #       lines per source layer), ready for Neuronpedia's importer or `clt-lens upload`.
    export_dir = write_neuronpedia_export(features_dir)
    src = export_dir / f"{layer}-{manifest['sourceset']}"
    expl_files = sorted((src / "explanations").glob("*.jsonl.gz"))
    n_rows = sum(len(gzip.open(p).read().splitlines()) for p in expl_files)
    print(f"b) {export_dir}: {n_rows} explanation rows in "
          f"{[str(p.relative_to(export_dir)) for p in expl_files]}")

    #    c) the viewer: feature pages carry the explanation, and attribution graphs built
    #       with features_dir (tutorial 3; `clt-lens attribute --features DIR`) label their
    #       nodes with it. Here, pages for just the explained features:
    scan = "clt-lens/tutorial-04"
    pages = write_viewer_features(features_dir, out / "viewer", scan,
                                  features=sorted(explanations))
    first = next(iter(sorted(explanations)), None)
    if first is not None:
        from clt_lens.circuits import cantor_pair

        page = json.loads((pages / f"{cantor_pair(*first)}.json").read_text())
        print(f"c) {pages}: page of {first[0]}:{first[1]} says {page['explanation']!r}")
    print(f"\ndone. Explanations: {features_dir / 'autointerp.jsonl'}; "
          f"summary: {features_dir / 'autointerp_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
