"""SourceConfig: where activations come from, one section shared by every command.

Caching, training, evaluation and feature statistics all read MLP activations of some model on
some dataset; their configs hold this section as ``source`` (``--source.model``,
``source: {model: ..., dataset: ...}`` in YAML) instead of repeating the fields. The old flat
spellings (``model:``, ``--dataset``) keep working through each config's ``renamed_keys``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clt_lens.activations import HookSpec
from clt_lens.config import ConfigError

SOURCE_FIELDS = ("model", "dataset", "split", "context_size", "input_hook", "output_hook")
SOURCE_RENAMES = {name: f"source.{name}" for name in SOURCE_FIELDS}


@dataclass
class SourceConfig:
    # "embedded", a local Hugging Face folder, or a TransformerLens model name
    model: str = "embedded"
    # "embedded", a local folder of .txt/.jsonl/.parquet files, or a Hugging Face dataset name
    dataset: str = "embedded"
    split: str = "train"  # dataset split to read
    context_size: int | None = None  # tokens per sequence; default: the model's n_ctx
    # Block-relative hook names; "auto" = the model family's default (clt_lens.models.SUPPORTED:
    # ln2.hook_normalized / hook_mlp_out for every supported family), or a cache's own hooks.
    # Resolved before anything is written, so saved configs hold the real names.
    input_hook: str = "auto"  # the hook the CLT reads
    output_hook: str = "auto"  # the hook the CLT reconstructs (see input_hook)

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("config key 'source.model' must name a model")
        if not self.dataset:
            raise ConfigError("config key 'source.dataset' must name a dataset")
        if self.context_size is not None and self.context_size < 2:
            raise ConfigError(
                f"config key 'source.context_size' must be >= 2, got {self.context_size}"
            )
        try:
            HookSpec(self.input_hook, self.output_hook)
        except ValueError as e:
            raise ConfigError(f"config keys source.input_hook/output_hook: {e}") from None

    @property
    def hooks(self) -> HookSpec:
        return HookSpec(self.input_hook, self.output_hook)


def flatten(d: dict[str, Any], section: str = "source") -> dict[str, Any]:
    """A config dict with its ``section`` mapping lifted to the top level (the on-disk form
    of caches written before the section existed, so their hashes and checks still agree)."""
    out = {k: v for k, v in d.items() if k != section}
    out.update(d.get(section, {}))
    return out
