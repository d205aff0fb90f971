"""``clt-lens attribute [CONFIG.yaml] CHECKPOINT PROMPT [--field value ...]``.

Writes ``{slug}.pt`` (unpruned graph), ``{slug}.json`` + ``graph-metadata.json`` (pruned graph
for the viewer / Neuronpedia) and ``{slug}.summary.json`` into ``out_dir``; view them with
``clt-lens serve DIR``. The first CLI's ``--clt CHECKPOINT --prompt TEXT`` still works.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import ClassVar, Literal

from clt_lens.cli_args import add_config_arguments, add_positionals, command_config


@dataclass
class AttributeConfig:
    # CLT checkpoint (SAELens folder or training run) or exported circuit-tracer set folder
    checkpoint: str
    prompt: str  # text to attribute (BOS is prepended)
    model: str | None = None  # model name or folder; default: the CLT's model, else 'embedded'
    out_dir: str = "graphs"  # graph folder
    slug: str | None = None  # graph name; default: from the prompt
    # features directory: labels nodes with explanations and writes the viewer's feature pages
    features_dir: str | None = None
    # attribute these next tokens (one token each) instead of the likeliest ones; on the
    # command line --target TOKEN, repeated, keeps leading spaces
    targets: list[str] | None = None
    max_feature_nodes: int | None = None  # cap on attributed feature nodes (CPU: try 200)
    max_n_logits: int = 10  # at most this many output logits are attributed
    desired_logit_prob: float = 0.95  # ... or as many as cover this probability
    batch_size: int = 256  # circuit-tracer's attribution batch size
    offload: Literal["cpu", "disk"] | None = None  # offload the model's weights while attributing
    node_threshold: float = 0.8  # pruning: keep nodes carrying this much influence
    edge_threshold: float = 0.98  # pruning: keep edges carrying this much influence
    scan: str | None = None  # transcoder identifier shown by the viewer
    device: str = "cpu"  # torch device
    verbose: bool = False  # print circuit-tracer's progress and the full result

    renamed_keys: ClassVar[dict[str, str]] = {
        "clt": "checkpoint", "out": "out_dir", "features": "features_dir",
    }


CONFIG = AttributeConfig
POSITIONALS = ("checkpoint", "prompt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "clt-lens attribute [CONFIG.yaml] CHECKPOINT PROMPT [--field value ...]"
    add_positionals(p, *POSITIONALS)
    add_config_arguments(p, AttributeConfig)
    p.add_argument("--target", dest="targets", action="append", default=argparse.SUPPRESS,
                   metavar="TOKEN", help="one target token, as written (repeatable)")
    p.epilog = "Old spellings still work: --clt, --out, --features."


def load(args: argparse.Namespace, extra: list[str]) -> AttributeConfig:
    return command_config(AttributeConfig, args, extra, "attribute", POSITIONALS)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from clt_lens.circuits.attribution import attribute_prompt, transcoder_set_summary
    from clt_lens.circuits.loading import clt_summary, is_transcoder_set_dir

    cfg = load(args, extra)
    model = cfg.model
    if model is None:
        summary = (transcoder_set_summary(cfg.checkpoint) if is_transcoder_set_dir(cfg.checkpoint)
                   else clt_summary(cfg.checkpoint))  # fmt: skip
        model = summary.get("model_name") or "embedded"
    result = attribute_prompt(
        cfg.checkpoint,
        cfg.prompt,
        model=model,
        max_n_logits=cfg.max_n_logits,
        desired_logit_prob=cfg.desired_logit_prob,
        batch_size=cfg.batch_size,
        max_feature_nodes=cfg.max_feature_nodes,
        offload=cfg.offload,
        node_threshold=cfg.node_threshold,
        edge_threshold=cfg.edge_threshold,
        out_dir=cfg.out_dir,
        slug=cfg.slug,
        features_dir=cfg.features_dir,
        targets=cfg.targets,
        scan=cfg.scan,
        device=cfg.device,
        verbose=cfg.verbose,
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
    if cfg.verbose:
        print(json.dumps(result.to_dict(), indent=1))
    return 0
