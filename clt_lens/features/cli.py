"""``clt-lens features [CONFIG.yaml] CHECKPOINT [--field value ...]``: feature statistics,
plus optional SAE-Dashboard HTML and Neuronpedia files.

    clt-lens features runs/demo/final --n_tokens 100000 [--out_dir DIR] [--layers 0,2]
        [--dashboard 0:1,5,9 ...] [--neuronpedia true [--neuronpedia_model_id ID]]

The options are the fields of :class:`clt_lens.features.config.FeaturesConfig` (``--help``
lists them); the model, dataset, split, context size and hooks are the ``source`` section
(``--source.dataset``). The first CLI's spellings (``--model``, ``--dataset``, ``--split``,
``--context_size``, ``--tokens``, ``--out``, ``--config FILE``, ``--model-id``,
``--neuronpedia`` without a value) still work.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from clt_lens.cli_args import add_config_arguments, add_positionals, command_config
from clt_lens.config import ConfigError
from clt_lens.errors import InputError
from clt_lens.features.config import FeaturesConfig
from clt_lens.features.stats import run_features

CONFIG = FeaturesConfig
POSITIONALS = ("checkpoint",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "clt-lens features [CONFIG.yaml] CHECKPOINT [--field value ...]"
    add_positionals(parser, *POSITIONALS)
    aliases = {k: v for k, v in FeaturesConfig.renamed_keys.items() if k != "dashboard"}
    add_config_arguments(parser, FeaturesConfig, aliases)
    parser.add_argument("--dashboard", dest="dashboards", action="append",
                        default=argparse.SUPPRESS, metavar="LAYER:F1,F2",
                        help="SAE-Dashboard HTML for these features (repeatable)")  # fmt: skip
    parser.add_argument("--config", dest="config_file", default=None, help=argparse.SUPPRESS)


def load(args: argparse.Namespace, extra: Sequence[str]) -> FeaturesConfig:
    cfg = command_config(FeaturesConfig, args, list(extra), "features", POSITIONALS,
                         config=args.config_file)  # fmt: skip
    if not cfg.checkpoint:
        raise ConfigError("give the CLT checkpoint: clt-lens features CHECKPOINT")
    if cfg.out_dir is None:
        cfg.out_dir = str(Path(cfg.checkpoint).expanduser().resolve().parent / "features")
    for spec in cfg.dashboards:
        parse_dashboard_spec(spec)  # bad specs fail before the pass
    return cfg


def parse_dashboard_spec(spec: str) -> tuple[int, list[int]]:
    """``"LAYER:F1,F2"`` -> (layer, [features])."""
    layer, sep, feats = spec.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(layer), [int(f) for f in feats.split(",") if f.strip()]
    except ValueError:
        raise InputError(f"--dashboard {spec!r}: expected LAYER:F1,F2,... (e.g. 0:3,17)") from None


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    cfg = load(args, extra)
    if cfg.dashboards:
        from clt_lens.features.dashboard import require_dashboard_scripts, require_sae_dashboard

        require_sae_dashboard()  # fail before the pass, not after it
        require_dashboard_scripts()
    out = run_features(cfg)
    manifest = json.loads((out / "features.json").read_text(encoding="utf-8"))
    timing = manifest["timing"]
    print(f"features: {out} ({manifest['n_tokens']} tokens, "
          f"{timing['tokens_per_second']:.0f} tokens/s, layers {manifest['layers']})")
    if cfg.dashboards:
        _dashboards(cfg, out)
    if cfg.neuronpedia:
        from clt_lens.features.neuronpedia import write_dashboard_batches, write_neuronpedia_export

        batches = write_dashboard_batches(out, model_id=cfg.neuronpedia_model_id)
        export = write_neuronpedia_export(out, model_id=cfg.neuronpedia_model_id)
        print(f"neuronpedia: {len(batches)} dashboard batches under "
              f"{out / 'neuronpedia' / 'dashboards'}; bulk export {export}")
    return 0


def _dashboards(cfg: FeaturesConfig, out: Path) -> None:
    import torch

    from clt_lens.clt.loading import load_clt, model_for
    from clt_lens.data import load_tokens
    from clt_lens.features.dashboard import write_dashboard

    manifest = json.loads((out / "features.json").read_text(encoding="utf-8"))
    clt = load_clt(manifest["checkpoint"])
    model, _ = model_for(clt, cfg.source.model, cfg.device)
    clt = clt.to(next(model.parameters()).device)
    ctx = manifest["context_size"]
    tokens = load_tokens(  # the text the statistics ran over (the source, resolved)
        manifest["dataset"], tokenizer=model.tokenizer, context_size=ctx, split=manifest["split"],
        max_tokens=cfg.dashboard_sequences * ctx, seed=cfg.seed, text_column=cfg.text_column,
    )
    for spec in cfg.dashboards:
        layer, feats = parse_dashboard_spec(spec)
        path = out / "dashboards" / f"layer_{layer:02d}.html"
        with torch.no_grad():
            write_dashboard(clt, layer, feats, model=model, tokens=tokens, out_html=path)
        print(f"dashboard: {path}")

