"""``clt-lens features CHECKPOINT``: feature statistics, plus optional SAE-Dashboard HTML and
Neuronpedia files.

    clt-lens features runs/demo/final --tokens 100000 [--out DIR] [--dataset embedded]
        [--split heldout] [--layers 0,2] [--model NAME] [--config features.yaml]
        [--dashboard 0:1,5,9 ...] [--neuronpedia [--model-id ID]] [--key value ...]

Any ``FeaturesConfig`` field can be set with ``--key value`` (e.g. ``--top_k 30 --window 24``)
or in the YAML file given by ``--config``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from clt_lens.config import load_config
from clt_lens.errors import InputError
from clt_lens.features.config import FeaturesConfig
from clt_lens.features.stats import run_features


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Any other FeaturesConfig field as --key value, e.g. --top_k 30 --n_quantiles 5 "
        "--examples_per_quantile 5 --n_negative 10 --window 32 --batch_size 32 --sourceset clt "
        "--seed 0."
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="CLT SAELens folder (e.g. runs/demo/final)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="held-out tokens to run over (default 100000)")
    parser.add_argument("--out", default=None,
                        help="features directory (default: CHECKPOINT/../features)")
    parser.add_argument("--dataset", default=None, help="dataset (default: embedded)")
    parser.add_argument("--split", default=None, help="split (default: heldout)")
    parser.add_argument("--layers", default=None, help="comma-separated source layers")
    parser.add_argument("--model", default=None,
                        help="model name or folder (default: the checkpoint's model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--config", default=None, help="YAML file of FeaturesConfig fields")
    parser.add_argument("--dashboard", action="append", default=None, metavar="LAYER:F1,F2",
                        help="also render SAE-Dashboard HTML for these features (repeatable)")
    parser.add_argument("--neuronpedia", action="store_true",
                        help="also write Neuronpedia dashboard batches and the bulk export")
    parser.add_argument("--model-id", default=None,
                        help="Neuronpedia model id for --neuronpedia (default: the model name)")


def parse_dashboard_spec(spec: str) -> tuple[int, list[int]]:
    """``"LAYER:F1,F2"`` -> (layer, [features])."""
    layer, sep, feats = spec.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(layer), [int(f) for f in feats.split(",") if f.strip()]
    except ValueError:
        raise InputError(f"--dashboard {spec!r}: expected LAYER:F1,F2,... (e.g. 0:3,17)") from None


def build_config(args: argparse.Namespace, extra: Sequence[str]) -> FeaturesConfig:
    overrides: dict[str, object] = {"checkpoint": args.checkpoint}
    for key, value in (("n_tokens", args.tokens), ("out", args.out), ("dataset", args.dataset),
                       ("split", args.split), ("layers", args.layers), ("model", args.model),
                       ("device", args.device), ("dashboard", args.dashboard)):
        if value is not None:
            overrides[key] = value
    if args.neuronpedia:
        overrides["neuronpedia"] = True
    from clt_lens.config import parse_overrides

    overrides.update(parse_overrides(list(extra)))
    cfg = load_config(FeaturesConfig, args.config, overrides)
    if cfg.out is None:
        cfg.out = str(Path(cfg.checkpoint).expanduser().resolve().parent / "features")
    for spec in cfg.dashboard:
        parse_dashboard_spec(spec)  # bad specs fail before the pass
    return cfg


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    cfg = build_config(args, extra)
    if cfg.dashboard:
        from clt_lens.features.dashboard import require_dashboard_scripts, require_sae_dashboard

        require_sae_dashboard()  # fail before the pass, not after it
        require_dashboard_scripts()
    out = run_features(cfg)
    manifest = json.loads((out / "features.json").read_text(encoding="utf-8"))
    timing = manifest["timing"]
    print(f"features: {out} ({manifest['n_tokens']} tokens, "
          f"{timing['tokens_per_second']:.0f} tokens/s, layers {manifest['layers']})")
    if cfg.dashboard:
        _dashboards(cfg, out)
    if cfg.neuronpedia:
        from clt_lens.features.neuronpedia import write_dashboard_batches, write_neuronpedia_export

        batches = write_dashboard_batches(out, model_id=args.model_id)
        export = write_neuronpedia_export(out, model_id=args.model_id)
        print(f"neuronpedia: {len(batches)} dashboard batches under "
              f"{out / 'neuronpedia' / 'dashboards'}; bulk export {export}")
    return 0


def _dashboards(cfg: FeaturesConfig, out: Path) -> None:
    import torch

    from clt_lens.clt.loading import load_clt
    from clt_lens.data import load_tokens
    from clt_lens.features.dashboard import write_dashboard
    from clt_lens.features.stats import _resolve_model

    manifest = json.loads((out / "features.json").read_text(encoding="utf-8"))
    clt = load_clt(manifest["checkpoint"])
    model, _ = _resolve_model(cfg.model, clt, cfg.device)
    clt = clt.to(next(model.parameters()).device)
    ctx = manifest["context_size"]
    tokens = load_tokens(
        cfg.dataset, tokenizer=model.tokenizer, context_size=ctx, split=cfg.split,
        max_tokens=cfg.dashboard_sequences * ctx, seed=cfg.seed, text_column=cfg.text_column,
    )
    for spec in cfg.dashboard:
        layer, feats = parse_dashboard_spec(spec)
        path = out / "dashboards" / f"layer_{layer:02d}.html"
        with torch.no_grad():
            write_dashboard(clt, layer, feats, model=model, tokens=tokens, out_html=path)
        print(f"dashboard: {path}")

