"""``FeaturesConfig``: the settings of ``clt-lens features`` (``compute_feature_stats``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from clt_lens.config import ConfigError
from clt_lens.features.format import DEFAULT_SOURCESET
from clt_lens.source_config import SOURCE_RENAMES, CheckpointSourceConfig


@dataclass
class FeaturesConfig:
    """Settings of ``clt-lens features`` (every field is also a ``--key value`` override)."""

    checkpoint: str = ""  # CLT SAELens folder (e.g. runs/demo/final) or training run
    # the model, text (see clt_lens.data), split, context size and hooks to run; each defaults
    # to what the CLT was trained on (the split to "heldout")
    source: CheckpointSourceConfig = field(default_factory=CheckpointSourceConfig)
    n_tokens: int = 100_000  # tokens to run over
    batch_size: int = 32  # sequences per forward pass
    top_k: int = 20  # top-activating examples kept per feature
    n_quantiles: int = 5  # activation quantiles sampled for examples
    examples_per_quantile: int = 5  # examples per quantile
    n_negative: int = 10  # random non-activating examples per feature
    window: int = 32  # tokens per example context
    hist_bins: int = 64  # power of two; the written histogram keeps 1/2..1 of them
    n_logits: int = 10  # top/bottom logits each feature promotes
    logits_hist_bins: int = 40  # bins of the logit-effect histogram
    layers: list[int] | None = None  # source layers to describe; default: all
    sourceset: str = DEFAULT_SOURCESET  # Neuronpedia source-set name
    text_column: str = "text"  # column of a JSON/parquet dataset holding the text
    seed: int = 0  # seeds the choice of examples
    device: str | None = None  # default: the model's device
    out_dir: str | None = None  # features directory; default: CHECKPOINT/../features
    # also render SAE-Dashboard HTML for these features ("LAYER:F1,F2"; on the command line
    # --dashboard LAYER:F1,F2, repeatable)
    dashboards: list[str] = field(default_factory=list)
    dashboard_sequences: int = 64  # sequences SAE-Dashboard runs over
    neuronpedia: bool = False  # also write Neuronpedia dashboard batches and the bulk export
    neuronpedia_model_id: str | None = None  # Neuronpedia model id; default: the model name

    # the option names of the first CLI and of older YAML files (flat model:, dataset: ...)
    renamed_keys: ClassVar[dict[str, str]] = {
        **SOURCE_RENAMES,
        "tokens": "n_tokens", "out": "out_dir", "dashboard": "dashboards",
        "model_id": "neuronpedia_model_id",
    }

    def validate(self) -> None:
        self.source.validate()
        for name in ("n_tokens", "batch_size", "top_k", "window", "n_logits", "logits_hist_bins",
                     "examples_per_quantile", "dashboard_sequences"):
            if getattr(self, name) < 1:
                raise ConfigError(f"features config: {name} must be >= 1, got "
                                  f"{getattr(self, name)}")
        for name in ("n_quantiles", "n_negative"):
            if getattr(self, name) < 0:
                raise ConfigError(f"features config: {name} must be >= 0, got "
                                  f"{getattr(self, name)}")
        if self.hist_bins < 2 or self.hist_bins & (self.hist_bins - 1):
            raise ConfigError(f"features config: hist_bins must be a power of two >= 2, got "
                              f"{self.hist_bins}")
        if not self.sourceset or "/" in self.sourceset:
            raise ConfigError(f"features config: sourceset {self.sourceset!r} must be a non-empty "
                              "name without '/'")
