"""``clt-lens eval CHECKPOINT [--model M] [--dataset D] [--split S] [--tokens N] [--out DIR]
[--density-tokens N] [--graphs N [--graph-max-nodes K] [--ablate K]]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from clt_lens.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="CLT SAELens folder or training run directory")
    p.add_argument("--model", help="model name or folder (default: the one the CLT was trained on)")
    p.add_argument("--dataset", help="dataset (default: the one the CLT was trained on)")
    p.add_argument("--split", default="heldout")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--no-single-layer", action="store_true", help="skip per-layer splices")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="output directory (default CHECKPOINT/eval)")
    p.add_argument("--density-tokens", type=int, default=131072,
                   help="count feature firing over this many tokens of the split (at most all "
                        "of it) for the dead fraction; 0 skips it")
    p.add_argument("--graphs", type=int, default=0, metavar="N",
                   help="attribute N held-out prompts with circuit-tracer and report replacement,"
                        " completeness, path length, graph size at fixed completeness and "
                        "influence-vs-ablation faithfulness (slow: ~seconds per prompt)")
    p.add_argument("--graph-max-nodes", type=int, default=None,
                   help="circuit-tracer max_feature_nodes for --graphs (default: all)")
    p.add_argument("--ablate", type=int, default=24,
                   help="features ablated per graph for the faithfulness score (0: skip)")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from clt_lens.evals.evaluate import evaluate
    from clt_lens.evals.report import markdown_table

    if extra:
        raise InputError(f"unknown options {extra}")
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
    result = evaluate(
        args.checkpoint,
        model=args.model,
        dataset=args.dataset,
        split=args.split,
        n_tokens=args.tokens,
        batch_size=args.batch_size,
        single_layer_splices=not args.no_single_layer,
        device=args.device,
        out_dir=out,
        density_tokens=args.density_tokens,
        graph_prompts=args.graphs,
        graph_max_feature_nodes=args.graph_max_nodes,
        graph_ablate=args.ablate,
    )
    print(markdown_table(result))
    print(f"\nwritten: {out / 'eval.json'}, {out / 'eval_layers.png'}, {out / 'density.png'}")
    return 0
