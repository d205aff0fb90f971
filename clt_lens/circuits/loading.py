"""Loading circuit-tracer transcoder sets offline (CLT checkpoints: ``clt_lens.clt.loading``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clt_lens.circuits.errors import CircuitsError
from clt_lens.clt.loading import (  # noqa: F401  (re-exported: circuits code and users import them here)
    CheckpointError,
    clt_summary,
    load_clt,
    read_clt_config,
    resolve_checkpoint_dir,
)

CONFIG_YAML = "config.yaml"


def is_transcoder_set_dir(path: Any) -> bool:
    return isinstance(path, str | Path) and (Path(path).expanduser() / CONFIG_YAML).is_file()


def load_transcoders(
    set_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    lazy: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Load a circuit-tracer transcoder set from a local folder with circuit-tracer's own loader.

    ``circuit_tracer.utils.hf_utils.load_transcoder_from_hub`` treats an absolute folder holding
    ``config.yaml`` as a cache hit; any other string goes to the Hugging Face hub, so the folder is
    checked first. ``lazy=False`` reads every weight into memory (the folder may then go away).
    Returns ``(transcoders, config)``.
    """
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    d = Path(set_dir).expanduser().resolve()
    if not (d / CONFIG_YAML).is_file():
        raise CircuitsError(f"{str(d)!r} is not a circuit-tracer transcoder set (no {CONFIG_YAML})")
    transcoders, config = load_transcoder_from_hub(
        str(d),
        device=torch.device(device),
        dtype=dtype,
        lazy_encoder=lazy,
        lazy_decoder=lazy,
    )
    return transcoders, config
