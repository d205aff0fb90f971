"""``clt-lens attribute --clt CHECKPOINT --prompt TEXT [--out DIR] [--features DIR] ...``.

Writes ``{slug}.pt`` (unpruned graph), ``{slug}.json`` + ``graph-metadata.json`` (pruned graph
for the viewer / Neuronpedia) and ``{slug}.summary.json`` into ``--out``; view them with
``clt-lens serve DIR``.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clt", required=True,
                   help="CLT checkpoint (SAELens folder or training run) or exported "
                   "circuit-tracer set folder")
    p.add_argument("--prompt", required=True, help="text to attribute (BOS is prepended)")
    p.add_argument("--model", default=None,
                   help="model name or folder (default: the CLT's model, else 'embedded')")
    p.add_argument("--out", default="graphs", help="graph folder (default ./graphs)")
    p.add_argument("--slug", default=None, help="graph name (default: from the prompt)")
    p.add_argument("--features", default=None,
                   help="features directory: labels nodes with explanations and writes the "
                   "viewer's feature pages")
    p.add_argument("--target", action="append", default=None,
                   help="attribute this next token instead of the likeliest ones (one token; "
                   "repeatable)")
    p.add_argument("--max-feature-nodes", type=int, default=None,
                   help="cap on attributed feature nodes (default: all; CPU: try 200)")
    p.add_argument("--max-n-logits", type=int, default=10)
    p.add_argument("--desired-logit-prob", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--offload", choices=["cpu", "disk"], default=None)
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument("--scan", default=None, help="transcoder identifier shown by the viewer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--verbose", action="store_true")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from clt_lens.circuits.attribution import attribute_prompt, transcoder_set_summary
    from clt_lens.circuits.errors import CircuitsError
    from clt_lens.circuits.loading import clt_summary, is_transcoder_set_dir

    if extra:
        raise CircuitsError(f"unknown options {extra}")
    model = args.model
    if model is None:
        summary = (transcoder_set_summary(args.clt) if is_transcoder_set_dir(args.clt)
                   else clt_summary(args.clt))
        model = summary.get("model_name") or "embedded"
    result = attribute_prompt(
        args.clt,
        args.prompt,
        model=model,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
        offload=args.offload,
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
        out_dir=args.out,
        slug=args.slug,
        features_dir=args.features,
        targets=args.target,
        scan=args.scan,
        device=args.device,
        verbose=args.verbose,
    )
    targets = ", ".join(f"{t!r} {p:.3f}" for t, p in result.logit_targets)
    print(
        f"graph {result.slug}: {result.n_tokens} tokens, {result.n_active_features} active "
        f"features, {result.n_feature_nodes} attributed in {result.attribution_seconds:.1f}s\n"
        f"pruned: {result.n_nodes} nodes, {result.n_edges} edges; replacement score "
        f"{result.replacement_score:.3f}, completeness {result.completeness_score:.3f}\n"
        f"targets: {targets}\n"
        f"written: {result.json_path}, {result.graph_path}\n"
        f"view: clt-lens serve {result.out_dir}"
    )
    if args.verbose:
        print(json.dumps(result.to_dict(), indent=1))
    return 0
