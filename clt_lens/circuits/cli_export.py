"""``clt-lens export [CONFIG.yaml] CHECKPOINT OUT_DIR [--field value ...]``: write a CLT as a
circuit-tracer transcoder set (loadable with circuit-tracer's ``load_clt`` /
``load_transcoder_set``, or ``load_transcoder_from_hub`` on the absolute path)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import torch

from clt_lens.cli_args import add_config_arguments, add_positionals, command_config

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ExportConfig:
    checkpoint: str  # CLT SAELens folder or training run directory
    out_dir: str  # folder to write (replaced if it is a transcoder set)
    # auto: a CLT as cross_layer_transcoder, a per-layer CLT as transcoder_set
    layout: Literal["auto", "cross_layer", "per_layer"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # dtype of the written weights
    model_name: str | None = None  # model_name written to config.yaml; default: the CLT's
    scan: str | None = None  # transcoder identifier written to config.yaml


CONFIG = ExportConfig
POSITIONALS = ("checkpoint", "out_dir")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "clt-lens export [CONFIG.yaml] CHECKPOINT OUT_DIR [--field value ...]"
    add_positionals(p, *POSITIONALS)
    add_config_arguments(p, ExportConfig)


def load(args: argparse.Namespace, extra: list[str]) -> ExportConfig:
    return command_config(ExportConfig, args, extra, "export", POSITIONALS)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from clt_lens.circuits.export import write_circuit_tracer_set

    cfg = load(args, extra)
    out = write_circuit_tracer_set(
        cfg.checkpoint, cfg.out_dir, dtype=DTYPES[cfg.dtype], model_name=cfg.model_name,
        layout=cfg.layout, scan=cfg.scan,
    )
    print(f"circuit-tracer transcoder set written to {out}")
    return 0
