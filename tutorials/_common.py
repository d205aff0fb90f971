"""Shared plumbing of tutorials 3-5: command-line flags and "get me a trained CLT".

Nothing here is new material: training is tutorial 1. The tutorials import this file as
``_common`` (Python puts a script's own folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

# What tutorial 1 writes; tutorials 3-5 reuse it when it is there.
TUTORIAL_1_CLT = Path("runs/tutorials/01/train/final")


def small_from_env() -> bool:
    return os.environ.get("CLT_LENS_TUTORIAL_SMALL", "").strip().lower() in ("1", "true", "yes")


def base_parser(doc: str, number: str) -> argparse.ArgumentParser:
    """--small, --out runs/tutorials/NN, --device and --clt, shared by tutorials 3-5."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", default=small_from_env(),
                   help="tiny sizes, runs in seconds (also: CLT_LENS_TUTORIAL_SMALL=1)")
    p.add_argument("--out", default=f"runs/tutorials/{number}", help="output directory")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    p.add_argument("--clt", default=None,
                   help="a trained CLT (SAELens folder or run directory). Default: tutorial "
                        f"1's {TUTORIAL_1_CLT} if it exists, else a quick one is trained")
    return p


def get_clt(args: argparse.Namespace, model: Any, out: Path) -> Path:
    """The CLT checkpoint folder to use: --clt, tutorial 1's, or a freshly trained one."""
    from clt_lens.training import CLTSpec, CLTTrainingRunner, TrainConfig

    if args.clt:
        path = Path(args.clt)
        if (path / "final" / "cfg.json").is_file():  # a run directory
            path = path / "final"
        if not (path / "cfg.json").is_file():
            raise SystemExit(f"--clt {args.clt}: no cfg.json there (give a SAELens folder "
                             "or a training run directory)")
        print(f"using the CLT in {path}")
        return path
    if not args.small and (TUTORIAL_1_CLT / "cfg.json").is_file():
        print(f"using tutorial 1's CLT in {TUTORIAL_1_CLT}")
        return TUTORIAL_1_CLT
    steps, d_sae, batch, sample = (20, 64, 128, 512) if args.small else (300, 256, 1024, 4096)
    print(f"training a quick CLT ({d_sae} features per layer, {steps} steps; "
          "run tutorial 1 first or pass --clt to skip this)")
    cfg = TrainConfig(
        clt=CLTSpec(d_sae=d_sae, sparsity_coeff=0.3), n_steps=steps, batch_size=batch,
        sparsity_warmup_steps=steps // 3, lr_warmup_steps=steps // 10,
        normalization_tokens=sample, heldout_tokens=sample // 2, eval_every=steps,
        stream_sequences_per_refill=8 if args.small else 32, device=args.device,
        out_dir=str(out / "train"),
        progress=not args.small,
    )
    CLTTrainingRunner(cfg, override_model=model).run()
    return out / "train" / "final"
