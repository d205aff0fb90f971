"""EvalConfig: what ``clt-lens eval`` measures and where it writes, one field per option.

Where the activations come from is the ``source`` section shared with the other commands
(:class:`~clt_lens.source_config.CheckpointSourceConfig`: unset, it is what the CLT was trained
on); the flat ``--model``, ``--dataset``, ``--split``, ``--context_size`` of the first CLI still
work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from clt_lens.config import ConfigError
from clt_lens.source_config import SOURCE_RENAMES, CheckpointSourceConfig


@dataclass
class EvalConfig:
    checkpoint: str  # CLT SAELens folder or training run directory
    # the model, dataset, split, context size and hooks the metrics are measured on; each
    # defaults to what the CLT was trained on (the split to "heldout")
    source: CheckpointSourceConfig = field(default_factory=CheckpointSourceConfig)
    n_tokens: int = 16384  # tokens for FVU/L0/CE/KL
    batch_size: int = 16  # sequences per forward pass
    # also splice each layer's reconstruction alone (per-layer CE/KL); false skips it
    single_layer_splices: bool = True
    device: str = "cpu"  # torch device (cpu, cuda, cuda:1, mps)
    out_dir: str | None = None  # output directory; default CHECKPOINT/eval
    # count feature firing over this many tokens of the split (at most all of it) for the
    # dead fraction; 0 skips it
    density_tokens: int = 131072
    # attribute this many held-out prompts with circuit-tracer and report replacement,
    # completeness, path length, graph size and faithfulness (slow: ~seconds per prompt)
    graph_prompts: int = 0
    # circuit-tracer max_feature_nodes for the graphs; default: every active feature
    graph_max_feature_nodes: int | None = None
    graph_ablate: int = 24  # features ablated per graph for the faithfulness score; 0 skips

    # the option names of the first CLI (``--tokens``, ``--out``, ``--graphs``, ...)
    renamed_keys: ClassVar[dict[str, str]] = {
        **SOURCE_RENAMES,
        "tokens": "n_tokens", "out": "out_dir", "graphs": "graph_prompts",
        "graph_max_nodes": "graph_max_feature_nodes", "ablate": "graph_ablate",
    }

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("config key 'checkpoint' must name a CLT checkpoint")
        self.source.validate()
        for key in ("n_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("density_tokens", "graph_prompts", "graph_ablate"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key '{key}' must be >= 0, got {getattr(self, key)}")
        if self.graph_max_feature_nodes is not None and self.graph_max_feature_nodes < 1:
            raise ConfigError("config key 'graph_max_feature_nodes' must be >= 1 or unset")
