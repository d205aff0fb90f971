"""SourceConfig: where activations come from, one section shared by every command.

Caching, training, evaluation and feature statistics all read MLP activations of some model on
some dataset; their configs hold this section as ``source`` (``--source.model``,
``source: {model: ..., dataset: ...}`` in YAML) instead of repeating the fields. The old flat
spellings (``model:``, ``--dataset``) keep working through each config's ``renamed_keys``.
Commands that read a trained CLT (eval, features) hold :class:`CheckpointSourceConfig`, whose
unset fields come from the CLT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

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

    # fields for which None means "take it from the CLT" (CheckpointSourceConfig)
    from_checkpoint: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        for key in ("model", "dataset"):
            value = getattr(self, key)
            if not value and not (value is None and key in self.from_checkpoint):
                raise ConfigError(f"config key 'source.{key}' must name a {key}, got {value!r}")
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


@dataclass
class CheckpointSourceConfig(SourceConfig):
    """The ``source`` of a command that reads a trained CLT (``clt-lens eval``, ``clt-lens
    features``): unset fields are what the CLT was trained on, and its hooks are fixed."""

    # a load_model name or folder; default: the model the CLT was trained on (its
    # metadata.model_name, else "embedded")
    model: str | None = None
    # "embedded", a local folder of .txt/.jsonl/.parquet files, or a Hugging Face dataset name;
    # default: the CLT's training dataset (its run's train_config.json), else "embedded"
    dataset: str | None = None
    split: str = "heldout"  # dataset split to read
    # tokens per sequence; default: the checkpoint's context size, else the model's n_ctx
    context_size: int | None = None
    # "auto" = the hook the CLT was trained on (its cfg.json); another name is refused unless it
    # is that same hook: a CLT's numbers on a hook it was not trained on mean nothing
    input_hook: str = "auto"
    output_hook: str = "auto"  # "auto" = the CLT's output hook (see input_hook)

    from_checkpoint: ClassVar[tuple[str, ...]] = ("model", "dataset")

    def trained_hooks(self, input_hook: str, output_hook: str) -> HookSpec:
        """The hooks to read: the CLT's own (``input_hook``/``output_hook``, as it was trained).
        Raises ConfigError, naming both hooks, if this source asks for another one."""
        for key, asked, own in (("input_hook", self.input_hook, input_hook),
                                ("output_hook", self.output_hook, output_hook)):  # fmt: skip
            if asked not in ("auto", own):
                raise ConfigError(
                    f"config key 'source.{key}' is {asked!r}, but the CLT was trained on "
                    f"{key.replace('_', ' ')} {own!r} (hooks {input_hook} -> {output_hook}): a "
                    f"CLT can only be run on its own hooks; leave source.{key} 'auto'"
                )
        return HookSpec(input_hook, output_hook)


def flatten(d: dict[str, Any], section: str = "source") -> dict[str, Any]:
    """A config dict with its ``section`` mapping lifted to the top level (the on-disk form
    of caches written before the section existed, so their hashes and checks still agree)."""
    out = {k: v for k, v in d.items() if k != section}
    out.update(d.get(section, {}))
    return out
