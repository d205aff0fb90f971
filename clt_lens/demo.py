"""``clt-lens demo``: the whole path on the embedded default model.

Each stage is a call to the same public function its own subcommand uses; the demo only
chooses small sizes and puts everything under one output directory.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from clt_lens.data import load_tokens
    from clt_lens.models import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = load_model("embedded", device=args.device)
    cfg = model.cfg
    toks = load_tokens("embedded", tokenizer=model.tokenizer, context_size=cfg.n_ctx,
                       split="heldout", max_tokens=16 * cfg.n_ctx, shuffle=False)
    with torch.no_grad():
        loss = model(toks.to(args.device), return_type="loss").item()
    print("embedded model")
    print(f"  layers {cfg.n_layers}, d_model {cfg.d_model}, d_mlp {cfg.d_mlp}, "
          f"vocab {cfg.d_vocab}, context {cfg.n_ctx}")
    print(f"  held-out loss {loss:.3f} nats/token on {toks.numel()} tokens")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0
