"""``clt-lens export CHECKPOINT OUT_DIR [--layout auto|cross_layer|per_layer] [--dtype ...]``:
write a CLT as a circuit-tracer transcoder set (loadable with circuit-tracer's ``load_clt`` /
``load_transcoder_set``, or ``load_transcoder_from_hub`` on the absolute path)."""

from __future__ import annotations

import argparse

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="CLT SAELens folder or training run directory")
    p.add_argument("out_dir", help="folder to write (replaced if it is a transcoder set)")
    p.add_argument("--layout", choices=["auto", "cross_layer", "per_layer"], default="auto",
                   help="auto: a CLT as cross_layer_transcoder, a per-layer CLT as "
                   "transcoder_set")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--model-name", default=None, help="model_name written to config.yaml")
    p.add_argument("--scan", default=None, help="transcoder identifier written to config.yaml")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from clt_lens.circuits.errors import CircuitsError
    from clt_lens.circuits.export import write_circuit_tracer_set

    if extra:
        raise CircuitsError(f"unknown options {extra}")
    out = write_circuit_tracer_set(
        args.checkpoint, args.out_dir, dtype=DTYPES[args.dtype], model_name=args.model_name,
        layout=args.layout, scan=args.scan,
    )
    print(f"circuit-tracer transcoder set written to {out}")
    return 0
